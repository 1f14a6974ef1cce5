"""Who may use the HIL Server: API tokens (`HIL_API_TOKENS`), the worker token (`HIL_WORKER_TOKEN`), and the one
rule for which questions a token may see.

`AuthMiddleware` checks the API token before anything else runs (no body is parsed for a caller without a valid
token) and leaves the caller's `Grant` in the ASGI scope, where handlers read it with `grant_of()`.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from hil_protocol.http_errors import send_error

from .models import Session

GRANT_KEY = "hil.grant"
# Where a caller sets its token, said in a 401: hil-mcp on stdio has a flag, a remote MCP client sends a header.
HIL_MCP_TOKEN = "hil-mcp: --api-token or HIL_API_TOKEN"
MCP_CLIENT_TOKEN = "a remote MCP client sends it as an HTTP header: add 'headers' to its /mcp server entry"
# Routes anyone may call: health, the service banner, the API docs, the robot callback (authenticated by its own
# rules) and the worker socket (the worker token).
PUBLIC_PATHS = frozenset(
    {"/", "/health", "/api/health", "/api/callback", "/ws", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


class AuthError(Exception):
    """The caller has no valid token (401) or may not do this (403). `str()` says what to configure."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Grant:
    """What one API token may do. `chats` is None when the token may write to any chat; otherwise the first chat is
    the token's default."""

    owner: str  # a stable, non-secret name for the token (a hash prefix), used to scope sessions and in logs
    chats: tuple[str, ...] | None

    @property
    def default_chat(self) -> str | None:
        return self.chats[0] if self.chats else None

    def may_write(self, chat_id: str | None) -> bool:
        return self.chats is None or chat_id in self.chats


def can_see(grant: Grant | None, session: Session) -> bool:
    """The one visibility rule: with tokens off everyone sees everything; with tokens on, a token sees only the
    questions it asked (whatever chats it may write to), so no caller reads another's answers."""
    return grant is None or session.owner == grant.owner


def parse_tokens(spec: str | None) -> list[tuple[bytes, Grant]]:
    """`tokA,tokB=chat1|chat2` -> [(token bytes, Grant)]. Raises ValueError naming the entry (never its value)."""
    grants: list[tuple[bytes, Grant]] = []
    for position, item in enumerate((spec or "").split(","), start=1):
        item = item.strip()
        if not item:
            continue
        token, bound, chats = item.partition("=")
        token = token.strip()
        chat_list = tuple(dict.fromkeys(c.strip() for c in chats.split("|") if c.strip()))
        if not token:
            raise ValueError(f"HIL_API_TOKENS entry {position} has no token before '='")
        if bound and not chat_list:
            # "tok=" would otherwise be a token that may write anywhere: refuse instead of widening it.
            raise ValueError(
                f"HIL_API_TOKENS entry {position} ends in '=' with no chat after it; list its chats "
                "(tok=chatA|chatB) or drop the '=' to let it write to any chat"
            )
        owner = "tok-" + hashlib.sha256(token.encode()).hexdigest()[:8]
        grants.append((token.encode(), Grant(owner=owner, chats=chat_list or None)))
    return grants


class ApiAuth:
    def __init__(self, spec: str | None) -> None:
        self._grants = parse_tokens(spec)

    @property
    def enabled(self) -> bool:
        return bool(self._grants)

    def grant_for(self, authorization: str | None, where: str = HIL_MCP_TOKEN) -> Grant | None:
        """The caller's grant from its Authorization header; None when tokens are off. Raises AuthError(401).
        `where` tells the caller where its token is set (hil-mcp's flag, or a remote MCP client's header)."""
        if not self._grants:
            return None
        given = bearer_token(authorization)
        if not given:
            raise AuthError(
                401, f"this HIL Server requires an API token: send 'Authorization: Bearer <token>' ({where})"
            )
        found: Grant | None = None
        candidate = given.encode("utf-8", "surrogateescape")
        # Compare against every token, in constant time each, so timing tells nothing about which one matched.
        for token, grant in self._grants:
            if hmac.compare_digest(token, candidate):
                found = grant
        if found is None:
            raise AuthError(401, f"API token not accepted: check it against the server's HIL_API_TOKENS ({where})")
        return found

    @staticmethod
    def check_chat(grant: Grant | None, chat_id: str | None) -> None:
        if grant is None or grant.may_write(chat_id):
            return
        allowed = ", ".join(sorted(grant.chats or ()))
        raise AuthError(
            403,
            f"this API token may only write to chat(s) {allowed}; "
            f"pass one of them as chat_id (hil-mcp: --chat-id / DEFAULT_CHAT_ID)",
        )


class AuthMiddleware:
    """Pure ASGI: every HTTP route outside PUBLIC_PATHS needs a valid API token when tokens are configured."""

    def __init__(self, app: ASGIApp, auth: ApiAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.auth.enabled and scope["path"] not in PUBLIC_PATHS:
            authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            try:
                where = MCP_CLIENT_TOKEN if scope["path"] == "/mcp" else HIL_MCP_TOKEN
                scope[GRANT_KEY] = self.auth.grant_for(authorization.decode("latin-1"), where)
            except AuthError as exc:
                await send_error(send, exc.status, str(exc), headers=[(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


def grant_of(conn: HTTPConnection) -> Grant | None:
    """The caller's grant, as AuthMiddleware found it (None when tokens are off)."""
    return conn.scope.get(GRANT_KEY)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (maybe empty); None for no header or another scheme."""
    scheme, space, given = (authorization or "").partition(" ")
    return given.strip() if space and scheme.lower() == "bearer" else None


def worker_token_ok(expected: str | None, query_token: str | None, authorization: str | None) -> bool:
    if not expected:
        return True
    given = bearer_token(authorization)
    if given is None:
        given = query_token or ""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())
