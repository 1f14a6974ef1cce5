"""Security end to end, on the real processes (fake WeCom, HIL Server, relay worker) on 127.0.0.1:
API tokens (also through hil-mcp over stdio), the callback auth header, WeCom's encrypted callback checked against an
oracle written here from WECOM.md (not with hil_protocol.wecom_crypto), and no secret in any process log."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from hil_sandbox.fake_wecom import format_quote_reply
from tests.helpers import callback_body
from tests.procs import BOT_KEY, WORKER_TOKEN, Proc, Stack, mcp_stdio_params
from tests.wecom_oracle import (
    WeComOracle,
    new_aes_key,
    new_callback_token,
    tamper,
    text_payload_json,
    text_payload_xml,
)

pytestmark = pytest.mark.e2e

MODES = ["direct", "relay"]
ROBOT = "HIL助手"
HEADER_RE = re.compile(r"^\[#(?P<short_id>[0-9a-f]{8})")


# --- processes --------------------------------------------------------------------------------------------------------


@contextmanager
def running(mode: str, tmp: Path, *, env: dict[str, str] | None = None, **kw: Any) -> Iterator[Stack]:
    """A started Stack; `env` goes to both the server and the worker. Logs are printed when the test fails."""
    with Stack(mode=mode, tmp=tmp, server_env=dict(env or {}), worker_env=dict(env or {}), **kw).running() as stack:
        yield stack


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
        assert stack.messages() == [], "a refused send reached WeCom"
        # Without a chat_id, a token bound to chats asks in its first one.
        default = tok_b.post(send, json={"message": "不指定会话"}).json()
        assert default["success"] is True and question(stack, "chatX", default["short_id"])

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


# --- (e) attacks on the answer: each fails, and the asked person still gets through -------------------------------

CEO = {"userid": "ceo", "name": "CEO"}  # someone other than the asked person


def test_relay_server_takes_no_callbacks_of_its_own(tmp_path: Path) -> None:
    env = {"HIL_API_TOKENS": "tok"}
    with running("relay", tmp_path, env=env) as stack, http("tok") as client:
        sent = client.post(f"{stack.server_url}/api/send", json={"message": "上线吗？", "chat_id": "chatR"}).json()
        forged = callback_body("yes, deploy", "chatR", "forged-1", sender=CEO)
        response = client.post(f"{stack.server_url}/api/callback", json=forged)
        assert response.status_code == 404 and "DevCloud Worker" in response.json()["error"], response.text
        # Without any token, too.
        assert httpx.post(f"{stack.server_url}/api/callback", json=forged, trust_env=False).status_code == 404
        poll = f"{stack.server_url}/api/poll/{sent['session_id']}"
        assert client.get(poll).json()["status"] == "waiting"
        stack.reply("chatR", "不行", quote=question(stack, "chatR", sent["short_id"]), quote_sender=ROBOT)
        replied = client.get(poll, params={"wait": 5}).json()
        assert replied["status"] == "replied" and replied["replies"][0]["content"] == "不行"


@pytest.mark.parametrize("mode", MODES)
def test_signed_reply_reaches_a_setup_with_signing_and_a_header_rule(mode: str, tmp_path: Path) -> None:
    token, key = new_callback_token(), new_aes_key()
    env = {
        "WECOM_CALLBACK_TOKEN": token,
        "WECOM_CALLBACK_AES_KEY": key,
        "CALLBACK_AUTH_KEY": "X-Hil-Auth",
        "CALLBACK_AUTH_VALUE": "h3ader-value",
    }
    wecom = WeComOracle(token, key)
    with running(mode, tmp_path, env=env, fake_args=["--callback-header", "X-Hil-Auth: h3ader-value"]) as stack:
        sent = stack.send("签名和请求头都配置了", chat_id="chatSH")
        content = format_quote_reply(question(stack, "chatSH", sent["short_id"]), "签名回答", ROBOT, ROBOT)
        params, body = wecom.json_post(text_payload_json("chatSH", content, "sh-1"))
        with http() as client:  # WeCom cannot add a custom header to its signed POST
            response = client.post(stack.callback_url, params=params, content=body)
            assert response.status_code == 200, response.text
            unsigned = client.post(stack.callback_url, json=callback_body("yes", "chatSH", "sh-2", sender=CEO))
            assert unsigned.status_code == 401
        polled = stack.poll(sent["session_id"], wait=5)
        assert polled["status"] == "replied" and polled["replies"][0]["content"] == "签名回答"


@pytest.mark.parametrize("mode", MODES)
def test_quotes_from_other_chats_never_answer(mode: str, tmp_path: Path) -> None:
    with running(mode, tmp_path) as stack:
        sent = stack.send("只在 chatQ 里问", chat_id="chatQ")
        quoted = question(stack, "chatQ", sent["short_id"])
        # Another group quotes the real message; a private chat types the quote by hand.
        stack.reply("chatOther", "yes, deploy", quote=quoted, quote_sender=ROBOT)
        typed = f"\u201c[#{sent['short_id']}]\u201d\n------\nyes"
        stack.reply("zhangsan", typed, chat_type="single")
        assert stack.poll(sent["session_id"], wait=1)["status"] == "waiting"
        hints = [m for m in stack.messages("chatOther", wait=1) if "不是在这个会话" in (m["content"] or "")]
        assert hints, stack.messages("chatOther")
        stack.reply("chatQ", "不上线", quote=quoted, quote_sender=ROBOT)
        polled = stack.poll(sent["session_id"], wait=5)
        (reply,) = polled["replies"]
        assert reply["content"] == "不上线" and reply["chat_id"] == "chatQ"


@pytest.mark.parametrize("mode", MODES)
def test_stale_and_replayed_signed_callbacks_are_refused(mode: str, tmp_path: Path) -> None:
    token, key = new_callback_token(), new_aes_key()
    env = {"WECOM_CALLBACK_TOKEN": token, "WECOM_CALLBACK_AES_KEY": key, "HIL_CALLBACK_MAX_AGE": "60"}
    wecom = WeComOracle(token, key)
    with running(mode, tmp_path, env=env) as stack, http() as client:
        first = stack.send("第一个问题", chat_id="chatRP")
        captured = wecom.json_post(text_payload_json("chatRP", "yes", "cap-1"))
        assert client.post(stack.callback_url, params=captured[0], content=captured[1]).status_code == 200
        assert stack.poll(first["session_id"], wait=5)["status"] == "replied"

        second = stack.send("第二个问题", chat_id="chatRP")
        # Replayed as captured: a duplicate; replayed years later with its old timestamp: refused.
        assert client.post(stack.callback_url, params=captured[0], content=captured[1]).status_code == 200
        old = wecom.json_post(text_payload_json("chatRP", "yes", "cap-old"), at=time.time() - 3 * 365 * 86400)
        stale = client.post(stack.callback_url, params=old[0], content=old[1])
        assert stale.status_code == 403 and "timestamp" in stale.json()["error"]
        assert stack.poll(second["session_id"], wait=1)["status"] == "waiting"

        fresh = wecom.json_post(text_payload_json("chatRP", "第二个：不", "new-2"))
        assert client.post(stack.callback_url, params=fresh[0], content=fresh[1]).status_code == 200
        polled = stack.poll(second["session_id"], wait=5)
        assert [r["content"] for r in polled["replies"]] == ["第二个：不"]


def test_a_token_without_chats_stops_the_server_in_one_line(tmp_path: Path) -> None:
    stack = Stack(mode="direct", tmp=tmp_path, server_env={"HIL_API_TOKENS": "good,s3cretbad="})
    proc = Proc("hil-server", ["-m", "hil_server.app"], stack.server_process_env(), tmp_path / "server.log").start()
    assert proc.popen is not None
    assert proc.popen.wait(20) == 2
    output = proc.log().strip()
    assert "HIL_API_TOKENS entry 2" in output and "s3cretbad" not in output
    assert "Traceback" not in output, output


def test_malformed_ids_never_reach_a_session(tmp_path: Path) -> None:
    with running("direct", tmp_path) as stack, http() as client:
        sent = stack.send("id 测试", chat_id="chatID")
        # (A client normalises "../" itself; hil-mcp checks ids before it builds a URL, see its tests.)
        for ref in ("..%2F..%2Fstatus.json", sent["short_id"] + "%0A", sent["short_id"].upper(), "%00" * 8):
            response = client.get(f"{stack.server_url}/api/poll/{ref}")
            assert response.status_code == 404, (ref, response.text)
            assert response.json().get("status", "not_found") == "not_found", response.text
        assert client.get(f"{stack.server_url}/api/poll/{sent['short_id']}").json()["status"] == "waiting"
