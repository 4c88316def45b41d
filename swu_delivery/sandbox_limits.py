"""The limits customer templates run under, and the per-render budget that counts against them.

`RenderLimits` holds the numbers. A `RenderBudget` is one render's allowance: loop iterations
and calls (steps), characters of text built, the size of the output, and the deadline. It lives
in a context variable, so a guard deep inside a filter finds it without plumbing, and renders
running at the same time in threads or tasks never share one. The size checks themselves (what
one operator, call or filter may build) are `sandbox_guard.SizeGuard`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COSTLY",
    "LimitExceeded",
    "RenderBudget",
    "RenderLimits",
    "charge",
    "current_budget",
    "guarded_iter",
    "output_too_large",
]

#: characters one render may build through operators, calls and filters, in max_string_lengths
BUILT_FACTOR = 16
#: bigger results also check the deadline: building them takes real time
COSTLY = 64 * 1024
_CHECK_EVERY = 64  # steps between looks at the clock and the output
_SMALL_SEQUENCES = frozenset({list, tuple, str, range, dict})


@dataclass(frozen=True, kw_only=True, slots=True)
class RenderLimits:
    """Per-part limits; the defaults suit transactional email."""

    max_source_bytes: int = 256 * 1024  # per template part
    max_output_bytes: int = 1024 * 1024  # per rendered part
    render_timeout: float = 1.0  # seconds of rendering per part
    compile_timeout: float = 5.0  # guarded compile (TemplateEngine.check)
    compile_memory_bytes: int = 512 * 1024 * 1024
    max_iterations: int = 200_000  # loop iterations and calls per render
    max_string_length: int = 1_000_000  # any string/sequence built by an operator/call/filter
    max_int_bits: int = 4096  # ints built by * and **


class LimitExceeded(Exception):
    """Template code broke a size, time or work limit; surfaces as TemplateRenderError."""


class RenderBudget:
    """What one render may still spend; steps are loop iterations and calls.

    Every 64 steps `check` looks at the clock and at the output gathered so far (`output`,
    the list the root generator is being extended into), so a loop cannot run past the
    deadline or pile up more than max_output_bytes before anybody looks.
    """

    __slots__ = (
        "built_left",
        "counted",
        "deadline",
        "limits",
        "next_check",
        "output",
        "output_size",
        "steps_left",
    )

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.render_timeout
        self.steps_left = limits.max_iterations
        self.next_check = limits.max_iterations - _CHECK_EVERY
        self.built_left = BUILT_FACTOR * limits.max_string_length
        self.output: list[str] | None = None  # set by SizeGuard.render_output
        self.counted = self.output_size = 0

    def spend(self, steps: int) -> None:
        """Count `steps`; every 64 of them, `check` (monotonic() and sum() are not free)."""
        left = self.steps_left - steps
        self.steps_left = left
        if left < 0:
            raise LimitExceeded(
                f"more than {self.limits.max_iterations:,} loop iterations or calls in one render"
            )
        if left <= self.next_check:
            self.next_check = left - _CHECK_EVERY
            self.check()

    def build(self, size: int) -> None:
        """Charge `size` characters built; a render may build only so much text in total."""
        left = self.built_left - size
        self.built_left = left
        if left < 0:
            raise LimitExceeded(
                f"the template built more than {BUILT_FACTOR * self.limits.max_string_length:,}"
                " characters of text in one render"
            )
        if size > COSTLY:
            self.check()

    def check(self) -> None:
        """Raise if the deadline has passed or the output gathered so far is too large."""
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"rendering took longer than {self.limits.render_timeout:g}s")
        output = self.output
        if output is not None and len(output) > self.counted:
            self.output_size += sum(map(len, output[self.counted :]))
            self.counted = len(output)
            if self.output_size > self.limits.max_output_bytes:
                raise output_too_large(self.limits.max_output_bytes)


def output_too_large(limit: int) -> LimitExceeded:
    return LimitExceeded(f"the output is larger than {limit:,} bytes")


_budget: ContextVar[RenderBudget | None] = ContextVar("swu_render_budget", default=None)


def current_budget() -> ContextVar[RenderBudget | None]:
    """The context variable holding the running render's budget (None while compiling)."""
    return _budget


def charge(size: int) -> None:
    """Charge `size` characters built to the running render, if any."""
    budget = _budget.get()
    if budget is not None:
        budget.build(size)


def guarded_iter(iterable: Iterable[Any]) -> Iterable[Any]:
    """The iterable of a template ``for`` loop, each item counted against the render's budget."""
    budget = _budget.get()
    if budget is None:  # outside a render (compile time): nothing to count against
        return iterable
    if type(iterable) in _SMALL_SEQUENCES and len(iterable) <= _CHECK_EVERY:  # type: ignore[arg-type]
        budget.spend(len(iterable))  # type: ignore[arg-type]
        return iterable  # at most 64 body runs: as often as a long loop is checked anyway
    return _counted(iterable, budget)


def _counted(iterable: Iterable[Any], budget: RenderBudget) -> Iterator[Any]:
    n = 0
    for item in iterable:
        n += 1
        if n == _CHECK_EVERY:
            budget.spend(n)
            n = 0
        yield item
    if n:
        budget.spend(n)
