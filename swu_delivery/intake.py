"""The accept path: validate each item, pin its template version, store the batch, acknowledge."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence

import orjson

from swu_delivery import metrics
from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from swu_delivery.errors import AlreadyExists, SwuError, TemplateRenderError, Unavailable
from swu_delivery.outbox import BULK, TRANSACTIONAL, NewMessage, Outbox
from swu_delivery.requeue import requeue
from swu_delivery.sandbox import TemplateEngine
from swu_delivery.templates import TemplateCache, TemplateStore
from swu_delivery.validation import validate_batch_size, validate_email

__all__ = ["Intake", "new_message_ids"]

log = logging.getLogger(__name__)

_PRIORITY = {
    delivery_pb2.PRIORITY_UNSPECIFIED: TRANSACTIONAL,
    delivery_pb2.PRIORITY_TRANSACTIONAL: TRANSACTIONAL,
    delivery_pb2.PRIORITY_BULK: BULK,
}


def new_message_ids(n: int) -> list[str]:
    """`n` unique ids: 12 hex digits of milliseconds (so ids sort by time) + 80 random bits."""
    prefix = f"{int(time.time() * 1000):012x}"
    rnd = os.urandom(10 * n).hex()
    return [prefix + rnd[i * 20 : i * 20 + 20] for i in range(n)]


def item_error(index: int, exc: SwuError, prefix: str) -> delivery_pb2.SendResult:
    return delivery_pb2.SendResult(
        index=index,
        error=common_pb2.ItemError(
            code=exc.code.value[0], message=exc.prefixed(prefix), field=exc.field
        ),
    )


class Intake:
    """Turns Email items into durable outbox rows, one transaction per batch."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        store: TemplateStore,
        cache: TemplateCache,
        engine: TemplateEngine,
        on_accepted: Callable[[], None],
    ) -> None:
        self.outbox = outbox
        self.store = store
        self.cache = cache
        self.engine = engine
        self.on_accepted = on_accepted
        self.draining = False

    async def accept(
        self,
        emails: Sequence[delivery_pb2.Email],
        *,
        offset: int = 0,
        prefix: str = "emails",
        indexed: bool = True,
    ) -> list[delivery_pb2.SendResult]:
        """One result per item, in order; `offset` shifts indexes (streams count across chunks).

        Error messages start with the item's path: ``emails[3].to.email`` (or ``email.to.email``
        when `indexed` is false, for the unary Send).
        """
        if self.draining:
            raise Unavailable("the service is shutting down; retry on another instance")
        validate_batch_size(len(emails))

        def where(i: int) -> str:
            return f"{prefix}[{i}]" if indexed else prefix

        results: list[delivery_pb2.SendResult | None] = [None] * len(emails)
        valid: list[int] = []
        for i, email in enumerate(emails):
            try:
                validate_email(email)
            except SwuError as exc:
                results[i] = item_error(offset + i, exc, where(i))
            else:
                valid.append(i)
        pins = await self.store.pin(
            (emails[i].template_id, emails[i].template_version) for i in valid
        )
        rows: list[NewMessage] = []
        row_index: list[int] = []
        ids = new_message_ids(len(valid))
        now = time.time()
        for n, i in enumerate(valid):
            email = emails[i]
            pin = pins[(email.template_id, email.template_version)]
            if isinstance(pin, SwuError):
                results[i] = item_error(offset + i, pin, where(i))
                continue
            if email.validate_render:
                try:
                    await self.render_check(email, pin)
                except SwuError as exc:
                    results[i] = item_error(offset + i, exc, where(i))
                    continue
            payload = email.SerializeToString(deterministic=True)
            key = email.idempotency_key or None
            rows.append(
                NewMessage(
                    id=ids[n],
                    priority=_PRIORITY.get(email.priority, TRANSACTIONAL),
                    due_at=max(now, email.send_at.ToNanoseconds() / 1e9)
                    if email.HasField("send_at")
                    else now,
                    template_id=email.template_id,
                    template_version=pin,
                    locale=email.locale,
                    recipient=email.to.email,
                    payload=payload,
                    idempotency_key=key,
                    digest=hashlib.blake2b(payload, digest_size=16).digest() if key else None,
                )
            )
            row_index.append(i)
        if rows:
            accepted = await self.outbox.accept(rows)
            for i, outcome in zip(row_index, accepted, strict=True):
                if outcome.conflict:
                    conflict = AlreadyExists(
                        "key was already used for a message with different content",
                        field="idempotency_key",
                    )
                    results[i] = item_error(offset + i, conflict, where(i))
                else:
                    results[i] = delivery_pb2.SendResult(
                        index=offset + i, message_id=outcome.message_id, duplicate=outcome.duplicate
                    )
            self.on_accepted()
        done = [r for r in results if r is not None]
        metrics.count_intake(done)
        if log.isEnabledFor(logging.DEBUG):  # the request id (logs.REQUEST_ID) ↔ message ids
            log.debug("accepted messages %s", [r.message_id for r in done if r.message_id])
        return done

    async def requeue(self, request: delivery_pb2.RequeueRequest) -> delivery_pb2.RequeueResponse:
        """Put finished messages back in the queue and wake the lane, as an accept does."""
        if self.draining:
            raise Unavailable("the service is shutting down; retry on another instance")
        response = await requeue(self.outbox, request)
        if response.requeued:
            self.on_accepted()
        return response

    async def render_check(self, email: delivery_pb2.Email, version: int) -> None:
        """Render now, so a caller who asked for it learns of render errors at accept time."""
        compiled = (await self.cache.ensure([(email.template_id, version)]))[
            (email.template_id, version)
        ]
        if isinstance(compiled, SwuError):
            raise compiled
        try:
            context = orjson.loads(email.data_json) if email.data_json else {}
        except orjson.JSONDecodeError as exc:  # validate_email checked it; kept for safety
            raise TemplateRenderError(str(exc), field="data_json") from None
        try:
            compiled.resolve(email.locale).render(self.engine, context)
        except SwuError as exc:
            part = exc.field or "template"
            message = f"rendering {part} failed: {exc.message}"
            raise TemplateRenderError(message, field="data_json") from None
