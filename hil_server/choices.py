"""Typed answers: a question with options ("合并 / 不合并"), an approval (批准 / 拒绝), and who may answer.

Pure rules, no I/O: how options read in a text chat, which option a reply picks, what an approval reply decides.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from hil_protocol.outbound import Question

APPROVE, REJECT = "批准", "拒绝"
APPROVAL_OPTIONS = (APPROVE, REJECT)
# Words a person types for each decision (compared after NFKC and casefold), longest first so "不同意" wins over "同意".
_APPROVE_WORDS = ("approved", "approve", "同意", "批准", "通过", "可以", "yes", "ok", "好的", "好")
_REJECT_WORDS = ("不同意", "不批准", "不通过", "不可以", "rejected", "reject", "拒绝", "驳回", "不行", "no", "否")
_SEPARATORS = " \t\n,，.。:：;；!！、-—"
MAX_LABEL_CHARS = 40
MAX_OPTIONS = 20


@dataclass(frozen=True)
class Pick:
    """What a reply chose: an option (`index`, `label`) and any text after it (the comment)."""

    index: int
    label: str
    comment: str = ""


def normalize(text: str) -> str:
    """Full-width digits and letters to ASCII (NFKC), case folded, outer blanks dropped."""
    return unicodedata.normalize("NFKC", text).casefold().strip()


def as_text(question: Question) -> str:
    """The question as a text chat shows it: the message, then numbered options and how to answer."""
    if not question.options:
        return question.message
    lines = [question.message.rstrip(), ""]
    lines += [f"{i}. {label}" for i, label in enumerate(question.options, start=1)]
    if question.approvals_required:
        how = (
            f"回复 1 批准、2 拒绝（可在后面附上说明，如「拒绝，先跑测试」）；需要 {question.approvals_required} 人批准"
        )
    elif question.allow_text:
        how = "回复数字或选项文字，也可以直接回复文字"
    else:
        how = "回复数字或选项文字"
    lines.append(f"（{how}）")
    if question.responders:
        lines.append("（只有 " + "、".join(f"@{r}" for r in question.responders) + " 可以回答）")
    return "\n".join(lines)


def pick_option(text: str, options: tuple[str, ...] | list[str]) -> Pick | None:
    """The option a reply names: its number (`1`, `１`), or its label (case and outer blanks ignored). A number or
    label followed by a separator and more text is that option with a comment ("1 先跑测试")."""
    if not options:
        return None
    said = normalize(text)
    labels = [normalize(o) for o in options]
    if said in labels:
        index = labels.index(said)
        return Pick(index, options[index])
    # "1", "1 先跑测试", "1，先跑测试" pick option 1; "1.5" is a number, not an option with a comment.
    match = re.fullmatch(r"(\d{1,2})(?:[" + re.escape(_SEPARATORS) + r"]+(\D.*))?", said, re.DOTALL)
    if match and 1 <= int(match.group(1)) <= len(options):
        index = int(match.group(1)) - 1
        return Pick(index, options[index], _comment(text, match.group(2)))
    for index in sorted(range(len(labels)), key=lambda i: -len(labels[i])):
        label = labels[index]
        if label and said.startswith(label) and said[len(label) : len(label) + 1] in tuple(_SEPARATORS):
            return Pick(index, options[index], _comment(text, said[len(label) :]))
    return None


def pick_decision(text: str) -> Pick | None:
    """An approval reply: 批准 / 同意 / 1 approve, 拒绝 / 2 reject; the text after the decision word is the comment
    ("拒绝，先跑测试" rejects with the comment "先跑测试")."""
    picked = pick_option(text, APPROVAL_OPTIONS)
    if picked is not None:
        return picked
    said = normalize(text)
    for words, index in ((_REJECT_WORDS, 1), (_APPROVE_WORDS, 0)):
        for word in sorted(words, key=len, reverse=True):
            rest = said[len(word) :]
            if said.startswith(word) and (not rest or rest[0] in _SEPARATORS):
                return Pick(index, APPROVAL_OPTIONS[index], _comment(text, rest))
    return None


def _comment(original: str, rest_normalized: str | None) -> str:
    # The comment as the person wrote it (not case folded): the same number of trailing characters.
    rest = (rest_normalized or "").strip(_SEPARATORS)
    if not rest:
        return ""
    plain = unicodedata.normalize("NFKC", original).strip()
    return plain[len(plain) - len(rest) :].strip(_SEPARATORS) if len(plain) >= len(rest) else rest


def check_options(options: list[str]) -> list[str]:
    """API validation of `options`: 1–20 short, distinct, one-line labels."""
    if not 1 <= len(options) <= MAX_OPTIONS:
        raise ValueError(f"options takes 1 to {MAX_OPTIONS} labels")
    seen: set[str] = set()
    cleaned = []
    for label in options:
        label = label.strip()
        if not label or len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"each option is 1 to {MAX_LABEL_CHARS} characters")
        if not label.isprintable():
            raise ValueError("options may not contain line breaks or control characters")
        if re.fullmatch(r"\d+", normalize(label)):
            raise ValueError("an option may not be a bare number (numbers pick options by position)")
        key = normalize(label)
        if key in seen:
            raise ValueError(f"option {label!r} is given twice")
        seen.add(key)
        cleaned.append(label)
    return cleaned
