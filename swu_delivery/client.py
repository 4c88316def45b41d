"""Python client for swu-delivery: build emails and send them over gRPC, async or sync.

Every failed call raises one exception type:

    SwuError                   (swu_delivery.errors)
    └── ClientError            a call failed; `code` is its grpc.StatusCode, `message` its details

Per-item rejections inside a batch are not exceptions: they come back as `SendResult.error`
(`send_batch`) or as `Rejection`s in a `BulkReport` (`send_bulk`).

    async with AsyncClient("127.0.0.1:50051") as client:
        report = await client.send_bulk(email("welcome", row["to"], row) for row in rows)

Create an `AsyncClient` inside a running event loop; `Client` is the same API over a synchronous
channel.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, cast

import grpc
import grpc.aio
import orjson

from swu_delivery._proto.swu.delivery.v1 import (
    common_pb2,
    delivery_pb2,
    delivery_pb2_grpc,
    suppression_pb2,
    suppression_pb2_grpc,
    template_pb2,
    template_pb2_grpc,
)
from swu_delivery.errors import SwuError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "AddressLike",
    "AsyncClient",
    "AttachmentLike",
    "BulkReport",
    "Client",
    "ClientError",
    "LocaleContents",
    "Rejection",
    "email",
]

AddressLike: TypeAlias = "str | tuple[str, str] | common_pb2.Address"
AttachmentLike: TypeAlias = "delivery_pb2.Attachment | tuple[str, str, bytes]"
LocaleContents: TypeAlias = "Mapping[str, Mapping[str, str]] | Iterable[template_pb2.LocaleContent]"
ProgressCallback: TypeAlias = "Callable[[BulkReport], None]"

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's default receive limit
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
)
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Channel = TypeVar("_Channel", grpc.Channel, grpc.aio.Channel)


class ClientError(SwuError):
    """A gRPC call failed; `code` is the status and `message` the server's details."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"ClientError({self.code.name}, {self.message!r})"


def _open_channel(
    target: str | _Channel,
    connect: Callable[..., _Channel],
    options: Sequence[tuple[str, Any]],
) -> tuple[_Channel, bool]:
    """The channel a client uses, and whether it is the client's to close (a target it opened)."""
    if isinstance(target, str):
        return connect(target, options=options), True
    return target, False


@contextmanager
def _rpc_errors() -> Iterator[None]:
    """Turn any grpc.RpcError raised inside the block into a ClientError."""
    try:
        yield
    except grpc.RpcError as exc:
        raise _client_error(exc) from None


