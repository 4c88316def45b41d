"""The `swu-delivery` command: one argparse front end over the server, the simulator and the client.

    swu-delivery serve [--config FILE] [--listen HOST:PORT] [--data-dir DIR] [--workers N]
    swu-delivery esp-simulator [ARGS...]
    swu-delivery template put ID --subject S [--html FILE|-] [--text FILE|-] [--locale L]
                                 [--default-locale L] [--description D] [--draft]
    swu-delivery template put ID --from-dir DIR     (DIR/<locale>/{subject.txt,body.html,body.txt})
    swu-delivery template get ID [--version N]
    swu-delivery template list | delete ID | versions ID | activate ID N
    swu-delivery send --template ID --to EMAIL [--name N] [--data JSON | --data-file FILE] ...
    swu-delivery send --file FILE.jsonl [--batch-size 500] [--concurrency 4] [--stream]
    swu-delivery status MESSAGE_ID
    swu-delivery events [--cursor C] [--esp A] [--template T] [--type bounced] [--limit N]
    swu-delivery stats TEMPLATE_ID
    swu-delivery render --template ID [--data JSON | --data-file FILE] [--locale L]
    swu-delivery suppression add EMAIL... [--reason manual|unsubscribe|...] [--note T] [--replace]
    swu-delivery suppression remove EMAIL... | check EMAIL... | list [--reason R] [--prefix P]
    swu-delivery requeue ID...
    swu-delivery requeue --template T [--esp E] [--since ISO] [--until ISO] [--state S] [--limit N]

Client commands take `--target HOST:PORT` (default: $SWU_TARGET, else 127.0.0.1:50051) and print
JSON on stdout. Exit codes: 0 ok, 1 a call failed or an item was rejected, 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import os
import sys
import time
from array import array
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import grpc
import orjson
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2, template_pb2
from swu_delivery.client import AsyncClient, BulkReport, Client, ClientError, email

__all__ = ["main"]

DEFAULT_TARGET = "127.0.0.1:50051"
FIRST_REJECTIONS = 20  # how many rejections the `send --file` summary lists


class UsageError(Exception):
    """A flag combination or an input file is wrong; exit code 2."""


# --- output ---------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready dict with proto field names and zero values included."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


# --- inputs ---------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    """A file's text, or stdin's for "-"."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a JSON object")
    return value


