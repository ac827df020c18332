"""The one way the gateway words its own errors: `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """An answer the gateway makes itself (not one passed on from upstream)."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "upstream_error")


def error_body(status: int, code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"message": message, "type": GatewayError(status, code, message).type, "code": code}}


def error_response(error: GatewayError) -> web.Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return web.json_response(error_body(error.status, error.code, error.message), status=error.status, headers=headers)
