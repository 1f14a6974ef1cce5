"""Typed answers: a question with options ("合并 / 不合并"), an approval (批准 / 拒绝), and who may answer.

Pure rules, no I/O: how options read in a text chat, and what a text reply decides (`read_reply`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from hil_protocol.outbound import Question

APPROVE, REJECT = "批准", "拒绝"
APPROVAL_OPTIONS = (APPROVE, REJECT)
MAX_LABEL_CHARS = 40
MAX_OPTIONS = 20


@dataclass(frozen=True)
class Pick:
    """What a reply chose: an option (`index`, `label`) and any text after it (the comment)."""

    index: int
    label: str
    comment: str = ""


@dataclass(frozen=True)
class Unclear:
    """A reply that names an option or a decision but does not say one thing: it decides nothing. `why` is for logs
    and tests (English)."""

    why: str


Reading = Pick | Unclear | None  # None: the reply names no option and no decision at all (free text)


def normalize(text: str) -> str:
    """Full-width digits and letters to ASCII (NFKC), case folded, outer blanks dropped."""
    return unicodedata.normalize("NFKC", text).casefold().strip()


def as_text(question: Question) -> str:
    """The question as a text chat shows it: the message, then numbered options and how to answer."""
    if not question.options:
        return question.message
    lines = [question.message.rstrip(), ""]
    lines += [f"{i}. {label}" for i, label in enumerate(question.options, start=1)]
    if question.multi_select:
        how = "回复编号，可多选，如 1 3" + ("；也可以直接回复文字" if question.allow_text else "")
    elif question.approvals_required:
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


# --- reading a text reply ------------------------------------------------------------------------------------------
#
# The rule, once: a text decides only when it starts with one decision (a number, an option's label, or for an
# approval a decision word such as 批准 / 同意 / ok / 👍 or 拒绝 / 不行 / no / 👎), optionally followed by a comment
# that does not contradict it. It decides nothing (Unclear) when
#   - it names two options or both decisions ("ok, reject", "1 2", "合并，不合并也行"), or a number with no option;
#   - it asks a question ("可以吗？");
#   - a go-ahead (批准, or an option whose label neither refuses nor defers) carries a comment that refuses, defers,
#     sets a condition first or only acknowledges ("好的，先不要", "可以，但不是现在", "批准，先跑测试再合并",
#     "好的，收到"): the agent would act at once on what the person meant as "not yet";
#   - a refusal carries a comment that approves ("不行，好吧" / "no, go ahead"); a refusal may defer ("拒绝，先跑测试").
# A text that names no option and no decision ("让我想想", "先等等") is None: not a decision either.

# Read before anything else in a comment: negated words that say yes ("没问题") must not count as a refusal.
_SAYS_YES = ("没问题", "没毛病", "没意见", "没关系", "没事", "无异议", "不错", "不客气")
_SAYS_YES_EN = ("no problem", "no problems", "no objection", "no objections", "no worries", "not a problem")

_APPROVE_WORDS = (
    *_SAYS_YES, *_SAYS_YES_EN, "批准", "同意", "通过", "可以", "好的", "好滴", "好嘞", "准了", "允许", "确认", "行的",
    "好", "行", "approved", "approve", "lgtm", "okay", "ok", "yes", "yep", "yeah", "y", "sure", "go ahead", "ship it",
    "👍", "👌", "✅", "🆗", "✔", "☑",
)  # fmt: skip
_REJECT_WORDS = (
    "不同意", "不批准", "不通过", "不可以", "不允许", "不行", "不要", "不准", "不用", "不好", "驳回", "否决", "拒绝",
    "算了", "取消", "别", "不", "否", "rejected", "reject", "denied", "deny", "declined", "decline", "disapprove",
    "don't approve", "do not approve", "not approved", "don't", "do not", "veto", "nope", "nah", "no", "n",
    "👎", "❌", "🚫", "✖", "⛔", "❎",
)  # fmt: skip
# What a go-ahead's comment may not contain: refusing, deferring, a condition or a "but" (substrings, after _SAYS_YES).
_HOLD_CJK = (
    "不", "别", "没", "勿", "莫", "甭", "否", "拒", "驳", "缓", "等", "先", "再", "稍", "晚点", "回头", "以后", "下次",
    "改天", "明天", "待", "停", "但", "却", "除非", "如果", "要是", "只要", "前提", "算了", "取消",
)  # fmt: skip
_HOLD_EN = re.compile(
    r"(?<![a-z'])(?:not|no|nope|nah|never|[a-z]+n't|dont|do not|wait|hold|later|stop|reject\w*|den(?:y|ied)|declin\w*|"
    r"cancel\w*|abort|but|however|unless|if|until|after|before|first|tomorrow|defer\w*|postpone\w*|pause)(?![a-z'])"
)
_HOLD_EMOJI = ("👎", "❌", "🚫", "✖", "⛔", "❎", "🤔", "✋", "🛑")
# An acknowledgement says "I saw it", not "go": after an approval word it makes the reply unclear.
_ACKNOWLEDGE = ("收到", "知道了", "了解", "明白", "看到了", "noted", "got it", "ack", "seen", "👀")
# In a refusal's comment, these approve wherever they stand (negated forms were taken out first).
_STRONG_YES = ("批准", "同意", "approve", "lgtm", "go ahead", "ship it", "👍", "👌", "✅")
# Deferring to think or look ("好的，我看看") is not a go-ahead either.
_HOLD_THINK = ("看看", "看一下", "瞧瞧", "想想", "想一下", "考虑", "研究", "商量", "讨论", "问问", "问一下", "再议")
_HOLD_THINK_EN = re.compile(r"(?<![a-z])(?:let me|check|look|think|consider|discuss)(?![a-z])")
# What makes an option's own label a refusal or deferral ("不合并", "暂缓", "later"), so its comment may defer too.
_REFUSING_LABEL_CJK = (
    "不", "别", "没", "勿", "否", "拒", "驳", "缓", "暂", "等", "稍", "晚", "以后", "下次", "改天", "取消",
)  # fmt: skip
_REFUSING_LABEL_EN = re.compile(
    r"(?<![a-z'])(?:not|no|never|[a-z]+n't|don't|reject\w*|den(?:y|ied)|declin\w*|cancel\w*|"
    r"abort|later|wait|hold|defer\w*|postpone\w*|skip|stop)(?![a-z'])"
)
# Words that read on into their object without a break ("同意合并", "拒绝上线"); every other word needs a break
# after it: "好像" is not 好, "可以考虑" not 可以, "确认一下" not 确认, "okay" not ok, "yesterday" not yes.
_FREE = frozenset(("批准", "同意", "不同意", "不批准", "不通过", "不可以", "不允许", "不准", "驳回", "否决", "拒绝"))
_QUESTION = ("?", "吗", "么")
_SEPARATORS = frozenset(" \t\n\r,.。:;!、-—~…/|·")
_PARTICLES = frozenset("吧了啊呀哈的嘞啦哦噢喔滴咯哟呗哒")
_FILLERS = ("那就", "那", "嗯嗯", "嗯", "恩", "哦", "噢", "我们", "我", "we ", "i ")
# Dropped before reading: emoji presentation selectors, skin tones, the keycap mark (2️⃣ is 2), zero-width joiners.
_INVISIBLE = re.compile("[\ufe0e\ufe0f\u20e3\u200b\u200c\u200d\u2060\U0001f3fb-\U0001f3ff]")


def read_reply(text: str, options: tuple[str, ...] | list[str], *, approval: bool = False) -> Reading:
    """What a text reply to a question with `options` (for an approval: 批准 / 拒绝) decides: a `Pick`, `Unclear`
    (it names something but not one thing), or None (it names nothing). See the rule above."""
    if not options:
        return None
    said, where = _fold(text)
    labels = [_fold(o)[0] for o in options]
    if (
        not approval and said and said in labels
    ):  # a label as it stands, whatever it contains ("先不合并", "Rebase First")
        return Pick(labels.index(said), options[labels.index(said)])
    words = _approval_words() if approval else _label_words(labels)

    pos = _skip_filler(said)
    picked: list[int] = []
    while (found := _word_at(said, pos, words, len(options))) is not None:
        start, (index, pos) = pos, found
        if index < 0:
            return Unclear(f"there is no option {said[start:pos]}")
        picked.append(index)
        while pos < len(said) and (said[pos] in _PARTICLES or said[pos] in _SEPARATORS):
            pos += 1
    if not picked:
        if not _names_any(said, words, len(options)):
            return None
        asks = any(q in said for q in _QUESTION)
        return Unclear("asks a question" if asks else "names an option, but not at the start")
    if len(set(picked)) > 1:
        return Unclear("says both yes and no" if approval else "names more than one option")
    index = picked[0]
    comment = said[pos:]
    if any(q in comment for q in _QUESTION):  # "批准？", "1 吗" (a label may hold 么: "什么都不做")
        return Unclear("asks a question")
    if _names_other(comment, index, [] if approval else words, len(options)):
        return Unclear("the comment names another option")
    refuses = _refuses(labels[index]) if not approval else index == 1
    if not refuses and _holds(comment, acknowledge=approval):
        return Unclear("a go-ahead with a comment that refuses, defers or sets a condition")
    if approval and refuses and _approves(comment):
        return Unclear("a refusal with a comment that approves")
    start = where[pos] if pos < len(where) else len(text)
    return Pick(index, options[index], text[start:].strip("".join(_SEPARATORS) + "\u3000"))


# --- reading a pick-several reply -------------------------------------------------------------------------------------
#
# A pick-several reply is a list of numbers or labels and nothing else: "1 3", "1,3", "1、3", "１，３", "合并 回滚".
# Any number that is no option, a word that is neither a number nor a label, or a question makes it Unclear when it
# names an option at all (never a partial pick); a text that names no option is None (free text).

_LIST_SEPARATORS = frozenset(" \t\n\r,，、;；/|+&和及与")


def read_several(text: str, options: tuple[str, ...] | list[str]) -> list[Pick] | Unclear | None:
    """What a reply to a pick-several question picks: the options named, in the options' order (each once), Unclear, or
    None (see the rule above)."""
    if not options:
        return None
    said, _ = _fold(text)
    labels = [_fold(o)[0] for o in options]
    if said in labels:  # a label as it stands, separators and all
        return [Pick(labels.index(said), options[labels.index(said)])]
    by_length = sorted(((label, i) for i, label in enumerate(labels) if label), key=lambda w: -len(w[0]))
    picked: list[int] = []
    pos = 0
    while True:
        while pos < len(said) and (said[pos] in _LIST_SEPARATORS or said[pos] in _PARTICLES):
            pos += 1
        if pos >= len(said):
            break
        number = re.match(r"\d+", said[pos:])
        if number:
            end = pos + number.end()
            if end < len(said) and said[end] not in _LIST_SEPARATORS:
                return Unclear("a number run into other text")  # "1.3", "2x": not a list of options
            value = int(number.group())
            if not 1 <= value <= len(options):
                return Unclear(f"there is no option {value}")
            picked.append(value - 1)
            pos = end
            continue
        for label, index in by_length:
            end = pos + len(label)
            if said.startswith(label, pos) and (end >= len(said) or said[end] in _LIST_SEPARATORS):
                picked.append(index)
                pos = end
                break
        else:
            return _unclear_or_none(said, by_length, len(options), "words that are neither numbers nor options")
    if not picked:
        return None
    return [Pick(i, options[i]) for i in sorted(set(picked))]


def _unclear_or_none(said: str, labels: list[tuple[str, int]], count: int, why: str) -> Unclear | None:
    words = [(label, index, True) for label, index in labels]
    return Unclear(why) if _names_any(said, words, count) else None


def pick_option(text: str, options: tuple[str, ...] | list[str]) -> Pick | None:
    """The option a reply clearly picks, or None (see `read_reply`)."""
    reading = read_reply(text, options)
    return reading if isinstance(reading, Pick) else None


def pick_decision(text: str) -> Pick | None:
    """An approval reply's clear decision (index 0 批准, 1 拒绝) and its comment, or None (see `read_reply`)."""
    reading = read_reply(text, APPROVAL_OPTIONS, approval=True)
    return reading if isinstance(reading, Pick) else None


