"""The Python client (async and sync) and the `swu-delivery` command, end to end."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from swu_delivery import cli
from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from swu_delivery.client import AsyncClient, Client, ClientError, email
from tests.conftest import STATE_NAMES, ServerHandle
from tests.helpers import ORDER, data, sent_ids

ROOT = Path(__file__).resolve().parent.parent


def swu(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m swu_delivery ARGS` and capture its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SWU_TARGET", None)
    return subprocess.run(
        [sys.executable, "-m", "swu_delivery", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )


def out_json(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a successful command printed."""
    assert proc.returncode == 0, proc.stderr
    return orjson.loads(proc.stdout)


def free_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def order_emails(count: int) -> Iterator[delivery_pb2.Email]:
    """`count` order emails, message i to user{i}@example.com."""
    for i in range(count):
        yield email("order", f"user{i}@example.com", data(i))


@pytest.fixture
def server(swu_server: ServerHandle) -> ServerHandle:
    """The server with the `order` template (en) in place."""
    swu_server.put_template("order", {"en": ORDER})
    return swu_server


# --- without a server -----------------------------------------------------------------------


def test_email_builder_fills_every_field() -> None:
    """email() turns plain Python values into a complete Email message."""
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    msg = email(
        "order",
        "jane@example.com",
        {"n": 1, "when": when},
        name="Jane",
        locale="fr-CA",
        template_version=3,
        cc=["c@example.com", ("d@example.com", "D")],
        bcc=[common_pb2.Address(email="b@example.com")],
        reply_to=("r@example.com", "R"),
        sender="s@example.com",
        headers={"X-Campaign": "spring"},
        tags=["a", "b"],
        metadata={"k": "v"},
        idempotency_key="key-1",
        attachments=[("a.txt", "text/plain", b"hi")],
        priority="bulk",
        send_at=when,
        validate_render=True,
    )
    assert msg.to == common_pb2.Address(email="jane@example.com", name="Jane")
    assert orjson.loads(msg.data_json) == {"n": 1, "when": "2030-01-02T03:04:05+00:00"}
    assert [(a.email, a.name) for a in msg.cc] == [("c@example.com", ""), ("d@example.com", "D")]
    assert msg.bcc[0].email == "b@example.com"
    assert (msg.reply_to.email, msg.reply_to.name) == ("r@example.com", "R")
    assert msg.sender.email == "s@example.com"
    assert dict(msg.headers) == {"X-Campaign": "spring"} and list(msg.tags) == ["a", "b"]
    assert msg.attachments[0].content == b"hi"
    assert msg.priority == delivery_pb2.PRIORITY_BULK
    assert msg.send_at.ToDatetime(tzinfo=UTC) == when
    assert (msg.locale, msg.template_version, msg.validate_render) == ("fr-CA", 3, True)


def test_json_line_forms() -> None:
    """A JSON line accepts addresses as strings, [email, name] pairs or objects."""
    msg = cli.email_from_json(
        {
            "template_id": "order",
            "to": ["jane@example.com", "Jane"],
            "cc": ["c@example.com", {"email": "d@example.com", "name": "D"}],
            "data": {"x": 1},
            "priority": "transactional",
            "send_at": "2030-01-01T00:00:00+00:00",
        }
    )
    assert (msg.to.email, msg.to.name) == ("jane@example.com", "Jane")
    assert [a.email for a in msg.cc] == ["c@example.com", "d@example.com"]
    assert msg.HasField("send_at") and msg.priority == delivery_pb2.PRIORITY_TRANSACTIONAL
    for bad, reason in [
        ([1], "expected a JSON object"),
        ({"to": "a@example.com"}, "template_id: required"),
        ({"template_id": "t", "to": "a@example.com", "nope": 1}, "unknown key 'nope'"),
        ({"template_id": "t", "to": 5}, "to: expected"),
        ({"template_id": "t", "to": "a@example.com", "data": [1]}, "data: expected"),
        ({"template_id": "t", "to": "a@example.com", "tags": [1]}, ""),
    ]:
        with pytest.raises(ValueError, match=reason or None):
            cli.email_from_json(bad)


