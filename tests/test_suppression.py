"""SuppressionService end to end: the list over gRPC, its effect on sends, webhooks, the CLI."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest

from swu_delivery._proto.swu.delivery.v1 import (
    common_pb2,
    delivery_pb2,
    suppression_pb2,
    suppression_pb2_grpc,
)
from swu_delivery.db import SCHEMA
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.helpers import ORDER, mk, sent_ids
from tests.test_client_cli import out_json, swu
from tests.test_webhook_effects import HOOK_ENV, HOOK_PASSWORD, PM_ACCOUNT, hard_bounce, post

SP = suppression_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MANUAL = SP.SUPPRESSION_REASON_MANUAL


@pytest.fixture
def server(swu_server: ServerHandle) -> ServerHandle:
    """The server with the `order` template (en) in place."""
    swu_server.put_template("order", {"en": ORDER})
    return swu_server


def stub(server: ServerHandle) -> suppression_pb2_grpc.SuppressionServiceStub:
    return suppression_pb2_grpc.SuppressionServiceStub(server.channel)


def add(
    server: ServerHandle, *emails: str, reason: int = MANUAL, note: str = "", replace: bool = False
) -> list[suppression_pb2.AddSuppressionResult]:
    entries = [SP.SuppressionEntry(email=e, reason=reason, note=note) for e in emails]
    request = SP.AddSuppressionRequest(entries=entries, replace=replace)
    return list(stub(server).AddSuppression(request).results)


def list_all(server: ServerHandle, **fields: Any) -> list[suppression_pb2.Suppression]:
    return list(stub(server).ListSuppressions(SP.ListSuppressionsRequest(**fields)).suppressions)


def refused(call: Any, request: Any) -> str:
    """The details of a call that must fail with INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    assert err.value.code() == INVALID, err.value.details()
    details: str = err.value.details()
    return details


def send(server: ServerHandle, to: str, **fields: Any) -> str:
    return str(server.delivery.Send(delivery_pb2.SendRequest(email=mk(to=to, **fields))).message_id)


def test_add_list_page_check_remove(swu_server: ServerHandle) -> None:
    """Entries are stored lower-cased, paged in address order, checked and removed."""
    emails = [f"User{i}@Example.com" for i in range(5)]
    results = add(swu_server, *emails, note="asked by support")
    assert [r.index for r in results] == list(range(5))
    assert all(r.added and not r.HasField("error") for r in results)
    first = results[0].suppression
    assert (first.email, first.reason, first.esp, first.event_seq) == (
        "user0@example.com",
        MANUAL,
        "",
        0,
    )
    assert first.note == "asked by support" and first.created_at.seconds > 0
    add(swu_server, "other@elsewhere.org", reason=SP.SUPPRESSION_REASON_UNSUBSCRIBE)
    seen, token, pages = [], "", 0
    while True:
        page = stub(swu_server).ListSuppressions(
            SP.ListSuppressionsRequest(page_size=2, page_token=token)
        )
        seen += [s.email for s in page.suppressions]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(["other@elsewhere.org", *(e.lower() for e in emails)])
    assert pages == 3
    unsub = list_all(swu_server, reason=SP.SUPPRESSION_REASON_UNSUBSCRIBE)
    assert [s.email for s in unsub] == ["other@elsewhere.org"]
    assert [s.email for s in list_all(swu_server, email_prefix="USER3@")] == ["user3@example.com"]
    assert [s.email for s in list_all(swu_server, email_prefix="user")] == [
        e.lower() for e in emails
    ]
    checked = stub(swu_server).CheckSuppression(
        SP.CheckSuppressionRequest(emails=["USER1@example.COM", "free@example.com"])
    )
    one, free = checked.results
    assert one.email == "USER1@example.COM" and one.suppressed
    assert one.suppression.email == "user1@example.com" and one.suppression.reason == MANUAL
    assert free.email == "free@example.com" and not free.suppressed
    assert not free.HasField("suppression")
    removed = stub(swu_server).RemoveSuppression(
        SP.RemoveSuppressionRequest(emails=["user1@EXAMPLE.com", "never@example.com"])
    )
    assert [s.email for s in removed.removed] == ["user1@example.com"]
    assert "user1@example.com" not in [s.email for s in list_all(swu_server)]


def test_existing_entry_is_kept_unless_replaced(swu_server: ServerHandle) -> None:
    """A second add keeps the first entry (added=False); replace=True overwrites it."""
    add(swu_server, "jane@example.com", reason=SP.SUPPRESSION_REASON_HARD_BOUNCE)
    (kept,) = add(swu_server, "JANE@example.com", note="by hand")
    assert not kept.added
    assert kept.suppression.reason == SP.SUPPRESSION_REASON_HARD_BOUNCE
    assert kept.suppression.note == ""
    (replaced,) = add(swu_server, "jane@example.com", note="by hand", replace=True)
    assert replaced.added
    assert (replaced.suppression.reason, replaced.suppression.note) == (MANUAL, "by hand")


