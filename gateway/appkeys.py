"""Typed application state shared by the HTTP modules."""

from __future__ import annotations

from aiohttp import web

from .metrics import GatewayMetrics
from .service import Gateway

GATEWAY = web.AppKey("gateway", Gateway)
METRICS = web.AppKey("metrics", GatewayMetrics)
