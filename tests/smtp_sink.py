"""A recording SMTP server for tests (aiosmtpd), run as ``python tests/smtp_sink.py LOG [flags]``.

It binds a free loopback port, prints ``smtp-sink listening on PORT`` and appends one JSON line
per event to LOG: ``{"event": "connect", "conn": n}``, ``{"event": "auth", "conn": n, "login": ...,
"ok": ...}`` and ``{"event": "message", "conn": n, "mail_from": ..., "rcpt_tos": [...],
"data": <raw message>, "queue_id": ...}``.

Replies by local part: RCPT ``temp-fail…@`` → 451 and ``perm-fail…@`` → 550 (others 250); the
same prefixes on MAIL FROM refuse the whole transaction. ``--auth USER:PASSWORD`` requires AUTH
(PLAIN/LOGIN, allowed without TLS: loopback only); ``--drop-after-data`` closes the connection
right after each accepted message, as a server ending idle sessions would.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from typing import Any, TextIO

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

LISTENING = "smtp-sink listening on "
TEMP_FAIL = "451 4.2.1 Mailbox busy, try again later"
PERM_FAIL = "550 5.1.1 No such user here"


def _refusal(address: str) -> str | None:
    local = address.partition("@")[0].lower()
    if local.startswith("temp-fail"):
        return TEMP_FAIL
    if local.startswith("perm-fail"):
        return PERM_FAIL
    return None


def _conn(server: SMTP) -> int:
    return int(getattr(server, "conn_id", 0))


class Recorder:
    """The aiosmtpd handler: answers by local part and writes every event to the log."""

    def __init__(self, log: TextIO, drop_after_data: bool) -> None:
        self.log = log
        self.drop_after_data = drop_after_data
        self.conns = itertools.count(1)
        self.queue_ids = itertools.count(1)

    def record(self, **event: Any) -> None:
        self.log.write(json.dumps(event) + "\n")
        self.log.flush()

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if refusal := _refusal(address):
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if refusal := _refusal(address):
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        queue_id = f"SINK{next(self.queue_ids):05d}"
        data = envelope.original_content or b""
        self.record(
            event="message",
            conn=_conn(server),
            mail_from=envelope.mail_from,
            rcpt_tos=envelope.rcpt_tos,
            data=data.decode("utf-8", "replace"),
            queue_id=queue_id,
        )
        if self.drop_after_data and server.transport is not None:
            asyncio.get_running_loop().call_soon(server.transport.close)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def authenticator(self, credentials: tuple[str, str]) -> Any:
        user, password = credentials

        def check(
            server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
        ) -> AuthResult:
            given = ("", "")
            if isinstance(data, LoginPassword):
                given = (data.login.decode(), data.password.decode())
            ok = given == (user, password)
            self.record(
                event="auth", conn=_conn(server), login=given[0], ok=ok, mechanism=mechanism
            )
            return AuthResult(success=ok, handled=False)  # aiosmtpd sends 235 or 535

        return check


async def serve(args: argparse.Namespace, log: TextIO) -> None:
    recorder = Recorder(log, args.drop_after_data)
    kwargs: dict[str, Any] = {"hostname": "sink.test", "ident": "smtp-sink"}
    if args.auth:
        user, _, password = args.auth.partition(":")
        kwargs.update(
            auth_required=True,
            auth_require_tls=False,
            authenticator=recorder.authenticator((user, password)),
        )

    class CountingSMTP(SMTP):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.conn_id = next(recorder.conns)
            recorder.record(event="connect", conn=self.conn_id)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: CountingSMTP(recorder, **kwargs), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    print(f"{LISTENING}{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--auth", default="", help="USER:PASSWORD that AUTH must present")
    parser.add_argument("--drop-after-data", action="store_true")
    args = parser.parse_args()
    with open(args.log, "a", encoding="utf-8") as log:
        asyncio.run(serve(args, log))


if __name__ == "__main__":
    main()
