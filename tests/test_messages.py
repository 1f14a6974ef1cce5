"""hil_protocol.messages: the question header, splitting to WeCom's 2048-byte limit, and quote-reply parsing."""

from __future__ import annotations

import re

import pytest

from hil_protocol.messages import (
    HEADER_RE,
    TEXT_LIMIT,
    ParsedText,
    format_header,
    new_short_id,
    parse_reply_text,
    split_text,
    strip_mention,
    truncate_bytes,
    utf8_len,
)
from hil_sandbox.fake_wecom import format_quote_reply

HEADER = "[#1a2b3c4d my project]"
COUNTER_RE = re.compile(r"^(?P<header>\[#[0-9a-f]{8}[^\]\n]*\]) \((?P<i>\d+)/(?P<n>\d+)\)\n", re.DOTALL)


def lined_question(kb: int = 9) -> str:
    """About `kb` KB of Chinese and ASCII on many lines of different lengths."""
    lines: list[str] = []
    i = 0
    while utf8_len("\n".join(lines)) < kb * 1024:
        lines.append(f"第{i}行：检查 deploy step {i} 的输出，结果是 ok/失败？" + "细节" * (i % 7) + " tail" * (i % 3))
        i += 1
    return "\n".join(lines)


def unlined_question(kb: int = 9) -> str:
    """About `kb` KB on one line: words separated by spaces, with runs of Chinese (no spaces) in between."""
    words: list[str] = []
    i = 0
    while utf8_len(" ".join(words)) < kb * 1024:
        words.append(f"word{i}" if i % 3 else "没有空格的一长串中文字符" * 2)
        i += 1
    return " ".join(words)


def contents(parts: list[str], header: str) -> list[str]:
    """Each part's text after its `header (i/n)` line, checking the header and counter on the way."""
    n = len(parts)
    out = []
    for i, part in enumerate(parts, start=1):
        prefix = f"{header} ({i}/{n})\n"
        assert part.startswith(prefix), f"part {i} does not start with {prefix!r}: {part[:60]!r}"
        out.append(part[len(prefix) :])
    return out


def rejoin(original: str, chunks: list[str]) -> None:
    """Assert the chunks are the original in order, with at most one separator (newline or space) dropped per cut."""
    pos = 0
    for k, chunk in enumerate(chunks):
        if k and not original.startswith(chunk, pos):
            assert original[pos] in "\n ", f"chunk {k} starts at {pos} but text there is {original[pos : pos + 20]!r}"
            pos += 1
        assert original.startswith(chunk, pos), f"chunk {k} is not the text at {pos}"
        pos += len(chunk)
    assert pos == len(original), f"text after byte {pos} is missing"


# --- header -----------------------------------------------------------------------------------------------------


def test_format_header_with_and_without_project() -> None:
    assert format_header("1a2b3c4d", "my project") == "[#1a2b3c4d my project]"
    assert format_header("1a2b3c4d", "  spaced  ") == "[#1a2b3c4d spaced]"
    assert format_header("1a2b3c4d") == "[#1a2b3c4d]"
    assert format_header("1a2b3c4d", "") == "[#1a2b3c4d]"
    assert format_header("1a2b3c4d", "   ") == "[#1a2b3c4d]"


def test_header_regex_reads_back_what_format_header_writes() -> None:
    for project in ("my project", "项目 A", None):
        short_id = new_short_id()
        assert re.fullmatch(r"[0-9a-f]{8}", short_id)
        match = HEADER_RE.match(format_header(short_id, project))
        assert match is not None
        assert match.group("short_id") == short_id
        assert (match.group("project") or None) == project


# --- split_text ---------------------------------------------------------------------------------------------------


def test_short_message_is_one_part_without_counter() -> None:
    assert split_text("你好 world", HEADER) == [f"{HEADER}\n你好 world"]


@pytest.mark.parametrize("body", [lined_question(), unlined_question()], ids=["with-newlines", "without-newlines"])
def test_nine_kb_question_splits_under_limit_with_header_and_counter(body: str) -> None:
    assert utf8_len(body) >= 9 * 1024
    parts = split_text(body, HEADER)
    assert len(parts) >= 4
    for part in parts:
        assert utf8_len(part) <= TEXT_LIMIT
        match = COUNTER_RE.match(part)
        assert match and match.group("header") == HEADER
    rejoin(body, contents(parts, HEADER))


