"""Security end to end, on the real processes (fake WeCom, HIL Server, relay worker) on 127.0.0.1:
API tokens (also through hil-mcp over stdio), the callback auth header, WeCom's encrypted callback checked against an
oracle written here from WECOM.md (not with hil_protocol.wecom_crypto), and no secret in any process log."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from hil_sandbox.fake_wecom import format_quote_reply
from tests.procs import BOT_KEY, WORKER_TOKEN, Stack, mcp_stdio_params

pytestmark = pytest.mark.e2e

MODES = ["direct", "relay"]
ROBOT = "HIL助手"
HEADER_RE = re.compile(r"^\[#(?P<short_id>[0-9a-f]{8})")


# --- the WeCom side, written from WECOM.md ------------------------------------------------------------------------


def new_aes_key() -> str:
    """An EncodingAESKey as the robot console shows it: 43 base64 characters (32 bytes, '=' dropped)."""
    return base64.b64encode(os.urandom(32)).decode().rstrip("=")


def new_callback_token() -> str:
    return "cb" + secrets.token_hex(12)  # 3-32 letters/digits


class WeComOracle:
    """What WeCom does with the robot's Token and EncodingAESKey: sign, and encrypt to AES-256-CBC."""

    def __init__(self, token: str, encoding_aes_key: str) -> None:
        self.token = token
        self.key = base64.b64decode(encoding_aes_key + "=")
        assert len(self.key) == 32

    def sign(self, timestamp: str, nonce: str, encrypt: str) -> str:
        # lowercase hex SHA1 of [Token, timestamp, nonce, encrypt] sorted, then joined
        return hashlib.sha1("".join(sorted([self.token, timestamp, nonce, encrypt])).encode()).hexdigest()

    def encrypt(self, message: str | bytes, receive_id: bytes = b"") -> str:
        raw = message.encode() if isinstance(message, str) else message
        # 16 random bytes + 4-byte big-endian length + message + receiveid ("" for robots)
        plain = os.urandom(16) + struct.pack(">I", len(raw)) + raw + receive_id
        pad = 32 - len(plain) % 32  # PKCS#7 to a 32-byte block: 1..32 bytes of value `pad`
        plain += bytes([pad]) * pad
        encryptor = Cipher(algorithms.AES(self.key), modes.CBC(self.key[:16])).encryptor()
        return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()

    def query(self, encrypt: str, **extra: str) -> dict[str, str]:
        timestamp, nonce = str(int(time.time())), secrets.token_hex(6)
        return {"msg_signature": self.sign(timestamp, nonce, encrypt), "timestamp": timestamp, "nonce": nonce, **extra}

    def verification(self, echo_plain: str) -> dict[str, str]:
        """GET query for URL verification."""
        echostr = self.encrypt(echo_plain)
        return {**self.query(echostr), "echostr": echostr}

    def xml_post(self, payload_xml: str) -> tuple[dict[str, str], bytes]:
        encrypt = self.encrypt(payload_xml)
        return self.query(encrypt), f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode()

    def json_post(self, payload: dict[str, Any]) -> tuple[dict[str, str], bytes]:
        encrypt = self.encrypt(json.dumps(payload, ensure_ascii=False))
        return self.query(encrypt, robot_callback_format="json"), json.dumps({"encrypt": encrypt}).encode()


def cdata(value: str) -> str:
    return f"<![CDATA[{value}]]>"


def text_payload_xml(chat_id: str, content: str, msgid: str, userid: str = "lisi") -> str:
    """A decrypted text callback in WeCom's XML (PascalCase) form."""
    return (
        "<xml>"
        f"<WebhookUrl>{cdata('https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=xx')}</WebhookUrl>"
        f"<MsgId>{cdata(msgid)}</MsgId><ChatId>{cdata(chat_id)}</ChatId><ChatType>group</ChatType>"
        f"<From><UserId>{cdata(userid)}</UserId><Name>{cdata('李四')}</Name><Alias>{escape(userid)}</Alias></From>"
        f"<MsgType>text</MsgType><Text><Content>{cdata(content)}</Content></Text>"
        "</xml>"
    )


def text_payload_json(chat_id: str, content: str, msgid: str, userid: str = "lisi") -> dict[str, Any]:
    """The same in the JSON (snake_case) form, for URLs with robot_callback_format=json."""
    return {
        "webhook_url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=xx",
        "msgid": msgid,
        "chatid": chat_id,
        "chattype": "group",
        "from": {"userid": userid, "name": "李四", "alias": userid},
        "msgtype": "text",
        "text": {"content": content},
    }


def tamper(signature: str) -> str:
    """The same signature with one character changed."""
    return signature[:-1] + ("0" if signature[-1] != "0" else "1")


# --- processes --------------------------------------------------------------------------------------------------------


