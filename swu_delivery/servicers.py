"""The gRPC servicers: thin translations between protobuf requests and the service's parts."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from swu_delivery._proto.swu.delivery.v1 import (
    delivery_pb2,
    delivery_pb2_grpc,
    suppression_pb2,
    suppression_pb2_grpc,
    template_pb2,
    template_pb2_grpc,
)
from swu_delivery.errors import InvalidArgument, SwuError, status_for
from swu_delivery.events import EventStore
from swu_delivery.intake import Intake
from swu_delivery.ledger import Ledger
from swu_delivery.sandbox import TemplateEngine
from swu_delivery.suppressions import SuppressionStore
from swu_delivery.templates import TemplateCache, TemplateStore, check_template_id
from swu_delivery.validation import parse_data

__all__ = ["DeliveryServicer", "SuppressionServicer", "TemplateServicer"]

log = logging.getLogger(__name__)

R = TypeVar("R")
CURSOR_METADATA = "swu-cursor"  # WatchEvents: the cursor the stream starts after
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]


def unary(fn: Handler[R]) -> Handler[R]:
    """Map our errors to their status; log anything unexpected and answer INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await fn(self, request, context)
        except SwuError as exc:
            code, message = status_for(exc)
        except Exception as exc:
            log.exception("%s failed", fn.__name__)
            code, message = status_for(exc)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    return wrapper