def test_malformed_lines_become_rejections() -> None:
    """Bad lines are reported with their line number; the others still come through."""
    lines = [
        orjson.dumps({"template_id": "t", "to": "a@example.com"}),
        b"{not json",
        b"",
        orjson.dumps({"template_id": "t"}),
        orjson.dumps({"template_id": "t", "to": "b@example.com"}),
    ]
    feed = cli.JsonLinesEmails(io.BytesIO(b"\n".join(lines) + b"\n"))
    assert [m.to.email for m in feed] == ["a@example.com", "b@example.com"]
    assert list(feed.line_of) == [1, 5]
    assert [(line, code) for line, code, _ in feed.rejections] == [
        (2, "INVALID_ARGUMENT"),
        (4, "INVALID_ARGUMENT"),
    ]
    assert feed.rejections[0][2].startswith("invalid JSON")


def test_progress_bar_line() -> None:
    """The progress line shows counts with separators, the total and a rate."""
    stream = io.StringIO()
    bar = cli.ProgressBar(100_000, stream)
    bar.update(12_000, 11_990, 10, force=True)
    bar.update(12_500, 12_490, 10)  # too soon after the last redraw: skipped
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r  12,000 / 100,000  accepted 11,990  rejected 10  ")
    assert text.endswith("/s\n") and "12,500" not in text


