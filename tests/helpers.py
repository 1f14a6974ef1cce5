"""Helpers the tests and the benchmark share: free ports, environments without the test runner's settings, robot
callbacks, quote-replies and pictures as WeCom sends them, waiting for a condition, a throwaway TLS certificate, and
the chat page in a real browser. Imports only the standard library, pytest and the fake's quote format at module
level."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import itertools
import os
import socket
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hil_sandbox.fake_wecom import format_quote_reply

ROBOT = "HIL助手"  # the robot's name in the chat (the fake's default)
WEBHOOK_URL = "https://wecom.test/cgi-bin/webhook/send?key=xyz"

# Variables that configure the suite's programs (server, worker, hil-mcp, deploy scripts; names are matched without
# regard to case, as pydantic-settings reads them): a value in the test runner's environment must not reach a test.
SETTINGS_PREFIXES = (
    "HIL_",
    "WECOM_",
    "BOT_",
    "CALLBACK_",
    "HEARTBEAT_",
    "WORKER_",
    "RECONNECT_",
    "HELLO_",
    "SERVICE_",
    "DEFAULT_",
    "DEVCLOUD_",
    "POLL_",
)
# Tests talk to 127.0.0.1 only: a proxy from the environment must not get in the way.
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# --- ports and environments -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_setting(name: str, also: tuple[str, ...] = ()) -> bool:
    """`name` configures one of the suite's programs (or starts with a prefix in `also`)."""
    return name.upper().startswith(SETTINGS_PREFIXES + also)


def child_env(*, drop: Iterable[str] = (), drop_prefixes: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child: without the suite's settings, proxies, the variables named in `drop`
    and those starting with one of `drop_prefixes`; NO_PROXY for 127.0.0.1; then `extra`."""
    names = set(drop)
    env = {
        k: v
        for k, v in os.environ.items()
        if not is_setting(k, drop_prefixes) and k not in names and k.lower() not in PROXY_VARS
    }
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def scrub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the suite's settings out of this process's environment (settings classes read it) for one test."""
    for name in list(os.environ):
        if is_setting(name):
            monkeypatch.delenv(name)


# --- what WeCom sends ---------------------------------------------------------------------------------------------

_msgids = itertools.count(1)


def callback_body(
    text: str | None = "",
    /,
    chat: str = "chatA",
    msgid: str | None = None,
    *,
    msgtype: str = "text",
    chattype: str = "group",
    sender: Mapping[str, str] | None = None,
    webhook_url: str | None = WEBHOOK_URL,
    **parts: Any,
) -> dict[str, Any]:
    """A robot callback as fly-pigeon's relay POSTs it (WECOM.md): by default a text message from 张三 in a group chat.
    `sender` overrides fields of "from"; `parts` adds or replaces fields (image, event, mixed_message, even text);
    a msgid left out is a new one."""
    body: dict[str, Any] = {"webhook_url": webhook_url} if webhook_url else {}
    body.update(
        {
            "msgid": msgid or f"m-{next(_msgids)}",
            "chatid": chat,
            "chattype": chattype,
            "from": {"userid": "zhangsan", "name": "张三", "alias": "", **(sender or {})},
            "msgtype": msgtype,
        }
    )
    if text is not None:
        body["text"] = {"content": text}
    body.update(parts)
    return body


def question_text(short_id: str, question: str = "the question", project: str | None = None) -> str:
    """A question as the robot posts it: the header `[#short_id project]`, then the question."""
    return f"[#{short_id} {project}]\n{question}" if project else f"[#{short_id}]\n{question}"


def quote(short_id: str, answer: str, project: str | None = "proj", question: str = "the question") -> str:
    """The text of a quote-reply to the robot's question `short_id` in a group chat, as WeCom delivers it."""
    return format_quote_reply(question_text(short_id, question, project), answer, sender=ROBOT, robot_name=ROBOT)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(width: int = 4, height: int = 3, rgb: tuple[int, int, int] = (0x2F, 0x7C, 0xF6)) -> bytes:
    """A solid-colour PNG, so the tests need no image files."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# --- what MCP clients see -----------------------------------------------------------------------------------------

# The parameters of the seed's tools (CONTRACT.md), and of send_and_wait_reply with choices.
SEED_TOOL_PARAMETERS = frozenset({"message", "chat_id", "image_paths", "project_name"})
ASK_PARAMETERS = SEED_TOOL_PARAMETERS | {"options", "responders", "multi_select"}


def parameters(tool: Any) -> set[str]:
    """The names an MCP tool (from `list_tools`) takes."""
    return set(tool.input_schema["properties"])


# --- waiting ------------------------------------------------------------------------------------------------------


def eventually(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition not met in time") -> None:
    """Poll state another thread or process changes until `predicate` holds; AssertionError(`what`) after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll state that other components own (a client, a stand-in, a library), which offer nothing to wait on."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  (no single event to wait on: the state spans components)
            await asyncio.sleep(0.005)


# --- TLS ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    cafile: Path  # the test CA: what a client trusts
    certfile: Path  # the server's certificate, signed by the CA
    keyfile: Path  # the server's key

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certfile, self.keyfile)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Trusts only the test CA, and checks host names."""
        return ssl.create_default_context(cafile=str(self.cafile))


def throwaway_tls(directory: Path, *names: str) -> TlsFiles:
    """A test CA and a server certificate it signed for `names` (host names or IP addresses; default 127.0.0.1),
    written as PEM files in `directory`. A CA of its own, not a self-signed leaf: strict verifiers refuse those."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = names or ("127.0.0.1",)
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hil-mcp test CA")])

    def signed(subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca = (
        signed(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), key.public_key())
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    files.cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.keyfile.chmod(0o600)
    return files


# --- the chat page in a real browser --------------------------------------------------------------------------------

# --disable-background-networking and friends: otherwise Chromium reaches for Google's servers on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]


@dataclass
class ChatPage:
    page: Any  # playwright's async Page
    errors: list[str]  # JavaScript errors the page raised


@contextlib.asynccontextmanager
async def aibot_chat_page(chromium: str, url: str, userid: str) -> AsyncIterator[ChatPage]:
    """The fake's chat page at `url` in headless Chromium, in AI-bot mode, as the person `userid`."""
    async_api = pytest.importorskip("playwright.async_api", reason="playwright is in the test extra")
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 800}, locale="zh-CN")
        page.set_default_timeout(10_000)
        opened = ChatPage(page, [])
        page.on("pageerror", lambda exc: opened.errors.append(str(exc)))
        await page.goto(url)
        await async_api.expect(page.get_by_test_id("mode-select")).to_have_value("aibot")
        await page.get_by_test_id("whoami-userid").fill(userid)
        yield opened
        await browser.close()
