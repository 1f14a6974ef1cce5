"""Fuzzing: schemathesis over the HIL Server's OpenAPI schema (direct and relay mode), and hand-made hostile requests
to the robot-callback routes of the server (/api/callback) and the worker (/callback). Never a 5xx, always quick."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans

from devcloud_worker.config import WorkerSettings
from devcloud_worker.worker import create_app as create_worker_app
from hil_server.app import create_app
from hil_server.config import ServerSettings
from tests.helpers import callback_body, scrub_env
from tests.wecom_oracle import WeComOracle, new_aes_key, new_callback_token, text_payload_json, text_payload_xml

WECOM = "http://wecom.fuzz.test"
FUZZ_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
FAST = 1.0  # WeCom wants URL verification answered within 1 s and retries callbacks after 5 s


@pytest.fixture(scope="module", autouse=True)
def clean_env() -> Iterator[None]:
    # Settings read the environment (and ./.env, turned off below): none of it may leak into these apps.
    with pytest.MonkeyPatch.context() as mp:
        scrub_env(mp)
        yield


@pytest.fixture(scope="module")
def wecom() -> Iterator[respx.MockRouter]:
    """The robot webhook answers errcode 0; any other URL (an image the fuzzer names) is unreachable."""
    with respx.mock(assert_all_called=False) as router:
        router.post(f"{WECOM}/cgi-bin/webhook/send").mock(
            return_value=httpx.Response(200, json={"errcode": 0, "errmsg": "ok"})
        )
        router.route().mock(side_effect=httpx.ConnectError)
        yield router


def server_settings(data_dir: Path, **kw: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "hil_mode": "direct",
        "bot_key": "k",
        "wecom_api_base": WECOM,
        "hil_data_dir": data_dir,
        "worker_grace": 0.1,
        "relay_request_timeout": 2.0,
        "wecom_retry_deadline": 1.0,
        "max_body_bytes": 4 * 1024 * 1024,
    }
    values.update(kw)
    return ServerSettings(_env_file=None, **values)


def worker_settings(data_dir: Path, **kw: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "bot_key": "k",
        "hil_url": "ws://127.0.0.1:1/ws",  # nobody there: the worker spools and keeps retrying, slowly
        "hil_data_dir": data_dir,
        "reconnect_min_delay": 5.0,
        "wecom_api_base": WECOM,
    }
    values.update(kw)
    return WorkerSettings(_env_file=None, **values)


# --- schemathesis over the OpenAPI schema -----------------------------------------------------------------------------

# The OpenAPI document is the same in both modes and needs no lifespan, so it is read at collection time (schemathesis'
# lazy `from_fixture` loader does not work with this pytest); the apps under test come from fixtures and are passed to
# each call, and schemathesis runs their lifespans on its own event-loop thread.
API = schemathesis.openapi.from_dict(create_app(server_settings(Path("unused"))).openapi())


@pytest.fixture(scope="module")
def direct_app(tmp_path_factory: pytest.TempPathFactory, wecom: respx.MockRouter) -> Iterator[FastAPI]:
    yield create_app(server_settings(tmp_path_factory.mktemp("fuzz-direct")))
    shutdown_lifespans()


@pytest.fixture(scope="module")
def relay_app(tmp_path_factory: pytest.TempPathFactory, wecom: respx.MockRouter) -> Iterator[FastAPI]:
    yield create_app(server_settings(tmp_path_factory.mktemp("fuzz-relay"), hil_mode="relay", bot_key=None))
    shutdown_lifespans()


def sends_fail_cleanly(ctx: Any, response: Any, case: Any) -> None:
    """Relay mode without a worker: a send that passes validation answers success false, naming the problem."""
    if case.operation.path == "/api/send" and response.status_code == 200:
        body = response.json()
        assert body["success"] is False, body
        assert body.get("error"), body


@API.parametrize()
@FUZZ_SETTINGS
def test_direct_api_never_5xx(case: Any, direct_app: FastAPI) -> None:
    case.call_and_validate(app=direct_app, checks=[not_a_server_error], timeout=15)


@API.parametrize()
@FUZZ_SETTINGS
def test_relay_api_without_worker_never_5xx(case: Any, relay_app: FastAPI) -> None:
    case.call_and_validate(app=relay_app, checks=[not_a_server_error, sends_fail_cleanly], timeout=15)


# --- hand-made hostile callbacks --------------------------------------------------------------------------------------


CRYPTO_TOKEN, CRYPTO_KEY = new_callback_token(), new_aes_key()
ORACLE = WeComOracle(CRYPTO_TOKEN, CRYPTO_KEY)
CRYPTO = {"wecom_callback_token": CRYPTO_TOKEN, "wecom_callback_aes_key": CRYPTO_KEY}

AppFactory = Callable[[Path], FastAPI]
APPS: dict[str, tuple[AppFactory, str]] = {
    "server": (lambda d: create_app(server_settings(d)), "/api/callback"),
    "server-crypto": (lambda d: create_app(server_settings(d, **CRYPTO)), "/api/callback"),
    "worker": (lambda d: create_worker_app(worker_settings(d)), "/callback"),
    "worker-crypto": (lambda d: create_worker_app(worker_settings(d, **CRYPTO)), "/callback"),
}


class Callback:
    """One app's callback route; every answer is checked to be no 5xx and to come within FAST seconds."""

    def __init__(self, client: TestClient, path: str, crypto: bool) -> None:
        self.client = client
        self.path = path
        self.crypto = crypto

    def request(self, method: str, *, expect: tuple[int, ...] | None = None, **kw: Any) -> httpx.Response:
        started = time.monotonic()
        response = self.client.request(method, self.path, **kw)
        elapsed = time.monotonic() - started
        what = f"{method} {self.path} {kw.get('params') or ''} {str(kw.get('content') or kw.get('json'))[:200]!r}"
        assert response.status_code < 500, f"{what} -> {response.status_code} {response.text[:300]}"
        assert elapsed < FAST, f"{what} took {elapsed:.2f}s"
        if expect is not None:
            assert response.status_code in expect, f"{what} -> {response.status_code} {response.text[:300]}"
        return response

    def post(self, body: bytes | str, *, expect: tuple[int, ...] | None = (400,), **kw: Any) -> httpx.Response:
        content = body.encode() if isinstance(body, str) else body
        kw.setdefault("headers", {"content-type": "application/json"})
        if self.crypto and "msg_signature" not in (kw.get("params") or {}) and expect and {200, 400} & set(expect):
            # With WeCom's encryption configured (and no auth header), unsigned bodies are refused before parsing.
            expect = (403,)
        return self.request("POST", content=content, expect=expect, **kw)


