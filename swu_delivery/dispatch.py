"""The delivery lane: claim due messages, render them, hand them to their ESP, record outcomes.

Each claimed batch is rendered from the template cache and sent through the account's adapter,
which splits it into provider calls; every message's outcome is recorded in one transaction per
batch. Retryable outcomes are re-queued with full-jitter exponential backoff (or the provider's
own wait) until `max_attempts`; permanent outcomes and render errors fail at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import replace

import orjson

from adapters.base import Adapter, Attachment, Mailbox, OutboundEmail, OutcomeKind, SendOutcome
from swu_delivery import metrics
from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from swu_delivery.breaker import Breaker
from swu_delivery.config import DeliveryConfig, EspAccount
from swu_delivery.errors import SwuError
from swu_delivery.outbox import FAILED, QUEUED, SENT, SUPPRESSED, Claimed, Completion, Outbox
from swu_delivery.sandbox import TemplateEngine
from swu_delivery.templates import CompiledVersion, TemplateCache

__all__ = ["Dispatcher", "backoff"]

log = logging.getLogger(__name__)

EV_SENT = delivery_pb2.EVENT_TYPE_SENT
EV_DEFERRED = delivery_pb2.EVENT_TYPE_DEFERRED
EV_FAILED = delivery_pb2.EVENT_TYPE_FAILED
EV_SUPPRESSED = delivery_pb2.EVENT_TYPE_SUPPRESSED
# Calls may wait for their account's rate limit this share of the lease; the rest of it covers
# the call itself (up to the account's timeout) and recording the batch.
LEASE_SHARE_FOR_WAITING = 0.5


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** max(attempt - 1, 0)))


def _suppressed_reason(reason: str, event_seq: int) -> str:
    """A SUPPRESSED message's reason: the list entry, and the webhook event that added it."""
    if event_seq:
        return f"recipient suppressed: {reason} (event {event_seq})"
    return f"recipient suppressed: {reason}"  # added through SuppressionService


def _mailbox(box: common_pb2.Address) -> Mailbox:
    return Mailbox(box.email, box.name)