def _data(args: argparse.Namespace) -> dict[str, Any] | None:
    """Template data from --data or --data-file."""
    if args.data is not None:
        return _json_object(args.data, "--data")
    if args.data_file is not None:
        return _json_object(_read_text(args.data_file), args.data_file)
    return None


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """{K: V} from repeated K=V flags."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag}: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


# --- serve, esp-simulator -------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from swu_delivery.config import ConfigError, load_config

    try:
        config = load_config(
            args.config,
            listen=args.listen,
            data_dir=args.data_dir,
            log_level=args.log_level,
            log_format=args.log_format,
        )
        if args.workers > 1:  # before anything imports prometheus_client
            from swu_delivery.workers import prepare_metrics_dir

            prepare_metrics_dir(config.data_dir)
        from swu_delivery import server

        return server.run(config, workers=args.workers)
    except ConfigError as exc:
        _error(str(exc))
        return 2


def _esp_simulator(args: argparse.Namespace) -> int:
    from swu_delivery import simulator

    code = simulator.main(args.rest)  # an exit code, or None
    return code if isinstance(code, int) else 0


# --- templates ------------------------------------------------------------------------------


def _contents_from_dir(root: Path) -> list[template_pb2.LocaleContent]:
    """One LocaleContent per DIR/<locale>/ holding subject.txt and body.html and/or body.txt."""
    if not root.is_dir():
        raise UsageError(f"--from-dir: {root} is not a directory")
    contents = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        subject, html, text = (folder / n for n in ("subject.txt", "body.html", "body.txt"))
        if not subject.is_file():
            raise UsageError(f"{folder}: missing subject.txt")
        if not html.is_file() and not text.is_file():
            raise UsageError(f"{folder}: needs body.html or body.txt")
        contents.append(
            template_pb2.LocaleContent(
                locale=folder.name,
                subject=_read_text(str(subject)).strip(),
                html=_read_text(str(html)) if html.is_file() else "",
                text=_read_text(str(text)) if text.is_file() else "",
            )
        )
    if not contents:
        raise UsageError(f"--from-dir: no locale folders in {root}")
    return contents


def _put_contents(args: argparse.Namespace) -> tuple[list[template_pb2.LocaleContent], str]:
    """The locale contents and default locale that `template put` asks for."""
    if args.from_dir is not None:
        if args.subject is not None or args.html is not None or args.text is not None:
            raise UsageError("--from-dir: do not combine with --subject, --html or --text")
        contents = _contents_from_dir(args.from_dir)
        locales = [c.locale for c in contents]
        return contents, args.default_locale or ("en" if "en" in locales else locales[0])
    if args.subject is None:
        raise UsageError("template put: --subject is required (or use --from-dir)")
    if args.html is None and args.text is None:
        raise UsageError("template put: --html or --text is required")
    if args.html == "-" and args.text == "-":
        raise UsageError("template put: only one of --html and --text can read stdin")
    content = template_pb2.LocaleContent(
        locale=args.locale,
        subject=args.subject,
        html=_read_text(args.html) if args.html is not None else "",
        text=_read_text(args.text) if args.text is not None else "",
    )
    return [content], args.default_locale or args.locale


def _template_put(args: argparse.Namespace) -> int:
    contents, default_locale = _put_contents(args)
    with Client(args.target) as client:
        response = client.put_template(
            args.id,
            contents,
            default_locale=default_locale,
            description=args.description,
            draft=args.draft,
        )
    _print_json(_to_dict(response.version))
    return 0


def _template_get(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        _print_json(_to_dict(client.get_template(args.id, args.version)))
    return 0


def _template_list(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        _print_json([_to_dict(t) for t in client.list_templates()])
    return 0


def _template_delete(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        client.delete_template(args.id)
    _print_json({"template_id": args.id, "deleted": True})
    return 0


def _template_versions(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        _print_json([_to_dict(v) for v in client.list_template_versions(args.id)])
    return 0


def _template_activate(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        _print_json(_to_dict(client.activate_template_version(args.id, args.version)))
    return 0


# --- send -----------------------------------------------------------------------------------


def _send(args: argparse.Namespace) -> int:
    if args.file is not None:
        if args.template is not None or args.to is not None:
            raise UsageError("send --file: each line names its template and recipient")
        return _send_file(args)
    if args.template is None or args.to is None:
        raise UsageError("send: --template and --to are required (or use --file)")
    message = email(
        args.template,
        args.to,
        _data(args),
        name=args.name,
        locale=args.locale,
        template_version=args.version,
        cc=args.cc,
        bcc=args.bcc,
        reply_to=args.reply_to,
        headers=_pairs(args.header, "--header"),
        tags=args.tag,
        metadata=_pairs(args.metadata, "--metadata"),
        idempotency_key=args.idempotency_key,
        priority=args.priority,
        send_at=_iso_time(args.send_at) if args.send_at else None,
        validate_render=args.validate_render,
    )
    with Client(args.target) as client:
        response = client.send(message)
    _print_json({"message_id": response.message_id, "duplicate": response.duplicate})
    return 0


def _iso_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--send-at: not an ISO 8601 time: {text!r}") from None


_EMAIL_KEYS = frozenset(inspect.signature(email).parameters)


def _json_address(value: Any, key: str) -> common_pb2.Address:
    """An Address from "a@b.com", ["a@b.com", "Name"] or {"email": ..., "name": ...}."""
    if isinstance(value, str):
        return common_pb2.Address(email=value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return common_pb2.Address(email=value[0], name=value[1])
    if isinstance(value, dict) and isinstance(value.get("email"), str):
        return common_pb2.Address(email=value["email"], name=str(value.get("name", "")))
    raise ValueError(f"{key}: expected an address string, [email, name] or {{email, name}}")


def _json_attachment(value: Any) -> delivery_pb2.Attachment:
    """An Attachment from {"filename", "content_type", "content" (base64), "content_id"}."""
    if not isinstance(value, dict):
        raise ValueError("attachments: expected objects")
    return delivery_pb2.Attachment(
        filename=value.get("filename", ""),
        content_type=value.get("content_type", ""),
        content=base64.b64decode(value.get("content", ""), validate=True),
        content_id=value.get("content_id", ""),
    )


def email_from_json(obj: Any) -> delivery_pb2.Email:
    """An Email from one JSON-lines object whose keys are `email()`'s parameters."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(obj.keys() - _EMAIL_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    for key in ("template_id", "to"):
        if key not in obj:
            raise ValueError(f"{key}: required")
    kwargs = dict(obj)
    if not isinstance(kwargs["template_id"], str):
        raise ValueError("template_id: expected a string")
    if kwargs.get("data") is not None and not isinstance(kwargs["data"], dict):
        raise ValueError("data: expected a JSON object")
    for key in ("to", "reply_to", "sender"):
        if kwargs.get(key) is not None:
            kwargs[key] = _json_address(kwargs[key], key)
    for key in ("cc", "bcc"):
        if key in kwargs:
            kwargs[key] = [_json_address(a, key) for a in kwargs[key] or ()]
    if "attachments" in kwargs:
        kwargs["attachments"] = [_json_attachment(a) for a in kwargs["attachments"] or ()]
    if isinstance(kwargs.get("send_at"), str):
        kwargs["send_at"] = datetime.fromisoformat(kwargs["send_at"])
    try:
        return email(**kwargs)
    except TypeError as exc:  # a field of the wrong JSON type
        raise ValueError(str(exc)) from None