def test_bad_fields_are_invalid_argument_naming_the_field(swu_server: ServerHandle) -> None:
    """Each bad entry is refused alone with its path; whole-request problems fail the call."""
    s = stub(swu_server)
    entries = [
        SP.SuppressionEntry(email="ok@example.com", reason=MANUAL),
        SP.SuppressionEntry(email="not an address", reason=MANUAL),
        SP.SuppressionEntry(email="noreason@example.com"),
        SP.SuppressionEntry(email="note@example.com", reason=MANUAL, note="line\nbreak"),
        SP.SuppressionEntry(email="enum@example.com", reason=99),  # type: ignore[arg-type]
    ]
    ok, bad_email, no_reason, bad_note, bad_enum = s.AddSuppression(
        SP.AddSuppressionRequest(entries=entries)
    ).results
    assert ok.added and not ok.HasField("error")
    code = INVALID.value[0]
    assert (bad_email.error.code, bad_email.error.field) == (code, "email")
    assert bad_email.error.message.startswith("entries[1].email: ")
    assert no_reason.error.message.startswith("entries[2].reason: required")
    assert bad_note.error.message.startswith("entries[3].note: ")
    assert bad_enum.error.message.startswith("entries[4].reason: unknown value 99")
    assert [e.email for e in list_all(swu_server)] == ["ok@example.com"]
    assert refused(s.AddSuppression, SP.AddSuppressionRequest()).startswith("entries: ")
    remove = SP.RemoveSuppressionRequest(emails=["ok@example.com", "a@b@c"])
    assert refused(s.RemoveSuppression, remove).startswith("emails[1]: ")
    check = SP.CheckSuppressionRequest(emails=["x" * 300 + "@example.com"])
    assert refused(s.CheckSuppression, check).startswith("emails[0]: ")
    too_many = SP.CheckSuppressionRequest(emails=[f"u{i}@example.com" for i in range(1001)])
    assert refused(s.CheckSuppression, too_many).startswith("emails: too many")
    token = SP.ListSuppressionsRequest(page_token="***")
    assert refused(s.ListSuppressions, token).startswith("page_token: ")
    reason = SP.ListSuppressionsRequest(reason=42)  # type: ignore[arg-type]
    assert refused(s.ListSuppressions, reason).startswith("reason: ")
    prefix = SP.ListSuppressionsRequest(email_prefix="a\x00")
    assert refused(s.ListSuppressions, prefix).startswith("email_prefix: ")
    assert [e.email for e in list_all(swu_server)] == ["ok@example.com"]  # nothing removed


def test_suppressed_to_is_not_sent_until_removed(server: ServerHandle) -> None:
    """A manually suppressed To ends SUPPRESSED, unsent; after removal the next send goes out."""
    add(server, "Blocked@Example.com")
    blocked, other = send(server, "blocked@example.COM"), send(server, "fine@example.com")
    done = server.wait_for_state([blocked, other], states=("SENT", "SUPPRESSED"))
    assert STATE_NAMES[done[blocked].state] == "SUPPRESSED"
    assert done[blocked].reason == "recipient suppressed: manual"
    assert STATE_NAMES[done[other].state] == "SENT"
    assert sent_ids(server.sim.requests()) == [other]
    stub(server).RemoveSuppression(SP.RemoveSuppressionRequest(emails=["blocked@example.com"]))
    again = send(server, "blocked@example.com")
    assert STATE_NAMES[server.wait_for_state([again])[again].state] == "SENT"
    assert sent_ids(server.sim.requests()) == [other, again]


def test_suppressed_cc_and_bcc_are_dropped_from_the_message(server: ServerHandle) -> None:
    """The message goes to To and the unsuppressed copies only."""
    add(server, "CC-gone@example.com", "bcc-gone@example.com")
    email = mk(
        to="to@example.com",
        cc=[
            common_pb2.Address(email="cc-gone@example.com"),
            common_pb2.Address(email="cc-kept@example.com", name="Kept"),
        ],
        bcc=[common_pb2.Address(email="BCC-gone@example.com")],
    )
    mid = server.delivery.Send(delivery_pb2.SendRequest(email=email)).message_id
    assert STATE_NAMES[server.wait_for_state([mid])[mid].state] == "SENT"
    (record,) = server.sim.requests(status=202)
    (personalization,) = record["body"]["personalizations"]
    assert personalization["to"] == [{"email": "to@example.com"}]
    assert personalization["cc"] == [{"email": "cc-kept@example.com", "name": "Kept"}]
    assert "bcc" not in personalization