@contextmanager
def callback_route(name: str, data_dir: Path) -> Iterator[Callback]:
    factory, path = APPS[name]
    with TestClient(factory(data_dir), raise_server_exceptions=False) as client:
        yield Callback(client, path, crypto=name.endswith("crypto"))


@pytest.fixture(params=list(APPS), scope="module")
def callback(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, wecom: Any
) -> Iterator[Callback]:
    with callback_route(request.param, tmp_path_factory.mktemp(request.param)) as route:
        yield route


@pytest.fixture(params=["server-crypto", "worker-crypto"], scope="module")
def crypto_callback(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, wecom: Any
) -> Iterator[Callback]:
    with callback_route(request.param, tmp_path_factory.mktemp(request.param)) as route:
        yield route


def valid(msgtype: str = "text", **extra: Any) -> dict[str, Any]:
    """A callback with every part filled in, whichever `msgtype` it names: there is something at every path."""
    parts: dict[str, Any] = {
        "image": {"image_url": "https://example.invalid/a.png"},
        "mixed_message": {
            "msg_item": [
                {"msg_type": "text", "text": {"content": "@HIL助手 hi"}},
                {"msg_type": "image", "image": {"image_url": "https://example.invalid/a.png"}},
            ]
        },
        "event": {"event_type": "add_to_chat"},
    }
    return callback_body(
        "@HIL助手 hi",
        "fuzzChat",
        f"fuzz-{random.getrandbits(64):x}",
        msgtype=msgtype,
        sender={"alias": "zs"},
        webhook_url=f"{WECOM}/cgi-bin/webhook/send?key=xyz",
        **{**parts, **extra},
    )


def leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into a JSON value, the containers as well as the leaves."""
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from leaf_paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from leaf_paths(inner, (*prefix, index))


def replaced(body: Any, path: tuple[Any, ...], new: Any) -> Any:
    copy = json.loads(json.dumps(body))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return copy


WRONG_TYPES: list[Any] = [None, 0, -1.5, True, "", "s", [], {}, ["x"], {"k": "v"}, "x" * 5000, 10**30]


def test_valid_callbacks_are_accepted(callback: Callback) -> None:
    for msgtype in ("text", "image", "mixed", "event", "something_new"):
        callback.post(json.dumps(valid(msgtype)), expect=(200,))


def test_wrong_types_for_every_field(callback: Callback) -> None:
    for msgtype in ("text", "mixed"):
        base = valid(msgtype)
        for path in leaf_paths(base):
            for wrong in WRONG_TYPES:
                body = replaced(base, path, wrong)
                if path != ("msgid",):
                    body["msgid"] = f"fuzz-{random.getrandbits(64):x}"
                callback.post(json.dumps(body), expect=(200, 400))
    for top in WRONG_TYPES:
        callback.post(json.dumps(top), expect=(400,))


def test_garbage_bodies(callback: Callback) -> None:
    rng = random.Random(20240601)
    for size in (1, 7, 64, 2048, 65536):
        callback.post(rng.randbytes(size))
    for raw in (
        b"",
        b"\xff\xfe\x00",
        b"\x00" * 100,
        b"{",
        b"[]",
        b"null",
        b"1e999999",
        b'"\\ud800"',
        b"\xef\xbb\xbf{}",
        b'{"chatid": "c", "msgtype": "text", "chatid": 1}',
    ):
        callback.post(raw)
    # Strings that no UTF-8 store or log can hold (lone surrogates) anywhere in an otherwise good callback.
    for field in ("msgid", "chatid", "chattype", "msgtype", "webhook_url"):
        callback.post(json.dumps(valid()).replace(f'"{field}": "', f'"{field}": "\\ud800', 1))
    callback.post(json.dumps(valid(text={"content": "\udfff"})))
    callback.post(json.dumps(valid(**{"from": {"userid": "\ud83d"}})))
    # Every content type, including none and a lying one.
    for content_type in (
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
    ):
        callback.post(b"@@@", headers={"content-type": content_type})
    callback.request("POST", content=b"{}", expect=(403,) if callback.crypto else (400,))


def test_huge_and_deep_bodies(callback: Callback) -> None:
    # Where only signed callbacks are taken, unsigned JSON is refused before its body is read (or by the size limit
    # in front of everything, whichever comes first).
    too_big = (403, 413) if callback.crypto else (413,)
    callback.post(b"{" + b'"a": "' + b"x" * (3 * 1024 * 1024) + b'"}', expect=too_big)
    chunks = iter([b'{"chatid": "', b"c" * (2 * 1024 * 1024), b'"}'])  # no Content-Length
    callback.request("POST", content=chunks, expect=too_big, headers={"content-type": "application/json"})
    callback.post(json.dumps([valid()] * 500))  # big, but an array
    callback.post(json.dumps(valid(text={"content": "长" * 100_000})), expect=(200,))  # big, but a callback
    for depth in (100_000, 5_000):
        callback.post(b"[" * depth + b"]" * depth)
        callback.post(b'{"a":' * depth + b"1" + b"}" * depth)
    for depth in (50, 500, 900):
        nested: Any = "x"
        for _ in range(depth):
            nested = [nested]
        callback.post(json.dumps(valid(extra=nested)), expect=(200, 400))
        callback.post(json.dumps(valid(text={"content": nested})), expect=(400,))
        callback.post(json.dumps(valid(mixed_message={"msg_item": nested})), expect=(200, 400))


DOCTYPE_XML = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><xml><Encrypt>&lol3;</Encrypt></xml>'
)
XXE_XML = '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><Encrypt>&e;</Encrypt></xml>'


def test_xml_with_doctype(callback: Callback) -> None:
    for xml in (DOCTYPE_XML, XXE_XML, "<xml><Encrypt>abc</Encrypt>", "<" * 10_000):
        callback.post(xml, headers={"content-type": "text/xml"})  # not signed: not JSON either
        signed = ORACLE.query("abc")
        response = callback.post(xml, params=signed, headers={"content-type": "text/xml"}, expect=(400, 403))
        assert "passwd" not in response.text and "root:" not in response.text
    # Correctly signed and encrypted, but the decrypted payload declares entities.
    for payload in (DOCTYPE_XML.replace("Encrypt", "Content"), XXE_XML.replace("Encrypt", "MsgId")):
        params, body = ORACLE.xml_post(payload)
        callback.post(body, params=params, headers={"content-type": "text/xml"})


def test_encrypted_form_without_crypto_configured(callback: Callback) -> None:
    params, body = ORACLE.xml_post(text_payload_xml("fuzzChat", "hi", "enc-1"))
    if callback.crypto:
        callback.post(body, params=params, expect=(200,))
        callback.request("GET", params=ORACLE.verification("4242"), expect=(200,))
        return
    response = callback.post(body, params=params)
    assert "WECOM_CALLBACK_TOKEN" in response.json()["errmsg"]
    callback.post(b"{}", params={"msg_signature": "x"})
    response = callback.request("GET", params=ORACLE.verification("4242"), expect=(400,))
    assert "WECOM_CALLBACK_TOKEN" in response.text
    callback.request("GET", expect=(400,))


def test_garbage_encrypted_requests(crypto_callback: Callback) -> None:
    callback = crypto_callback
    get = callback.request
    # URL verification with garbage: no query, partial query, bad signature, signed garbage echostr.
    get("GET", expect=(400, 403))
    for params in (
        {"echostr": "abc"},
        {"msg_signature": "", "echostr": ""},
        {"msg_signature": "0" * 40},
        {"msg_signature": "é" * 40, "timestamp": "\x00", "nonce": "%", "echostr": "%%%"},
    ):
        get("GET", params=params, expect=(400, 403))
    for echostr in (
        "not base64!",
        "QUJD",
        "A" * 44,
        "A" * 43 + "=",
        "",
        " ",
        "\u00e9" * 10,
        ORACLE.encrypt("x")[:-4],
        ORACLE.encrypt(b"\xff\xfe not utf-8"),
        ORACLE.encrypt("x", b"wrong-id"),
        WeComOracle(CRYPTO_TOKEN, new_aes_key()).encrypt("x"),
    ):
        get("GET", params={**ORACLE.query(echostr), "echostr": echostr}, expect=(400, 403))
    get("GET", params={**ORACLE.verification("ok"), "timestamp": "1"}, expect=(403,))
    get("GET", content=b"x" * 1000, params=ORACLE.verification("ok"), expect=(200,))
    # Percent-escapes that are not UTF-8.
    raw = callback.client.get(f"{callback.path}?msg_signature=%FF%FE&timestamp=%C0&nonce=%80&echostr=%FF%FF")
    assert raw.status_code in (400, 403), raw.text

    # Encrypted POSTs: bad signatures, bodies without Encrypt, Encrypt that is not ours, payloads not callbacks.
    params, body = ORACLE.xml_post(text_payload_xml("fuzzChat", "hi", "enc-g1"))
    callback.post(body, params={**params, "msg_signature": "0" * 40}, expect=(403,))
    callback.post(body, params={**params, "nonce": params["nonce"] + "1"}, expect=(403,))
    callback.post(body, params={k: v for k, v in params.items() if k != "timestamp"}, expect=(403,))
    for bad_body in (
        b"",
        b"<xml/>",
        b"<xml><Encrypt></Encrypt></xml>",
        b"{}",
        b'{"encrypt": 5}',
        b"[1]",
        b"<xml><Encrypt><![CDATA[%%%]]></Encrypt></xml>",
        os.urandom(300),
    ):
        callback.post(bad_body, params=params, expect=(400, 403))
    for payload in (
        "",
        "plain text",
        "{",
        "[1]",
        "<xml/>",
        "<xml><MsgType>text</MsgType></xml>",
        json.dumps({"chatid": [5], "msgtype": "text"}),
        '{"chatid": "\\ud800", "msgtype": "text"}',
        "<xml>" + "<a>" * 50 + "</a>" * 50 + "</xml>",
    ):
        encrypt = ORACLE.encrypt(payload)
        for form in (f"<xml><Encrypt>{encrypt}</Encrypt></xml>", json.dumps({"Encrypt": encrypt})):
            callback.post(form, params=ORACLE.query(encrypt), expect=(400,))
    # Signed, but encrypted with another key, or for another receive id, or truncated.
    for encrypt in (
        WeComOracle(CRYPTO_TOKEN, new_aes_key()).encrypt("<xml/>"),
        ORACLE.encrypt("<xml/>", b"corp"),
        ORACLE.encrypt("<xml/>")[:-8] + "AAAAAAA=",
    ):
        callback.post(f"<xml><Encrypt>{encrypt}</Encrypt></xml>", params=ORACLE.query(encrypt), expect=(400,))
    # And the good ones in both forms still go through.
    callback.post(body, params=params, expect=(200,))
    params, body = ORACLE.json_post(text_payload_json("fuzzChat", "hi", "enc-g2"))
    callback.post(body, params=params, expect=(200,))


# --- hand-made /api/send cases the schema does not describe ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["direct", "relay"])
def test_send_hand_cases(mode: str, tmp_path: Path, wecom: Any) -> None:
    extra = {"hil_mode": "relay", "bot_key": None} if mode == "relay" else {}
    with TestClient(create_app(server_settings(tmp_path, **extra)), raise_server_exceptions=False) as client:

        def send(raw: bytes | dict[str, Any], expect: tuple[int, ...]) -> dict[str, Any]:
            started = time.monotonic()
            if isinstance(raw, dict):
                response = client.post("/api/send", json=raw)
            else:
                response = client.post("/api/send", content=raw, headers={"content-type": "application/json"})
            assert time.monotonic() - started < 5
            assert response.status_code in expect, f"{raw!r:.200} -> {response.status_code} {response.text[:300]}"
            return response.json()

        # Lone surrogates (JSON escapes) in every free-text field: refused before they reach a store or WeCom.
        for field in ("message", "project_name", "mention_list", "images", "chat_id"):
            value = '["\\ud800"]' if field in ("mention_list", "images") else '"\\ud800"'
            body = send(
                f'{{"message": "q", "{field}": {value}}}'.replace('"message": "q", "message"', '"message"').encode(),
                (422,),
            )
            assert field in body["error"], body
        for raw in (
            b'{"message": "q", "timeout": NaN}',
            b'{"message": "q", "timeout": Infinity}',
            b'{"message": "q", "timeout": -Infinity}',
            b"[" * 50_000,
            b'{"message": ' * 50_000,
        ):
            send(raw, (400, 422))
        # Image URLs that are not URLs at all: refused before anything is stored (no phantom question).
        for url in ("http://[::", "http://\x00x", "http://" + "a" * 70_000, "https://:99999/", "http://x:99999/a"):
            body = send({"message": f"img {url[:20]}", "chat_id": "c", "images": [url]}, (422,))
            assert "images" in body["error"], body
        # (A URL that parses but cannot be fetched fails its question with words: tests/test_images.py.)
        assert client.get("/health").status_code == 200
