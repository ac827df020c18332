"""agnes-gateway: a drop-in gateway for the Agnes video API over a pool of keys."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