def assert_cut_between(chunks: list[str], body: str, separator: str) -> None:
    """Every chunk is a run of whole pieces of `body` (split at `separator`), and the runs follow each other."""
    pieces = body.split(separator)
    pos = 0
    for chunk in chunks:
        chunk_pieces = chunk.split(separator)
        assert chunk_pieces == pieces[pos : pos + len(chunk_pieces)]
        pos += len(chunk_pieces)
    assert pos == len(pieces)


def test_cuts_at_line_ends_when_lines_allow_it() -> None:
    body = lined_question()
    # Every chunk is a run of whole original lines: no line was cut in the middle.
    assert_cut_between(contents(split_text(body, HEADER), HEADER), body, "\n")


def test_cuts_at_spaces_when_there_are_no_newlines() -> None:
    body = unlined_question()
    # Every chunk is a run of whole words.
    assert_cut_between(contents(split_text(body, HEADER), HEADER), body, " ")


def test_never_splits_a_multibyte_character() -> None:
    # No newline or space at all: the cut must fall between characters of 3 and 4 bytes, at odd byte offsets.
    body = ("中文😀" * 2000) + "终"
    parts = split_text(body, HEADER)
    chunks = contents(parts, HEADER)
    assert "".join(chunks) == body  # nothing dropped, nothing duplicated, no replacement character
    assert "\ufffd" not in "".join(parts)
    for part in parts:
        assert utf8_len(part) <= TEXT_LIMIT
        part.encode("utf-8").decode("utf-8")  # every part is valid UTF-8 on its own
    # The cut used the room: parts (but the last) are within one character of the limit.
    assert all(utf8_len(p) > TEXT_LIMIT - 4 for p in parts[:-1])


def test_ten_or_more_parts_counter_width_still_fits() -> None:
    body = lined_question(kb=24)
    parts = split_text(body, HEADER)
    n = len(parts)
    assert n >= 10
    assert parts[0].startswith(f"{HEADER} (1/{n})\n")
    assert parts[9].startswith(f"{HEADER} (10/{n})\n")
    assert all(utf8_len(p) <= TEXT_LIMIT for p in parts)
    rejoin(body, contents(parts, HEADER))


def test_hundreds_of_parts_at_a_small_limit() -> None:
    body = "汉字abc " * 2000
    parts = split_text(body, HEADER, limit=120)
    n = len(parts)
    assert n >= 100
    assert parts[-1].startswith(f"{HEADER} ({n}/{n})\n")
    assert all(utf8_len(p) <= 120 for p in parts)
    rejoin(body, contents(parts, HEADER))


def test_header_too_long_for_limit_raises() -> None:
    with pytest.raises(ValueError, match="header too long"):
        split_text("x" * 500, "[#1a2b3c4d " + "p" * 80 + "]", limit=100)


def test_truncate_bytes_keeps_whole_characters() -> None:
    text = "中" * 2000
    out = truncate_bytes(text, 4096)
    assert utf8_len(out) <= 4096
    assert out.endswith("…")
    assert set(out[:-1]) == {"中"}
    assert truncate_bytes("short", 4096) == "short"


# --- parse_reply_text -------------------------------------------------------------------------------------------


def read_reply(content: str, short_id: str | None, answer: str) -> ParsedText:
    """`content` read as the quote-reply to `short_id` (None: no quoted question) saying `answer`."""
    parsed = parse_reply_text(content)
    assert parsed.quoted_short_id == short_id
    assert parsed.answer == answer
    return parsed


def test_exact_wecom_quote_format() -> None:
    content = "\u201cSender\uff1a\n[#1a2b3c4d my project]\nquestion\u201d\n------\n@Robot answer"
    parsed = read_reply(content, "1a2b3c4d", "answer")
    assert parsed.quoted_text is not None and "question" in parsed.quoted_text


def test_quote_built_by_independent_formatter() -> None:
    content = format_quote_reply(
        "[#0f0e0d0c 多 个 词 的 项目]\n要部署吗？", "部署吧", sender="张三", robot_name="HIL助手"
    )
    read_reply(content, "0f0e0d0c", "部署吧")


def test_quote_in_single_chat_without_mention() -> None:
    read_reply(format_quote_reply("[#deadbeef]\nq?", "yes, go ahead"), "deadbeef", "yes, go ahead")


