"""A minimal aiohttp pass-through proxy: the floor of what any aiohttp-based gateway costs.

    python benchmarks/passthrough.py --port 8081 --upstream http://127.0.0.1:8090

No auth, no quota, no routing, no logging: method, path, Authorization, Content-Type and body go
upstream on one shared keep-alive session; status, Content-Type and body come back.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str) -> web.Application:
    app = web.Application()

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k in ("Authorization", "Content-Type") if (v := request.headers.get(k)) is not None}
        body = await request.read() if request.can_read_body else None
        async with request.app[SESSION].request(
            request.method, upstream + request.path_qs, headers=headers, data=body
        ) as resp:
            data = await resp.read()
            return web.Response(status=resp.status, body=data, headers={"Content-Type": resp.content_type})

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(create_app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
