"""`/mcp`: hil-mcp's tools over MCP streamable HTTP, served by the HIL Server itself.

An agent adds one URL and a bearer token instead of running hil-mcp. The tools are `mcp_server.tools`, the same code
hil-mcp runs on stdio; here their backend is the service, called in-process with the caller's token grant.

Every request passes `McpEndpoint`'s checks before the MCP SDK sees it: without `HIL_API_TOKENS` only clients on this
machine (loopback address and Host, not through a proxy); an `Origin` header must be allowed (DNS rebinding, as the MCP
spec requires); then the token (401 with `WWW-Authenticate`) and the chat given in the URL (`?chat_id=`, 403 when the
token may not write there). A cut stream or a cancelled call is a cancelled wait: the question stays open.

Lanes: a question asked here remembers its MCP session (`Mcp-Session-Id`), so `wait_for_reply()` without an id
resumes only a question of the same session; a client without sessions (the 2026 protocol) has the lane of its
token, chat and project. Sessions are capped per token and in all (`mcp_sessions.SessionBook`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.datastructures import Headers, QueryParams
from starlette.types import Message, Receive, Scope, Send

from hil_protocol.http_errors import error_response
from hil_protocol.validation import problems
from mcp_server.backend import BackendError, Outgoing, Polled, QuestionRef, Sent
from mcp_server.tools import Caller, OpenQuestions, ToolSettings, build_server

from . import errors
from .api import NOT_FOUND
from .auth import ApiAuth, AuthError, Grant, can_see, grant_of
from .config import ServerSettings
from .errors import InvalidRequest
from .mcp_sessions import SessionBook
from .models import SendRequest, Session
from .service import HilService

logger = logging.getLogger(__name__)

PATH = "/mcp"
_CALLER_KEY = "hil.mcp_caller"
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_LANE_MEMORIES = 4096  # lanes whose reuse-of-open-questions memory is kept (least recently used go first)


# --- the in-process backend --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lane:
    """Whose questions `wait_for_reply()` without an id may resume: those asked in this MCP session, or (no session)
    those asked outside sessions with these defaults. Always within one token."""

    mcp_session: str | None
    chat_id: str | None
    project_name: str | None


class ServiceBackend:
    """`mcp_server.backend.Backend` on the service, with one API token's rights (None: tokens are off)."""

    def __init__(self, service: HilService, grant: Grant | None, lane: Lane | None = None) -> None:
        self.service = service
        self.grant = grant
        self.owner = grant.owner if grant else None
        self.lane = lane or Lane(None, None, None)

    async def _visible(self, ref: str) -> Session | None:
        # The one visibility rule: another token's question does not exist for this caller.
        session = await self.service.find(ref)
        return session if session is not None and can_see(self.grant, session) else None

    async def send(self, outgoing: Outgoing) -> Sent:
        try:
            ApiAuth.check_chat(self.grant, outgoing.chat_id)
        except AuthError as exc:
            raise BackendError(str(exc)) from exc
        try:
            request = SendRequest.model_validate(outgoing.model_dump(exclude_none=True))
        except ValidationError as exc:
            raise BackendError(f"the question was refused: {problems(exc.errors(), default='body')}") from exc
        try:
            sent = await self.service.send(request, owner=self.owner, mcp_session=self.lane.mcp_session)
        except InvalidRequest as exc:  # refused with this server's settings (e.g. its default responders)
            raise BackendError(f"the question was refused: {exc}") from exc
        return Sent.model_validate(sent.model_dump())

    async def poll(self, ref: str, wait: float) -> Polled:
        session = await self._visible(ref)
        if session is None:
            return Polled(session_id=ref, status="not_found", message=NOT_FOUND)
        return Polled.model_validate((await self.service.poll(session, wait)).model_dump())

    async def mark_timeout(self, ref: str) -> None:
        session = await self._visible(ref)
        if session is not None:
            await self.service.mark_timeout(session)

    async def upload_image(self, path: Path) -> str:
        # The tools refuse image_paths before they get here; a path on this server is never the agent's file.
        raise BackendError("image files cannot be read over /mcp")

    async def open_questions(self) -> list[QuestionRef]:
        lane = self.lane
        found = await self.service.open_questions(
            self.owner, mcp_session=lane.mcp_session, chat_id=lane.chat_id, project_name=lane.project_name
        )
        return [
            QuestionRef(session_id=s.session_id, short_id=s.short_id, project_name=s.project_name, message=s.message)
            for s in found
        ]


# --- who is calling -----------------------------------------------------------------------------------------------