class JsonLinesEmails:
    """Emails read lazily from JSON lines; malformed lines become rejections, not errors."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.line_of = array("Q")  # line number of each email handed out, by send index
        self.rejections: list[tuple[int, str, str]] = []  # (line, code, message)

    def __iter__(self) -> Iterator[delivery_pb2.Email]:
        for number, raw in enumerate(self._stream, 1):
            if not raw.strip():
                continue
            try:
                message = email_from_json(orjson.loads(raw))
            except ValueError as exc:  # includes orjson.JSONDecodeError
                reason = f"invalid JSON: {exc}" if isinstance(exc, orjson.JSONDecodeError) else exc
                self.rejections.append((number, "INVALID_ARGUMENT", str(reason)))
                continue
            self.line_of.append(number)
            yield message


class ProgressBar:
    """A one-line progress display on stderr, redrawn at most a few times a second."""

    INTERVAL = 0.25  # seconds between redraws

    def __init__(self, total: int | None, stream: IO[str], *, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, accepted: int, rejected: int, *, force: bool = False) -> None:
        """Redraw if enough time has passed since the last redraw (or when forced)."""
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.INTERVAL):
            return
        self._last = now
        rate = done / max(now - self.start, 1e-9)
        total = f" / {self.total:,}" if self.total is not None else ""
        self.stream.write(
            f"\r  {done:,}{total}  accepted {accepted:,}  rejected {rejected:,}  {rate:,.0f}/s"
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the progress line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _count_lines(path: Path) -> int:
    """Non-blank lines in a file, read in binary chunks."""
    count = 0
    with path.open("rb") as f:
        for raw in f:
            count += bool(raw.strip())
    return count


def _send_file(args: argparse.Namespace) -> int:
    if not 1 <= args.batch_size <= 1000:
        raise UsageError("--batch-size: must be 1..1000")
    total = None
    if args.file != "-":
        path = Path(args.file)
        try:
            total = _count_lines(path)
            stream: IO[bytes] = path.open("rb")
        except OSError as exc:
            raise UsageError(f"{args.file}: cannot read ({exc.strerror})") from None
    else:
        stream = sys.stdin.buffer
    emails = JsonLinesEmails(stream)
    bar = ProgressBar(total, sys.stderr, enabled=not args.no_progress)

    def progress(report: BulkReport) -> None:
        local = len(emails.rejections)
        bar.update(report.done + local, report.accepted, len(report.rejected) + local)

    try:
        report = asyncio.run(_send_bulk(args, emails, progress))
        local = len(emails.rejections)
        bar.update(report.done + local, report.accepted, len(report.rejected) + local, force=True)
    finally:
        bar.close()
        stream.close()
    _print_json(_summary(report, emails))
    return 1 if report.rejected or emails.rejections else 0


async def _send_bulk(
    args: argparse.Namespace, emails: JsonLinesEmails, progress: Any
) -> BulkReport:
    async with AsyncClient(args.target) as client:
        return await client.send_bulk(
            emails,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            stream=args.stream,
            on_progress=progress,
        )


def _summary(report: BulkReport, emails: JsonLinesEmails) -> dict[str, Any]:
    """The JSON summary of `send --file`: counts, rate and the first rejections by line."""
    rejections = list(emails.rejections)
    rejections += [(emails.line_of[r.index], r.code.name, r.message) for r in report.rejected]
    rejections.sort()
    return {
        "accepted": report.accepted,
        "duplicates": report.duplicates,
        "rejected": len(rejections),
        "elapsed": round(report.elapsed, 3),
        "rate": round(report.done / report.elapsed, 1) if report.elapsed > 0 else 0.0,
        "first_rejections": [
            {"line": line, "code": code, "message": message}
            for line, code, message in rejections[:FIRST_REJECTIONS]
        ],
    }


# --- status, render -------------------------------------------------------------------------

_ENUM_PREFIXES = ("MESSAGE_STATE_", "EVENT_TYPE_", "BOUNCE_TYPE_", "SUPPRESSION_REASON_")


def _short_enums(value: Any) -> Any:
    """The same JSON value with MESSAGE_STATE_/EVENT_TYPE_ prefixes dropped from enum names."""
    if isinstance(value, dict):
        return {k: _short_enums(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short_enums(v) for v in value]
    if isinstance(value, str):
        for prefix in _ENUM_PREFIXES:
            if value.startswith(prefix):
                return value.removeprefix(prefix)
    return value


def _status(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        message = client.get_message(args.message_id)
    _print_json(_short_enums(_to_dict(message)))
    return 0


def _events(args: argparse.Namespace) -> int:
    """Print events as JSON lines until interrupted (or --limit events were printed)."""
    with Client(args.target) as client:
        stream = client.watch_events(
            cursor=args.cursor, esps=args.esp, template_ids=args.template, types=args.type
        )
        for printed, item in enumerate(stream, start=1):
            line = _short_enums(_to_dict(item))
            print(orjson.dumps(line).decode(), flush=True)
            if args.limit and printed >= args.limit:
                break
    return 0


def _stats(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        _print_json(_to_dict(client.template_stats(args.template_id)))
    return 0


def _render(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        response = client.render(
            args.template, _data(args), locale=args.locale, version=args.version
        )
    _print_json(_to_dict(response))
    return 0


# --- suppression, requeue ------------------------------------------------------------------


def _suppression_add(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        results = client.add_suppressions(
            args.emails, reason=args.reason, note=args.note, replace=args.replace
        )
    _print_json([_short_enums(_to_dict(r)) for r in results])
    return 1 if any(r.HasField("error") for r in results) else 0


def _suppression_remove(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        removed = client.remove_suppressions(args.emails)
    _print_json({"removed": [_short_enums(_to_dict(e)) for e in removed]})
    return 0


def _suppression_list(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        entries = client.list_suppressions(reason=args.reason, email_prefix=args.prefix)
    _print_json([_short_enums(_to_dict(e)) for e in entries])
    return 0


def _suppression_check(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        results = client.check_suppressions(args.emails)
    _print_json([_short_enums(_to_dict(r)) for r in results])
    return 0


def _time_flag(text: str | None, flag: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag}: not an ISO 8601 time: {text!r}") from None


def _requeue(args: argparse.Namespace) -> int:
    filtered = any(v is not None for v in (args.template, args.esp, args.since, args.until))
    if args.ids:
        if filtered or args.limit or args.state:
            raise UsageError("requeue: give message ids or filter flags, not both")
        with Client(args.target) as client:
            results = client.requeue(args.ids)
        _print_json([_to_dict(r) for r in results])
        return 0 if all(r.requeued for r in results) else 1
    if not filtered:
        raise UsageError("requeue: give message ids, or --template, --esp, --since or --until")
    with Client(args.target) as client:
        count = client.requeue_matching(
            template_id=args.template or "",
            esp=args.esp or "",
            state=args.state or "failed",
            failed_after=_time_flag(args.since, "--since"),
            failed_before=_time_flag(args.until, "--until"),
            limit=args.limit,
        )
    _print_json({"requeued": count})
    return 0


# --- argument parsing -----------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--data", metavar="JSON", help="template data, a JSON object")
    group.add_argument("--data-file", metavar="FILE", help="template data from a file (- stdin)")


def _add_template_commands(sub: Any, target: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("template", help="manage templates")
    tsub = parser.add_subparsers(dest="template_command", required=True, metavar="COMMAND")

    put = tsub.add_parser("put", parents=[target], help="create a template or add a version")
    put.add_argument("id")
    put.add_argument("--subject")
    put.add_argument("--html", metavar="FILE", help="HTML body (Jinja2); - reads stdin")
    put.add_argument("--text", metavar="FILE", help="text body (Jinja2); - reads stdin")
    put.add_argument("--locale", default="en", help="locale of --subject/--html/--text")
    put.add_argument("--default-locale", help="fallback locale (default: --locale, or en)")
    put.add_argument("--description", default="")
    put.add_argument("--draft", action="store_true", help="store without activating")
    put.add_argument("--from-dir", type=Path, metavar="DIR", help="DIR/<locale>/subject.txt ...")
    put.set_defaults(func=_template_put)

    get = tsub.add_parser("get", parents=[target], help="show a template and a version")
    get.add_argument("id")
    get.add_argument("--version", type=int, default=0, help="0: the active version")
    get.set_defaults(func=_template_get)

    tsub.add_parser("list", parents=[target], help="list templates").set_defaults(
        func=_template_list
    )

    delete = tsub.add_parser("delete", parents=[target], help="soft-delete a template")
    delete.add_argument("id")
    delete.set_defaults(func=_template_delete)

    versions = tsub.add_parser("versions", parents=[target], help="list a template's versions")
    versions.add_argument("id")
    versions.set_defaults(func=_template_versions)

    activate = tsub.add_parser("activate", parents=[target], help="activate a version")
    activate.add_argument("id")
    activate.add_argument("version", type=_positive)
    activate.set_defaults(func=_template_activate)


def _add_suppression_commands(sub: Any, target: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("suppression", help="manage the suppression list")
    ssub = parser.add_subparsers(dest="suppression_command", required=True, metavar="COMMAND")
    reasons = ["hard_bounce", "complaint", "unsubscribe", "manual"]

    add = ssub.add_parser("add", parents=[target], help="suppress addresses")
    add.add_argument("emails", nargs="+", metavar="EMAIL")
    add.add_argument("--reason", choices=reasons, default="manual")
    add.add_argument("--note", default="", help="free text kept with each entry")
    add.add_argument("--replace", action="store_true", help="overwrite existing entries")
    add.set_defaults(func=_suppression_add)

    remove = ssub.add_parser("remove", parents=[target], help="take addresses off the list")
    remove.add_argument("emails", nargs="+", metavar="EMAIL")
    remove.set_defaults(func=_suppression_remove)

    listing = ssub.add_parser("list", parents=[target], help="list entries by address")
    listing.add_argument("--reason", choices=reasons)
    listing.add_argument("--prefix", default="", help="addresses starting with this text")
    listing.set_defaults(func=_suppression_list)

    check = ssub.add_parser("check", parents=[target], help="are these addresses suppressed?")
    check.add_argument("emails", nargs="+", metavar="EMAIL")
    check.set_defaults(func=_suppression_check)


def _add_requeue_command(sub: Any, target: argparse.ArgumentParser) -> None:
    requeue = sub.add_parser(
        "requeue", parents=[target], help="queue failed messages again, by id or by filter"
    )
    requeue.add_argument("ids", nargs="*", metavar="ID")
    requeue.add_argument("--template", metavar="ID")
    requeue.add_argument("--esp", metavar="ACCOUNT")
    requeue.add_argument("--since", metavar="ISO8601", help="ended at or after (naive: UTC)")
    requeue.add_argument("--until", metavar="ISO8601", help="ended before (naive: UTC)")
    requeue.add_argument("--state", choices=["failed", "suppressed"], help="default: failed")
    requeue.add_argument("--limit", type=_positive, default=0, help="default 1000")
    requeue.set_defaults(func=_requeue)


def _add_send_command(sub: Any, target: argparse.ArgumentParser) -> None:
    send = sub.add_parser("send", parents=[target], help="send one email, or a JSON-lines file")
    one = send.add_argument_group("one email")
    one.add_argument("--template", metavar="ID")
    one.add_argument("--to", metavar="EMAIL")
    one.add_argument("--name", default="", help="recipient display name")
    _add_data_flags(send)
    one.add_argument("--locale", default="")
    one.add_argument("--version", type=int, default=0, help="template version (0: active)")
    one.add_argument("--cc", action="extend", nargs="+", default=[], metavar="EMAIL")
    one.add_argument("--bcc", action="extend", nargs="+", default=[], metavar="EMAIL")
    one.add_argument("--reply-to", metavar="EMAIL")
    one.add_argument("--header", action="append", metavar="K=V")
    one.add_argument("--tag", action="append", default=[], metavar="T")
    one.add_argument("--metadata", action="append", metavar="K=V")
    one.add_argument("--idempotency-key", default="")
    one.add_argument("--priority", choices=["transactional", "bulk"])
    one.add_argument("--send-at", metavar="ISO8601", help="deliver not before this time")
    one.add_argument("--validate-render", action="store_true")

    bulk = send.add_argument_group("many emails")
    bulk.add_argument("--file", metavar="FILE.jsonl", help="one JSON object per line (- stdin)")
    bulk.add_argument("--batch-size", type=_positive, default=500)
    bulk.add_argument("--concurrency", type=_positive, default=4)
    bulk.add_argument("--stream", action="store_true", help="one SendStream instead of batches")
    bulk.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    send.set_defaults(func=_send)


def build_parser() -> argparse.ArgumentParser:
    """The `swu-delivery` argument parser."""
    parser = argparse.ArgumentParser(
        prog="swu-delivery", description="Templated email delivery over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    serve.add_argument("--listen", metavar="HOST:PORT")
    serve.add_argument("--data-dir", type=Path, metavar="DIR")
    serve.add_argument("--workers", type=_positive, default=1, metavar="N")
    serve.add_argument(
        "--log-level", metavar="LEVEL", help="debug, info, warning, error (overrides log_level)"
    )
    serve.add_argument(
        "--log-format",
        choices=("json", "text", "auto"),
        help="json lines, text, or auto: json unless stderr is a terminal (overrides log_format)",
    )
    serve.set_defaults(func=_serve)

    sim = sub.add_parser("esp-simulator", add_help=False, help="run the ESP simulator")
    sim.set_defaults(func=_esp_simulator)

    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "--target",
        default=os.environ.get("SWU_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help="server address (default: $SWU_TARGET or %(default)s)",
    )
    _add_template_commands(sub, target)
    _add_send_command(sub, target)
    _add_suppression_commands(sub, target)
    _add_requeue_command(sub, target)

    status = sub.add_parser("status", parents=[target], help="show a message's state and events")
    status.add_argument("message_id")
    status.set_defaults(func=_status)

    events = sub.add_parser("events", parents=[target], help="print events as they happen")
    events.add_argument("--cursor", default="", help='resume after it; "0" from the oldest')
    events.add_argument("--esp", action="append", default=[], metavar="ACCOUNT")
    events.add_argument("--template", action="append", default=[], metavar="ID")
    events.add_argument("--type", action="append", default=[], help="e.g. bounced, clicked")
    events.add_argument("--limit", type=_positive, default=0, help="stop after N events")
    events.set_defaults(func=_events)

    stats = sub.add_parser("stats", parents=[target], help="a template's counts per version")
    stats.add_argument("template_id")
    stats.set_defaults(func=_stats)

    render = sub.add_parser("render", parents=[target], help="render a template, send nothing")
    render.add_argument("--template", required=True, metavar="ID")
    _add_data_flags(render)
    render.add_argument("--locale", default="")
    render.add_argument("--version", type=int, default=0)
    render.set_defaults(func=_render)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "esp-simulator":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        code: int = args.func(args)
    except UsageError as exc:
        _error(str(exc))
        return 2
    except ClientError as exc:
        _error(str(exc))
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            print(
                f"hint: no swu-delivery server reachable at {args.target}"
                " (start one with `swu-delivery serve`, or set --target / SWU_TARGET)",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `swu-delivery` command."""
    sys.exit(run(argv))
