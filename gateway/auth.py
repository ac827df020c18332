"""Who is calling: bearer tokens compared in constant time."""

from __future__ import annotations

import hmac

from .config import ClientConfig, Secret

ANONYMOUS = "anonymous"


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def matches(token: str, secret: Secret) -> bool:
    """Constant-time comparison, so response times do not reveal how much of a token was right."""
    # surrogateescape: a header with bytes that are not UTF-8 is compared as those bytes, never an error.
    return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), secret.reveal().encode())


def identify(clients: tuple[ClientConfig, ...], header: str | None) -> str | None:
    """The name of the client presenting `header`; ANONYMOUS when no clients are configured; None if refused."""
    if not clients:
        return ANONYMOUS
    token = bearer(header)
    if token is None:
        return None
    found: str | None = None
    for client in clients:  # every token is compared, so timing does not tell which one matched
        if matches(token, client.token):
            found = client.name
    return found