def _client_error(exc: grpc.RpcError) -> ClientError:
    """The ClientError for a sync or async RpcError (the base class itself has no status)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    status = code() if callable(code) else grpc.StatusCode.UNKNOWN
    message = details() if callable(details) else str(exc)
    return ClientError(status, message or "")


# --- building requests ----------------------------------------------------------------------


def _address(value: AddressLike, name: str = "") -> common_pb2.Address:
    """An Address from "a@b.com", ("a@b.com", "Name") or an Address message."""
    if isinstance(value, common_pb2.Address):
        return value
    if isinstance(value, str):
        return common_pb2.Address(email=value, name=name)
    addr, display = value
    return common_pb2.Address(email=addr, name=display)


def _attachment(value: AttachmentLike) -> delivery_pb2.Attachment:
    """An Attachment from a message or a (filename, content_type, content) tuple."""
    if isinstance(value, delivery_pb2.Attachment):
        return value
    filename, content_type, content = value
    return delivery_pb2.Attachment(filename=filename, content_type=content_type, content=content)


class _ProtoEnum(Protocol):
    def Value(self, name: str) -> int: ...  # protobuf's own method name
    def values(self) -> list[Any]: ...


def _enum_value(enum: _ProtoEnum, prefix: str, value: int | str, field: str) -> int:
    """A value of `enum` from its number, its name, or its short name ("bulk", "hard-bounce")."""
    if isinstance(value, str):
        upper = value.upper().replace("-", "_")
        try:
            return enum.Value(upper if upper.startswith(prefix) else prefix + upper)
        except ValueError:
            raise ValueError(f"{field}: unknown value {value}") from None
    if value in enum.values():
        return int(value)
    raise ValueError(f"{field}: unknown value {value}")


def _priority(value: int | str) -> delivery_pb2.Priority.ValueType:
    return cast(
        "delivery_pb2.Priority.ValueType",
        _enum_value(delivery_pb2.Priority, "PRIORITY_", value, "priority"),
    )


def _event_type(value: int | str) -> delivery_pb2.EventType.ValueType:
    return cast(
        "delivery_pb2.EventType.ValueType",
        _enum_value(delivery_pb2.EventType, "EVENT_TYPE_", value, "event type"),
    )


def _watch_request(
    cursor: str, esps: Iterable[str], template_ids: Iterable[str], types: Iterable[int | str]
) -> delivery_pb2.WatchEventsRequest:
    return delivery_pb2.WatchEventsRequest(
        cursor=cursor,
        esps=list(esps),
        template_ids=list(template_ids),
        types=[_event_type(t) for t in types],
    )


def _data_json(data: Mapping[str, Any] | None) -> str:
    """Template data as JSON text; None (no data) is the empty string."""
    return orjson.dumps(data).decode() if data is not None else ""


def email(
    template_id: str,
    to: AddressLike,
    data: Mapping[str, Any] | None = None,
    *,
    name: str = "",
    locale: str = "",
    template_version: int = 0,
    cc: Iterable[AddressLike] = (),
    bcc: Iterable[AddressLike] = (),
    reply_to: AddressLike | None = None,
    sender: AddressLike | None = None,
    headers: Mapping[str, str] | None = None,
    tags: Iterable[str] = (),
    metadata: Mapping[str, str] | None = None,
    idempotency_key: str = "",
    attachments: Iterable[AttachmentLike] = (),
    priority: int | str | None = None,
    send_at: datetime | None = None,
    validate_render: bool = False,
) -> delivery_pb2.Email:
    """One templated Email; `data` is JSON-encoded, `name` names a plain-string `to`."""
    msg = delivery_pb2.Email(
        template_id=template_id,
        template_version=template_version,
        locale=locale,
        to=_address(to, name),
        cc=[_address(a) for a in cc],
        bcc=[_address(a) for a in bcc],
        data_json=_data_json(data),
        headers=headers,
        tags=tags,
        metadata=metadata,
        idempotency_key=idempotency_key,
        attachments=[_attachment(a) for a in attachments],
        validate_render=validate_render,
    )
    if reply_to is not None:
        msg.reply_to.CopyFrom(_address(reply_to))
    if sender is not None:
        msg.sender.CopyFrom(_address(sender))
    if priority is not None:
        msg.priority = _priority(priority)
    if send_at is not None:
        msg.send_at.FromDatetime(send_at)  # a naive datetime is taken as UTC
    return msg


def _locale_contents(contents: LocaleContents) -> list[template_pb2.LocaleContent]:
    """LocaleContent messages from {locale: {"subject", "html", "text"}} or messages."""
    if isinstance(contents, Mapping):
        return [
            template_pb2.LocaleContent(
                locale=locale,
                subject=parts.get("subject", ""),
                html=parts.get("html", ""),
                text=parts.get("text", ""),
            )
            for locale, parts in contents.items()
        ]
    return list(contents)


def _render_request(
    template_id: str, data: Mapping[str, Any] | None, locale: str, version: int
) -> delivery_pb2.RenderRequest:
    """The Render request for a template, data, locale and version."""
    return delivery_pb2.RenderRequest(
        template_id=template_id,
        template_version=version,
        locale=locale,
        data_json=_data_json(data),
    )


def _create_template_request(
    template_id: str, contents: LocaleContents, default_locale: str, description: str
) -> template_pb2.CreateTemplateRequest:
    """The CreateTemplate request for a template's first version."""
    return template_pb2.CreateTemplateRequest(
        template_id=template_id,
        description=description,
        default_locale=default_locale,
        contents=_locale_contents(contents),
    )


def _update_template_request(
    template_id: str,
    contents: LocaleContents,
    default_locale: str,
    description: str,
    draft: bool,
) -> template_pb2.UpdateTemplateRequest:
    """The UpdateTemplate request for a template's next version."""
    return template_pb2.UpdateTemplateRequest(
        template_id=template_id,
        default_locale=default_locale,
        contents=_locale_contents(contents),
        draft=draft,
        description=description,
    )


def _put_template_requests(
    template_id: str,
    contents: LocaleContents,
    default_locale: str,
    description: str,
    draft: bool,
) -> tuple[template_pb2.CreateTemplateRequest, template_pb2.UpdateTemplateRequest]:
    """The CreateTemplate request to try first, and the UpdateTemplate one if it exists."""
    items = _locale_contents(contents)  # read `contents` once
    return (
        _create_template_request(template_id, items, default_locale, description),
        _update_template_request(template_id, items, default_locale, description, draft),
    )


def _created_as_updated(
    created: template_pb2.CreateTemplateResponse,
) -> template_pb2.UpdateTemplateResponse:
    """A create's response in the shape `put_template` returns."""
    return template_pb2.UpdateTemplateResponse(template=created.template, version=created.version)


def _next_page(
    request: template_pb2.ListTemplatesRequest, response: template_pb2.ListTemplatesResponse
) -> template_pb2.ListTemplatesRequest | None:
    """The request for the page after `response`, or None after the last page."""
    if not response.next_page_token:
        return None
    return template_pb2.ListTemplatesRequest(
        page_size=request.page_size, page_token=response.next_page_token
    )


def _suppression_reason(value: int | str) -> suppression_pb2.SuppressionReason.ValueType:
    return cast(
        "suppression_pb2.SuppressionReason.ValueType",
        _enum_value(
            suppression_pb2.SuppressionReason, "SUPPRESSION_REASON_", value, "suppression reason"
        ),
    )


def _message_state(value: int | str) -> delivery_pb2.MessageState.ValueType:
    return cast(
        "delivery_pb2.MessageState.ValueType",
        _enum_value(delivery_pb2.MessageState, "MESSAGE_STATE_", value, "message state"),
    )