def _fold(text: str) -> tuple[str, list[int]]:
    """`text` normalized (NFKC, case folded, invisible marks dropped, blanks trimmed) and, for each character of
    the result, where it came from in `text` (so a comment is returned as the person wrote it)."""
    out: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        if _INVISIBLE.fullmatch(ch):
            continue
        for c in unicodedata.normalize("NFKC", ch).casefold():
            out.append(c)
            where.append(i)
    folded = "".join(out)
    start = len(folded) - len(folded.lstrip())
    end = len(folded.rstrip())
    return folded[start:end], where[start:end]


# A decision word or label: (text, option index, may be followed directly by more text).
_Word = tuple[str, int, bool]


def _approval_words() -> list[_Word]:
    words = [(w, 0) for w in _APPROVE_WORDS] + [(w, 1) for w in _REJECT_WORDS] + [(APPROVE, 0), (REJECT, 1)]
    return sorted(((w, i, _free(w)) for w, i in words), key=lambda w: -len(w[0]))


def _label_words(labels: list[str]) -> list[_Word]:
    return sorted(((label, i, _free(label)) for i, label in enumerate(labels) if label), key=lambda w: -len(w[0]))


def _free(word: str) -> bool:
    return word in _FREE or not word[-1].isalnum()  # an emoji cannot be the start of a longer word