@contextmanager
def running(mode: str, tmp: Path, *, env: dict[str, str] | None = None, **kw: Any) -> Iterator[Stack]:
    """A started Stack; `env` goes to both the server and the worker. Logs are printed when the test fails."""
    stack = Stack(mode=mode, tmp=tmp, server_env=dict(env or {}), worker_env=dict(env or {}), **kw)
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def http(token: str | None = None, timeout: float = 30) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(headers=headers, timeout=timeout, trust_env=False)


def question(stack: Stack, chat: str, short_id: str) -> str:
    for message in stack.messages(chat, wait=1):
        if (message["content"] or "").startswith(f"[#{short_id}"):
            return message["content"]
    raise AssertionError(f"#{short_id} never reached {chat}: {stack.messages(chat)}")


def mcp_params(stack: Stack, cwd: Path, chat: str, *extra: str) -> StdioServerParameters:
    args = ["--chat-id", chat, "--project-name", "sec", "--timeout", "30", *extra]
    return mcp_stdio_params(stack.server_url, cwd, *args, log_level="DEBUG")


async def ask_over_mcp(stack: Stack, params: StdioServerParameters, errlog: Path, chat: str, text: str) -> dict:
    """send_and_wait_reply through a real hil-mcp process; a person quote-replies in the fake chat."""
    outcome: dict[str, Any] = {}
    with errlog.open("a") as log:
        async with Client(stdio_client(params, errlog=log)) as client, anyio.create_task_group() as tg:

            async def ask() -> None:
                outcome["result"] = await client.call_tool("send_and_wait_reply", {"message": text})

            tg.start_soon(ask)
            async with httpx.AsyncClient(base_url=stack.fake_url, trust_env=False, timeout=30) as fake:
                with anyio.fail_after(20):
                    while True:
                        found = (await fake.get("/_fake/messages", params={"chat_id": chat})).json()["messages"]
                        asked = [m for m in found if text in (m["content"] or "")]
                        if asked:
                            break
                        await anyio.sleep(0.05)
                answered = await fake.post(
                    "/_fake/reply",
                    json={"chat_id": chat, "text": "同意", "quote": asked[0]["content"], "quote_sender": ROBOT},
                )
                assert answered.json()["responses"][0]["status_code"] == 200, answered.text
    result = outcome["result"]
    assert not result.is_error, result
    return result.structured_content


# --- (a) API tokens -----------------------------------------------------------------------------------------------


@pytest.fixture(params=MODES)
def token_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with running(request.param, tmp_path, env={"HIL_API_TOKENS": "tokA,tokB=chatX"}) as stack:
        yield stack


def test_api_tokens_over_http(token_stack: Stack) -> None:
    stack = token_stack
    send = f"{stack.server_url}/api/send"
    with http() as anonymous, http("nope") as wrong, http("tokB") as tok_b, http("tokA") as tok_a:
        refused = anonymous.post(send, json={"message": "无 token", "chat_id": "chatX"})
        assert refused.status_code == 401, refused.text
        assert "token" in refused.json()["error"].lower()
        assert wrong.post(send, json={"message": "错 token", "chat_id": "chatX"}).status_code == 401
        other_chat = tok_b.post(send, json={"message": "越权", "chat_id": "chatY"})
        assert other_chat.status_code == 403, other_chat.text
        assert "chatX" in other_chat.json()["error"]
        assert tok_b.post(send, json={"message": "不指定会话"}).status_code == 403
        assert stack.messages() == [], "a refused send reached WeCom"

        sent = tok_b.post(send, json={"message": "tokB 的问题", "chat_id": "chatX"}).json()
        assert sent["success"] is True, sent
        assert question(stack, "chatX", sent["short_id"]).endswith("\ntokB 的问题")
        # The API needs the token for reading too, and a token sees only its own sessions.
        poll = f"{stack.server_url}/api/poll/{sent['session_id']}"
        assert anonymous.get(poll).status_code == 401
        assert tok_a.get(poll).json()["status"] == "not_found"
        assert tok_b.get(poll).json()["status"] == "waiting"
        # The callback is not behind API tokens: WeCom cannot send one.
        stack.reply("chatX", "好", quote=question(stack, "chatX", sent["short_id"]), quote_sender=ROBOT)
        assert tok_b.get(poll, params={"wait": 5}).json()["status"] == "replied"


