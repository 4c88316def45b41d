"""The service's error tree and its one mapping to gRPC status codes.

    SwuError                       base of every error we raise on purpose
    ├── InvalidArgument            INVALID_ARGUMENT: a field of the request is wrong
    │   ├── TemplateSyntaxError        a template part does not compile (or breaks a limit)
    │   └── TemplateRenderError        rendering raised (bad data, limits, template code)
    ├── NotFound                   NOT_FOUND: template, version, locale or message is unknown
    ├── AlreadyExists              ALREADY_EXISTS: template id taken; idempotency key reused
    │                                  with different content
    ├── FailedPrecondition         FAILED_PRECONDITION: e.g. the template was deleted
    └── Unavailable                UNAVAILABLE: the service is draining or the store is down

Every error carries `field`, the path of the offending field relative to the request item
(e.g. ``to.email``), so batch results can name it. Messages are meant for the caller: they never
contain API keys or template data.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "SwuError",
    "TemplateRenderError",
    "TemplateSyntaxError",
    "Unavailable",
    "status_for",
]


class SwuError(Exception):
    """Root of the error tree; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def prefixed(self, prefix: str) -> str:
        """The message with the field path under `prefix`, e.g. ``emails[3].to.email: ...``."""
        if not self.field:
            return f"{prefix}: {self.message}" if prefix else self.message
        return f"{prefix}.{self.field}: {self.message}" if prefix else str(self)


class InvalidArgument(SwuError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class TemplateSyntaxError(InvalidArgument):
    """A template part failed to compile, or its compilation broke a limit."""


class TemplateRenderError(InvalidArgument):
    """Rendering failed: template code raised, or a time/size/memory limit was hit."""


class NotFound(SwuError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SwuError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SwuError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(SwuError):
    code = grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for any exception; unexpected ones become INTERNAL."""
    if isinstance(exc, SwuError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
