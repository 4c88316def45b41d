"""The Requeue RPC: check the request, then put finished messages back in the outbox.

A request names messages by id (one result each) or by a filter (a count). A filter must narrow
by template, ESP account or time: an empty one would requeue every failure ever recorded, which
is never what a caller meant.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2
from swu_delivery.errors import InvalidArgument
from swu_delivery.outbox import FAILED, SUPPRESSED, Outbox, RequeueFilter
from swu_delivery.templates import check_template_id
from swu_delivery.validation import validate_batch_size

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "check_filter", "requeue"]

DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000  # one transaction; larger sets take several calls
MAX_ID, MAX_ESP = 128, 128
_SECONDS = range(-62135596800, 253402300800)  # 0001-01-01 .. 9999-12-31, as protobuf allows


def _seconds(ts: Timestamp, field: str) -> float:
    if ts.seconds not in _SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument("not a valid timestamp", field=field)
    return ts.seconds + ts.nanos / 1e9


def check_filter(request: delivery_pb2.RequeueRequest) -> tuple[RequeueFilter, int]:
    """The outbox filter and limit of a filtered request, or INVALID_ARGUMENT naming the field."""
    f = request.filter
    state = f.state or FAILED
    if state not in (FAILED, SUPPRESSED):
        problem = "only FAILED or SUPPRESSED messages are requeued"
        raise InvalidArgument(problem, field="filter.state")
    if f.template_id:
        check_template_id(f.template_id, "filter.template_id")
    if len(f.esp) > MAX_ESP or not f.esp.isprintable():
        raise InvalidArgument("not an ESP account name", field="filter.esp")
    after = _seconds(f.failed_after, "filter.failed_after") if f.HasField("failed_after") else None
    before = (
        _seconds(f.failed_before, "filter.failed_before") if f.HasField("failed_before") else None
    )
    if after is not None and before is not None and before <= after:
        raise InvalidArgument("must be after filter.failed_after", field="filter.failed_before")
    if not f.template_id and not f.esp and after is None and before is None:
        problem = "set template_id, esp, failed_after or failed_before: an empty filter is refused"
        raise InvalidArgument(problem, field="filter")
    if request.limit > MAX_LIMIT:
        raise InvalidArgument(f"at most {MAX_LIMIT}", field="limit")
    wanted = RequeueFilter(
        state=state, template_id=f.template_id, esp=f.esp, ended_after=after, ended_before=before
    )
    return wanted, request.limit or DEFAULT_LIMIT


def _check_ids(request: delivery_pb2.RequeueRequest) -> list[str]:
    validate_batch_size(len(request.message_ids), "message_ids")
    if request.limit:
        raise InvalidArgument("only with filter; every listed id is requeued", field="limit")
    for i, message_id in enumerate(request.message_ids):
        if not message_id:
            raise InvalidArgument("required", field=f"message_ids[{i}]")
        if len(message_id) > MAX_ID or not message_id.isprintable():
            raise InvalidArgument("not a message id", field=f"message_ids[{i}]")
    return list(request.message_ids)


async def requeue(
    outbox: Outbox, request: delivery_pb2.RequeueRequest
) -> delivery_pb2.RequeueResponse:
    """Requeue by ids (a result per id) or by filter (a count)."""
    if request.message_ids and request.HasField("filter"):
        raise InvalidArgument("set message_ids or filter, not both", field="filter")
    if not request.message_ids and not request.HasField("filter"):
        raise InvalidArgument("set message_ids or filter", field="message_ids")
    if not request.HasField("filter"):
        ids = _check_ids(request)
        outcomes = await outbox.requeue(ids)
        results = []
        for i, (message_id, why) in enumerate(zip(ids, outcomes, strict=True)):
            result = delivery_pb2.RequeueResult(index=i, message_id=message_id)
            if why is None:
                result.requeued = True
            else:
                result.error.CopyFrom(
                    common_pb2.ItemError(
                        code=why.code.value[0], message=why.prefixed(f"message_ids[{i}]")
                    )
                )
            results.append(result)
        return delivery_pb2.RequeueResponse(
            results=results, requeued=sum(r.requeued for r in results)
        )
    wanted, limit = check_filter(request)
    return delivery_pb2.RequeueResponse(requeued=await outbox.requeue_matching(wanted, limit))
