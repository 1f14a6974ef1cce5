"""WeCom's side of the signed (encrypted) robot callback, written from WECOM.md and not from our code: tests sign and
encrypt with it, so a passing test does not merely check hil_protocol.wecom_crypto against itself."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
import time
from typing import Any
from xml.sax.saxutils import escape

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


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

    def query(self, encrypt: str, *, at: float | None = None, **extra: str) -> dict[str, str]:
        """Signed query parameters; `at` signs with another time (a captured or a forged-future callback)."""
        timestamp, nonce = str(int(time.time() if at is None else at)), secrets.token_hex(6)
        return {"msg_signature": self.sign(timestamp, nonce, encrypt), "timestamp": timestamp, "nonce": nonce, **extra}

    def verification(self, echo_plain: str) -> dict[str, str]:
        """GET query for URL verification."""
        echostr = self.encrypt(echo_plain)
        return {**self.query(echostr), "echostr": echostr}

    def xml_post(self, payload_xml: str, *, at: float | None = None) -> tuple[dict[str, str], bytes]:
        encrypt = self.encrypt(payload_xml)
        return self.query(encrypt, at=at), f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode()

    def json_post(self, payload: dict[str, Any], *, at: float | None = None) -> tuple[dict[str, str], bytes]:
        encrypt = self.encrypt(json.dumps(payload, ensure_ascii=False))
        query = self.query(encrypt, at=at, robot_callback_format="json")
        return query, json.dumps({"encrypt": encrypt}).encode()


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


def text_payload_json(
    chat_id: str, content: str, msgid: str, userid: str = "lisi", chattype: str = "group"
) -> dict[str, Any]:
    """The same in the JSON (snake_case) form, for URLs with robot_callback_format=json."""
    return {
        "webhook_url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=xx",
        "msgid": msgid,
        "chatid": chat_id,
        "chattype": chattype,
        "from": {"userid": userid, "name": "李四", "alias": userid},
        "msgtype": "text",
        "text": {"content": content},
    }


def tamper(signature: str) -> str:
    """The same signature with one character changed."""
    return signature[:-1] + ("0" if signature[-1] != "0" else "1")
