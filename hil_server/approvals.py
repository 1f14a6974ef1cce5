"""Where an approval stands, from its replies: `required` different responders must approve; one 拒绝 decides."""

from __future__ import annotations

from .choices import pick_decision
from .models import Approval, Session


def tally(session: Session) -> Approval:
    approvers: list[str] = []
    for reply in session.replies:
        if reply.choice is None or reply.matched_by == "late":
            continue
        if reply.choice.index == 1:  # 拒绝
            picked = pick_decision(reply.content) if reply.via == "text" else None
            return Approval(
                approved=False,
                decided_by=[reply.answered_by],
                comment=picked.comment if picked else "",
                approvals=len(approvers),
                required=session.approvals_required,
            )
        if reply.answered_by.casefold() not in {a.casefold() for a in approvers}:  # WeCom userids ignore case
            approvers.append(reply.answered_by)
        if len(approvers) >= session.approvals_required:
            comments = [pick_decision(r.content) for r in session.replies if r.via == "text" and r.content]
            return Approval(
                approved=True,
                decided_by=approvers,
                comment="；".join(p.comment for p in comments if p and p.comment),
                approvals=len(approvers),
                required=session.approvals_required,
            )
    return Approval(approved=None, decided_by=[], approvals=len(approvers), required=session.approvals_required)


def answered(session: Session, approval: Approval | None = None) -> bool:
    """Whether the question has its answer: a reply, or for an approval its decision (a first 批准 of two is not one).
    `approval`: the session's tally when the caller already has it."""
    if not session.approvals_required:
        return bool(session.replies)
    return (approval or tally(session)).approved is not None