async def test_hil_mcp_with_api_token(token_stack: Stack, tmp_path: Path) -> None:
    stack = token_stack
    params = mcp_params(stack, tmp_path / "mcp", "chatM", "--api-token", "tokA")
    result = await ask_over_mcp(stack, params, tmp_path / "mcp.log", "chatM", "带 token 的 MCP 问题")
    assert result["status"] == "success", result
    assert [r["content"] for r in result["replies"]] == ["同意"]

    # Without the token the tool says what is wrong instead of hanging or crashing.
    with (tmp_path / "mcp.log").open("a") as log:
        async with Client(stdio_client(mcp_params(stack, tmp_path / "mcp", "chatM"), errlog=log)) as client:
            refused = await client.call_tool("send_and_wait_reply", {"message": "没有 token"})
    content = refused.structured_content or {}
    assert refused.is_error or content.get("status") == "error", refused
    text = json.dumps(content, ensure_ascii=False) + " ".join(getattr(c, "text", "") for c in refused.content)
    assert "token" in text.lower(), text
    assert "tokA" not in (tmp_path / "mcp.log").read_text()


# --- (b) callback auth header -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_callback_auth_header(mode: str, tmp_path: Path) -> None:
    env = {"CALLBACK_AUTH_KEY": "X-Hil-Auth", "CALLBACK_AUTH_VALUE": "s3cret"}
    with running(mode, tmp_path, env=env) as stack:
        sent = stack.send("需要鉴权的回调", chat_id="chatAuth")
        assert sent["success"], sent
        quoted = question(stack, "chatAuth", sent["short_id"])

        refused = stack.reply("chatAuth", "没带头", quote=quoted, quote_sender=ROBOT, msgid="auth-msg-1")
        assert refused["responses"][0]["status_code"] == 401, refused
        stack.fake("config", {"callback_headers": {"X-Hil-Auth": "wrong"}})
        wrong = stack.reply("chatAuth", "错的值", quote=quoted, quote_sender=ROBOT, msgid="auth-msg-1")
        assert wrong["responses"][0]["status_code"] == 401, wrong
        assert stack.poll(sent["session_id"], wait=1)["status"] == "waiting"
        assert [m for m in stack.messages("chatAuth") if m["msgtype"] != "text"] == [], "a refused callback got a hint"

        stack.fake("config", {"callback_headers": {"X-Hil-Auth": "s3cret"}})
        # The same msgid as the refused attempts: refusing must not have recorded it as seen.
        accepted = stack.reply("chatAuth", "带了头", quote=quoted, quote_sender=ROBOT, msgid="auth-msg-1")
        assert accepted["responses"][0]["status_code"] == 200, accepted
        polled = stack.poll(sent["session_id"], wait=5)
        assert polled["status"] == "replied", polled
        assert [r["content"] for r in polled["replies"]] == ["带了头"]


# --- (c) WeCom's encrypted callback -------------------------------------------------------------------------------


@pytest.fixture(params=MODES)
def crypto_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Stack, WeComOracle]]:
    token, key = new_callback_token(), new_aes_key()
    env = {"WECOM_CALLBACK_TOKEN": token, "WECOM_CALLBACK_AES_KEY": key}
    with running(request.param, tmp_path, env=env) as stack:
        yield stack, WeComOracle(token, key)


def test_encrypted_url_verification(crypto_stack: tuple[Stack, WeComOracle]) -> None:
    stack, wecom = crypto_stack
    plain = "echo-" + str(secrets.randbelow(10**18))
    with http() as client:
        started = time.monotonic()
        response = client.get(stack.callback_url, params=wecom.verification(plain))
        assert time.monotonic() - started < 1.0
        assert response.status_code == 200, response.text
        assert response.content == plain.encode()  # the plaintext alone: no quotes, no newline

        forged = wecom.verification(plain)
        forged["msg_signature"] = tamper(forged["msg_signature"])
        refused = client.get(stack.callback_url, params=forged)
        assert refused.status_code == 403, refused.text
        assert plain not in refused.text
        other = WeComOracle(wecom.token, new_aes_key())  # right Token, wrong key: signature fine, decryption not
        assert client.get(stack.callback_url, params=other.verification(plain)).status_code in (400, 403)


@pytest.mark.parametrize("form", ["xml", "json"])
def test_encrypted_quote_reply_is_matched(crypto_stack: tuple[Stack, WeComOracle], form: str) -> None:
    stack, wecom = crypto_stack
    chat = f"chatEnc-{form}"
    sent = stack.send(f"加密回调的问题（{form}）", chat_id=chat, project_name="enc proj")
    other = stack.send("同一会话里的另一个问题", chat_id=chat, project_name="enc proj")
    assert sent["success"] and other["success"], (sent, other)
    content = format_quote_reply(question(stack, chat, sent["short_id"]), "加密的回答", sender=ROBOT, robot_name=ROBOT)
    msgid = f"enc-{form}-{secrets.token_hex(4)}"
    if form == "xml":
        params, body = wecom.xml_post(text_payload_xml(chat, content, msgid))
        headers = {"content-type": "text/xml"}
    else:
        params, body = wecom.json_post(text_payload_json(chat, content, msgid))
        headers = {"content-type": "application/json"}

    with http() as client:
        forged = {**params, "msg_signature": tamper(params["msg_signature"])}
        refused = client.post(stack.callback_url, params=forged, content=body, headers=headers)
        assert refused.status_code == 403, refused.text
        assert stack.poll(sent["session_id"], wait=1)["status"] == "waiting"

        started = time.monotonic()
        accepted = client.post(stack.callback_url, params=params, content=body, headers=headers)
        assert time.monotonic() - started < 1.0
        assert accepted.status_code == 200, accepted.text

    polled = stack.poll(sent["session_id"], wait=5)
    assert polled["status"] == "replied", polled
    (reply,) = polled["replies"]
    assert reply["content"] == "加密的回答"
    assert reply["from_user"]["userid"] == "lisi"
    assert reply["matched_by"] == "quote"
    assert stack.poll(other["session_id"])["status"] == "waiting"


