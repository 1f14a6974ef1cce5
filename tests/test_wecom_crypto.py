"""WeCom robot callback crypto and payload parsing, checked against an independent oracle built from WECOM.md."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
from xml.etree import ElementTree as ET

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hil_protocol.wecom_crypto import WeComCrypto, WeComCryptoError, WeComDecryptError, WeComSignatureError
from hil_protocol.wecom_xml import CallbackPayloadError, parse_callback_payload
from tests.helpers import callback_body

TOKEN = "QDG6eK"
AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
TIMESTAMP = "1409659813"
NONCE = "1372623149"
# Full-width punctuation on purpose: it is what WeCom clients send.
WEBHOOK_URL = "http://in.qyapi.weixin.qq.com/cgi-bin/webhook/send?key=abc"
QUOTE_REPLY = "“张三：\n[#1a2b3c4d my project]\n要部署到生产环境吗？”\n------\n@HIL机器人 可以，部署吧 <ok> & 谢谢"


# --- the oracle: WECOM.md's rules written out directly, sharing no code with hil_protocol -------------------------


def oracle_key() -> bytes:
    key = base64.b64decode(AES_KEY + "=")
    assert len(key) == 32
    return key


def oracle_signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypt])).encode()).hexdigest()


def oracle_aes(data: bytes) -> bytes:
    key = oracle_key()
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return enc.update(data) + enc.finalize()


def oracle_pad(data: bytes) -> bytes:
    n = 32 - len(data) % 32  # PKCS#7 to a 32-byte block, by hand
    return data + bytes([n]) * n


def oracle_plain(message: bytes, receive_id: bytes = b"", prefix: bytes = b"0123456789abcdef") -> bytes:
    return prefix + struct.pack(">I", len(message)) + message + receive_id


def oracle_encrypt(message: str, receive_id: str = "") -> str:
    raw = oracle_pad(oracle_plain(message.encode(), receive_id.encode()))
    return base64.b64encode(oracle_aes(raw)).decode()


def oracle_raw_b64(padded: bytes) -> str:
    """Encrypt already-padded (possibly wrongly padded) bytes."""
    return base64.b64encode(oracle_aes(padded)).decode()


def oracle_decrypt(encrypt: str) -> tuple[bytes, str, bytes]:
    key = oracle_key()
    dec = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    ciphertext = base64.b64decode(encrypt)
    assert len(ciphertext) % 32 == 0  # WeCom pads to 32-byte blocks
    padded = dec.update(ciphertext) + dec.finalize()
    n = padded[-1]
    assert 1 <= n <= 32 and padded[-n:] == bytes([n]) * n
    plain = padded[:-n]
    (length,) = struct.unpack(">I", plain[16:20])
    return plain[:16], plain[20 : 20 + length].decode(), plain[20 + length :]


def signed_body(crypto_payload: str, *, as_json: bool = False) -> tuple[str, bytes]:
    encrypt = oracle_encrypt(crypto_payload)
    signature = oracle_signature(TOKEN, TIMESTAMP, NONCE, encrypt)
    if as_json:
        return signature, json.dumps({"encrypt": encrypt}).encode()
    return signature, f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode()


@pytest.fixture
def crypto() -> WeComCrypto:
    return WeComCrypto(TOKEN, AES_KEY)


# --- URL verification, messages, replies ----------------------------------------------------------------------


def test_url_verification_returns_plain_echostr(crypto: WeComCrypto) -> None:
    echostr = oracle_encrypt("6150392939127815237")
    signature = oracle_signature(TOKEN, TIMESTAMP, NONCE, echostr)
    assert crypto.signature(TIMESTAMP, NONCE, echostr) == signature
    assert crypto.verify_url(signature, TIMESTAMP, NONCE, echostr) == "6150392939127815237"


def test_xml_text_message_decrypts_to_fly_pigeon_shape(crypto: WeComCrypto) -> None:
    payload = (
        f"<xml><WebhookUrl><![CDATA[{WEBHOOK_URL}]]></WebhookUrl>"
        "<MsgId><![CDATA[CIGABBCOgP3Z/P3Z/gcYByC8h+X2lYCAAw==]]></MsgId>"
        "<ChatId><![CDATA[wrkSFfCgAAxxxx]]></ChatId><ChatType>group</ChatType>"
        "<From><UserId><![CDATA[zhangsan]]></UserId><Name><![CDATA[张三]]></Name><Alias><![CDATA[san]]></Alias></From>"
        "<GetChatInfoUrl><![CDATA[http://in.qyapi.weixin.qq.com/cgi-bin/webhook/get_chat_info?code=x]]></GetChatInfoUrl>"
        "<MsgType>text</MsgType>"
        f"<Text><Content><![CDATA[{QUOTE_REPLY}]]></Content></Text></xml>"
    )
    signature, body = signed_body(payload)
    decrypted = crypto.decrypt_callback(signature, TIMESTAMP, NONCE, body)
    assert decrypted == payload
    assert parse_callback_payload(decrypted) == callback_body(
        QUOTE_REPLY,
        "wrkSFfCgAAxxxx",
        "CIGABBCOgP3Z/P3Z/gcYByC8h+X2lYCAAw==",
        sender={"alias": "san"},
        webhook_url=WEBHOOK_URL,
        get_chat_info_url="http://in.qyapi.weixin.qq.com/cgi-bin/webhook/get_chat_info?code=x",
    )


def test_xml_escaped_content_is_unescaped_and_kept_exact() -> None:
    payload = "<xml><MsgType>text</MsgType><Text><Content>\n  a &lt;b&gt; &amp; “c”\n------\nd  </Content></Text></xml>"
    assert parse_callback_payload(payload)["text"] == {"content": "\n  a <b> & “c”\n------\nd  "}


def test_json_payload_and_json_body(crypto: WeComCrypto) -> None:
    sent = {
        "webhook_url": WEBHOOK_URL,
        "msgid": 12345,
        "chatid": "wrkSFfCgAAxxxx",
        "chattype": "single",
        "from": {"userid": "lisi", "name": "李四", "alias": "si"},
        "msgtype": "text",
        "text": {"content": QUOTE_REPLY},
        "unknown_field": {"ignored": True},
    }
    signature, body = signed_body(json.dumps(sent, ensure_ascii=False), as_json=True)
    decrypted = crypto.decrypt_callback(signature, TIMESTAMP, NONCE, body)
    # The same fields, the msgid as text; fields of no known meaning left out.
    expected = {k: v for k, v in sent.items() if k != "unknown_field"} | {"msgid": "12345"}
    assert parse_callback_payload(decrypted) == expected


def test_capitalised_json_body_key_is_accepted(crypto: WeComCrypto) -> None:
    encrypt = oracle_encrypt("hello")
    signature = oracle_signature(TOKEN, TIMESTAMP, NONCE, encrypt)
    body = json.dumps({"Encrypt": encrypt})
    assert crypto.decrypt_callback(signature, TIMESTAMP, NONCE, body) == "hello"


def test_module_encrypt_decrypts_with_oracle(crypto: WeComCrypto) -> None:
    prefix = bytes(range(16))
    encrypt = crypto.encrypt(QUOTE_REPLY, random_prefix=prefix)
    assert oracle_decrypt(encrypt) == (prefix, QUOTE_REPLY, b"")
    # Every length around a block boundary, including a full padding block.
    for n in range(0, 70):
        assert oracle_decrypt(crypto.encrypt("x" * n))[1] == "x" * n
        assert crypto.decrypt(oracle_encrypt("y" * n)) == "y" * n


def test_encrypt_reply_round_trip(crypto: WeComCrypto) -> None:
    reply = crypto.encrypt_reply("收到 ✅", "1700000000", "abc123")
    root = ET.fromstring(reply)
    assert [c.tag for c in root] == ["Encrypt", "MsgSignature", "TimeStamp", "Nonce"]
    encrypt = root.findtext("Encrypt")
    assert root.findtext("TimeStamp") == "1700000000"
    assert root.findtext("Nonce") == "abc123"
    assert root.findtext("MsgSignature") == oracle_signature(TOKEN, "1700000000", "abc123", encrypt)
    assert oracle_decrypt(encrypt)[1:] == ("收到 ✅", b"")
    signature = root.findtext("MsgSignature")
    assert crypto.decrypt_callback(signature, "1700000000", "abc123", reply) == "收到 ✅"


@pytest.mark.parametrize(("timestamp", "nonce"), [("17x", "abc"), ("1700000000", "a]]>b"), ("1", "")])
def test_encrypt_reply_refuses_unsafe_envelope_values(crypto: WeComCrypto, timestamp: str, nonce: str) -> None:
    with pytest.raises(WeComCryptoError):
        crypto.encrypt_reply("hi", timestamp, nonce)


def test_receive_id_is_checked_when_configured() -> None:
    corp = WeComCrypto(TOKEN, AES_KEY, receive_id="wwcorp123")
    assert corp.decrypt(oracle_encrypt("hi", receive_id="wwcorp123")) == "hi"
    assert oracle_decrypt(corp.encrypt("hi"))[2] == b"wwcorp123"
    with pytest.raises(WeComDecryptError):
        corp.decrypt(oracle_encrypt("hi"))


# --- refusals ---------------------------------------------------------------------------------------------------


def _flip(text: str, index: int) -> str:
    c = text[index]
    return text[:index] + ("0" if c != "0" else "1") + text[index + 1 :]


@pytest.mark.parametrize("index", [0, 17, -1])
def test_one_changed_signature_character_is_refused(crypto: WeComCrypto, index: int) -> None:
    signature, body = signed_body("<xml><MsgType>text</MsgType></xml>")
    with pytest.raises(WeComSignatureError):
        crypto.decrypt_callback(_flip(signature, index), TIMESTAMP, NONCE, body)


def test_signature_bound_to_timestamp_nonce_and_token(crypto: WeComCrypto) -> None:
    echostr = oracle_encrypt("42")
    signature = oracle_signature(TOKEN, TIMESTAMP, NONCE, echostr)
    for args in [(signature, "1409659814", NONCE, echostr), (signature, TIMESTAMP, "1", echostr)]:
        with pytest.raises(WeComSignatureError):
            crypto.verify_url(*args)
    with pytest.raises(WeComSignatureError):
        WeComCrypto("OtherToken", AES_KEY).verify_url(signature, TIMESTAMP, NONCE, echostr)


@pytest.mark.parametrize("bad", ["", "签名", None, "A" * 40])
def test_missing_or_garbled_signature_is_refused(crypto: WeComCrypto, bad: object) -> None:
    echostr = oracle_encrypt("42")
    with pytest.raises(WeComSignatureError):
        crypto.verify_url(bad, TIMESTAMP, NONCE, echostr)  # type: ignore[arg-type]


def _tampered() -> str:
    raw = bytearray(base64.b64decode(oracle_encrypt("a message long enough for two blocks")))
    # CBC: garbles the second-to-last 16-byte plaintext block and flips a bit of the last byte, the padding byte.
    raw[-17] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _wrongly_padded(pad: bytes) -> str:
    plain = oracle_plain(b"hello")  # 25 bytes
    return oracle_raw_b64(plain + pad)


BAD_CIPHERTEXTS = {
    "tampered": _tampered(),
    "tampered header": base64.b64encode(
        bytes([base64.b64decode(oracle_encrypt("hello"))[0] ^ 0x80]) + base64.b64decode(oracle_encrypt("hello"))[1:]
    ).decode(),
    "pad byte 0": _wrongly_padded(b"\x07" * 6 + b"\x00"),
    "pad byte 33": _wrongly_padded(b"\x21" * 7),
    "inconsistent pad": _wrongly_padded(b"\x07" * 5 + b"\x06\x07"),
    # 40 bytes padded to AES's 16-byte block (48) instead of WeCom's 32 (64).
    "16-byte block padding": oracle_raw_b64(oracle_plain(b"x" * 20) + b"\x08" * 8),
    "wrong receive id": oracle_encrypt("hi", receive_id="wwcorp123"),
    "length field too large": oracle_raw_b64(
        oracle_pad(oracle_plain(b"hello")[:16] + struct.pack(">I", 999) + b"hello")
    ),
    "too short for header": oracle_raw_b64(oracle_pad(b"0123456789abcdef\x00\x00")),
    "not utf-8": oracle_raw_b64(oracle_pad(oracle_plain(b"\xff\xfe"))),
    "truncated block": base64.b64encode(base64.b64decode(oracle_encrypt("x" * 40))[:-16]).decode(),
    "truncated base64": oracle_encrypt("x" * 40)[:-5],
    "16 bytes": base64.b64encode(b"\x00" * 16).decode(),
    "not base64": "this is not base64!",
    "non-ascii": "密文密文",
    "empty": "",
    "none": None,
}


@pytest.mark.parametrize("name", BAD_CIPHERTEXTS)
def test_bad_ciphertext_raises_decrypt_error(crypto: WeComCrypto, name: str) -> None:
    encrypt = BAD_CIPHERTEXTS[name]
    with pytest.raises(WeComDecryptError):
        crypto.decrypt(encrypt)  # type: ignore[arg-type]
    if isinstance(encrypt, str) and encrypt:
        # Correctly signed, so only the decryption can refuse it.
        signature = oracle_signature(TOKEN, TIMESTAMP, NONCE, encrypt)
        with pytest.raises(WeComDecryptError):
            crypto.decrypt_callback(signature, TIMESTAMP, NONCE, f"<xml><Encrypt>{encrypt}</Encrypt></xml>")


def test_random_garbage_only_raises_wecom_errors(crypto: WeComCrypto) -> None:
    rng = random.Random(20240601)
    for _ in range(300):
        blob = rng.randbytes(rng.choice([0, 1, 15, 16, 31, 32, 33, 64, 96, 200]))
        encrypt = base64.b64encode(blob).decode()
        signature = crypto.signature(TIMESTAMP, NONCE, encrypt)
        calls = [
            (crypto.decrypt, (encrypt,)),
            (crypto.verify_url, ("0" * 40, TIMESTAMP, NONCE, encrypt)),
            (crypto.decrypt_callback, ("0" * 40, TIMESTAMP, NONCE, blob)),
            (crypto.decrypt_callback, (signature, TIMESTAMP, NONCE, f"<xml><Encrypt>{encrypt}</Encrypt></xml>")),
        ]
        for call, args in calls:
            try:
                call(*args)
            except WeComCryptoError:
                pass  # anything else (binascii.Error, IndexError, ...) fails the test


BAD_BODIES = {
    "doctype": '<!DOCTYPE xml [<!ENTITY e "x">]><xml><Encrypt>&e;</Encrypt></xml>',
    "external entity": '<?xml version="1.0"?><!doctype xml SYSTEM "file:///etc/passwd"><xml><Encrypt>a</Encrypt></xml>',
    "oversize": "<xml><Encrypt>" + "A" * (1024 * 1024) + "</Encrypt></xml>",
    "oversize bytes": b"{" + b" " * (1024 * 1024) + b"}",
    "no encrypt": "<xml><ToUserName>x</ToUserName></xml>",
    "empty encrypt": "<xml><Encrypt></Encrypt></xml>",
    "not xml": "<xml><Encrypt>abc</xml>",
    "plain text": "hello",
    "json without encrypt": '{"msgtype": "text"}',
    "json list": "[1, 2]",
    "json not string": '{"encrypt": 5}',
    "deep json": "{" + '"a":' + "[" * 100_000 + "]" * 100_000 + "}",
    "invalid utf-8": b"<xml><Encrypt>\xff\xfe</Encrypt></xml>",
    "empty": b"",
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_bad_callback_body_raises_decrypt_error(crypto: WeComCrypto, name: str) -> None:
    with pytest.raises(WeComDecryptError) as info:
        crypto.decrypt_callback("0" * 40, TIMESTAMP, NONCE, BAD_BODIES[name])
    assert str(info.value)


def test_doctype_message_is_clear(crypto: WeComCrypto) -> None:
    with pytest.raises(WeComDecryptError, match="DOCTYPE"):
        crypto.decrypt_callback("0" * 40, TIMESTAMP, NONCE, BAD_BODIES["doctype"])


@pytest.mark.parametrize(
    ("token", "key", "setting"),
    [
        ("", AES_KEY, "WECOM_CALLBACK_TOKEN"),
        ("tok-en", AES_KEY, "WECOM_CALLBACK_TOKEN"),
        ("secret token", AES_KEY, "WECOM_CALLBACK_TOKEN"),
        ("T" * 33, AES_KEY, "WECOM_CALLBACK_TOKEN"),
        ("Tökén", AES_KEY, "WECOM_CALLBACK_TOKEN"),
        (TOKEN, AES_KEY[:-1], "WECOM_CALLBACK_AES_KEY"),
        (TOKEN, AES_KEY + "=", "WECOM_CALLBACK_AES_KEY"),
        (TOKEN, AES_KEY + "Q", "WECOM_CALLBACK_AES_KEY"),
        (TOKEN, AES_KEY[:-1] + "!", "WECOM_CALLBACK_AES_KEY"),
        (TOKEN, "", "WECOM_CALLBACK_AES_KEY"),
        (TOKEN, None, "WECOM_CALLBACK_AES_KEY"),
    ],
)
def test_bad_config_names_setting_without_secret(token: str, key: str, setting: str) -> None:
    with pytest.raises(ValueError, match=setting) as info:
        WeComCrypto(token, key)
    message = str(info.value)
    for secret in (token, key):
        if secret and len(secret) > 3:
            assert secret not in message
    assert AES_KEY[:10] not in message


def test_repr_hides_secrets(crypto: WeComCrypto) -> None:
    assert TOKEN not in repr(crypto) and AES_KEY not in repr(crypto)


# --- payload parsing --------------------------------------------------------------------------------------------


def test_mixed_message_xml() -> None:
    payload = (
        "<xml><ChatId>c1</ChatId><ChatType>single</ChatType><MsgType>mixed</MsgType><MixedMessage>"
        f"<MsgItem><MsgType>text</MsgType><Text><Content><![CDATA[{QUOTE_REPLY}]]></Content></Text></MsgItem>"
        "<MsgItem><MsgType>image</MsgType><Image><ImageUrl><![CDATA[https://img/1.png]]></ImageUrl></Image></MsgItem>"
        "</MixedMessage></xml>"
    )
    assert parse_callback_payload(payload) == {
        "chatid": "c1",
        "chattype": "single",
        "msgtype": "mixed",
        "mixed_message": {
            "msg_item": [
                {"msg_type": "text", "text": {"content": QUOTE_REPLY}},
                {"msg_type": "image", "image": {"image_url": "https://img/1.png"}},
            ]
        },
    }


def test_mixed_message_single_item_is_a_list() -> None:
    payload = (
        "<xml><MsgType>mixed</MsgType><MixedMessage>"
        "<MsgItem><MsgType>text</MsgType><Text><Content>hi</Content></Text></MsgItem></MixedMessage></xml>"
    )
    assert parse_callback_payload(payload)["mixed_message"] == {
        "msg_item": [{"msg_type": "text", "text": {"content": "hi"}}]
    }


def test_mixed_message_json() -> None:
    payload = {
        "chatid": "c1",
        "msgtype": "mixed",
        "mixed_message": {
            "msg_item": [
                {"msg_type": "text", "text": {"content": " 你好\n"}},
                {"msg_type": "image", "image": {"image_url": "https://img/2.png"}},
            ]
        },
    }
    assert parse_callback_payload(json.dumps(payload)) == payload


def test_image_message_xml() -> None:
    payload = (
        "<xml><ChatId>c1</ChatId><MsgType>image</MsgType><Image><ImageUrl>https://img/3.png</ImageUrl></Image></xml>"
    )
    assert parse_callback_payload(payload) == {
        "chatid": "c1",
        "msgtype": "image",
        "image": {"image_url": "https://img/3.png"},
    }


@pytest.mark.parametrize(
    "payload",
    [
        "<xml><ChatId>c9</ChatId><ChatType>single</ChatType><MsgType>event</MsgType>"
        "<From><UserId>u1</UserId></From><Event><EventType>enter_chat</EventType></Event></xml>",
        json.dumps(
            {
                "chatid": "c9",
                "chattype": "single",
                "msgtype": "event",
                "from": {"userid": "u1"},
                "event": {"event_type": "enter_chat"},
            }
        ),
    ],
)
def test_event_payload(payload: str) -> None:
    assert parse_callback_payload(payload) == {
        "chatid": "c9",
        "chattype": "single",
        "msgtype": "event",
        "from": {"userid": "u1"},
        "event": {"event_type": "enter_chat"},
    }


def test_attachment_payload_xml_and_json() -> None:
    xml_payload = (
        "<xml><MsgType>attachment</MsgType><Attachment><CallbackId>cb1</CallbackId>"
        "<Actions><Name>approve</Name><Value>yes</Value><Type>button</Type></Actions></Attachment></xml>"
    )
    expected = {
        "msgtype": "attachment",
        "attachment": {"callback_id": "cb1", "actions": [{"name": "approve", "value": "yes", "type": "button"}]},
    }
    assert parse_callback_payload(xml_payload) == expected
    json_payload = {
        "msgtype": "attachment",
        "attachment": {"callbackid": "cb1", "actions": [{"name": "approve", "value": "yes", "type": "button"}]},
    }
    assert parse_callback_payload(json.dumps(json_payload)) == expected


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "   ",
        "hello",
        "<xml><MsgType>text</MsgType>",
        "{not json",
        "[1, 2]",
        '<!DOCTYPE xml [<!ENTITY a "b">]><xml><MsgType>&a;</MsgType></xml>',
        "<xml>" + "<a>" * 50 + "</a>" * 50 + "</xml>",
        "[" * 100_000,
        "{" + '"a":' + "[" * 100_000 + "]" * 100_000 + "}",
        "<xml><Text><Content>" + "x" * (1024 * 1024) + "</Content></Text></xml>",
        b"<xml>\xff</xml>",
    ],
)
def test_unparseable_payload_raises(payload: str) -> None:
    with pytest.raises(CallbackPayloadError):
        parse_callback_payload(payload)
