"""The chat side of a question: its `[#short_id project]` header, splitting to WeCom's limits, quote-replies."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

TEXT_LIMIT = 2048
MARKDOWN_LIMIT = 4096

# What names a question: its session_id (32 hex) or the short id shown in the chat (8 hex). Use it with
# fullmatch: "$" would let a trailing newline through.
SESSION_REF_RE = re.compile(r"[0-9a-f]{8}(?:[0-9a-f]{24})?")
# The header as it stands at the start of a question (or of a part of one). Project names may contain spaces,
# but never "]" or a line break (the API refuses those), so "[^\]\n]" ends the name.
HEADER_RE = re.compile(r"\[#(?P<short_id>[0-9a-f]{8})(?:[ \t]+(?P<project>[^\]\n]*))?\]")

_OPEN_QUOTES = '\u201c"'
_CLOSE_QUOTES = '\u201d"'
# "------" on its own line separates the quoted text from the answer; be lenient about spaces around it.
_SEPARATOR_RE = re.compile(r"[\u201d\"]?\s*\n?[ \t]*-{6,}[ \t]*\n?", re.MULTILINE)
# "@RobotName " or "@RobotName\n" at the start of what the person typed.
_LEADING_MENTION_RE = re.compile(r"^\s*@\S+(?:[ \t\u2005\u00a0]+|\s*\n|$)")


def new_short_id() -> str:
    return secrets.token_hex(4)


def format_header(short_id: str, project_name: str | None = None) -> str:
    project = (project_name or "").strip()
    return f"[#{short_id} {project}]" if project else f"[#{short_id}]"


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def split_text(body: str, header: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Split a question into parts of at most `limit` UTF-8 bytes, each starting with `header`.

    WeCom may shorten a long quoted text, so every part must carry the header at its very start; parts after
    the first one also carry a counter such as `(2/5)` so the person can see that the message continues.
    """
    whole = "\n".join(part for part in (header, body) if part)  # no header (a notice): the text alone
    if utf8_len(whole) <= limit:
        return [whole]
    # The counter's width depends on how many parts there are; widen it until the parts fit their counter.
    digits = 1
    while True:
        room = limit - utf8_len(f"{header} ({'9' * digits}/{'9' * digits})\n")
        if room < 16:
            raise ValueError("header too long to split the message under WeCom's limit")
        chunks = _chunk(body, room)
        if len(str(len(chunks))) <= digits:
            break
        digits += 1
    total = len(chunks)
    lead = f"{header} " if header else ""
    return [f"{lead}({i}/{total})\n{chunk}" for i, chunk in enumerate(chunks, start=1)]


def _chunk(text: str, room: int) -> list[str]:
    """Cut `text` into pieces of at most `room` bytes, at line ends where possible, else at spaces, else anywhere."""
    chunks: list[str] = []
    rest = text
    while utf8_len(rest) > room:
        cut = _byte_prefix_len(rest, room)
        window = rest[:cut]
        at = window.rfind("\n")
        if at < cut // 3:
            at = window.rfind(" ") if window.rfind(" ") >= cut // 3 else -1
        if at > 0:
            chunks.append(rest[:at])
            rest = rest[at + 1 :]
        else:
            chunks.append(window)
            rest = rest[cut:]
    if rest or not chunks:
        chunks.append(rest)
    return chunks


def _byte_prefix_len(text: str, max_bytes: int) -> int:
    """How many characters of `text` fit in `max_bytes` UTF-8 bytes (never cuts a character in half)."""
    encoded = text.encode("utf-8")[:max_bytes]
    return len(encoded.decode("utf-8", errors="ignore"))


def truncate_bytes(text: str, max_bytes: int, ellipsis: str = "…") -> str:
    if utf8_len(text) <= max_bytes:
        return text
    return text[: _byte_prefix_len(text, max_bytes - utf8_len(ellipsis))] + ellipsis


@dataclass(frozen=True)
class ParsedText:
    """A person's text message, with the quote-reply taken apart."""

    answer: str
    quoted_short_id: str | None = None
    quoted_text: str | None = None


def parse_reply_text(content: str) -> ParsedText:
    """Take a robot callback's text apart: the quoted question's short_id (if any) and the clean answer.

    A quote-reply arrives as `“Sender：\\n[#1a2b3c4d proj]\\nquestion”\\n------\\n@Robot answer`. Clients and locales
    differ, so either quote mark is accepted and the separator may have spaces or newlines around it.
    """
    text = content.replace("\r\n", "\n")
    stripped = text.lstrip()
    if stripped[:1] in _OPEN_QUOTES:
        match = _find_separator(stripped)
        if match is not None:
            quoted = stripped[1 : match.start()].strip()
            if quoted[-1:] in _CLOSE_QUOTES:
                quoted = quoted[:-1]
            answer = stripped[match.end() :]
            header = HEADER_RE.search(quoted)
            return ParsedText(
                answer=strip_mention(answer),
                quoted_short_id=header.group("short_id") if header else None,
                quoted_text=quoted,
            )
    return ParsedText(answer=strip_mention(text))


def _find_separator(text: str) -> re.Match[str] | None:
    # The quoted text itself may contain "------"; the separator is the last one that follows a closing quote,
    # falling back to the first one when no closing quote precedes any.
    best: re.Match[str] | None = None
    for match in re.finditer(r"[\u201d\"][ \t]*\n?[ \t]*-{6,}[ \t]*\n?", text):
        best = match
    if best is not None:
        return best
    return _SEPARATOR_RE.search(text)


def strip_mention(text: str) -> str:
    """Remove the leading `@RobotName` WeCom puts in front of a group message, and surrounding blanks."""
    return _LEADING_MENTION_RE.sub("", text, count=1).strip()
