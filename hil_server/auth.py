"""API tokens (`HIL_API_TOKENS`) and the worker token (`HIL_WORKER_TOKEN`)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request


@dataclass(frozen=True)
class Grant:
    """What one API token may do. `chats` is None when the token may write to any chat."""

    owner: str  # a stable, non-secret name for the token (a hash prefix), used to scope sessions and in logs
    chats: frozenset[str] | None


def parse_tokens(spec: str | None) -> list[tuple[bytes, Grant]]:
    """`tokA,tokB=chat1|chat2` -> [(token bytes, Grant)]."""
    grants: list[tuple[bytes, Grant]] = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        token, _, chats = item.partition("=")
        token = token.strip()
        owner = "tok-" + hashlib.sha256(token.encode()).hexdigest()[:8]
        chat_set = frozenset(c.strip() for c in chats.split("|") if c.strip()) or None
        grants.append((token.encode(), Grant(owner=owner, chats=chat_set)))
    return grants


class ApiAuth:
    def __init__(self, spec: str | None) -> None:
        self._grants = parse_tokens(spec)

    @property
    def enabled(self) -> bool:
        return bool(self._grants)

    def check(self, request: Request) -> Grant | None:
        """The caller's grant, None when tokens are off. Raises 401 when a token is needed and not valid."""
        if not self._grants:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                401,
                "this HIL Server requires an API token: send 'Authorization: Bearer <token>' "
                "(hil-mcp: --api-token or HIL_API_TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        found: Grant | None = None
        candidate = given.strip().encode()
        # Compare against every token, in constant time each, so timing tells nothing about which one matched.
        for token, grant in self._grants:
            if hmac.compare_digest(token, candidate):
                found = grant
        if found is None:
            raise HTTPException(
                401,
                "API token not accepted: check --api-token / HIL_API_TOKEN against the server's HIL_API_TOKENS",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return found

    @staticmethod
    def check_chat(grant: Grant | None, chat_id: str | None) -> None:
        if grant is None or grant.chats is None:
            return
        if chat_id not in grant.chats:
            allowed = ", ".join(sorted(grant.chats))
            raise HTTPException(
                403,
                f"this API token may only write to chat(s) {allowed}; "
                f"pass one of them as chat_id (hil-mcp: --chat-id / DEFAULT_CHAT_ID)",
            )


def worker_token_ok(expected: str | None, query_token: str | None, authorization: str | None) -> bool:
    if not expected:
        return True
    given = query_token or ""
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    return hmac.compare_digest(given.encode(), expected.encode())