def _add_suppression_request(
    emails: Iterable[str], reason: int | str, note: str, replace: bool
) -> suppression_pb2.AddSuppressionRequest:
    kind = _suppression_reason(reason)
    return suppression_pb2.AddSuppressionRequest(
        entries=[suppression_pb2.SuppressionEntry(email=e, reason=kind, note=note) for e in emails],
        replace=replace,
    )


def _list_suppressions_request(
    reason: int | str | None, email_prefix: str, page_size: int
) -> suppression_pb2.ListSuppressionsRequest:
    request = suppression_pb2.ListSuppressionsRequest(
        page_size=page_size, email_prefix=email_prefix
    )
    if reason is not None:
        request.reason = _suppression_reason(reason)
    return request


def _next_suppression_page(
    request: suppression_pb2.ListSuppressionsRequest,
    response: suppression_pb2.ListSuppressionsResponse,
) -> suppression_pb2.ListSuppressionsRequest | None:
    """The request for the page after `response`, or None after the last page."""
    if not response.next_page_token:
        return None
    following = suppression_pb2.ListSuppressionsRequest()
    following.CopyFrom(request)
    following.page_token = response.next_page_token
    return following


def _requeue_filter_request(
    template_id: str,
    esp: str,
    state: int | str,
    failed_after: datetime | None,
    failed_before: datetime | None,
    limit: int,
) -> delivery_pb2.RequeueRequest:
    """A filtered Requeue; naive datetimes are taken as UTC."""
    request = delivery_pb2.RequeueRequest(limit=limit)
    request.filter.SetInParent()  # present even when every field is empty (the server refuses it)
    request.filter.state = _message_state(state)
    request.filter.template_id = template_id
    request.filter.esp = esp
    if failed_after is not None:
        request.filter.failed_after.FromDatetime(failed_after)
    if failed_before is not None:
        request.filter.failed_before.FromDatetime(failed_before)
    return request


# --- bulk results ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Rejection:
    """One item the service refused: its input position, status code and reason."""

    index: int
    code: grpc.StatusCode
    message: str
    field: str = ""


@dataclass(kw_only=True)
class BulkReport:
    """What `send_bulk` did; `accepted` counts duplicates too, which `duplicates` counts again."""

    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)  # input order; "" for rejected items
    elapsed: float = 0.0  # seconds, from the first call to the last result

    @property
    def done(self) -> int:
        """Items with a result so far."""
        return len(self.message_ids)

    def add(self, result: delivery_pb2.SendResult) -> None:
        """Fold one result (with its input index) into the report."""
        self.message_ids.append(result.message_id)
        if result.message_id:
            self.accepted += 1
            self.duplicates += result.duplicate
            return
        err = result.error
        self.rejected.append(
            Rejection(
                index=result.index,
                code=_CODES.get(err.code, grpc.StatusCode.UNKNOWN),
                message=err.message,
                field=err.field,
            )
        )


class _Tally:
    """A BulkReport filled chunk by chunk; its clock starts when the tally is made."""

    def __init__(self, on_progress: ProgressCallback | None) -> None:
        self.report = BulkReport()
        self._on_progress = on_progress
        self._start = time.monotonic()

    def add(self, results: Iterable[delivery_pb2.SendResult]) -> None:
        """Fold one chunk of results into the report, then tell `on_progress`."""
        for result in results:
            self.report.add(result)
        self.report.elapsed = time.monotonic() - self._start
        if self._on_progress is not None:
            self._on_progress(self.report)

    def finish(self) -> BulkReport:
        """The report, its clock stopped."""
        self.report.elapsed = time.monotonic() - self._start
        return self.report


class _Numbering:
    """Renumbers chunk after chunk of results by input position, from 0."""

    def __init__(self) -> None:
        self._offset = 0

    def __call__(self, results: Sequence[delivery_pb2.SendResult]) -> list[delivery_pb2.SendResult]:
        out = list(results)
        for index, result in enumerate(out, self._offset):
            result.index = index
        self._offset += len(out)
        return out


def _chunks(emails: Iterable[delivery_pb2.Email], size: int) -> Iterator[list[delivery_pb2.Email]]:
    """Lists of at most `size` emails, read lazily."""
    chunk: list[delivery_pb2.Email] = []
    for item in emails:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _achunks(
    emails: Iterable[delivery_pb2.Email] | AsyncIterable[delivery_pb2.Email], size: int
) -> AsyncIterator[list[delivery_pb2.Email]]:
    """Lists of at most `size` emails from a sync or async source, read lazily."""
    if not isinstance(emails, AsyncIterable):
        for chunk in _chunks(emails, size):
            yield chunk
        return
    batch: list[delivery_pb2.Email] = []
    async for item in emails:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_bulk_args(batch_size: int, concurrency: int) -> None:
    """Refuse bulk settings the service or the pipeline cannot honour."""
    if not 1 <= batch_size <= 1000:
        raise ValueError("batch_size: must be 1..1000")
    if concurrency < 1:
        raise ValueError("concurrency: must be at least 1")


