"""Typed application state shared by the HTTP modules."""

from __future__ import annotations

from aiohttp import web

from .metrics import GatewayMetrics
from .reload import Reloader
from .retention import Retention
from .service import Gateway

GATEWAY = web.AppKey("gateway", Gateway)
METRICS = web.AppKey("metrics", GatewayMetrics)
RELOADER = web.AppKey("reloader", Reloader)
RETENTION = web.AppKey("retention", Retention)