class Dispatcher:
    """One loop claiming from the outbox; each claimed batch is delivered as its own task."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        cache: TemplateCache,
        engine: TemplateEngine,
        adapters: Mapping[str, Adapter],
        config: DeliveryConfig,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = outbox
        self.cache = cache
        self.engine = engine
        self.adapters = adapters
        self.config = config
        self.rng = rng or random.Random()
        self.breakers = {
            name: Breaker(
                name,
                failures=adapter.account.breaker_failures,
                cooldown=adapter.account.breaker_cooldown_seconds,
                clock=clock,
            )
            for name, adapter in adapters.items()
        }
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[asyncio.Task[None], list[str]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._claiming = False  # the loop is inside a claim transaction: let it finish
        self._interrupted: dict[str, str] = {}  # message id -> account of a call cut at stop

    def wake(self) -> None:
        """New messages were accepted: claim now instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="swu-dispatch")

    async def stop(self, grace: float) -> None:
        """Stop claiming, let in-flight ESP calls finish for `grace` seconds, release the rest."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            # Parked on a free slot (every batch waits on a slow ESP) or on the idle poll, the
            # loop holds nothing: cancel it. Inside a claim, let the claim's transaction end.
            if not self._claiming:
                self._loop_task.cancel()
            await asyncio.wait([self._loop_task])
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=grace)
        leftover = [i for ids in self._inflight.values() for i in ids]
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.wait(list(self._inflight))
        if leftover:
            # A call cut mid-flight may have reached its account: the message stays with it.
            cut = {i: self._interrupted[i] for i in leftover if i in self._interrupted}
            await self.outbox.release(leftover, interrupted=cut)

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.config.max_inflight_batches)
        while not self._stopping:
            await slots.acquire()
            if self._stopping:
                slots.release()
                break
            self._wake.clear()  # before claiming, so a wake during the claim is not lost
            self._claiming = True
            try:
                claimed = await self.outbox.claim(
                    self.config.claim_batch, self.config.lease_seconds, self.config.retry_share
                )
            except Exception:
                log.exception("claim from the outbox failed")
                claimed = []
            finally:
                self._claiming = False
            if not claimed:
                slots.release()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_poll)
                continue
            task = asyncio.create_task(self._deliver_batch(claimed))
            self._inflight[task] = [c.id for c in claimed]
            task.add_done_callback(self._batch_done(slots))

    def _batch_done(self, slots: asyncio.Semaphore) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._inflight.pop(task, None)
            slots.release()

        return done

    async def _deliver_batch(self, claimed: list[Claimed]) -> None:
        metrics.BATCH_SIZE.observe(len(claimed))
        try:
            completions = await self._deliver(claimed)
        except Exception:
            log.exception("delivering a batch of %d failed; re-queued", len(claimed))
            completions = [
                # c.esp: a message whose last call may have reached its account stays there.
                self._completion(c, c.esp, SendOutcome.retry("internal error while delivering"))
                for c in claimed
            ]
        metrics.count_retries(completions, QUEUED)
        await self.outbox.record(completions)

    async def _drop_suppressed_copies(self, emails: list[OutboundEmail]) -> None:
        """Take suppressed cc and bcc addresses off `emails`; the rest still get the message.

        Only batches with cc or bcc pay for this second lookup. Addresses are never logged.
        """
        copies = [box.email for e in emails for box in (*e.cc, *e.bcc)]
        suppressed = await self.outbox.suppressed(copies) if copies else {}
        if not suppressed:
            return
        for e in emails:
            cc = [box for box in e.cc if box.email.lower() not in suppressed]
            bcc = [box for box in e.bcc if box.email.lower() not in suppressed]
            if dropped := len(e.cc) + len(e.bcc) - len(cc) - len(bcc):
                log.debug(
                    "message %s: %d suppressed cc/bcc recipients dropped", e.message_id, dropped
                )
                e.cc, e.bcc = cc, bcc

    async def _deliver(self, claimed: list[Claimed]) -> list[Completion]:
        suppressed = await self.outbox.suppressed(c.recipient for c in claimed)
        completions: list[Completion] = []
        if suppressed:
            completions = [
                Completion(
                    c.id,
                    SUPPRESSED,
                    EV_SUPPRESSED,
                    c.attempts,
                    reason=_suppressed_reason(*suppressed[c.recipient.lower()]),
                )
                for c in claimed
                if c.recipient.lower() in suppressed
            ]
            claimed = [c for c in claimed if c.recipient.lower() not in suppressed]
        versions = await self.cache.ensure({(c.template_id, c.template_version) for c in claimed})
        by_esp: dict[str, tuple[list[Claimed], list[OutboundEmail]]] = {}
        admitted: dict[str, bool] = {}  # per account, asked once a batch (a half-open probe)
        for c in claimed:
            esp = self._choose_esp(c, admitted)
            if esp is None:
                completions.append(self._held(c))
                continue
            compiled = versions[(c.template_id, c.template_version)]
            try:
                if isinstance(compiled, SwuError):
                    raise compiled
                email = self._prepare(c, compiled, self.adapters[esp].account)
            except SwuError as exc:
                completions.append(
                    Completion(c.id, FAILED, EV_FAILED, c.attempts, reason=f"render error: {exc}")
                )
                continue
            ready, outbound = by_esp.setdefault(esp, ([], []))
            ready.append(c)
            outbound.append(email)
        await self._drop_suppressed_copies([e for _, out in by_esp.values() for e in out])
        if by_esp:
            sent = await asyncio.gather(*(self._send(esp, o) for esp, (_, o) in by_esp.items()))
            for (esp, (ready, _)), outcomes in zip(by_esp.items(), sent, strict=True):
                self.breakers[esp].record(outcomes)
                completions.extend(
                    self._completion(c, esp, o) for c, o in zip(ready, outcomes, strict=True)
                )
        return completions

    def _choose_esp(self, claimed: Claimed, admitted: dict[str, bool]) -> str | None:
        """The ESP account this message goes to on this attempt; None: hold it, all are open.

        The first account of the message's route whose breaker admits a call, except that a
        message whose last attempt may have reached its account stays there: sending it
        elsewhere could deliver it twice.
        """
        route = self._route(claimed)
        for esp in route:
            if esp not in admitted:
                admitted[esp] = self.breakers[esp].admit()
            if admitted[esp]:
                return esp
        return None

    def _route(self, claimed: Claimed) -> tuple[str, ...]:
        """The accounts this message may try, in order of preference."""
        if claimed.maybe_sent and claimed.esp in self.adapters:
            return (claimed.esp,)
        route = self.config.route_for(claimed.template_id)
        return tuple(esp for esp in route if esp in self.adapters)

    def _held(self, claimed: Claimed) -> Completion:
        """Every account of the route is open: queued again, attempt kept, due at a probe."""
        route = self._route(claimed)
        wait = min((self.breakers[esp].wait() for esp in route), default=0.0)
        names = ", ".join(route)
        return Completion(
            claimed.id,
            QUEUED,
            EV_DEFERRED,
            claimed.attempts,
            esp=claimed.esp,
            reason=f"not sent: circuit open for every account of its route ({names})",
            due_at=time.time() + max(wait, self.config.idle_poll),
            refund=True,
            maybe_sent=claimed.maybe_sent,
        )

    def _failover(self, claimed: Claimed, esp: str) -> str:
        """The history line when this attempt goes to another account than the last one."""
        if not claimed.esp or claimed.esp == esp:
            return ""
        return f"failover from {claimed.esp} to {esp}: {claimed.reason or 'circuit open'}"

    async def _send(self, esp: str, emails: list[OutboundEmail]) -> list[SendOutcome]:
        """Hand `emails` to account `esp`'s adapter: one outcome per message, in order.

        Calls the account's rate limit cannot start within part of the lease are not made (their
        outcomes are `deferred`): a slow account must not hold a claim until another takes it
        over and sends it again.
        """
        started = time.monotonic()
        horizon = self.config.lease_seconds * LEASE_SHARE_FOR_WAITING
        try:
            outcomes = await self.adapters[esp].send(emails, horizon=horizon)
        except asyncio.CancelledError:  # stop() cut the call after its grace
            self._interrupted.update((e.message_id, esp) for e in emails)
            raise
        # A deferred call's wait was counted from (about) the start; the batch ends only now.
        elapsed = time.monotonic() - started
        return [
            replace(o, retry_after=max(0.0, o.retry_after - elapsed))
            if o.deferred and o.retry_after is not None
            else o
            for o in outcomes
        ]

    def _completion(self, claimed: Claimed, esp: str, outcome: SendOutcome) -> Completion:
        """What to record for one attempt at `esp`, with its failover line and ambiguity."""
        done = self._attempted(claimed, esp, outcome)
        done.failover = self._failover(claimed, esp)
        # Once a call may have reached an account, the message stays with it: later throttling
        # or 5xx there does not tell whether that earlier call delivered it.
        done.maybe_sent = claimed.maybe_sent or outcome.maybe_sent
        return done

    def _attempted(self, claimed: Claimed, esp: str, outcome: SendOutcome) -> Completion:
        """`_outcome`, except that deferred and throttled messages keep their attempt."""
        if outcome.kind is not OutcomeKind.RETRY or not (outcome.deferred or outcome.rate_limited):
            return self._outcome(claimed, esp, outcome)
        # Due when the account expects room again: the limiter's estimate for a deferral (not
        # capped: it is a place in the account's queue), else the provider's wait or the pause.
        delay = outcome.retry_after or 0.0
        if not outcome.deferred:
            delay = min(delay, self.config.retry_max)
        delay = max(delay, self.adapters[esp].limiter.paused_for())
        return Completion(
            claimed.id,
            QUEUED,
            EV_DEFERRED,
            claimed.attempts,
            esp=esp,
            reason=outcome.reason,
            due_at=time.time() + delay,
            refund=True,
        )

    def _prepare(
        self, claimed: Claimed, compiled: CompiledVersion, account: EspAccount
    ) -> OutboundEmail:
        email = delivery_pb2.Email.FromString(claimed.payload)
        context = orjson.loads(email.data_json) if email.data_json else {}
        rendered = compiled.resolve(claimed.locale).render(self.engine, context)
        if email.HasField("sender"):
            sender = _mailbox(email.sender)
        elif account.sender:
            sender = Mailbox(account.sender, account.sender_name)
        else:
            raise SwuError(f"no sender: set one on the message or on ESP account {account.name}")
        return OutboundEmail(
            message_id=claimed.id,
            sender=sender,
            to=_mailbox(email.to),
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            cc=[_mailbox(a) for a in email.cc],
            bcc=[_mailbox(a) for a in email.bcc],
            reply_to=_mailbox(email.reply_to) if email.HasField("reply_to") else None,
            headers=dict(email.headers),
            tags=list(email.tags),
            metadata=dict(email.metadata),
            attachments=[
                Attachment(a.filename, a.content_type, a.content, a.content_id)
                for a in email.attachments
            ],
        )

    def _outcome(self, claimed: Claimed, esp: str, outcome: SendOutcome) -> Completion:
        attempt = claimed.attempts
        if outcome.kind is OutcomeKind.SENT:
            return Completion(
                claimed.id, SENT, EV_SENT, attempt, esp=esp, esp_message_id=outcome.esp_message_id
            )
        if outcome.kind is OutcomeKind.REJECTED:
            return Completion(
                claimed.id, FAILED, EV_FAILED, attempt, esp=esp, reason=outcome.reason
            )
        if attempt >= self.config.max_attempts:
            reason = f"retries exhausted after {attempt} attempts: {outcome.reason}"
            return Completion(claimed.id, FAILED, EV_FAILED, attempt, esp=esp, reason=reason)
        delay = backoff(
            attempt, base=self.config.retry_base, cap=self.config.retry_max, rng=self.rng
        )
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, self.config.retry_max))
        return Completion(
            claimed.id,
            QUEUED,
            EV_DEFERRED,
            attempt,
            esp=esp,
            reason=outcome.reason,
            due_at=time.time() + delay,
        )