class Hangup:
    """Fired when the client's HTTP stream goes away; a waiting tool registers its cancel here."""

    __slots__ = ("_callbacks", "fired")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], object]] = []
        self.fired = False

    def add(self, callback: Callable[[], object]) -> None:
        if self.fired:
            callback()
        else:
            self._callbacks.append(callback)

    def discard(self, callback: Callable[[], object]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def fire(self) -> None:
        self.fired = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


@dataclass(frozen=True)
class CallerInfo:
    """What the checks established about one HTTP request, handed to the tools through the ASGI scope."""

    grant: Grant | None
    chat_id: str | None
    project_name: str | None
    hangup: Hangup = field(default_factory=Hangup)
    mcp_session: str | None = None  # the request's Mcp-Session-Id, once the SDK will check it (2025 protocol)

    @property
    def lane(self) -> Lane:
        return Lane(self.mcp_session, self.chat_id, self.project_name)


@dataclass
class EndpointHost:
    """The tools' `ToolHost` on the server: a backend per call with the caller's grant, memory per token."""

    tool_settings: ToolSettings
    service: HilService
    memories: OrderedDict[tuple[str | None, Lane], OpenQuestions] = field(default_factory=OrderedDict)

    def memory(self, owner: str | None, lane: Lane) -> OpenQuestions:
        """The lane's memory of questions asked through it (to reuse one asked again while still open)."""
        key = (owner, lane)
        memory = self.memories.pop(key, None) or OpenQuestions()
        self.memories[key] = memory
        while len(self.memories) > _LANE_MEMORIES:
            self.memories.popitem(last=False)
        return memory

    def caller(self, ctx: Context) -> Caller:
        request = ctx.request_context.request
        info = request.scope.get(_CALLER_KEY) if request is not None else None
        if not isinstance(info, CallerInfo):
            raise ToolError("this call did not come through /mcp's checks")
        owner = info.grant.owner if info.grant else None
        return Caller(
            backend=ServiceBackend(self.service, info.grant, info.lane),
            memory=self.memory(owner, info.lane),
            settings=self.tool_settings,
            chat_id=info.chat_id,
            project_name=info.project_name,
            hangup=info.hangup,
        )


# --- the endpoint ---------------------------------------------------------------------------------------------------


class McpEndpoint:
    """The ASGI app at `/mcp`. Built by `create_app`; `run(service)` goes in its lifespan."""

    def __init__(self, settings: ServerSettings, auth: ApiAuth) -> None:
        self.auth = auth
        self.allowed_origins = frozenset(
            o.strip().rstrip("/").lower() for o in settings.hil_mcp_allowed_origins.split(",") if o.strip()
        )
        self.tool_settings = ToolSettings(
            timeout=settings.hil_default_timeout,
            heartbeat=settings.hil_mcp_heartbeat,
            poll_interval=1.0,
            send_timeout=None,
            local_files=False,
            max_call=settings.hil_mcp_max_call,
            long_call_clients=frozenset(
                name.strip() for name in settings.hil_mcp_long_call_clients.split(",") if name.strip()
            ),
        )
        self.sessions = SessionBook(settings.hil_mcp_sessions_per_token, settings.hil_mcp_max_sessions)
        self._session_idle = settings.hil_mcp_session_idle
        self._host: EndpointHost | None = None

        @contextlib.asynccontextmanager
        async def lifespan(server: MCPServer[EndpointHost]) -> AsyncIterator[EndpointHost | None]:
            yield self._host

        self.server = build_server(lifespan)
        self._max_body_bytes = settings.max_body_bytes
        self._manager: StreamableHTTPSessionManager | None = None
        self.warn_open = True  # False: the loopback sandbox, which leaves tokens unset itself

    @contextlib.asynccontextmanager
    async def run(self, service: HilService) -> AsyncIterator[None]:
        if not self.auth.enabled and self.warn_open:
            logger.warning(
                "HIL_API_TOKENS is not set: /mcp answers only clients on this machine (set tokens to serve others)"
            )
        # A session manager runs once; an app's lifespan may run again (tests), so each run gets its own.
        self.server.streamable_http_app(
            streamable_http_path=PATH,
            # The Host/Origin rules are ours (below): the SDK's allow-list would need the public host name up front.
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            max_request_body_size=self._max_body_bytes,
            session_idle_timeout=self._session_idle,
            # A backstop only: our check answers first, with a reason, and lets a token at its own cap open one more
            # for a moment (it then closes its own oldest).
            max_sessions=self.sessions.total + self.sessions.per_token,
        )
        manager = self.server.session_manager
        self._host = EndpointHost(self.tool_settings, service)
        try:
            async with manager.run():
                self._manager = manager
                self.sessions.bind(manager)
                yield
        finally:
            self.sessions.bind(None)
            self._manager = None
            self._host = None

    def problems(self) -> list[str]:
        """Why /mcp cannot take new clients now (for /health): empty when it can."""
        return self.sessions.problems()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = Headers(scope=scope)
        manager = self._manager
        if manager is None:
            await _refuse(503, "the HIL Server is starting or stopping; try again", scope, receive, send)
            return
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _refuse(403, refusal, scope, receive, send)
            return
        grant = grant_of(Request(scope))  # AuthMiddleware checked the token before anything ran
        try:
            info = self._caller_info(grant, QueryParams(scope.get("query_string", b"")))
        except (AuthError, InvalidRequest) as exc:
            await errors.render(exc)(scope, receive, send)
            return
        if scope["method"] == "GET":
            # No stream outside a call: everything this server sends answers a call, on that call's own stream
            # (the spec lets a server answer 405 here). A held GET per session costs ~50 KB for nothing.
            await error_response(
                405, "this server sends messages only on the stream of a call", headers={"Allow": "POST, DELETE"}
            )(scope, receive, send)
            return
        # The SDK serves the 2025 protocol (sessions) unless the request names a later version; only there does it
        # check an Mcp-Session-Id (it exists, and this token opened it), so only there is it the caller's lane.
        version = headers.get("mcp-protocol-version")
        sessions = version is None or version in HANDSHAKE_PROTOCOL_VERSIONS
        session_id = headers.get("mcp-session-id") if sessions else None
        owner = grant.owner if grant else None
        opening = sessions and session_id is None and scope["method"] == "POST"
        if opening and (full := self.sessions.refusal(owner)) is not None:
            await _refuse(503, full, scope, receive, send)
            return
        scope[_CALLER_KEY] = dataclasses.replace(info, mcp_session=session_id)
        if grant is not None:
            # The SDK binds a session to the principal that opened it: another token cannot use its session id.
            scope["user"] = AuthenticatedUser(AccessToken(token="-", client_id=grant.owner, scopes=[]))
        hangup = info.hangup

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                hangup.fire()
            return message

        async def watched_send(message: Message) -> None:
            if opening and message["type"] == "http.response.start" and message["status"] < 400:
                # Counted (and the token's oldest closed past its cap) before the client hears of the new session.
                for new in Headers(raw=message.get("headers", [])).getlist("mcp-session-id"):
                    await self.sessions.opened(owner, new)
            await send(message)

        with self.sessions.using(session_id):
            await manager.handle_request(scope, watched_receive, watched_send)

    def _refusal(self, scope: Scope, headers: Headers) -> str | None:
        """Why this request may not reach /mcp (its client or its Origin), or None."""
        local = _is_loopback_host(headers.get("host", ""))
        if not self.auth.enabled:
            client = scope.get("client")
            proxied = "x-forwarded-for" in headers or "forwarded" in headers
            if not (client and _is_loopback_ip(client[0]) and local and not proxied):
                return (
                    "this HIL Server has no HIL_API_TOKENS, so /mcp answers only clients on its own machine; "
                    "set HIL_API_TOKENS on the server and send 'Authorization: Bearer <token>'"
                )
        origin = headers.get("origin")
        if origin is None:
            return None  # not a browser: MCP clients in editors and terminals send none
        normalized = origin.strip().rstrip("/").lower()
        if normalized in self.allowed_origins or (local and _is_loopback_origin(normalized)):
            return None
        return (
            f"Origin {origin[:100]!r} may not use /mcp (DNS-rebinding protection); "
            "a browser-based client's origin must be listed in the server's HIL_MCP_ALLOWED_ORIGINS"
        )

    def _caller_info(self, grant: Grant | None, query: QueryParams) -> CallerInfo:
        chat_id = query.get("chat_id") or None
        project_name = query.get("project_name") or None
        if chat_id or project_name:
            try:  # the rules of /api/send for these two fields
                checked = SendRequest(message="-", chat_id=chat_id, project_name=project_name)
            except ValidationError as exc:
                raise InvalidRequest(f"the /mcp URL: {problems(exc.errors(), default='body')}") from exc
            chat_id, project_name = checked.chat_id, checked.project_name
        if chat_id:
            ApiAuth.check_chat(grant, chat_id)
        elif grant is not None:
            chat_id = grant.default_chat
        return CallerInfo(grant, chat_id, project_name)


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_loopback_host(host: str) -> bool:
    """A Host header (name[:port] or [v6]:port) naming this machine."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest  # anything but ":digits" after "]" is refused below
    else:
        name, _, port = host.partition(":")
    if port and not port.isdigit():
        return False
    return name in _LOOPBACK_HOSTS or _is_loopback_ip(name)


def _is_loopback_origin(origin: str) -> bool:
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and "/" not in rest and _is_loopback_host(rest)


async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
    logger.info("/mcp refused: HTTP %d %s", status, message)
    await error_response(status, message)(scope, receive, send)


__all__ = ["PATH", "McpEndpoint", "ServiceBackend"]
