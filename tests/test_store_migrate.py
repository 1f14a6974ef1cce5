"""`hil-server store migrate --from sqlite:///… --to postgresql://…` against the throwaway PostgreSQL cluster: every
question, reply, msgid, audit row and outbox row arrives, a non-empty target is refused unless --force, and a server
on the target carries on where the SQLite one stopped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hil_protocol.outbound import Notice, Question, SendReceipt
from hil_server.cli import main
from hil_server.models import SendRequest
from hil_server.repository import OutboxItem, open_repository
from tests.helpers import callback_body, quote
from tests.service_helpers import close_service, new_service
from tests.test_service import handle

pytestmark = pytest.mark.usefixtures("clean_env")


class Channel:
    name = "test"

    async def send_question(self, question: Question) -> SendReceipt:
        return SendReceipt()

    async def send_notice(self, notice: Notice) -> None:
        pass


async def fill(path: Path) -> dict[str, str]:
    service = await new_service(Channel(), path)
    try:
        replied = await service.send(SendRequest(message="上线？", chat_id="chatA"))
        waiting = await service.send(SendRequest(message="还在等", chat_id="chatB"))
        assert replied.short_id and waiting.session_id and replied.session_id
        body = callback_body(quote(replied.short_id, "可以"), chat="chatA", msgid="mig-1")
        assert await handle(service, body) == "matched_quote"
        assert await handle(service, callback_body("@bot 你好", chat="chatC", msgid="mig-2")) == "hint_chat_id"
        await service.repo.enqueue([OutboxItem("notice", {"text": "稍后发送"}, chat_id="chatA")], now=1.0)
        return {"replied": replied.session_id, "waiting": waiting.session_id}
    finally:
        await close_service(service)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_copies_everything_and_refuses_a_non_empty_target(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "hil.db"
    ids = asyncio.run(fill(source))
    code, out, err = run(capsys, "store", "migrate", "--from", f"sqlite:///{source}", "--to", pg_url)
    assert code == 0, err
    assert out.split() == ["questions=2", "answers=1", "seen_msgids=2", "outbox=1", "audit=4"]

    async def check() -> None:
        sqlite = await open_repository(f"sqlite:///{source}")
        pg = await open_repository(pg_url)
        try:
            assert await pg.export_tables() == await sqlite.export_tables()  # type: ignore[attr-defined]
            assert not await pg.record_msgid("mig-1", now=2.0)  # still a duplicate after the move
            replied = await pg.get(ids["replied"])
            assert replied is not None and replied.status == "replied" and replied.replies[0].content == "可以"
            # the identities moved past the copied ids: new rows do not collide
            await pg.append_audit([], now=3.0)
            (new_id,) = await pg.enqueue([OutboxItem("notice", {"text": "新的"}, chat_id="chatA")], now=3.0)
            assert new_id == 2
        finally:
            await sqlite.close()
            await pg.close()

    asyncio.run(check())

    code, _, err = run(capsys, "store", "migrate", "--from", f"sqlite:///{source}", "--to", pg_url)
    assert code == 1 and "not empty" in err and "--force" in err
    code, out, err = run(capsys, "store", "migrate", "--from", f"sqlite:///{source}", "--to", pg_url, "--force")
    assert code == 0 and "outbox=1" in out, err


def test_migrate_without_a_source_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "store", "migrate", "--from", f"sqlite:///{tmp_path}/none.db", "--to", "postgresql://x/y"
    )
    assert code == 1 and "no store at" in err