def test_hard_bounce_webhook_entry_is_listed_with_its_event(swu_server: ServerHandle) -> None:
    """A hard bounce from a webhook shows as HARD_BOUNCE with its ESP account and event seq."""
    swu_server.stop()
    write_config(swu_server.config, swu_server.data_dir, swu_server.sim.url, extra=PM_ACCOUNT)
    swu_server.env[HOOK_ENV] = HOOK_PASSWORD
    swu_server.start()
    swu_server.put_template("order", {"en": ORDER})
    first = send(swu_server, "Gone@Example.com")
    swu_server.wait_for_state([first], states=("SENT", "FAILED"))
    assert post(swu_server, hard_bounce(first, "Gone@Example.com", 4242))[0] == 200
    (entry,) = list_all(swu_server)
    assert (entry.email, entry.reason, entry.esp) == (
        "gone@example.com",
        SP.SUPPRESSION_REASON_HARD_BOUNCE,
        "pm",
    )
    stream = swu_server.delivery.WatchEvents(
        delivery_pb2.WatchEventsRequest(cursor="0", types=[delivery_pb2.EVENT_TYPE_BOUNCED])
    )
    try:
        bounce = next(iter(stream))
    finally:
        stream.cancel()
    assert bounce.event.provider_event_id == "4242"
    assert entry.event_seq == int(bounce.cursor)


def test_data_directory_from_before_the_note_column(
    tmp_path: Path, esp_simulator: Any, swu_server: ServerHandle
) -> None:
    """A database whose suppressions table lacks `note` opens, keeps its rows, and takes notes."""
    swu_server.stop()
    old_dir = tmp_path / "old-data"
    old_dir.mkdir()
    conn = sqlite3.connect(old_dir / "swu.db")
    old_table = (
        "CREATE TABLE suppressions (recipient TEXT PRIMARY KEY, reason TEXT NOT NULL,"
        " esp TEXT NOT NULL DEFAULT '', event_seq INTEGER NOT NULL DEFAULT 0,"
        " created_at REAL NOT NULL) WITHOUT ROWID"
    )
    conn.execute(old_table)
    conn.executescript(SCHEMA)  # the other tables; suppressions exists and is left alone
    conn.execute("INSERT INTO suppressions VALUES ('old@example.com', 'complaint', 'sg', 7, 1.0)")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    config = write_config(tmp_path / "old.toml", old_dir, esp_simulator.url)
    old = ServerHandle(config, old_dir, esp_simulator)
    old.start()
    try:
        (entry,) = list_all(old)
        assert (entry.email, entry.reason, entry.esp, entry.event_seq, entry.note) == (
            "old@example.com",
            SP.SUPPRESSION_REASON_COMPLAINT,
            "sg",
            7,
            "",
        )
        (result,) = add(old, "new@example.com", note="kept")
        assert result.suppression.note == "kept"
    finally:
        old.stop()


def test_suppression_cli_commands(server: ServerHandle) -> None:
    """`suppression add/list/check/remove` print JSON and change the list."""
    t = ("--target", server.target)
    added = out_json(
        swu("suppression", "add", "A@example.com", "b@example.com", "--note", "cli", *t)
    )
    assert [r["suppression"]["email"] for r in added] == ["a@example.com", "b@example.com"]
    assert all(r["added"] and r["suppression"]["reason"] == "MANUAL" for r in added)
    unsub = out_json(swu("suppression", "add", "c@example.com", "--reason", "unsubscribe", *t))
    assert unsub[0]["suppression"]["reason"] == "UNSUBSCRIBE"
    listed = out_json(swu("suppression", "list", *t))
    assert [s["email"] for s in listed] == ["a@example.com", "b@example.com", "c@example.com"]
    assert listed[0]["note"] == "cli"
    manual = out_json(swu("suppression", "list", "--reason", "manual", *t))
    assert [s["email"] for s in manual] == ["a@example.com", "b@example.com"]
    checked = out_json(swu("suppression", "check", "a@example.com", "z@example.com", *t))
    assert [(c["email"], c["suppressed"]) for c in checked] == [
        ("a@example.com", True),
        ("z@example.com", False),
    ]
    removed = out_json(swu("suppression", "remove", "a@example.com", "z@example.com", *t))
    assert [s["email"] for s in removed["removed"]] == ["a@example.com"]
    bad = swu("suppression", "add", "not-an-address", *t)
    assert bad.returncode == 1
    assert "entries[0].email: " in bad.stdout
    mid = send(server, "B@example.com")
    done = server.wait_for_state([mid], states=("SENT", "SUPPRESSED"))
    assert STATE_NAMES[done[mid].state] == "SUPPRESSED"
