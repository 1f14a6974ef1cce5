"""`/api/send` validation that matches meaning: approvals_required against the distinct responders (the server's
defaults too), responders deduplicated case-insensitively, and project names of any printable text except the
characters that break the `[#id project]` header — with the header still matched by a quote-reply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hil_protocol.callback import parse_callback
from hil_protocol.messages import HEADER_RE, format_header, parse_reply_text
from hil_server.app import create_app
from hil_server.models import SendRequest, project_name_problem
from tests.helpers import callback_body
from tests.server_fixtures import WeCom, settings
from tests.service_helpers import new_service
from tests.test_choices import Channel, ask

pytestmark = pytest.mark.usefixtures("clean_env")

DEV = "👨\u200d💻 dev"  # an emoji joined by ZWJ (U+200D)


# --- responders and approvals_required -----------------------------------------------------------------------------


def test_responders_are_deduplicated_case_insensitively() -> None:
    assert SendRequest(message="q", responders=["lisi", "LISI", " LiSi ", "wangwu", ""]).responders == [
        "lisi",
        "wangwu",
    ]


@pytest.mark.parametrize(
    ("responders", "required", "named"),
    [(["lisi", "LISI"], 2, "only 1 distinct person"), (["a", "b"], 3, "only 2 distinct people")],
)
def test_more_approvals_than_distinct_responders_is_refused(responders: list[str], required: int, named: str) -> None:
    with pytest.raises(ValueError, match=f"approvals_required is {required} but responders name {named}"):
        SendRequest(message="q", responders=responders, approvals_required=required)


def test_approvals_with_no_responders_at_all_are_fine() -> None:
    # Anyone in the chat may answer: any number of different people can approve.
    assert SendRequest(message="q", approvals_required=5).approvals_required == 5


async def test_the_default_responders_count_too() -> None:
    from hil_server.errors import InvalidRequest

    service = await new_service(Channel(), default_responders=("boss", "BOSS"))
    with pytest.raises(InvalidRequest, match="approvals_required is 2 but the server's default responders"):
        await ask(service, approvals_required=2)
    assert (await service.repo.questions()) == []  # nothing stored, nothing sent
    assert service.channel.questions == []  # type: ignore[attr-defined]
    await ask(service, approvals_required=1)
    await ask(service, approvals_required=2, responders=["lisi", "wangwu"])  # the request's own responders rule


def test_http_422_bodies_name_both_numbers(tmp_path: Path, wecom: WeCom) -> None:
    app = create_app(settings(tmp_path, hil_default_responders="boss,Boss"))
    with TestClient(app) as client:
        own = client.post("/api/send", json={"message": "q", "responders": ["lisi", "LISI"], "approvals_required": 2})
        defaults = client.post("/api/send", json={"message": "q", "approvals_required": 2})
        fine = client.post("/api/send", json={"message": "q", "chat_id": "c1", "approvals_required": 1})
    for response in (own, defaults):
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["success"] is False and body["message"] == body["error"]
        assert "approvals_required is 2" in body["error"] and "only 1 distinct person" in body["error"]
    assert "responders" in own.json()["error"] and own.json()["detail"][0]["loc"] == ["body"]
    assert "HIL_DEFAULT_RESPONDERS" in defaults.json()["error"]
    assert fine.status_code == 200 and fine.json()["success"] is True
    assert len(wecom.accepted) == 1  # the refused ones never reached WeCom


# --- project_name --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        DEV,
        "my proj",
        "项目　A",
        "café",
        "👍🏽 deploy",
        "🏳️‍🌈",
        "x" * 64,
        "a-b_c.d/e:f",
        "日本語\u200cテキスト",
        "«guillemets»",
    ],
)
def test_printable_project_names_are_taken(name: str) -> None:
    assert SendRequest(message="q", project_name=name).project_name == name


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("a[b", "project_name may not contain '[' (U+005B)"),
        ("a]b", "project_name may not contain ']' (U+005D)"),
        ("a\nb", "project_name may not contain a line break (U+000A)"),
        ("a\rb", "project_name may not contain a line break (U+000D)"),
        ("a\u2028b", "project_name may not contain a line break (U+2028)"),
        ("a\u0085b", "project_name may not contain a line break (U+0085)"),
        ("a\tb", "project_name may not contain U+0009 (a control character)"),
        ("a\x1bb", "project_name may not contain U+001B (a control character)"),
        ("a\x00b", "project_name may not contain U+0000 (a control character)"),
        ("evil\u202etxt.exe", "project_name may not contain U+202E RIGHT-TO-LEFT OVERRIDE (an invisible format"),
        ("a\u2066b", "U+2066 LEFT-TO-RIGHT ISOLATE"),
        ("a\u200bb", "U+200B ZERO WIDTH SPACE"),
        ("a\u200eb", "U+200E LEFT-TO-RIGHT MARK"),
        ("a\ufeffb", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
        ("a\U000e0041b", "U+E0041 TAG LATIN CAPITAL LETTER A"),  # hidden text smuggled in tag characters
        ("a\ue000b", "U+E000 (an unassigned or private-use code point)"),
    ],
)
def test_refused_project_names_say_which_character(name: str, error: str) -> None:
    assert error in (project_name_problem(name) or "")
    with pytest.raises(ValueError, match="project_name may not contain"):
        SendRequest(message="q", project_name=name)


def test_project_name_keeps_its_length_limit() -> None:
    with pytest.raises(ValueError, match="longer than 64"):
        SendRequest(message="q", project_name="👨\u200d💻" * 22)  # 66 code points


def test_http_422_names_the_refused_character(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path))) as client:
        bracket = client.post("/api/send", json={"message": "q", "chat_id": "c1", "project_name": "a[b"})
        bidi = client.post("/api/send", json={"message": "q", "chat_id": "c1", "project_name": "x\u202ey"})
        emoji = client.post("/api/send", json={"message": "q", "chat_id": "c1", "project_name": DEV})
    assert bracket.status_code == 422 and "'[' (U+005B)" in bracket.json()["error"]
    assert bidi.status_code == 422 and "U+202E" in bidi.json()["error"]
    assert bidi.json()["detail"][0]["loc"] == ["body", "project_name"]
    assert emoji.status_code == 200, emoji.text
    wecom.wait_for(lambda: any(t.startswith(f"[#{emoji.json()['short_id']} {DEV}]") for t in wecom.texts()))


# --- the header round trip -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [DEV, "项目　A", "🏳️‍🌈 flags", "a b  c"])
def test_the_header_round_trips_a_project_name(name: str) -> None:
    header = format_header("1a2b3c4d", name)
    match = HEADER_RE.fullmatch(header)
    assert match is not None and match.group("short_id") == "1a2b3c4d" and match.group("project") == name
    quoted = f"“张三：\n{header}\n部署吗？”\n------\n@bot 批准"
    parsed = parse_reply_text(quoted)
    assert parsed.quoted_short_id == "1a2b3c4d" and parsed.answer == "批准"


async def test_a_quote_reply_to_an_emoji_project_is_matched() -> None:
    service = await new_service(Channel())
    await ask(service, project_name=DEV)
    second = await ask(service, project_name=DEV, approvals_required=1)  # two waiting: only a quote can say which
    session = await service.get(second)
    assert session is not None
    header = format_header(session.short_id, session.project_name)
    body: dict[str, Any] = callback_body(f"“机器人：\n{header}\n合并吗？”\n------\n@bot 批准", "c")
    assert await service.handle_message(parse_callback(body)) == "matched_quote"
    result = await service.poll(await service.get(second))  # type: ignore[arg-type]
    assert result.status == "replied" and result.approval is not None and result.approval.approved is True