class _StreamLedger:
    """One SendStream's counts: emails written, results received, chunks awaiting results."""

    def __init__(self) -> None:
        self.written = 0
        self.received = 0
        self._ends: deque[int] = deque()  # cumulative email count at the end of each chunk

    def wrote(self, count: int) -> None:
        """A chunk of `count` emails went out."""
        self.written += count
        self._ends.append(self.written)

    def got(self, count: int) -> int:
        """`count` more results arrived; how many written chunks they complete."""
        self.received += count
        completed = 0
        while self._ends and self._ends[0] <= self.received:
            self._ends.popleft()
            completed += 1
        return completed

    def check_complete(self) -> None:
        """After the stream ended: a result for every email written, or DATA_LOSS."""
        if self.received != self.written:
            raise ClientError(
                grpc.StatusCode.DATA_LOSS,
                f"stream ended with {self.received} results for {self.written} emails",
            )


# --- async client ---------------------------------------------------------------------------


class AsyncClient:
    """The swu-delivery API over a grpc.aio channel; use `async with` or call `close()`."""

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        channel_options: Sequence[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS,
        timeout: float | None = 30.0,
    ) -> None:
        self.channel, self._owns_channel = _open_channel(
            target, grpc.aio.insecure_channel, channel_options
        )
        self.timeout = timeout  # per unary call; streams have no deadline
        self._delivery = delivery_pb2_grpc.DeliveryServiceStub(self.channel)
        self._templates = template_pb2_grpc.TemplateServiceStub(self.channel)
        self._suppressions = suppression_pb2_grpc.SuppressionServiceStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            await self.channel.close(None)

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        """One unary call with this client's timeout; its failure raises ClientError."""
        with _rpc_errors():
            return await method(request, timeout=self.timeout)

    # sending

    async def send(self, message: delivery_pb2.Email) -> delivery_pb2.SendResponse:
        """Send one email; a rejection raises ClientError."""
        return await self._unary(self._delivery.Send, delivery_pb2.SendRequest(email=message))

    async def send_batch(
        self, emails: Iterable[delivery_pb2.Email]
    ) -> list[delivery_pb2.SendResult]:
        """Send up to 1000 emails in one call; one result per email, in order."""
        request = delivery_pb2.SendBatchRequest(emails=emails)
        return list((await self._unary(self._delivery.SendBatch, request)).results)

    async def send_iter(
        self,
        emails: Iterable[delivery_pb2.Email] | AsyncIterable[delivery_pb2.Email],
        *,
        batch_size: int = 500,
        concurrency: int = 4,
        stream: bool = False,
    ) -> AsyncIterator[delivery_pb2.SendResult]:
        """Send any number of emails in chunks; yield results in input order, indexed from 0."""
        async for results in self._result_chunks(emails, batch_size, concurrency, stream):
            for result in results:
                yield result

    async def send_bulk(
        self,
        emails: Iterable[delivery_pb2.Email] | AsyncIterable[delivery_pb2.Email],
        *,
        batch_size: int = 500,
        concurrency: int = 4,
        stream: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> BulkReport:
        """Send any number of emails in chunks and tally the results in input order."""
        tally = _Tally(on_progress)
        async for results in self._result_chunks(emails, batch_size, concurrency, stream):
            tally.add(results)
        return tally.finish()

    async def _result_chunks(
        self,
        emails: Iterable[delivery_pb2.Email] | AsyncIterable[delivery_pb2.Email],
        batch_size: int,
        concurrency: int,
        stream: bool,
    ) -> AsyncIterator[list[delivery_pb2.SendResult]]:
        """Chunks of results, in input order, with input indices."""
        _check_bulk_args(batch_size, concurrency)
        source = self._stream_chunks if stream else self._batch_chunks
        numbered = _Numbering()
        async for results in source(_achunks(emails, batch_size), concurrency):
            yield numbered(results)

    async def _batch_chunks(
        self, chunks: AsyncIterator[list[delivery_pb2.Email]], concurrency: int
    ) -> AsyncIterator[Sequence[delivery_pb2.SendResult]]:
        """SendBatch per chunk, up to `concurrency` in flight; results in chunk order."""
        pending: deque[asyncio.Task[list[delivery_pb2.SendResult]]] = deque()
        try:
            async for chunk in chunks:
                pending.append(asyncio.create_task(self.send_batch(chunk)))
                if len(pending) >= concurrency:
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _stream_chunks(
        self, chunks: AsyncIterator[list[delivery_pb2.Email]], concurrency: int
    ) -> AsyncIterator[Sequence[delivery_pb2.SendResult]]:
        """One SendStream call, up to `concurrency` chunks awaiting results at once."""
        call = self._delivery.SendStream(None)  # written with call.write()
        window = asyncio.Semaphore(concurrency)
        ledger = _StreamLedger()

        async def write_all() -> None:
            try:
                async for chunk in chunks:
                    await window.acquire()
                    ledger.wrote(len(chunk))
                    await call.write(delivery_pb2.SendStreamRequest(emails=chunk))
                await call.done_writing()
            except BaseException:
                call.cancel()  # unblocks the reader
                raise

        writer = asyncio.create_task(write_all())
        try:
            while True:
                try:
                    response = await call.read()
                except asyncio.CancelledError:
                    failed = writer.done() and not writer.cancelled()
                    source_error = writer.exception() if failed else None
                    if source_error is not None:
                        raise source_error from None
                    raise
                except grpc.RpcError as exc:
                    raise _client_error(exc) from None
                if not isinstance(response, delivery_pb2.SendStreamResponse):
                    break  # grpc.aio.EOF
                for _ in range(ledger.got(len(response.results))):
                    window.release()
                yield response.results
            with _rpc_errors():
                await writer
            ledger.check_complete()
        finally:
            if not writer.done():
                writer.cancel()
                call.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    # messages and previews

    async def get_message(self, message_id: str) -> delivery_pb2.Message:
        """A message's state and event history; NOT_FOUND raises ClientError."""
        request = delivery_pb2.GetMessageRequest(message_id=message_id)
        return (await self._unary(self._delivery.GetMessage, request)).message

    async def watch_events(
        self,
        *,
        cursor: str = "",
        esps: Iterable[str] = (),
        template_ids: Iterable[str] = (),
        types: Iterable[int | str] = (),
    ) -> AsyncIterator[delivery_pb2.WatchEventsResponse]:
        """Recorded events after `cursor` ("" from now, "0" from the oldest), then live ones."""
        request = _watch_request(cursor, esps, template_ids, types)
        with _rpc_errors():
            async for item in self._delivery.WatchEvents(request):
                yield item

    async def template_stats(self, template_id: str) -> delivery_pb2.GetTemplateStatsResponse:
        """Per version: messages sent, delivered, bounced, opened, clicked, complained..."""
        request = delivery_pb2.GetTemplateStatsRequest(template_id=template_id)
        return await self._unary(self._delivery.GetTemplateStats, request)

    async def render(
        self,
        template_id: str,
        data: Mapping[str, Any] | None = None,
        *,
        locale: str = "",
        version: int = 0,
    ) -> delivery_pb2.RenderResponse:
        """Render a template with `data` without sending anything."""
        request = _render_request(template_id, data, locale, version)
        return await self._unary(self._delivery.Render, request)

    # templates

    async def create_template(
        self,
        template_id: str,
        contents: LocaleContents,
        *,
        default_locale: str = "en",
        description: str = "",
    ) -> template_pb2.CreateTemplateResponse:
        """Create a template; its first version is active."""
        request = _create_template_request(template_id, contents, default_locale, description)
        return await self._unary(self._templates.CreateTemplate, request)

    async def update_template(
        self,
        template_id: str,
        contents: LocaleContents,
        *,
        default_locale: str = "en",
        description: str = "",
        draft: bool = False,
    ) -> template_pb2.UpdateTemplateResponse:
        """Store a new version, active unless `draft`; a non-empty description replaces it."""
        request = _update_template_request(
            template_id, contents, default_locale, description, draft
        )
        return await self._unary(self._templates.UpdateTemplate, request)

    async def put_template(
        self,
        template_id: str,
        contents: LocaleContents,
        *,
        default_locale: str = "en",
        description: str = "",
        draft: bool = False,
    ) -> template_pb2.UpdateTemplateResponse:
        """Create the template, or store a new version if it exists (a new one is never a draft)."""
        create, update = _put_template_requests(
            template_id, contents, default_locale, description, draft
        )
        try:
            created = await self._unary(self._templates.CreateTemplate, create)
        except ClientError as exc:
            if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return await self._unary(self._templates.UpdateTemplate, update)
        return _created_as_updated(created)

    async def get_template(
        self, template_id: str, version: int = 0
    ) -> template_pb2.GetTemplateResponse:
        """A template and one of its versions (0: the active one)."""
        request = template_pb2.GetTemplateRequest(template_id=template_id, version=version)
        return await self._unary(self._templates.GetTemplate, request)

    async def list_templates(self, *, page_size: int = 0) -> AsyncIterator[template_pb2.Template]:
        """Every template, following page tokens."""
        request: template_pb2.ListTemplatesRequest | None
        request = template_pb2.ListTemplatesRequest(page_size=page_size)
        while request is not None:
            response = await self._unary(self._templates.ListTemplates, request)
            for template in response.templates:
                yield template
            request = _next_page(request, response)

    async def delete_template(self, template_id: str) -> None:
        """Soft-delete a template: new sends are refused."""
        request = template_pb2.DeleteTemplateRequest(template_id=template_id)
        await self._unary(self._templates.DeleteTemplate, request)

    async def list_template_versions(self, template_id: str) -> list[template_pb2.TemplateVersion]:
        """A template's versions, newest first, without contents."""
        request = template_pb2.ListTemplateVersionsRequest(template_id=template_id)
        return list((await self._unary(self._templates.ListTemplateVersions, request)).versions)

    async def activate_template_version(
        self, template_id: str, version: int
    ) -> template_pb2.Template:
        """Make `version` the one new sends use."""
        request = template_pb2.ActivateTemplateVersionRequest(
            template_id=template_id, version=version
        )
        return (await self._unary(self._templates.ActivateTemplateVersion, request)).template

    # suppression list and requeue

    async def add_suppressions(
        self,
        emails: Iterable[str],
        *,
        reason: int | str = "manual",
        note: str = "",
        replace: bool = False,
    ) -> list[suppression_pb2.AddSuppressionResult]:
        """Suppress up to 1000 addresses; one result per address, a bad one refused alone."""
        request = _add_suppression_request(emails, reason, note, replace)
        return list((await self._unary(self._suppressions.AddSuppression, request)).results)

    async def remove_suppressions(self, emails: Iterable[str]) -> list[suppression_pb2.Suppression]:
        """Take up to 1000 addresses off the list; returns the entries that were removed."""
        request = suppression_pb2.RemoveSuppressionRequest(emails=list(emails))
        return list((await self._unary(self._suppressions.RemoveSuppression, request)).removed)

    async def list_suppressions(
        self, *, reason: int | str | None = None, email_prefix: str = "", page_size: int = 0
    ) -> AsyncIterator[suppression_pb2.Suppression]:
        """Every entry (of `reason`, starting with `email_prefix`), by address, following pages."""
        request: suppression_pb2.ListSuppressionsRequest | None
        request = _list_suppressions_request(reason, email_prefix, page_size)
        while request is not None:
            response = await self._unary(self._suppressions.ListSuppressions, request)
            for entry in response.suppressions:
                yield entry
            request = _next_suppression_page(request, response)

    async def check_suppressions(
        self, emails: Iterable[str]
    ) -> list[suppression_pb2.CheckSuppressionResult]:
        """For up to 1000 addresses: suppressed or not, with the entry."""
        request = suppression_pb2.CheckSuppressionRequest(emails=list(emails))
        return list((await self._unary(self._suppressions.CheckSuppression, request)).results)

    async def requeue(self, message_ids: Iterable[str]) -> list[delivery_pb2.RequeueResult]:
        """Queue FAILED or SUPPRESSED messages again (up to 1000 ids); one result per id."""
        request = delivery_pb2.RequeueRequest(message_ids=list(message_ids))
        return list((await self._unary(self._delivery.Requeue, request)).results)

    async def requeue_matching(
        self,
        *,
        template_id: str = "",
        esp: str = "",
        state: int | str = "failed",
        failed_after: datetime | None = None,
        failed_before: datetime | None = None,
        limit: int = 0,
    ) -> int:
        """Queue again up to `limit` messages matching the filter; returns how many."""
        request = _requeue_filter_request(
            template_id, esp, state, failed_after, failed_before, limit
        )
        return (await self._unary(self._delivery.Requeue, request)).requeued


# --- sync client ----------------------------------------------------------------------------


class _RequestFeed:
    """Chunked requests for a sync SendStream, at most `window` chunks ahead of the results."""

    def __init__(self, chunks: Iterator[list[delivery_pb2.Email]], window: int) -> None:
        self._chunks = chunks
        self._window = threading.Semaphore(window)
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # the ledger is written by grpc's feed thread too
        self._ledger = _StreamLedger()
        self.error: BaseException | None = None  # raised by the source, seen by the caller

    def __iter__(self) -> Iterator[delivery_pb2.SendStreamRequest]:
        try:
            for chunk in self._chunks:
                while not self._window.acquire(timeout=0.1):
                    if self._stopped.is_set():
                        return
                with self._lock:
                    self._ledger.wrote(len(chunk))
                yield delivery_pb2.SendStreamRequest(emails=chunk)
        except Exception as exc:  # grpc would swallow it into a CANCELLED status
            self.error = exc
            raise

    def received(self, count: int) -> None:
        """`count` more results arrived: open the window for the chunks they complete."""
        with self._lock:
            completed = self._ledger.got(count)
        for _ in range(completed):
            self._window.release()

    def check_complete(self) -> None:
        """After the stream ended: a result for every email written, or DATA_LOSS."""
        with self._lock:
            self._ledger.check_complete()

    def stop(self) -> None:
        """Let a blocked feed thread end."""
        self._stopped.set()


def _future_results(
    future: grpc.Future[delivery_pb2.SendBatchResponse],
) -> Sequence[delivery_pb2.SendResult]:
    """The results of a finished SendBatch future; its failure raises ClientError."""
    with _rpc_errors():
        return future.result().results


class Client:
    """The swu-delivery API over a synchronous grpc channel; use `with` or call `close()`."""

    def __init__(
        self,
        target: str | grpc.Channel,
        *,
        channel_options: Sequence[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS,
        timeout: float | None = 30.0,
    ) -> None:
        self.channel, self._owns_channel = _open_channel(
            target, grpc.insecure_channel, channel_options
        )
        self.timeout = timeout  # per unary call; streams have no deadline
        self._delivery = delivery_pb2_grpc.DeliveryServiceStub(self.channel)
        self._templates = template_pb2_grpc.TemplateServiceStub(self.channel)
        self._suppressions = suppression_pb2_grpc.SuppressionServiceStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            self.channel.close()

    def _unary(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        """One unary call with this client's timeout; its failure raises ClientError."""
        with _rpc_errors():
            return method(request, timeout=self.timeout)

    # sending

    def send(self, message: delivery_pb2.Email) -> delivery_pb2.SendResponse:
        """Send one email; a rejection raises ClientError."""
        return self._unary(self._delivery.Send, delivery_pb2.SendRequest(email=message))

    def send_batch(self, emails: Iterable[delivery_pb2.Email]) -> list[delivery_pb2.SendResult]:
        """Send up to 1000 emails in one call; one result per email, in order."""
        request = delivery_pb2.SendBatchRequest(emails=emails)
        return list(self._unary(self._delivery.SendBatch, request).results)

    def send_iter(
        self,
        emails: Iterable[delivery_pb2.Email],
        *,
        batch_size: int = 500,
        concurrency: int = 4,
        stream: bool = False,
    ) -> Iterator[delivery_pb2.SendResult]:
        """Send any number of emails in chunks; yield results in input order, indexed from 0."""
        for results in self._result_chunks(emails, batch_size, concurrency, stream):
            yield from results

    def send_bulk(
        self,
        emails: Iterable[delivery_pb2.Email],
        *,
        batch_size: int = 500,
        concurrency: int = 4,
        stream: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> BulkReport:
        """Send any number of emails in chunks and tally the results in input order."""
        tally = _Tally(on_progress)
        for results in self._result_chunks(emails, batch_size, concurrency, stream):
            tally.add(results)
        return tally.finish()

    def _result_chunks(
        self,
        emails: Iterable[delivery_pb2.Email],
        batch_size: int,
        concurrency: int,
        stream: bool,
    ) -> Iterator[list[delivery_pb2.SendResult]]:
        """Chunks of results, in input order, with input indices."""
        _check_bulk_args(batch_size, concurrency)
        source = self._stream_chunks if stream else self._batch_chunks
        numbered = _Numbering()
        for results in source(_chunks(emails, batch_size), concurrency):
            yield numbered(results)

    def _batch_chunks(
        self, chunks: Iterator[list[delivery_pb2.Email]], concurrency: int
    ) -> Iterator[Sequence[delivery_pb2.SendResult]]:
        """SendBatch per chunk (grpc futures), up to `concurrency` in flight; in chunk order."""
        pending: deque[grpc.Future[delivery_pb2.SendBatchResponse]] = deque()
        call = self._delivery.SendBatch
        try:
            for chunk in chunks:
                request = delivery_pb2.SendBatchRequest(emails=chunk)
                pending.append(call.future(request, timeout=self.timeout))
                if len(pending) >= concurrency:
                    yield _future_results(pending.popleft())
            while pending:
                yield _future_results(pending.popleft())
        finally:
            for future in pending:
                future.cancel()

    def _stream_chunks(
        self, chunks: Iterator[list[delivery_pb2.Email]], concurrency: int
    ) -> Iterator[Sequence[delivery_pb2.SendResult]]:
        """One SendStream call, up to `concurrency` chunks awaiting results at once."""
        feed = _RequestFeed(chunks, concurrency)
        responses = self._delivery.SendStream(iter(feed))
        try:
            for response in responses:
                feed.received(len(response.results))
                yield response.results
        except grpc.RpcError as exc:
            if feed.error is not None:
                raise feed.error from None
            raise _client_error(exc) from None
        finally:
            feed.stop()
            responses.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
        feed.check_complete()

    # messages and previews

    def get_message(self, message_id: str) -> delivery_pb2.Message:
        """A message's state and event history; NOT_FOUND raises ClientError."""
        request = delivery_pb2.GetMessageRequest(message_id=message_id)
        return self._unary(self._delivery.GetMessage, request).message

    def watch_events(
        self,
        *,
        cursor: str = "",
        esps: Iterable[str] = (),
        template_ids: Iterable[str] = (),
        types: Iterable[int | str] = (),
    ) -> Iterator[delivery_pb2.WatchEventsResponse]:
        """Recorded events after `cursor` ("" from now, "0" from the oldest), then live ones."""
        request = _watch_request(cursor, esps, template_ids, types)
        stream: Any = self._delivery.WatchEvents(request)  # a grpc Call as well as an iterator
        try:
            with _rpc_errors():
                yield from stream
        finally:
            stream.cancel()

    def template_stats(self, template_id: str) -> delivery_pb2.GetTemplateStatsResponse:
        """Per version: messages sent, delivered, bounced, opened, clicked, complained..."""
        request = delivery_pb2.GetTemplateStatsRequest(template_id=template_id)
        return self._unary(self._delivery.GetTemplateStats, request)

    def render(
        self,
        template_id: str,
        data: Mapping[str, Any] | None = None,
        *,
        locale: str = "",
        version: int = 0,
    ) -> delivery_pb2.RenderResponse:
        """Render a template with `data` without sending anything."""
        request = _render_request(template_id, data, locale, version)
        return self._unary(self._delivery.Render, request)

    # templates

    def create_template(
        self,
        template_id: str,
        contents: LocaleContents,
        *,
        default_locale: str = "en",
        description: str = "",
    ) -> template_pb2.CreateTemplateResponse:
        """Create a template; its first version is active."""
        request = _create_template_request(template_id, contents, default_locale, description)
        return self._unary(self._templates.CreateTemplate, request)

    def update_template(
        self,
        template_id: str,
        contents: LocaleContents,
        *,
        default_locale: str = "en",
        description: str = "",
        draft: bool = False,
    ) -> template_pb2.UpdateTemplateResponse:
        """Store a new version, active unless `draft`; a non-empty description replaces it."""
        request = _update_template_request(
            template_id, contents, default_locale, description, draft
        )
        return self._unary(self._templates.UpdateTemplate, request)

    def put_template(
        self,
        template_id: str,
        contents: LocaleContents,
        *,
        default_locale: str = "en",
        description: str = "",
        draft: bool = False,
    ) -> template_pb2.UpdateTemplateResponse:
        """Create the template, or store a new version if it exists (a new one is never a draft)."""
        create, update = _put_template_requests(
            template_id, contents, default_locale, description, draft
        )
        try:
            created = self._unary(self._templates.CreateTemplate, create)
        except ClientError as exc:
            if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return self._unary(self._templates.UpdateTemplate, update)
        return _created_as_updated(created)

    def get_template(self, template_id: str, version: int = 0) -> template_pb2.GetTemplateResponse:
        """A template and one of its versions (0: the active one)."""
        request = template_pb2.GetTemplateRequest(template_id=template_id, version=version)
        return self._unary(self._templates.GetTemplate, request)

    def list_templates(self, *, page_size: int = 0) -> list[template_pb2.Template]:
        """Every template, following page tokens."""
        templates: list[template_pb2.Template] = []
        request: template_pb2.ListTemplatesRequest | None
        request = template_pb2.ListTemplatesRequest(page_size=page_size)
        while request is not None:
            response = self._unary(self._templates.ListTemplates, request)
            templates.extend(response.templates)
            request = _next_page(request, response)
        return templates

    def delete_template(self, template_id: str) -> None:
        """Soft-delete a template: new sends are refused."""
        request = template_pb2.DeleteTemplateRequest(template_id=template_id)
        self._unary(self._templates.DeleteTemplate, request)

    def list_template_versions(self, template_id: str) -> list[template_pb2.TemplateVersion]:
        """A template's versions, newest first, without contents."""
        request = template_pb2.ListTemplateVersionsRequest(template_id=template_id)
        return list(self._unary(self._templates.ListTemplateVersions, request).versions)

    def activate_template_version(self, template_id: str, version: int) -> template_pb2.Template:
        """Make `version` the one new sends use."""
        request = template_pb2.ActivateTemplateVersionRequest(
            template_id=template_id, version=version
        )
        return self._unary(self._templates.ActivateTemplateVersion, request).template

    # suppression list and requeue

    def add_suppressions(
        self,
        emails: Iterable[str],
        *,
        reason: int | str = "manual",
        note: str = "",
        replace: bool = False,
    ) -> list[suppression_pb2.AddSuppressionResult]:
        """Suppress up to 1000 addresses; one result per address, a bad one refused alone."""
        request = _add_suppression_request(emails, reason, note, replace)
        return list((self._unary(self._suppressions.AddSuppression, request)).results)

    def remove_suppressions(self, emails: Iterable[str]) -> list[suppression_pb2.Suppression]:
        """Take up to 1000 addresses off the list; returns the entries that were removed."""
        request = suppression_pb2.RemoveSuppressionRequest(emails=list(emails))
        return list((self._unary(self._suppressions.RemoveSuppression, request)).removed)

    def list_suppressions(
        self, *, reason: int | str | None = None, email_prefix: str = "", page_size: int = 0
    ) -> list[suppression_pb2.Suppression]:
        """Every entry (of `reason`, starting with `email_prefix`), by address, following pages."""
        entries: list[suppression_pb2.Suppression] = []
        request: suppression_pb2.ListSuppressionsRequest | None
        request = _list_suppressions_request(reason, email_prefix, page_size)
        while request is not None:
            response = self._unary(self._suppressions.ListSuppressions, request)
            entries.extend(response.suppressions)
            request = _next_suppression_page(request, response)
        return entries

    def check_suppressions(
        self, emails: Iterable[str]
    ) -> list[suppression_pb2.CheckSuppressionResult]:
        """For up to 1000 addresses: suppressed or not, with the entry."""
        request = suppression_pb2.CheckSuppressionRequest(emails=list(emails))
        return list((self._unary(self._suppressions.CheckSuppression, request)).results)

    def requeue(self, message_ids: Iterable[str]) -> list[delivery_pb2.RequeueResult]:
        """Queue FAILED or SUPPRESSED messages again (up to 1000 ids); one result per id."""
        request = delivery_pb2.RequeueRequest(message_ids=list(message_ids))
        return list((self._unary(self._delivery.Requeue, request)).results)

    def requeue_matching(
        self,
        *,
        template_id: str = "",
        esp: str = "",
        state: int | str = "failed",
        failed_after: datetime | None = None,
        failed_before: datetime | None = None,
        limit: int = 0,
    ) -> int:
        """Queue again up to `limit` messages matching the filter; returns how many."""
        request = _requeue_filter_request(
            template_id, esp, state, failed_after, failed_before, limit
        )
        return (self._unary(self._delivery.Requeue, request)).requeued
