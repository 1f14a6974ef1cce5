"""hil_protocol.callback.parse_callback: fly-pigeon's callback JSON -> IncomingMessage."""

from __future__ import annotations

from typing import Any

import pytest

from hil_protocol.callback import CallbackError, parse_callback
from hil_sandbox.fake_wecom import format_quote_reply

FROM = {"userid": "zhangsan", "name": "张三", "alias": "san"}


def body(msgtype: str, **extra: Any) -> dict[str, Any]:
    return {
        "webhook_url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=xyz",
        "chatid": "wrkSFfCgAAxxxx",
        "chattype": "group",
        "msgid": "msg-001",
        "from": FROM,
        "msgtype": msgtype,
        **extra,
    }


def test_text_quote_reply() -> None:
    content = format_quote_reply("[#1a2b3c4d proj]\nDeploy now?", "yes", sender="张三", robot_name="HIL助手")
    msg = parse_callback(body("text", text={"content": content}))
    assert msg.msg_type == "text"
    assert msg.msgid == "msg-001"
    assert msg.chat_id == "wrkSFfCgAAxxxx"
    assert msg.chat_type == "group"
    assert msg.quoted_short_id == "1a2b3c4d"
    assert msg.answer == "yes"
    assert msg.image_urls == []
    assert not msg.is_event


def test_text_plain_mention() -> None:
    msg = parse_callback(body("text", text={"content": "@HIL助手 looks good"}))
    assert msg.quoted_short_id is None
    assert msg.answer == "looks good"


def test_from_user_mapping() -> None:
    msg = parse_callback(body("text", text={"content": "hi"}))
    assert (msg.from_user.userid, msg.from_user.name, msg.from_user.alias) == ("zhangsan", "张三", "san")


def test_missing_from_gives_empty_user() -> None:
    data = body("text", text={"content": "hi"})
    del data["from"]
    msg = parse_callback(data)
    assert msg.from_user.userid == ""


def test_image() -> None:
    msg = parse_callback(body("image", chattype="single", image={"image_url": "https://wework.test/img/1.png"}))
    assert msg.msg_type == "image"
    assert msg.chat_type == "single"
    assert msg.image_urls == ["https://wework.test/img/1.png"]
    assert msg.answer == ""


def test_mixed_with_quote_in_first_text_item() -> None:
    first = format_quote_reply("[#0badc0de p]\nwhich color?", "this one:", robot_name="HIL助手")
    data = body(
        "mixed",
        mixed_message={
            "msg_item": [
                {"msg_type": "text", "text": {"content": first}},
                {"msg_type": "image", "image": {"image_url": "https://wework.test/a.png"}},
                {"msg_type": "text", "text": {"content": "  and also this  "}},
                {"msg_type": "image", "image": {"image_url": "https://wework.test/b.png"}},
            ]
        },
    )
    msg = parse_callback(data)
    assert msg.msg_type == "mixed"
    assert msg.quoted_short_id == "0badc0de"
    assert msg.answer == "this one:\nand also this"
    assert msg.image_urls == ["https://wework.test/a.png", "https://wework.test/b.png"]


def test_mixed_quote_only_read_from_first_text_item() -> None:
    later = format_quote_reply("[#0badc0de p]\nq", "x")
    data = body(
        "mixed",
        mixed_message={
            "msg_item": [
                {"msg_type": "text", "text": {"content": "@HIL助手 first"}},
                {"msg_type": "text", "text": {"content": later}},
            ]
        },
    )
    msg = parse_callback(data)
    assert msg.quoted_short_id is None
    assert msg.answer.startswith("first\n")


@pytest.mark.parametrize("event_type", ["enter_chat", "add_to_chat", "delete_from_chat"])
def test_event(event_type: str) -> None:
    msg = parse_callback(body("event", chattype="single", event={"event_type": event_type}))
    assert msg.msg_type == "event"
    assert msg.event_type == event_type
    assert msg.is_event
    assert msg.answer == ""


def test_unknown_msgtype_is_other() -> None:
    msg = parse_callback(body("attachment", attachment={"callbackid": "c1"}))
    assert msg.msg_type == "other"
    assert msg.is_event


def test_extra_unknown_fields_accepted() -> None:
    data = body(
        "text",
        text={"content": "@HIL助手 ok", "brand_new": 1},
        get_chat_info_url="https://qyapi.test/chatinfo?code=1",
        some_future_field={"nested": [1, 2]},
        **{"from": {**FROM, "department": "R&D"}},
    )
    msg = parse_callback(data)
    assert msg.answer == "ok"
    assert msg.from_user.userid == "zhangsan"


def test_msgtype_case_insensitive() -> None:
    assert parse_callback(body("TEXT", text={"content": "hi"})).msg_type == "text"


def test_missing_chatid_names_the_field() -> None:
    data = body("text", text={"content": "hi"})
    del data["chatid"]
    with pytest.raises(CallbackError, match="chatid"):
        parse_callback(data)


def test_empty_chatid_refused() -> None:
    with pytest.raises(CallbackError, match="chatid"):
        parse_callback(body("text", chatid="", text={"content": "hi"}))


def test_missing_msgtype_names_the_field() -> None:
    data = body("text", text={"content": "hi"})
    del data["msgtype"]
    with pytest.raises(CallbackError, match="msgtype"):
        parse_callback(data)


@pytest.mark.parametrize("data", [[{"chatid": "c"}], "text", None, 42])
def test_non_dict_body(data: Any) -> None:
    with pytest.raises(CallbackError, match="JSON object"):
        parse_callback(data)


def test_callback_error_is_a_value_error() -> None:
    # Callers that only know ValueError (e.g. generic 400 handlers) still catch it.
    with pytest.raises(ValueError):
        parse_callback({})