def _weak(word: str) -> bool:
    # A single Chinese character (好, 不, 别) appears in too many sentences to count as naming a decision.
    return len(word) == 1 and _is_cjk(word)


def _is_cjk(ch: str) -> bool:
    return "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _skip_filler(said: str) -> int:
    for filler in _FILLERS:
        if said.startswith(filler) and len(said) > len(filler):
            pos = len(filler)
            while pos < len(said) and said[pos] in _SEPARATORS:
                pos += 1
            return pos
    return 0


def _word_at(said: str, pos: int, words: list[_Word], count: int) -> tuple[int, int] | None:
    """The option named at `pos` and where it ends; a number with no option is (-1, end)."""
    number = re.match(r"\d+", said[pos:])
    if number:
        end = pos + number.end()
        if re.match(r"[a-z]|\.\d", said[end : end + 2]):
            return None  # "1.5", "2x": not an option's number
        value = int(number.group())
        return (value - 1, end) if 1 <= value <= count else (-1, end)
    for word, index, free in words:
        if said.startswith(word, pos) and (free or _breaks(said, pos + len(word), words)):
            return index, pos + len(word)
    return None


def _breaks(said: str, end: int, words: list[_Word]) -> bool:
    if end >= len(said):
        return True
    nxt = said[end]
    if said[end - 1].isascii() and said[end - 1].isalnum():
        return not (nxt.isascii() and (nxt.isalnum() or nxt == "'"))
    return not nxt.isalnum() or nxt in _PARTICLES or any(said.startswith(w, end) for w, _, _ in words)


