"""Log records as JSON lines (or plain text), with the request id and ESP of the current context.

`request_id` is set by the gRPC interceptor for the call being served; `esp` by the adapter base
around a provider call. Both are contextvars, so every log line written in that context carries
them without passing them down.
"""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

__all__ = ["ESP", "REQUEST_ID", "JsonFormatter", "configure_logging"]

REQUEST_ID: ContextVar[str] = ContextVar("swu_request_id", default="")
ESP: ContextVar[str] = ContextVar("swu_esp", default="")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the context's ids."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.pid = os.getpid()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": self.pid,
        }
        if self.worker is not None:
            line["worker"] = self.worker
        if request_id := REQUEST_ID.get():
            line["request_id"] = request_id
        if esp := getattr(record, "esp", "") or ESP.get():
            line["esp"] = esp
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure_logging(level: str, log_format: str, *, worker: int | None = None) -> None:
    """Root logging to stderr: `json`, `text`, or `auto` (JSON unless stderr is a terminal).

    `worker` is the index of this worker process (`serve --workers N`); lines then carry it.
    Both values were checked when the config loaded (`config.load_config`).
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    elif worker is not None:
        prefix = f"%(asctime)s [worker {worker} pid {os.getpid()}] "
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT.replace("%(asctime)s ", prefix)))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
