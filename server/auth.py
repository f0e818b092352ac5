"""Bearer API-key authentication, as an ASGI middleware in front of every route.

Owns which paths are public and how keys are compared. Keys are compared as sha256 digests with
`hmac.compare_digest` (vLLM's scheme): the time taken does not depend on how much of a key matched,
nor on its length. Knows nothing of the routes behind it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import unauthorized

# Probes and scrapers run without credentials (vLLM keeps the same set open).
PUBLIC_PATHS = frozenset({"/health", "/version", "/metrics"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class APIKeyMiddleware:
    """Answer 401 (OpenAI error shape) unless the request carries `Authorization: Bearer <key>`
    for one of `api_keys`. Public paths and non-HTTP scopes pass through."""

    def __init__(self, app: ASGIApp, api_keys: Iterable[str]) -> None:
        self.app = app
        self._digests = [_digest(key) for key in api_keys]
        if not self._digests:
            raise ValueError("APIKeyMiddleware needs at least one key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await unauthorized().to_response()(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = _digest(token.strip())
        # Compare against every key (no early exit), so timing does not reveal which one matched.
        matches = [hmac.compare_digest(given, digest) for digest in self._digests]
        return any(matches)