def test_quote_of_a_later_part_of_a_split_question() -> None:
    parts = split_text(lined_question(), "[#cafe0123 proj]")
    read_reply(format_quote_reply(parts[2][:200], "ok", sender="李四", robot_name="Bot"), "cafe0123", "ok")


def test_ascii_quote_marks() -> None:
    read_reply('"Sender:\n[#1a2b3c4d my project]\nquestion"\n------\n@Robot answer', "1a2b3c4d", "answer")


@pytest.mark.parametrize(
    "content",
    [
        "\u201c[#1a2b3c4d my project] question\u201d------@Robot answer",
        "\u201c[#1a2b3c4d my project] question\u201d ------ @Robot answer",
        "\u201c[#1a2b3c4d my project] question\u201d\r\n------\r\n@Robot answer",
    ],
    ids=["no-newlines", "spaces", "crlf"],
)
def test_separator_without_surrounding_newlines(content: str) -> None:
    read_reply(content, "1a2b3c4d", "answer")


def test_mention_followed_by_newline() -> None:
    read_reply("\u201c[#1a2b3c4d]\nq\u201d\n------\n@Robot\nanswer\nsecond line", "1a2b3c4d", "answer\nsecond line")


def test_project_name_with_spaces() -> None:
    parsed = parse_reply_text(format_quote_reply("[#abcdef01 my big project name]\nq", "a", robot_name="R"))
    assert parsed.quoted_short_id == "abcdef01"
    assert parsed.quoted_text is not None and "my big project name" in parsed.quoted_text


def test_quote_without_header() -> None:
    content = format_quote_reply("just something someone said", "hi", sender="王五", robot_name="R")
    parsed = read_reply(content, None, "hi")
    assert parsed.quoted_text is not None and "just something someone said" in parsed.quoted_text


def test_header_must_be_eight_lowercase_hex() -> None:
    assert parse_reply_text(format_quote_reply("[#1A2B3C4D p]\nq", "x")).quoted_short_id is None
    assert parse_reply_text(format_quote_reply("[#1a2b3c p]\nq", "x")).quoted_short_id is None


def test_quoted_text_containing_separator() -> None:
    quote = "[#1a2b3c4d p]\nstep one\n------\nstep two"
    content = format_quote_reply(quote, "real answer", sender="S", robot_name="Robot")
    parsed = read_reply(content, "1a2b3c4d", "real answer")
    assert parsed.quoted_text is not None and "step two" in parsed.quoted_text


def test_quote_of_a_quote_reply_uses_the_outer_separator() -> None:
    inner = format_quote_reply("[#11111111 p]\nfirst", "first answer", robot_name="Robot")
    read_reply(format_quote_reply(inner, "outer answer", robot_name="Robot"), "11111111", "outer answer")


def test_plain_mention_is_not_a_quote() -> None:
    parsed = parse_reply_text("@Robot use the blue one")
    assert parsed.quoted_short_id is None
    assert parsed.quoted_text is None
    assert parsed.answer == "use the blue one"


def test_header_in_plain_text_is_not_a_quote() -> None:
    # Someone pasting a header without quoting is not a quote-reply.
    read_reply("@Robot [#1a2b3c4d p] yes", None, "[#1a2b3c4d p] yes")


def test_text_without_mention_is_kept_whole() -> None:
    read_reply("  yes, do it  \n", None, "yes, do it")


def test_strip_mention_variants() -> None:
    assert strip_mention("@HIL助手 好的") == "好的"
    assert strip_mention("@HIL助手\u2005好的") == "好的"
    assert strip_mention("@HIL助手\n好的") == "好的"
    assert strip_mention("@HIL助手") == ""
    assert strip_mention("email me at a@b.c") == "email me at a@b.c"


def test_plain_text_hints_carry_no_markdown() -> None:
    """The notices sent with markdown=False show every character as is: no backticks, bold or colour tags."""
    from hil_server import hints
    from hil_server.models import Session

    session = Session(
        session_id="0" * 32, short_id="1a2b3c4d", message="q", deadline=0, project_name="p", responders=["lisi"]
    )
    plain = [
        hints.empty_answer(),
        hints.unknown_quote("1a2b3c4d"),
        hints.other_chat("1a2b3c4d"),
        hints.late_answer(session),
        hints.abandoned(session),
        hints.not_a_responder(session),
    ]
    for text in plain:
        assert not any(mark in text for mark in ("`", "**", "<font", "\n>")), text
