"""Compile and render customer-written (hostile) Jinja templates safely and fast.

    engine = TemplateEngine(RenderLimits())
    engine.check(source, name="html", autoescape=True)           # save time: guarded worker
    part = engine.compile(source, name="html", autoescape=True)  # cache this CompiledPart
    text = engine.render(part, data)                             # the hot path

`compile` raises TemplateSyntaxError and `render` TemplateRenderError for any failure of
template code or of a limit, with the part's name as the error's `field`. The layers:

    sandbox.py          this API: error messages with line numbers, the guarded check
    sandbox_env.py      the Jinja environment whose code generator routes template code
                        through the guards; refuses include/import/extends/self
    sandbox_guard.py    size-checked operators, what may be printed, formatting
    sandbox_filters.py  the curated filter table, each filter guarded
    sandbox_limits.py   RenderLimits and the per-render budget (steps, characters, time)
    guarded_worker.py   the worker process `check` runs in (RLIMIT_AS, wall clock, SIGKILL)

How the threats are met:

- sandbox escapes: Jinja's immutable sandbox; globals cut to range/dict/namespace (``dict`` the
  type would allow ``dict.update(data, ...)``); ``self`` refused at compile time.
- Python reprs in mail: every ``{{ }}`` is finalized by a function that passes scalars (and
  containers of them) and refuses anything else; filters, ``~``, ``%`` and str.format too.
- compile-time DoS: nothing is constant-folded (``{{ 'a' * 10**10 }}`` compiles instantly);
  too-deep nesting is a TemplateSyntaxError; sources over max_source_bytes are refused.
- render-time DoS: sizes are checked before building, every loop iteration and call is a
  counted step, built text and output are charged, and the deadline is checked as they go.
- what slips past the in-process checks at save time is caught by `check`, which compiles and
  renders with empty data in a worker under RLIMIT_AS and a wall-clock limit.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.environment import Template

from swu_delivery.errors import TemplateRenderError, TemplateSyntaxError
from swu_delivery.guarded_worker import GuardedWorker, WorkerCrashed, WorkerTimeout
from swu_delivery.sandbox_env import GuardedEnvironment
from swu_delivery.sandbox_limits import LimitExceeded, RenderBudget, RenderLimits, current_budget

__all__ = ["CompiledPart", "RenderLimits", "TemplateEngine"]

DEFAULT_LIMITS = RenderLimits()
_MAX_MESSAGE = 300
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: render failures that no data can cause or cure: check() refuses templates that hit them
_DATA_INDEPENDENT = (LimitExceeded, jinja2.exceptions.SecurityError, RecursionError, MemoryError)
_budget = current_budget()


@dataclass(frozen=True, slots=True)
class CompiledPart:
    """One compiled template part (subject, html or text), ready to render many times."""

    name: str
    template: Template
    #: the template's globals as a plain dict: merged with each render's data in one step (its
    #: own globals are a ChainMap over the environment's, which Jinja copies key by key)
    globals: dict[str, Any]


class TemplateEngine:
    """Compiles and renders template parts in the hardened sandbox, under `limits`."""

    def __init__(self, limits: RenderLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._envs = {flag: GuardedEnvironment(limits, autoescape=flag) for flag in (False, True)}
        self._render_output = self._envs[False].guard.render_output
        self._worker = GuardedWorker(
            memory_bytes=limits.compile_memory_bytes, timeout=limits.compile_timeout
        )

    def compile(self, source: str, *, name: str, autoescape: bool) -> CompiledPart:
        """Compile in-process; raises TemplateSyntaxError saying what is wrong and where."""
        self._check_source_size(source, name)
        env = self._envs[autoescape]
        try:
            code = env.compile(source, name=name, filename=f"<template {name}>")
            template = env.template_class.from_code(env, code, env.make_globals(None))
        except Exception as exc:
            raise TemplateSyntaxError(_compile_message(exc), field=name) from None
        return CompiledPart(name=name, template=template, globals=dict(template.globals))

    def render(self, part: CompiledPart, context: Mapping[str, Any]) -> str:
        """Render `part` with `context`; raises TemplateRenderError for any failure."""
        try:
            return self._render(part, context)
        except Exception as exc:
            raise TemplateRenderError(_render_message(part, exc), field=part.name) from None

    def check(self, source: str, *, name: str, autoescape: bool) -> None:
        """Validate at save time: compile and render with empty data in the guarded worker."""
        self._check_source_size(source, name)
        try:
            problem = self._worker.run(_validate, self.limits, source, name, autoescape)
        except WorkerTimeout:
            raise TemplateSyntaxError("the template took too long to compile", field=name) from None
        except WorkerCrashed:
            raise TemplateSyntaxError(
                "the template needs too much memory to compile", field=name
            ) from None
        if problem is not None:
            raise TemplateSyntaxError(problem, field=name)

    async def check_async(self, source: str, *, name: str, autoescape: bool) -> None:
        """`check` from asyncio, on the default executor (the worker does the work)."""
        call = functools.partial(self.check, source, name=name, autoescape=autoescape)
        await asyncio.get_running_loop().run_in_executor(None, call)

    def close(self) -> None:
        """Stop the check worker."""
        self._worker.close()

    def _render(self, part: CompiledPart, context: Mapping[str, Any]) -> str:
        budget = RenderBudget(self.limits)
        token = _budget.set(budget)
        try:
            template = part.template
            # The data may shadow a global, as in Jinja's own new_context; shared=True takes this
            # fresh dict as the context's parent instead of copying it again.
            parent = {**part.globals, **context}
            chunks = template.root_render_func(template.new_context(parent, shared=True))
            return self._render_output(chunks, budget)
        finally:
            _budget.reset(token)

    def _check_source_size(self, source: str, name: str) -> None:
        limit = self.limits.max_source_bytes
        if len(source) > limit or len(source.encode("utf-8", "surrogatepass")) > limit:
            raise TemplateSyntaxError(f"the template is larger than {limit:,} bytes", field=name)


_worker_engines: dict[RenderLimits, TemplateEngine] = {}


def _validate(limits: RenderLimits, source: str, name: str, autoescape: bool) -> str | None:
    """In the worker: why the template is refused, or None. Data-dependent errors pass."""
    engine = _worker_engines.get(limits)
    if engine is None:
        engine = _worker_engines[limits] = TemplateEngine(limits)
    try:
        part = engine.compile(source, name=name, autoescape=autoescape)
    except TemplateSyntaxError as exc:
        return exc.message
    try:
        engine._render(part, {})
    except _DATA_INDEPENDENT as exc:
        return f"rendering with empty data failed: {_render_message(part, exc)}"
    except Exception:
        pass  # e.g. {{ user.name.upper() }} fails without data; that is the data's business
    return None


def _compile_message(exc: Exception) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        message = f"line {exc.lineno}: {exc.message or 'syntax error'}"
    elif isinstance(exc, (RecursionError, SyntaxError)):  # Python's "too many nested blocks"
        message = "the template is nested too deeply"
    elif isinstance(exc, MemoryError):
        message = "the template is too large to compile"
    else:
        message = f"cannot compile the template ({type(exc).__name__}: {exc})"
    return _ADDRESS.sub("", message)[:_MAX_MESSAGE]


def _render_message(part: CompiledPart, exc: Exception) -> str:
    if isinstance(exc, (LimitExceeded, jinja2.TemplateError)):
        message = str(exc)
    elif isinstance(exc, RecursionError):
        message = "macros or loops recurse too deeply"
    elif isinstance(exc, MemoryError):
        message = "rendering ran out of memory"
    else:
        message = f"{type(exc).__name__}: {exc}"
    line = _template_line(part.template, exc)
    message = _ADDRESS.sub("", message)  # e.g. "<function f at 0x7f..> is not in list"
    return (f"line {line}: {message}" if line else message)[:_MAX_MESSAGE]


def _template_line(template: Template, exc: BaseException | None) -> int | None:
    """The template line of the innermost frame of the template's own code in `exc`'s traceback.

    Falls back to the exception's context, e.g. the StopIteration behind "generator raised
    StopIteration".
    """
    filename = template.root_render_func.__code__.co_filename
    for _ in range(3):
        if exc is None:
            return None
        code_line, tb = None, exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == filename:
                code_line = tb.tb_lineno
            tb = tb.tb_next
        if code_line:
            return template.get_corresponding_lineno(code_line)
        exc = exc.__cause__ or exc.__context__
    return None
