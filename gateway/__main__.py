"""`python -m gateway` is the `agnes-gateway` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
