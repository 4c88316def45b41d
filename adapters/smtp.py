"""SMTP delivery with aiosmtplib: one transaction per message over a bounded connection pool.

4xx replies retry, 5xx are permanent; a message some RCPTs refuse still goes to the accepted ones,
and the refusals are named in its outcome's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import aiosmtplib

from adapters.base import (
    Adapter,
    AdapterError,
    BatchLimits,
    OutboundEmail,
    OutcomeKind,
    SendOutcome,
    account_option,
)
from adapters.mime import ascii_address, build_mime
from swu_delivery.config import EspAccount
from swu_delivery.errors import InvalidArgument

__all__ = ["SmtpAdapter", "SmtpPool"]

DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
NOOP_AFTER = 5.0  # seconds idle after which a pooled connection is NOOP-checked before reuse
_QUEUE_ID = re.compile(r"queued as\s+<?([^\s<>]+)|\bid=([^\s<>]+)", re.IGNORECASE)
_RATE_TEXT = re.compile(r"rate|too many|throttl", re.IGNORECASE)


class SmtpPool:
    """At most `size` connections; idle ones are reused, NOOP-checked after a quiet spell."""

    def __init__(self, smtp_kwargs: dict[str, Any], size: int) -> None:
        self._kwargs = smtp_kwargs
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self.opened = 0  # connections made so far

    async def _checkout(self, fresh: bool) -> tuple[aiosmtplib.SMTP, bool]:
        while self._idle and not fresh:
            smtp, since = self._idle.pop()  # the most recently used one: least likely timed out
            if smtp.is_connected and time.monotonic() - since < NOOP_AFTER:
                return smtp, True
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                if smtp.is_connected and (await smtp.noop()).code == 250:
                    return smtp, True
            smtp.close()
        smtp = aiosmtplib.SMTP(**self._kwargs)
        await smtp.connect()
        self.opened += 1
        return smtp, False

    @contextlib.asynccontextmanager
    async def connection(
        self, *, fresh: bool = False
    ) -> AsyncIterator[tuple[aiosmtplib.SMTP, bool]]:
        """(connection, reused) for one transaction; pooled again unless it broke the connection."""
        async with self._slots:
            smtp, reused = await self._checkout(fresh)
            keep = False
            try:
                yield smtp, reused
                keep = True
            except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
                keep = True  # the server answered and aiosmtplib sent RSET: still usable
                raise
            finally:
                if keep and smtp.is_connected:
                    self._idle.append((smtp, time.monotonic()))
                else:
                    smtp.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for smtp, _ in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit(timeout=2)
            smtp.close()


def _by_code(code: int, text: str) -> SendOutcome:
    """4xx (and garbled replies) retry, 5xx permanent; 421 and rate wording mean throttled."""
    reason = f"SMTP {code}: {text}"[:300]
    if 500 <= code < 600:
        return SendOutcome.rejected(reason)
    return SendOutcome.retry(reason, rate_limited=code == 421 or bool(_RATE_TEXT.search(text)))


def _refusals(refused: Sequence[tuple[str, int, str]]) -> str:
    return "; ".join(f"{rcpt} ({code} {text})" for rcpt, code, text in refused)


class SmtpAdapter(Adapter):
    """One SMTP transaction per message; envelope recipients are to + cc + bcc."""

    kind = "smtp"
    display_name = "SMTP"
    option_keys = frozenset(
        {"host", "port", "tls", "pool_size", "username", "validate_certs", "local_hostname"}
    )
    # RFC 5321 4.5.3.1.8: servers accept at least 100 RCPTs; size is the server's SIZE (552).
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=1, recipients_per_message=100, bytes_per_call=64 * 1024 * 1024
    )
    # Only a failed connect is surely unsent: a disconnect or timeout later in the transaction
    # may come after the server queued the message (before its 250 to DATA reached us).
    not_sent_errors: ClassVar[tuple[type[BaseException], ...]] = (
        *Adapter.not_sent_errors,
        aiosmtplib.SMTPConnectError,
    )

    def __init__(self, account: EspAccount) -> None:
        super().__init__(account)
        host = account_option(account, "host", str, "")
        tls = account_option(account, "tls", str, "starttls")
        size = account_option(account, "pool_size", int, min(account.max_concurrency, 8))
        if not host:
            raise AdapterError(f"esp {account.name}: host is required")
        if tls not in DEFAULT_PORTS:
            raise AdapterError(f"esp {account.name}: tls must be one of {sorted(DEFAULT_PORTS)}")
        if size < 1:
            raise AdapterError(f"esp {account.name}: pool_size must be at least 1")
        username = account_option(account, "username", str, "")
        kwargs = {
            "hostname": host,
            "port": account_option(account, "port", int, DEFAULT_PORTS[tls]),
            "use_tls": tls == "implicit",
            "start_tls": tls == "starttls",
            "validate_certs": account_option(account, "validate_certs", bool, True),
            "timeout": account.timeout,
            "username": username or None,  # AUTH only with a username
            "password": account.api_key if username else None,
            "local_hostname": account_option(account, "local_hostname", str, "") or None,
        }
        self.pool = SmtpPool(kwargs, size)

    async def close(self) -> None:
        await self.pool.close()

    async def send_call(self, call: list[OutboundEmail]) -> list[SendOutcome]:
        (email,) = call
        rcpts = [box.email for box in (email.to, *email.cc, *email.bcc)]
        try:
            sender, rcpts = ascii_address(email.sender.email), [ascii_address(r) for r in rcpts]
            message_id = f"{email.message_id}@{sender.split('@')[1]}"
            raw = build_mime(email, message_id=f"<{message_id}>").as_bytes()
            refused, reply = await self._transaction(sender, rcpts, raw)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            detail = _refusals([(e.recipient, e.code, e.message) for e in exc.recipients])
            worst = _by_code(min(e.code for e in exc.recipients), detail)  # any 4xx: retry
            return [dataclasses.replace(worst, reason=f"SMTP: all recipients refused: {detail}")]
        except aiosmtplib.SMTPResponseException as exc:
            return [_by_code(exc.code, exc.message)]
        except (ConnectionError, TimeoutError):
            raise  # the base makes these retryable
        except (aiosmtplib.SMTPException, InvalidArgument, ValueError) as exc:
            return [SendOutcome.rejected(f"SMTP: {exc}")]
        match = _QUEUE_ID.search(reply)
        esp_id = (match[1] or match[2]) if match else message_id
        if not refused:
            return [SendOutcome.sent(esp_id)]
        partial = [(rcpt, r.code, r.message) for rcpt, r in refused.items()]
        reason = f"SMTP: sent to {len(rcpts) - len(partial)} of {len(rcpts)}; refused: "
        return [SendOutcome(OutcomeKind.SENT, esp_id, reason + _refusals(partial))]

    async def _transaction(
        self, sender: str, rcpts: list[str], raw: bytes
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        """MAIL, RCPT…, DATA; a pooled connection the server dropped meanwhile is replaced once."""
        for fresh in (False, True):
            async with self.pool.connection(fresh=fresh) as (smtp, reused):
                try:
                    return await smtp.sendmail(sender, rcpts, raw)
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
        raise AssertionError("unreachable: a fresh connection re-raises")
