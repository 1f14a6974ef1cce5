"""WeCom's encrypted robot callback: msg_signature check, AES-256-CBC payloads, URL verification, passive replies."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .wecom_xml import MAX_PAYLOAD_BYTES, CallbackPayloadError, decode_text, load_json_object, safe_fromstring

_TOKEN_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_AES_KEY_RE = re.compile(r"[A-Za-z0-9+/]{43}")
# Values we put inside CDATA / element text of a reply; anything else could break out of the envelope.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,20}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_\-]{1,128}")
_RANDOM_LEN = 16
_BLOCK_BITS = 256  # WeCom pads to 32-byte blocks, not AES's 16


class WeComCryptoError(ValueError):
    """A WeCom callback could not be verified or decrypted."""


class WeComSignatureError(WeComCryptoError):
    """msg_signature is missing or does not match: the request did not come from WeCom with our Token."""


class WeComDecryptError(WeComCryptoError):
    """The encrypted part is malformed, or was not encrypted with our EncodingAESKey / receive id."""


class WeComCrypto:
    """Verify, decrypt and encrypt WeCom robot callbacks for one Token / EncodingAESKey pair."""

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str = "") -> None:
        # Messages name the setting and never echo the value: these strings end up in logs.
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise ValueError(
                "WECOM_CALLBACK_TOKEN must be the robot callback Token: 1-32 ASCII letters or digits "
                "(copy it from the robot's callback settings)"
            )
        if not isinstance(encoding_aes_key, str) or len(encoding_aes_key) != 43:
            length = len(encoding_aes_key) if isinstance(encoding_aes_key, str) else 0
            raise ValueError(
                f"WECOM_CALLBACK_AES_KEY must be the robot's 43-character EncodingAESKey; the configured value has "
                f"{length} characters (copy it from the robot's callback settings)"
            )
        if not _AES_KEY_RE.fullmatch(encoding_aes_key):
            raise ValueError(
                "WECOM_CALLBACK_AES_KEY may contain only letters, digits, '+' and '/'; copy the EncodingAESKey again"
            )
        try:
            key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except binascii.Error:
            raise ValueError("WECOM_CALLBACK_AES_KEY is not valid base64; copy the EncodingAESKey again") from None
        if len(key) != 32:  # cannot happen for 43 base64 characters, but the cipher depends on it
            raise ValueError("WECOM_CALLBACK_AES_KEY does not decode to a 32-byte AES key")
        if not isinstance(receive_id, str):
            raise ValueError("WeCom receive_id must be a string ('' for group robots)")
        self._token = token
        self._key = key
        self._iv = key[:16]
        self._receive_id = receive_id.encode("utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(receive_id={self._receive_id.decode()!r})"  # never the Token or key

    def signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        """msg_signature: lowercase hex SHA1 of Token, timestamp, nonce and encrypt, sorted then joined."""
        parts = [self._token, timestamp, nonce, encrypt]
        if not all(isinstance(p, str) for p in parts):
            raise WeComSignatureError("timestamp, nonce and the encrypted text must all be present")
        joined = "".join(sorted(parts)).encode("utf-8", "surrogatepass")
        return hashlib.sha1(joined).hexdigest()  # SHA1 is WeCom's choice, not ours

    def verify_signature(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> None:
        """Raise WeComSignatureError unless msg_signature matches."""
        if not isinstance(msg_signature, str) or not msg_signature:
            raise WeComSignatureError("msg_signature is missing from the callback URL")
        expected = self.signature(timestamp, nonce, encrypt)
        # compare_digest on str refuses non-ASCII with TypeError; bytes keep attacker input from reaching that.
        if not hmac.compare_digest(expected.encode(), msg_signature.encode("utf-8", "surrogatepass")):
            raise WeComSignatureError(
                "msg_signature does not match: the request is not from WeCom, or WECOM_CALLBACK_TOKEN differs "
                "from the Token in the robot's callback settings"
            )

    def decrypt(self, encrypt_b64: str) -> str:
        """Decrypt one base64 `Encrypt` value / echostr and return the message (UTF-8 text)."""
        if not isinstance(encrypt_b64, str) or not encrypt_b64:
            raise WeComDecryptError("the encrypted text is empty")
        if len(encrypt_b64) > 2 * MAX_PAYLOAD_BYTES:
            raise WeComDecryptError("the encrypted text is too large")
        try:
            ciphertext = base64.b64decode(encrypt_b64, validate=True)
        except ValueError as exc:  # binascii.Error, or non-ASCII characters
            raise WeComDecryptError("the encrypted text is not valid base64") from exc
        if not ciphertext or len(ciphertext) % (_BLOCK_BITS // 8):
            raise WeComDecryptError("the encrypted text has the wrong length (truncated?)")

        decryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._iv)).decryptor()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        unpadder = padding.PKCS7(_BLOCK_BITS).unpadder()
        try:
            plain = unpadder.update(padded) + unpadder.finalize()
        except ValueError as exc:
            raise WeComDecryptError(
                "bad padding after decryption: WECOM_CALLBACK_AES_KEY differs from the robot's EncodingAESKey, "
                "or the message was altered"
            ) from exc

        if len(plain) < _RANDOM_LEN + 4:
            raise WeComDecryptError("the decrypted text is too short")
        (length,) = struct.unpack(">I", plain[_RANDOM_LEN : _RANDOM_LEN + 4])
        start = _RANDOM_LEN + 4
        if start + length > len(plain):
            raise WeComDecryptError("the decrypted length field is larger than the message")
        message, receive_id = plain[start : start + length], plain[start + length :]
        if receive_id != self._receive_id:
            raise WeComDecryptError("the message was encrypted for a different receive id")
        try:
            return message.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WeComDecryptError("the decrypted message is not valid UTF-8") from exc

    def encrypt(self, plaintext: str, random_prefix: bytes | None = None) -> str:
        """Encrypt `plaintext` the way WeCom does; `random_prefix` (16 bytes) is only for tests."""
        if random_prefix is None:
            random_prefix = os.urandom(_RANDOM_LEN)
        if not isinstance(random_prefix, bytes) or len(random_prefix) != _RANDOM_LEN:
            raise WeComCryptoError(f"random_prefix must be {_RANDOM_LEN} bytes")
        if not isinstance(plaintext, str):
            raise WeComCryptoError("the reply to encrypt must be text")
        try:
            message = plaintext.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates
            raise WeComCryptoError("the reply to encrypt is not valid Unicode text") from exc
        plain = random_prefix + struct.pack(">I", len(message)) + message + self._receive_id
        padder = padding.PKCS7(_BLOCK_BITS).padder()
        padded = padder.update(plain) + padder.finalize()
        encryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._iv)).encryptor()
        return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode("ascii")

    def verify_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """URL verification (GET): check the signature, return the decrypted echostr to answer with as is."""
        self.verify_signature(msg_signature, timestamp, nonce, echostr)
        return self.decrypt(echostr)

    def decrypt_callback(self, msg_signature: str, timestamp: str, nonce: str, body: bytes | str) -> str:
        """A callback POST: take Encrypt from the body, check the signature, return the decrypted payload."""
        encrypt = extract_encrypt(body)
        self.verify_signature(msg_signature, timestamp, nonce, encrypt)
        return self.decrypt(encrypt)

    def encrypt_reply(self, plaintext: str, timestamp: str, nonce: str) -> str:
        """The passive-reply envelope for answering a callback in the same HTTP response."""
        if not isinstance(timestamp, str) or not _TIMESTAMP_RE.fullmatch(timestamp):
            raise WeComCryptoError("reply timestamp must be decimal digits")
        if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
            raise WeComCryptoError("reply nonce must be 1-128 letters, digits, '_' or '-'")
        encrypt = self.encrypt(plaintext)
        signature = self.signature(timestamp, nonce, encrypt)
        # base64, hex, digits and the nonce above contain nothing that could close a CDATA section.
        return (
            f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt>"
            f"<MsgSignature><![CDATA[{signature}]]></MsgSignature>"
            f"<TimeStamp>{timestamp}</TimeStamp>"
            f"<Nonce><![CDATA[{nonce}]]></Nonce></xml>"
        )


def extract_encrypt(body: bytes | str) -> str:
    """The `Encrypt` value of a callback body: `<xml><Encrypt>…</Encrypt></xml>` or `{"encrypt": "…"}`."""
    try:
        text = decode_text(body, "callback body").strip()
        if text.startswith(("{", "[")):
            data = load_json_object(text, "callback body")
            value = next((v for k, v in data.items() if isinstance(k, str) and k.lower() == "encrypt"), None)
        else:
            root = safe_fromstring(text, "callback body")
            node = next((c for c in root if isinstance(c.tag, str) and c.tag.lower() == "encrypt"), None)
            value = None if node is None else node.text
    except CallbackPayloadError as exc:
        raise WeComDecryptError(str(exc)) from exc
    if not isinstance(value, str) or not value.strip():
        raise WeComDecryptError("callback body has no Encrypt field")
    return value.strip()
