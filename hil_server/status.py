"""`GET /status` (a plain HTML page for people) and `GET /status.json` (the same data for scripts).

With HIL_API_TOKENS set both need a token, and show what that token may see (`auth.can_see`, as /api/poll).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from . import __version__
from .api import health
from .approvals import tally
from .auth import can_see, grant_of
from .hints import preview
from .state import ServerState, server_state

router = APIRouter()

PREVIEW_CHARS = 40


async def status_data(request: Request) -> dict[str, Any]:
    state = server_state(request)
    grant = grant_of(request)
    service = state["service"]
    now = time.time()
    waiting = [s for s in await service.waiting() if can_see(grant, s)]
    recent = []
    for event in service.events:
        session = await service.get(event.session_id)
        if grant is not None and (session is None or not can_see(grant, session)):
            continue
        recent.append(
            {
                "short_id": event.short_id,
                "project": event.project,
                "outcome": event.outcome,
                "by": event.by,
                "chat_id": event.chat_id,
                "at": event.at,
                "seconds_ago": round(now - event.at, 1),
            }
        )
    workers = [
        {
            "worker_id": w["worker_id"],
            "connected_at": w["connected_at"],
            "connected_seconds": round(now - w["connected_at"], 1),
            "last_heartbeat_seconds_ago": w["last_seen_seconds_ago"],
            "in_flight": w["in_flight"],
        }
        for w in state["hub"].status()
    ]
    _, health_body = health(state)
    return {
        "service": "hil-server",
        "version": __version__,
        "mode": state["mode"],
        "channel": state["channel"].name,
        # AI-bot mode: messages waiting for WeCom's pace
        "send_queue": getattr(state["channel"], "queued", None),
        "health": health_body["status"],
        "problems": health_body.get("reason"),
        "callbacks": callback_auth(state),
        "started_at": state["started_at"],
        "uptime_seconds": round(now - state["started_at"], 1),
        "scope": "all" if grant is None else "own",
        "workers": workers,
        "waiting": [
            {
                "short_id": s.short_id,
                "project": s.project_name,
                "chat_id": s.chat_id,
                "age_seconds": round(now - s.created_at, 1),
                "deadline_in_seconds": round(s.deadline - now, 1),
                "question": preview(s.message, PREVIEW_CHARS),
                "options": s.options,
                "responders": s.responders,
                "approvals": f"{tally(s).approvals}/{s.approvals_required}" if s.approvals_required else None,
                # answers not taken: from people who are not among the responders
                "refused": [
                    {"userid": r.userid, "name": r.name, "seconds_ago": round(now - r.at, 1)} for r in s.refused
                ],
            }
            for s in waiting
        ],
        "recent": recent,
    }


def callback_auth(state: ServerState) -> str:
    """How robot callbacks to this server are authenticated, in words for the status page."""
    intake = state["intake"]
    if state["mode"] == "relay" and not state["settings"].hil_relay_callbacks:
        return "through workers only (/api/callback is off)"
    if not intake.authenticated:
        return "callbacks unauthenticated"
    ways = []
    if intake.crypto is not None:
        ways.append("WeCom signature")
    if intake.auth_key:
        ways.append(f"{intake.auth_key} header")
    return " or ".join(ways)


@router.get("/status.json", include_in_schema=False)
async def status_json(request: Request) -> dict[str, Any]:
    return await status_data(request)


@router.get("/status", include_in_schema=False)
async def status_page(request: Request) -> HTMLResponse:
    return HTMLResponse(render_html(await status_data(request)))


# --- HTML -----------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,-apple-system,"PingFang SC","Microsoft YaHei",sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td:first-child{font-family:monospace}.empty{color:#888}dl{display:grid;
grid-template-columns:max-content auto;gap:.2em 1em}dt{color:#555}dd{margin:0}
"""


def _worker_row(w: dict[str, Any]) -> list[Any]:
    return [
        w["worker_id"],
        f"{_utc(w['connected_at'])} ({duration(w['connected_seconds'])})",
        f"{w['last_heartbeat_seconds_ago']:.0f}s ago",
        w["in_flight"],
    ]


def _waiting_row(w: dict[str, Any]) -> list[Any]:
    return [
        w["short_id"],
        w["project"] or "–",
        w["chat_id"] or "–",
        duration(w["age_seconds"]),
        w["question"] + (f"（{w['approvals']} 已批准）" if w["approvals"] else ""),
        "、".join(r["name"] or r["userid"] for r in w["refused"]) or "–",
    ]


def _recent_row(r: dict[str, Any]) -> list[Any]:
    return [
        r["short_id"],
        r["project"] or "–",
        r["outcome"],
        r["by"] or "–",
        r["chat_id"] or "–",
        f"{duration(r['seconds_ago'])} ago",
    ]


# The page's tables: title, column headings, the list in status.json, one item as a row, what an empty one says.
_SECTIONS: list[tuple[str, list[str], str, Callable[[dict[str, Any]], list[Any]], str]] = [
    (
        "Worker 连接 / Workers",
        ["worker_id", "连接于 Connected since", "上次心跳 Last heartbeat", "处理中 In flight"],
        "workers",
        _worker_row,
        "没有已连接的 Worker / no worker connected",
    ),
    (
        "等待回复的问题 / Waiting questions",
        ["短 id Short id", "项目 Project", "会话 Chat", "已等待 Age", "问题 Question", "未采纳 Refused"],
        "waiting",
        _waiting_row,
        "没有等待中的问题 / nothing is waiting",
    ),
    (
        "最近结果 / Recent outcomes",
        ["短 id Short id", "项目 Project", "结果 Outcome", "回答者 By", "会话 Chat", "时间 When"],
        "recent",
        _recent_row,
        "暂无 / none yet",
    ),
]


def render_html(data: dict[str, Any]) -> str:
    summary = [
        ("模式 Mode", data["mode"]),
        ("版本 Version", data["version"]),
        ("运行时间 Uptime", f"{duration(data['uptime_seconds'])} (since {_utc(data['started_at'])})"),
        ("健康 Health", data["health"] + (f" — {data['problems']}" if data["problems"] else "")),
        ("回调鉴权 Callbacks", data["callbacks"]),
        ("等待中 Waiting", str(len(data["waiting"]))),
    ]
    if data["mode"] == "relay":
        summary.append(("Worker 数 Workers", str(len(data["workers"]))))
    if data.get("send_queue") is not None:
        summary.append(("发送排队 Send queue", f"{data['send_queue']}（企业微信频率限制 / WeCom's pace）"))
    if data["scope"] == "own":
        summary.append(("范围 Scope", "仅本 token 的问题 / this token's questions only"))
    parts = [
        "<!doctype html>",
        '<html lang="zh-CN"><head><meta charset="utf-8">',
        '<meta http-equiv="refresh" content="15">',
        "<title>HIL Server 状态 / status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>HIL Server 状态 / Status</h1>",
        "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in summary) + "</dl>",
    ]
    for title, headings, key, row, empty in _SECTIONS:
        if key == "workers" and data["mode"] != "relay":
            continue
        parts.append(f"<h2>{title}</h2>")
        parts.append(_table(headings, [row(item) for item in data[key]], empty))
    parts.append('<p class="empty"><a href="status.json">status.json</a> · <a href="metrics">metrics</a></p>')
    parts.append("</body></html>")
    return "\n".join(parts)
