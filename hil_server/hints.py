"""What the robot says in the chat on its own: hints and notices (Chinese: the users are WeCom users).

Some go out as markdown (several_waiting, chat_id_hint, pick_one), the rest as plain text (see matching's
`markdown=False`): those carry no markup, which a plain-text message would show as is (backticks, asterisks)."""

from __future__ import annotations

from hil_protocol.messages import format_header

from .approvals import tally
from .models import Session


def preview(text: str, limit: int = 30) -> str:
    """`text` on one line, cut to `limit` characters (and an ellipsis)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


def several_waiting(sessions: list[Session]) -> str:
    lines = [f"**当前有 {len(sessions)} 个问题在等待回复**，无法判断你在回答哪一个。", ""]
    for session in sessions:
        project = f" {session.project_name}" if session.project_name else ""
        lines.append(f"> `#{session.short_id}`{project}：{preview(session.message)}")
    lines += [
        "",
        '请对要回答的那条问题消息使用<font color="warning">「引用回复」</font>'
        "（长按或右键该消息 → 引用），再输入你的回答。",
    ]
    return "\n".join(lines)


def chat_id_hint(chat_id: str, chat_type: str) -> str:
    return "\n".join(
        [
            "当前会话没有等待回复的问题。",
            f"> 本会话 chat_id：`{chat_id}`",
            f"> 会话类型：{chat_type}",
            "",
            f"要让 AI 把问题发到这里，请在 MCP 配置中加上 `--chat-id {chat_id}`，"
            f"或设置环境变量 `DEFAULT_CHAT_ID={chat_id}`。",
        ]
    )


def _about(session: Session, text: str) -> str:
    """A notice about one question, under its header so the person sees which one."""
    return f"{format_header(session.short_id, session.project_name)} {text}"


def unknown_quote(short_id: str) -> str:
    return f"没有找到问题 #{short_id}：它可能已过期或已被清理。如果 AI 还在等待别的问题，请引用那条问题消息回复。"


def late_answer(session: Session) -> str:
    return _about(session, "AI 已停止等待这个问题的回复，你的回答已保存：AI 可以用 wait_for_reply 取回它。")


def empty_answer() -> str:
    return "收到了一条空消息。请在 @机器人 之后输入你的回答，或引用问题消息后再回复。"


def other_chat(short_id: str) -> str:
    return f"问题 #{short_id} 不是在这个会话里提出的，这里的回答不会被采纳。请在提出该问题的会话里引用它回复。"


def abandoned(session: Session) -> str:
    return _about(
        session,
        "服务在发送这个问题时重启了，问题可能没有完整发出，已作废：请不要回答它，AI 会收到失败的结果并可以重新提问。",
    )


def not_a_responder(session: Session) -> str:
    people = "、".join(f"@{r}" for r in session.responders)
    return f"只有 {people} 可以回答 #{session.short_id}，你的回复没有被采纳。"


def pick_one(session: Session) -> str:
    if session.approvals_required:
        return f"`#{session.short_id}` 需要一个决定：回复 **1** 批准 或 **2** 拒绝（可在后面附上说明）。"
    options = "、".join(f"**{i}** {label}" for i, label in enumerate(session.options, start=1))
    if session.multi_select:
        return f"`#{session.short_id}` 请从选项中选择（可多选）：{options}（回复编号，如 1 3）。"
    return f"`#{session.short_id}` 请从选项中选择：{options}（回复数字或选项文字）。"


def unclear(session: Session) -> str:
    """One line for a text that named something but decided nothing ("好的，先不要", "1 2"): it is kept, not taken."""
    if session.approvals_required:
        return f"#{session.short_id} 没看懂，请回复 1 批准 或 2 拒绝（可在后面附上说明）。"
    numbers = "、".join(f"{i} {label}" for i, label in enumerate(session.options, start=1))
    if session.multi_select:
        return f"#{session.short_id} 没看懂，请只回复选项的编号，可多选，如 1 3（没有的编号不算）：{numbers}。"
    return f"#{session.short_id} 没看懂，请只回复一个选项的数字：{numbers}。"


def card_result(session: Session) -> str:
    """What a question's card says once people acted on it: the decision and who made it, or why it is closed."""
    tally = approval_lines(session)
    if tally:
        return tally
    chosen = [r for r in session.replies if r.choice is not None]
    if chosen:
        first = chosen[0]
        labels = "」「".join(c.label for c in first.choices) if first.choices else first.choice.label  # type: ignore[union-attr]
        return f"✅ {first.from_user.name or first.answered_by} 选择了「{labels}」"
    if session.replies:
        first = session.replies[0]
        return f"✅ {first.from_user.name or first.answered_by} 已用文字回答"
    if session.status == "timeout":
        return "⌛ 已超时，AI 不再等待这个问题"
    if session.status == "failed":
        return "⚠️ 这个问题没有发送成功"
    return "等待回答中"


def approval_lines(session: Session) -> str:
    if not session.approvals_required:
        return ""
    state = tally(session)
    names = {r.answered_by: (r.from_user.name or r.answered_by) for r in session.replies}
    if state.approved is True:
        return "✅ " + "、".join(names.get(u, u) for u in state.decided_by) + " 批准了"
    if state.approved is False:
        who = names.get(state.decided_by[0], state.decided_by[0]) if state.decided_by else "有人"
        comment = f"：{state.comment}" if state.comment else ""
        return f"❌ {who} 拒绝了{comment}"
    return f"已批准 {state.approvals}/{state.required}，等待更多批准"


def card_title(session: Session) -> str:
    return format_header(session.short_id, session.project_name)