def _mentions(text: str, word: str) -> bool:
    if word.isascii() and word[:1].isalnum():
        return re.search(rf"(?<![a-z0-9']){re.escape(word)}(?![a-z0-9'])", text) is not None
    return word in text


def _numbers(text: str, count: int) -> set[int]:
    return {int(n) - 1 for n in re.findall(r"(?<![\d.a-z])\d+(?![\d]|\.\d|[a-z])", text) if 1 <= int(n) <= count}


def _names_any(said: str, words: list[_Word], count: int) -> bool:
    # Single Chinese characters (好, 不, 别) are left out: "不知道" names no decision.
    return bool(_numbers(said, count)) or any(_mentions(said, w) for w, _, _ in words if not _weak(w))


def _names_other(comment: str, index: int, labels: list[_Word], count: int) -> bool:
    # (An approval's words are weighed by _holds / _approves instead: "好的，批准" names one decision twice.)
    if _numbers(comment, count) - {index}:
        return True
    rest = comment
    for word, other, _ in labels:  # longest first, so "不合并" is taken before "合并"
        if not _weak(word) and _mentions(rest, word):
            if other != index:
                return True
            rest = rest.replace(word, " ")
    return False


def _refuses(label: str) -> bool:
    """Whether an option itself refuses or defers ("不合并", "暂缓", "later"): a comment may then defer too."""
    return any(m in label for m in _REFUSING_LABEL_CJK) or _REFUSING_LABEL_EN.search(label) is not None


def _holds(text: str, *, acknowledge: bool) -> bool:
    for yes in (*_SAYS_YES, *_SAYS_YES_EN):
        text = text.replace(yes, " ")
    if any(m in text for m in (*_HOLD_CJK, *_HOLD_THINK, *_HOLD_EMOJI)):
        return True
    if _HOLD_EN.search(text) or _HOLD_THINK_EN.search(text):
        return True
    return acknowledge and any(_mentions(text, a) for a in _ACKNOWLEDGE)


def _approves(comment: str) -> bool:
    for no in sorted(_REJECT_WORDS, key=len, reverse=True):
        if len(no) > 1:
            comment = comment.replace(no, " ")
    if any(_mentions(comment, yes) for yes in _STRONG_YES):
        return True
    # A clause that starts with a yes ("不行，好吧", "no, ok then").
    clauses = re.split("[" + re.escape("".join(_SEPARATORS)) + "]+", comment)
    words = [(w, 0, False) for w in sorted(_APPROVE_WORDS, key=len, reverse=True)]
    return any(_word_at(c, 0, words, 0) is not None for c in clauses if c and not c[0].isdigit())


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