@pytest.mark.parametrize(
    "argv",
    [
        ["template", "put", "t"],
        ["template", "put", "t", "--subject", "s"],
        ["template", "put", "t", "--from-dir", "/nonexistent-dir"],
        ["send"],
        ["send", "--template", "t"],
        ["send", "--template", "t", "--to", "a@example.com", "--data", "[1]"],
        ["send", "--template", "t", "--to", "a@example.com", "--header", "no-equals"],
        ["send", "--file", "x.jsonl", "--to", "a@example.com"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Wrong flag combinations are refused before any call, with exit code 2."""
    assert cli.run([*argv, "--target", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_unknown_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown flag fails argument parsing (exit 2), except after esp-simulator."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["status", "m1", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_esp_simulator_gets_the_remaining_args(monkeypatch: pytest.MonkeyPatch) -> None:
    """`esp-simulator ARGS` hands every remaining argument, flags included, to the simulator."""
    import swu_delivery.simulator

    seen: list[list[str] | None] = []
    monkeypatch.setattr(swu_delivery.simulator, "main", seen.append, raising=False)
    assert cli.run(["esp-simulator", "--port", "0", "--rate-429", "0.1", "--help"]) == 0
    assert seen == [["--port", "0", "--rate-429", "0.1", "--help"]]


def test_unreachable_target_hints() -> None:
    """A call to a port with no server exits 1 and says the server is not reachable there."""
    target = f"127.0.0.1:{free_port()}"
    proc = swu("status", "m1", "--target", target)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: UNAVAILABLE: ")
    assert f"no swu-delivery server reachable at {target}" in proc.stderr


def test_serve_with_bad_config_exits_2(tmp_path: Path) -> None:
    """`serve` with an unreadable or invalid config prints the problem and exits 2."""
    proc = swu("serve", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2
    assert "missing.toml" in proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = \n")
    proc = swu("serve", "--config", str(bad))
    assert proc.returncode == 2 and "bad.toml" in proc.stderr


# --- CLI against the real server ------------------------------------------------------------


def test_template_put_then_get_round_trip(swu_server: ServerHandle, tmp_path: Path) -> None:
    """`template put` creates, then adds versions; `get`, `versions`, `activate` show them."""
    html = tmp_path / "body.html"
    html.write_text("<p>Hi {{ name }}</p>")
    text = tmp_path / "body.txt"
    text.write_text("Hi {{ name }}")
    t = ("--target", swu_server.target)
    v1 = out_json(
        swu(
            "template",
            "put",
            "hello",
            "--subject",
            "Hello {{ name }}",
            "--html",
            str(html),
            "--text",
            str(text),
            "--description",
            "greeting",
            *t,
        )
    )
    assert (v1["template_id"], v1["version"], v1["default_locale"]) == ("hello", 1, "en")
    assert v1["contents"] == [
        {
            "locale": "en",
            "subject": "Hello {{ name }}",
            "html": "<p>Hi {{ name }}</p>",
            "text": "Hi {{ name }}",
        }
    ]
    v2 = out_json(
        swu(
            "template",
            "put",
            "hello",
            "--subject",
            "Hey",
            "--html",
            "-",
            "--draft",
            *t,
            stdin="<p>v2</p>",
        )
    )
    assert v2["version"] == 2
    got = out_json(swu("template", "get", "hello", *t))
    assert got["template"]["description"] == "greeting"
    assert (got["template"]["active_version"], got["template"]["latest_version"]) == (1, 2)
    assert got["version"]["contents"][0]["subject"] == "Hello {{ name }}"
    got2 = out_json(swu("template", "get", "hello", "--version", "2", *t))
    assert got2["version"]["contents"][0]["html"] == "<p>v2</p>"
    versions = out_json(swu("template", "versions", "hello", *t))
    assert [v["version"] for v in versions] == [2, 1]
    activated = out_json(swu("template", "activate", "hello", "2", *t))
    assert activated["active_version"] == 2
    listed = out_json(swu("template", "list", *t))
    assert [x["template_id"] for x in listed] == ["hello"]
    out_json(swu("template", "delete", "hello", *t))
    gone = swu("template", "get", "hello", *t)
    assert gone.returncode == 1 and gone.stderr.startswith("error: NOT_FOUND: ")


def test_template_put_from_dir_then_render(swu_server: ServerHandle, tmp_path: Path) -> None:
    """`--from-dir` stores every locale folder; `render` picks the asked locale."""
    for locale, word in [("en", "Hello"), ("fr", "Bonjour")]:
        folder = tmp_path / "tpl" / locale
        folder.mkdir(parents=True)
        (folder / "subject.txt").write_text(f"{word} {{{{ name }}}}\n")
        (folder / "body.html").write_text(f"<p>{word} {{{{ name }}}}</p>")
        (folder / "body.txt").write_text(f"{word} {{{{ name }}}}")
    t = ("--target", swu_server.target)
    version = out_json(swu("template", "put", "hi", "--from-dir", str(tmp_path / "tpl"), *t))
    assert sorted(c["locale"] for c in version["contents"]) == ["en", "fr"]
    assert version["default_locale"] == "en"
    rendered = out_json(
        swu("render", "--template", "hi", "--data", '{"name": "<Zoé>"}', "--locale", "fr-CA", *t)
    )
    assert rendered["subject"] == "Bonjour <Zoé>"
    assert rendered["html"] == "<p>Bonjour &lt;Zoé&gt;</p>"
    assert rendered["text"] == "Bonjour <Zoé>"
    assert rendered["locale"] == "fr"


def test_send_one_then_status(server: ServerHandle, tmp_path: Path) -> None:
    """`send` prints the message id; `status` shows it SENT with its events."""
    payload = tmp_path / "data.json"
    payload.write_bytes(orjson.dumps(data(7)))
    send = ["send", "--template", "order", "--to", "jane@example.com", "--name", "Jane"]
    send += ["--data-file", str(payload), "--header", "X-Campaign=spring", "--tag", "orders"]
    send += ["--idempotency-key", "order-7", "--target", server.target]
    sent = out_json(swu(*send))
    assert sent["duplicate"] is False
    mid = sent["message_id"]
    server.wait_for_state([mid])
    status = out_json(swu("status", mid, "--target", server.target))
    assert status["message_id"] == mid and status["state"] == "SENT"
    assert status["esp"] == "sg" and status["esp_message_id"] and status["attempts"] >= 1
    assert [e["type"] for e in status["events"]][-1] == "SENT"
    (record,) = [r for r in server.sim.requests(status=202) if sent_ids([r]) == [mid]]
    assert record["body"]["subject"] == "Order 1007 shipped, User7"
    assert record["body"]["headers"]["X-Campaign"] == "spring"
    again = out_json(swu(*send))  # the same key and content: the original id, nothing sent
    assert again == {"message_id": mid, "duplicate": True}


def test_status_of_unknown_message_exits_1(swu_server: ServerHandle) -> None:
    """`status` of an id the service never issued prints NOT_FOUND and exits 1."""
    proc = swu("status", "no-such-message", "--target", swu_server.target)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: NOT_FOUND: ")


def write_orders_file(path: Path, count: int, bad_json: int, bad_address: int) -> None:
    """A JSON-lines file of `count` orders; two lines (1-based numbers) are broken."""
    with path.open("wb") as f:
        for line in range(1, count + 1):
            if line == bad_json:
                f.write(b'{"template_id": "order", "to": \n')
                continue
            to = "not-an-address" if line == bad_address else f"user{line}@example.com"
            row = {
                "template_id": "order",
                "to": to,
                "data": data(line),
                "idempotency_key": f"line-{line}",
                "tags": ["bulk-test"],
            }
            f.write(orjson.dumps(row) + b"\n")


def test_send_file_reports_rejections_and_delivers_the_rest(
    server: ServerHandle, tmp_path: Path
) -> None:
    """`send --file`: bad lines are counted with their line numbers, the rest end SENT."""
    path = tmp_path / "orders.jsonl"
    write_orders_file(path, 1200, bad_json=7, bad_address=500)
    t = ("--target", server.target)
    proc = swu("send", "--file", str(path), "--batch-size", "128", "--concurrency", "3", *t)
    assert proc.returncode == 1, proc.stderr
    summary = orjson.loads(proc.stdout)
    assert (summary["accepted"], summary["rejected"], summary["duplicates"]) == (1198, 2, 0)
    assert summary["elapsed"] >= 0 and summary["rate"] >= 0
    rejections = summary["first_rejections"]
    assert [(r["line"], r["code"]) for r in rejections] == [
        (7, "INVALID_ARGUMENT"),
        (500, "INVALID_ARGUMENT"),
    ]
    assert rejections[0]["message"].startswith("invalid JSON")
    assert "to" in rejections[1]["message"]
    assert "1,200 / 1,200" in proc.stderr  # the progress bar's final state

    # The same file again, streamed: every accepted line is a duplicate of the first run.
    again = swu("send", "--file", str(path), "--stream", "--no-progress", *t)
    assert again.returncode == 1 and again.stderr == ""
    summary = orjson.loads(again.stdout)
    assert (summary["accepted"], summary["rejected"], summary["duplicates"]) == (1198, 2, 1198)

    # The same content and keys through the client: the original ids, in line order.
    lines = [n for n in range(1, 1201) if n not in (7, 500)]
    emails = (
        email(
            "order",
            f"user{n}@example.com",
            data(n),
            tags=["bulk-test"],
            idempotency_key=f"line-{n}",
        )
        for n in lines
    )
    with Client(server.target) as client:
        report = client.send_bulk(emails)
    assert report.duplicates == 1198 and not report.rejected
    done = server.wait_for_state(report.message_ids)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    assert [done[mid].to for mid in report.message_ids] == [f"user{n}@example.com" for n in lines]
    assert set(sent_ids(server.sim.requests(status=202))) == set(report.message_ids)
    status = out_json(swu("status", report.message_ids[-1], *t))
    assert status["state"] == "SENT" and status["to"] == "user1200@example.com"


# --- the Python client against the real server ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["batches", "stream"])
async def test_async_send_bulk_in_input_order(server: ServerHandle, stream: bool) -> None:
    """AsyncClient.send_bulk delivers everything; ids and rejections follow input order."""
    emails = list(order_emails(1000))
    emails[333] = email("order", "bad address", data(333))
    progress: list[int] = []
    async with AsyncClient(server.target) as client:
        report = await client.send_bulk(
            emails,
            batch_size=128,
            concurrency=3,
            stream=stream,
            on_progress=lambda r: progress.append(r.done),
        )
    assert report.accepted == 999 and report.duplicates == 0
    (rejection,) = report.rejected
    assert (rejection.index, rejection.code) == (333, grpc.StatusCode.INVALID_ARGUMENT)
    assert report.message_ids[333] == ""
    assert progress == sorted(progress) and progress[-1] == 1000
    ids = [mid for mid in report.message_ids if mid]
    assert len(set(ids)) == 999
    done = server.wait_for_state(ids)
    assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
    expected = [f"user{i}@example.com" for i in range(1000) if i != 333]
    assert [done[mid].to for mid in ids] == expected


@pytest.mark.parametrize("stream", [False, True], ids=["batches", "stream"])
async def test_async_send_iter_from_async_source(server: ServerHandle, stream: bool) -> None:
    """send_iter reads an async iterable lazily and yields results indexed from 0, in order."""

    async def source() -> AsyncIterator[delivery_pb2.Email]:
        for msg in order_emails(250):
            yield msg

    async with AsyncClient(server.target) as client:
        results = [r async for r in client.send_iter(source(), batch_size=7, stream=stream)]
        assert [r.index for r in results] == list(range(250))
        message = await client.get_message(results[42].message_id)
        assert message.to == "user42@example.com"


async def test_async_client_templates_and_errors(swu_server: ServerHandle) -> None:
    """AsyncClient manages templates, renders, sends one, and raises ClientError on failures."""
    async with AsyncClient(swu_server.target) as client:
        created = await client.create_template(
            "hello", {"en": {"subject": "Hi {{ name }}", "text": "Hi {{ name }}"}}
        )
        assert created.template.active_version == 1
        await client.update_template(
            "hello", {"en": {"subject": "Yo {{ name }}", "text": "Yo"}}, draft=True
        )
        assert [t.template_id async for t in client.list_templates(page_size=1)] == ["hello"]
        rendered = await client.render("hello", {"name": "Ann"})
        assert rendered.subject == "Hi Ann"
        sent = await client.send(email("hello", "ann@example.com", {"name": "Ann"}))
        swu_server.wait_for_state([sent.message_id])
        assert (await client.get_message(sent.message_id)).to == "ann@example.com"
        with pytest.raises(ClientError) as err:
            await client.send(email("hello", "not an address"))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ClientError) as err:
            await client.get_message("no-such-message")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert str(err.value).startswith("NOT_FOUND: ")


def test_sync_client_round_trip(swu_server: ServerHandle) -> None:
    """The sync Client covers templates, previews, single, batch and bulk sends, and status."""
    with Client(swu_server.target) as client:
        client.create_template("t1", {"en": {"subject": "One {{ n }}", "text": "one"}})
        client.put_template("t2", {"en": {"subject": "Two {{ n }}", "text": "two"}})
        put = client.put_template("t2", {"en": {"subject": "Two v2 {{ n }}", "text": "two"}})
        assert put.version.version == 2
        assert [t.template_id for t in client.list_templates(page_size=1)] == ["t1", "t2"]
        assert [v.version for v in client.list_template_versions("t2")] == [2, 1]
        assert client.activate_template_version("t2", 1).active_version == 1
        assert client.get_template("t2").version.contents[0].subject == "Two {{ n }}"
        assert client.render("t2", {"n": 5}, version=2).subject == "Two v2 5"

        one = client.send(email("t1", "a@example.com", {"n": 1}))
        results = client.send_batch(
            [email("t1", "b@example.com", {"n": 2}), email("t1", "bad"), email("missing", "c@x.io")]
        )
        assert [r.index for r in results] == [0, 1, 2]
        assert results[0].message_id and not results[1].message_id
        assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert results[2].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        bulk = client.send_bulk(
            (email("t2", f"u{i}@example.com", {"n": i}) for i in range(300)),
            batch_size=64,
            stream=True,
        )
        assert bulk.accepted == 300 and not bulk.rejected
        ids = [one.message_id, results[0].message_id, *bulk.message_ids]
        done = swu_server.wait_for_state(ids)
        assert {STATE_NAMES[m.state] for m in done.values()} == {"SENT"}
        assert client.get_message(bulk.message_ids[299]).to == "u299@example.com"

        client.delete_template("t1")
        with pytest.raises(ClientError) as err:
            client.send(email("t1", "a@example.com"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_sync_client_unreachable_raises_unavailable() -> None:
    """Calls to a port with no server raise ClientError(UNAVAILABLE), bulk ones included."""
    with Client(f"127.0.0.1:{free_port()}", timeout=5) as client:
        for stream in (False, True):
            with pytest.raises(ClientError) as err:
                client.send_bulk(order_emails(10), stream=stream)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_bulk_source_errors_propagate(server: ServerHandle) -> None:
    """An exception raised by the caller's email source surfaces as itself, in both modes."""

    def broken() -> Iterator[delivery_pb2.Email]:
        yield from order_emails(600)
        raise RuntimeError("source broke")

    with Client(server.target) as client:
        for stream in (False, True):
            with pytest.raises(RuntimeError, match="source broke"):
                client.send_bulk(broken(), batch_size=100, stream=stream)


@pytest.mark.parametrize("stream", [False, True], ids=["batches", "stream"])
async def test_async_bulk_source_errors_propagate(server: ServerHandle, stream: bool) -> None:
    """An exception raised by an async email source surfaces as itself, not as a gRPC error."""

    async def broken() -> AsyncIterator[delivery_pb2.Email]:
        for msg in order_emails(600):
            yield msg
        raise RuntimeError("source broke")

    async with AsyncClient(server.target) as client:
        with pytest.raises(RuntimeError, match="source broke"):
            await client.send_bulk(broken(), batch_size=100, stream=stream)