class DeliveryServicer(delivery_pb2_grpc.DeliveryServiceServicer):
    def __init__(
        self,
        *,
        intake: Intake,
        ledger: Ledger,
        cache: TemplateCache,
        store: TemplateStore,
        engine: TemplateEngine,
        events: EventStore,
    ) -> None:
        self.intake = intake
        self.ledger = ledger
        self.cache = cache
        self.store = store
        self.engine = engine
        self.events = events

    @unary
    async def Send(
        self, request: delivery_pb2.SendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> delivery_pb2.SendResponse:
        if not request.HasField("email"):
            raise InvalidArgument("required", field="email")
        (result,) = await self.intake.accept([request.email], prefix="email", indexed=False)
        if result.HasField("error"):
            await context.abort(_BY_NUMBER[result.error.code], result.error.message)
        return delivery_pb2.SendResponse(message_id=result.message_id, duplicate=result.duplicate)

    @unary
    async def SendBatch(
        self, request: delivery_pb2.SendBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> delivery_pb2.SendBatchResponse:
        results = await self.intake.accept(request.emails)
        return delivery_pb2.SendBatchResponse(results=results)

    async def SendStream(
        self,
        request_iterator: AsyncIterator[delivery_pb2.SendStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[delivery_pb2.SendStreamResponse]:
        offset = 0
        try:
            async for chunk in request_iterator:
                results = await self.intake.accept(chunk.emails, offset=offset)
                offset += len(chunk.emails)
                yield delivery_pb2.SendStreamResponse(results=results)
        except SwuError as exc:
            await context.abort(*status_for(exc))
        except Exception as exc:
            log.exception("SendStream failed")
            await context.abort(*status_for(exc))

    @unary
    async def GetMessage(
        self, request: delivery_pb2.GetMessageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> delivery_pb2.GetMessageResponse:
        if not request.message_id:
            raise InvalidArgument("required", field="message_id")
        return delivery_pb2.GetMessageResponse(message=await self.ledger.get(request.message_id))

    @unary
    async def Render(
        self, request: delivery_pb2.RenderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> delivery_pb2.RenderResponse:
        check_template_id(request.template_id)
        pins = await self.store.pin([(request.template_id, request.template_version)])
        version = pins[(request.template_id, request.template_version)]
        if isinstance(version, SwuError):
            raise version
        context_data = parse_data(request.data_json)
        compiled = (await self.cache.ensure([(request.template_id, version)]))[
            (request.template_id, version)
        ]
        if isinstance(compiled, SwuError):
            raise compiled
        rendered = compiled.resolve(request.locale).render(self.engine, context_data)
        return delivery_pb2.RenderResponse(
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            template_version=version,
            locale=rendered.locale,
        )

    async def WatchEvents(
        self,
        request: delivery_pb2.WatchEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[delivery_pb2.WatchEventsResponse]:
        try:
            after = await self.events.start_cursor(request)
            # The initial metadata tells the caller the stream is live and where it starts.
            await context.send_initial_metadata(((CURSOR_METADATA, str(after)),))
            async for item in self.events.watch(request, after):
                yield item
        except SwuError as exc:
            await context.abort(*status_for(exc))
        except Exception as exc:
            log.exception("WatchEvents failed")
            await context.abort(*status_for(exc))

    @unary
    async def GetTemplateStats(
        self,
        request: delivery_pb2.GetTemplateStatsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> delivery_pb2.GetTemplateStatsResponse:
        check_template_id(request.template_id)
        return await self.events.template_stats(request.template_id)

    @unary
    async def Requeue(
        self, request: delivery_pb2.RequeueRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> delivery_pb2.RequeueResponse:
        return await self.intake.requeue(request)


class TemplateServicer(template_pb2_grpc.TemplateServiceServicer):
    def __init__(self, store: TemplateStore) -> None:
        self.store = store

    @unary
    async def CreateTemplate(
        self,
        request: template_pb2.CreateTemplateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> template_pb2.CreateTemplateResponse:
        template, version = await self.store.create(request)
        return template_pb2.CreateTemplateResponse(template=template, version=version)

    @unary
    async def UpdateTemplate(
        self,
        request: template_pb2.UpdateTemplateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> template_pb2.UpdateTemplateResponse:
        template, version = await self.store.update(request)
        return template_pb2.UpdateTemplateResponse(template=template, version=version)

    @unary
    async def GetTemplate(
        self, request: template_pb2.GetTemplateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> template_pb2.GetTemplateResponse:
        template, version = await self.store.get(request.template_id, request.version)
        return template_pb2.GetTemplateResponse(template=template, version=version)

    @unary
    async def ListTemplates(
        self,
        request: template_pb2.ListTemplatesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> template_pb2.ListTemplatesResponse:
        templates, token = await self.store.page(request.page_size, request.page_token)
        return template_pb2.ListTemplatesResponse(templates=templates, next_page_token=token)

    @unary
    async def DeleteTemplate(
        self,
        request: template_pb2.DeleteTemplateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> template_pb2.DeleteTemplateResponse:
        await self.store.delete(request.template_id)
        return template_pb2.DeleteTemplateResponse()

    @unary
    async def ListTemplateVersions(
        self,
        request: template_pb2.ListTemplateVersionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> template_pb2.ListTemplateVersionsResponse:
        return template_pb2.ListTemplateVersionsResponse(
            versions=await self.store.versions(request.template_id)
        )

    @unary
    async def ActivateTemplateVersion(
        self,
        request: template_pb2.ActivateTemplateVersionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> template_pb2.ActivateTemplateVersionResponse:
        template = await self.store.activate(request.template_id, request.version)
        return template_pb2.ActivateTemplateVersionResponse(template=template)


class SuppressionServicer(suppression_pb2_grpc.SuppressionServiceServicer):
    def __init__(self, store: SuppressionStore) -> None:
        self.store = store

    @unary
    async def AddSuppression(
        self,
        request: suppression_pb2.AddSuppressionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> suppression_pb2.AddSuppressionResponse:
        return await self.store.add(request)

    @unary
    async def RemoveSuppression(
        self,
        request: suppression_pb2.RemoveSuppressionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> suppression_pb2.RemoveSuppressionResponse:
        return await self.store.remove(request)

    @unary
    async def ListSuppressions(
        self,
        request: suppression_pb2.ListSuppressionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> suppression_pb2.ListSuppressionsResponse:
        return await self.store.page(request)

    @unary
    async def CheckSuppression(
        self,
        request: suppression_pb2.CheckSuppressionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> suppression_pb2.CheckSuppressionResponse:
        return await self.store.check(request)
