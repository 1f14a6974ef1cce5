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
        if reply.answered_by not in approvers:
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
