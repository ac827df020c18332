"""What every answered request leaves behind: its metrics and its access line (the middleware's and the fast path's)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from . import logs
from .metrics import GatewayMetrics

access_log = logging.getLogger("agnes_gateway.access")

#: Probes and scrapes arrive every few seconds: their access lines are DEBUG, their metrics still count.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
#: Status logged and counted when the client went away before the answer (as nginx does).
CLIENT_CLOSED = 499


def answered(
    metrics: GatewayMetrics,
    *,
    rid: str,
    method: str,
    route: str,
    status: int,
    client: str | None,
    key: str | None,
    seconds: float,
    calls: Sequence[logs.UpstreamCall] = (),
) -> None:
    """Count the request and write its access line, and its upstream calls' lines, on the loop's next turn.

    The answer leaves first: none of this is on the way to the client. A request whose one upstream
    call succeeded gets one line, with that call's outcome, status and time on it; any other calls get
    their own lines.
    """
    calls = tuple(calls)  # the request's list may still grow after it has been answered

    def account() -> None:
        metrics.request(route, status, seconds)
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        enabled = access_log.isEnabledFor(level)
        call = calls[0] if len(calls) == 1 and enabled else None
        if call is None:
            for each in calls:
                each.log()
        if not enabled:
            return
        ms = seconds * 1000
        fields: dict[str, object] = {
            "request_id": rid,
            "method": method,
            "route": route,
            "status": status,
            "client": client,
            "key": key,
            "duration_ms": round(ms, 1),
        }
        message = f"{method} {route} {status} client={client or '-'} key={key or '-'} {ms:.1f}ms"
        if call is not None:
            upstream_status = "-" if call.status is None else call.status
            message += f" upstream={call.outcome} {upstream_status} {call.duration_ms:.1f}ms"
            fields["operation"] = call.operation
            fields["outcome"] = call.outcome
            fields["upstream_status"] = call.status
            fields["upstream_ms"] = round(call.duration_ms, 1)
        logs.log_line(access_log, level, message, fields)

    asyncio.get_running_loop().call_soon(account)