# --- (d) no secret in any log -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_no_secret_in_any_log(mode: str, tmp_path: Path) -> None:
    api_token, bound_token = "apitok" + secrets.token_hex(10), "apibound" + secrets.token_hex(10)
    auth_value, cb_token, aes_key = "authval" + secrets.token_hex(10), new_callback_token(), new_aes_key()
    env = {
        "HIL_API_TOKENS": f"{api_token},{bound_token}=chatS",
        "CALLBACK_AUTH_KEY": "X-Hil-Auth",
        "CALLBACK_AUTH_VALUE": auth_value,
        "WECOM_CALLBACK_TOKEN": cb_token,
        "WECOM_CALLBACK_AES_KEY": aes_key,
        "HIL_LOG_LEVEL": "DEBUG",
    }
    wecom = WeComOracle(cb_token, aes_key)
    stack = Stack(
        mode=mode,
        tmp=tmp_path,
        server_env=env,
        worker_env=env,
        fake_args=["--callback-header", f"X-Hil-Auth: {auth_value}"],
    )
    mcp_log = tmp_path / "mcp.log"
    try:
        stack.start()
        # Everything that touches a secret: token checks (good and bad), sends, callbacks plain and encrypted,
        # URL verification, a forged signature, a hil-mcp session with its token.
        with http(bound_token) as client:
            send = f"{stack.server_url}/api/send"
            assert client.post(send, json={"message": "x", "chat_id": "other"}).status_code == 403
            sent = client.post(send, json={"message": "秘密测试", "chat_id": "chatS"}).json()
            assert sent["success"], sent
            quoted = question(stack, "chatS", sent["short_id"])
            answer = format_quote_reply(quoted, "ok", ROBOT, ROBOT)
            params, body = wecom.xml_post(text_payload_xml("chatS", answer, "s1"))
            headers = {"X-Hil-Auth": auth_value}
            assert client.post(stack.callback_url, params=params, content=body, headers=headers).status_code == 200
            forged = {**params, "msg_signature": tamper(params["msg_signature"])}
            assert client.post(stack.callback_url, params=forged, content=body, headers=headers).status_code == 403
            assert client.post(stack.callback_url, content=b"{}", headers={"X-Hil-Auth": "wrong"}).status_code == 401
            verify = client.get(stack.callback_url, params=wecom.verification("12345"), headers=headers)
            assert verify.text == "12345"
            assert (
                client.get(f"{stack.server_url}/api/poll/{sent['session_id']}", params={"wait": 5}).json()["status"]
                == "replied"
            )
        with http("not-a-token") as client:
            assert client.get(f"{stack.server_url}/api/poll/{sent['session_id']}").status_code == 401
        params_mcp = mcp_params(stack, tmp_path / "mcp", "chatS", "--api-token", bound_token)
        result = await ask_over_mcp(stack, params_mcp, mcp_log, "chatS", "通过 MCP 的秘密测试")
        assert result["status"] == "success", result
    finally:
        stack.stop()  # graceful: every process flushes its log

    logs = {name: proc.log() for name, proc in stack.procs.items()}
    logs["mcp"] = mcp_log.read_text() if mcp_log.exists() else ""
    assert logs["server"] and logs["mcp"]
    if mode == "relay":
        assert logs["worker"]
    values = {
        "BOT_KEY": BOT_KEY,
        "HIL_WORKER_TOKEN": WORKER_TOKEN,
        "API token": api_token,
        "bound API token": bound_token,
        "CALLBACK_AUTH_VALUE": auth_value,
        "WECOM_CALLBACK_TOKEN": cb_token,
        "WECOM_CALLBACK_AES_KEY": aes_key,
    }
    # The fake WeCom is not ours to judge (it stands in for Tencent's servers); every process of the suite is.
    leaks = [
        f"{what} in the {name} log"
        for name, text in logs.items()
        if name != "fake"
        for what, value in values.items()
        if value in text
    ]
    assert not leaks, leaks
