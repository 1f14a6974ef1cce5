"""WeCom robot callback payloads: safe XML loading and the decrypted payload -> fly-pigeon JSON shape."""

from __future__ import annotations

import json
import re
from typing import Any
from xml.etree import ElementTree as ET

# A robot callback is a few KB; anything near this is an attack or a mistake, not a message.
MAX_PAYLOAD_BYTES = 1024 * 1024
# Enough for <xml><MixedMessage><MsgItem><Text><Content>; a deeper tree is not a WeCom payload.
_MAX_DEPTH = 8
# Refused outright rather than trusted to expat's limits: no WeCom payload declares a DTD or entities.
_DTD_RE = re.compile(r"<!\s*(?:DOCTYPE|ENTITY)", re.IGNORECASE)


class CallbackPayloadError(ValueError):
    """The decrypted callback payload is not XML or JSON we can read."""


def decode_text(data: str | bytes, what: str = "payload") -> str:
    """Return `data` as text, refusing oversize or non-UTF-8 input (WeCom sends UTF-8 only)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) > MAX_PAYLOAD_BYTES:
            raise CallbackPayloadError(f"{what} is larger than {MAX_PAYLOAD_BYTES} bytes; refusing it")
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise CallbackPayloadError(f"{what} is not valid UTF-8") from exc
    if not isinstance(data, str):
        raise CallbackPayloadError(f"{what} must be text, not {type(data).__name__}")
    # Length in characters first, so a huge string is refused before it is encoded just to be measured.
    if len(data) > MAX_PAYLOAD_BYTES or len(data.encode("utf-8", "surrogatepass")) > MAX_PAYLOAD_BYTES:
        raise CallbackPayloadError(f"{what} is larger than {MAX_PAYLOAD_BYTES} bytes; refusing it")
    return data.lstrip("\ufeff")


def safe_fromstring(data: str | bytes, what: str = "payload") -> ET.Element:
    """Parse a small XML document that has no DOCTYPE/ENTITY declarations."""
    text = decode_text(data, what)
    if _DTD_RE.search(text):
        raise CallbackPayloadError(f"{what} contains a DOCTYPE or ENTITY declaration; refusing it")
    try:
        # A str is fed to expat as UTF-8 whatever the XML declaration says, so the check above saw what expat sees.
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise CallbackPayloadError(f"{what} is not well-formed XML: {exc}") from exc


def load_json_object(data: str | bytes, what: str = "payload") -> dict[str, Any]:
    """Parse a small JSON document whose top level is an object."""
    text = decode_text(data, what)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise CallbackPayloadError(f"{what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise CallbackPayloadError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def parse_callback_payload(payload: str | bytes) -> dict[str, Any]:
    """Turn a decrypted robot callback (PascalCase XML or snake_case JSON) into the fly-pigeon JSON shape.

    Only keys present in the payload appear in the result. Text content is kept exactly (quote-replies need
    their newlines); ids and other scalars are stripped strings.
    """
    text = decode_text(payload).strip()
    if text.startswith("{"):
        raw: Any = load_json_object(text)
    elif text.startswith("<"):
        raw = _element_to_raw(safe_fromstring(text), depth=0)
        if not isinstance(raw, dict):
            raw = {}  # <xml/> or <xml>text</xml>: a document with no fields
    else:
        raise CallbackPayloadError("callback payload is neither XML nor JSON")
    return _normalise(raw)


def _element_to_raw(element: ET.Element, depth: int) -> dict[str, Any] | str:
    """XML -> nested dicts; a leaf becomes its text, a repeated tag becomes a list."""
    if depth > _MAX_DEPTH:
        raise CallbackPayloadError("callback payload is nested too deeply")
    children = list(element)
    if not children:
        return element.text or ""
    out: dict[str, Any] = {}
    for child in children:
        value = _element_to_raw(child, depth + 1)
        if child.tag in out:
            previous = out[child.tag]
            out[child.tag] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            out[child.tag] = value
    return out


def _key(name: object) -> str:
    # One spelling for both forms: MsgId / msgid, WebhookUrl / webhook_url, CallbackId / callback_id.
    return str(name).replace("_", "").lower()


def _get(raw: dict[str, Any], name: str) -> Any:
    wanted = _key(name)
    for k, v in raw.items():
        if _key(k) == wanted:
            return v
    return None


def _scalar(value: Any, *, strip: bool = True) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        value = str(value).lower()
    text = str(value)
    return text.strip() if strip else text


def _as_dict(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if value == "":
        return {}  # an empty XML element such as <Text/>
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    # XML with a single repeated element yields a dict, not a list.
    return value if isinstance(value, list) else [value]


def _fields(raw: dict[str, Any], names: tuple[str, ...], *, exact: tuple[str, ...] = ()) -> dict[str, str]:
    """The named scalar fields present in `raw`, under their snake_case names; `exact` ones are not stripped."""
    out: dict[str, str] = {}
    for name in names:
        value = _scalar(_get(raw, name), strip=name not in exact)
        if value is not None:
            out[name] = value
    return out


def _sub(raw: dict[str, Any], name: str, names: tuple[str, ...], *, exact: tuple[str, ...] = ()) -> dict | None:
    inner = _as_dict(_get(raw, name))
    return None if inner is None else _fields(inner, names, exact=exact)


_TOP = ("webhook_url", "msgid", "chatid", "chattype", "msgtype", "get_chat_info_url")
_NESTED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("from", ("userid", "name", "alias")),
    ("text", ("content",)),
    ("image", ("image_url",)),
    ("event", ("event_type",)),
)
# Message text is kept byte for byte: a quote-reply's leading/trailing newlines are part of its format.
_EXACT = ("content",)


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = _fields(raw, _TOP)
    for name, names in _NESTED:
        sub = _sub(raw, name, names, exact=_EXACT)
        if sub is not None:
            out[name] = sub

    mixed = _as_dict(_get(raw, "mixed_message"))
    if mixed is not None:
        items = [_msg_item(i) for i in _as_list(_get(mixed, "msg_item")) if isinstance(i, dict)]
        out["mixed_message"] = {"msg_item": items}

    attachment = _as_dict(_get(raw, "attachment"))
    if attachment is not None:
        att: dict[str, Any] = _fields(attachment, ("callback_id",))
        actions = _get(attachment, "actions")
        if actions is not None:
            att["actions"] = [_fields(a, ("name", "value", "type")) for a in _as_list(actions) if isinstance(a, dict)]
        out["attachment"] = att
    return out


def _msg_item(raw: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = _fields(raw, ("msg_type",))
    for name, names in (("text", ("content",)), ("image", ("image_url",))):
        sub = _sub(raw, name, names, exact=_EXACT)
        if sub is not None:
            item[name] = sub
    return item
