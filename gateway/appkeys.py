"""Typed application state shared by the HTTP modules."""

from __future__ import annotations

from aiohttp import web

from .service import Gateway

GATEWAY = web.AppKey("gateway", Gateway)
