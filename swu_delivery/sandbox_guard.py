"""Size-checked operations for template code: operators, text conversion and formatting.

A `SizeGuard` holds one set of `RenderLimits`. No operator, call or filter may build a string,
list or int above them, and where one step could explode (``'a' * n``, ``9 ** n``,
``'%0999999999d'``, ``'{:>999999999}'``) the size is checked *before* building; what was built
is charged to the running render's budget. It also decides what may be printed at all: scalars
and containers of scalars, never the repr of a function, a loop or a macro.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from jinja2.exceptions import SecurityError
from jinja2.runtime import Undefined
from jinja2.utils import Namespace
from markupsafe import Markup, escape

from swu_delivery.sandbox_limits import (
    COSTLY,
    LimitExceeded,
    RenderBudget,
    RenderLimits,
    charge,
    current_budget,
    guarded_iter,
    output_too_large,
)

__all__ = ["SMALL_TEXT", "SizeGuard"]

T = TypeVar("T", bound=str)
V = TypeVar("V")

#: root output up to this long is not charged (it is sized with the output); longer is
SMALL_TEXT = 256
#: what a built object costs beyond its characters, roughly CPython's str/list header
OBJECT_OVERHEAD = 64
#: the printed size of any number: %d of a 4300-digit int (Python's own cap) or %f of 1e308
_NUMBER_TEXT = 4400
_SCALARS = frozenset({str, Markup, int, float, bool, type(None)})
_PERCENT = re.compile(r"%(?:\(([^()]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.S)
_DIGITS = re.compile(r"\d+")
_budget = current_budget()


class SizeGuard:
    """Size checks, checked operators and safe text conversion for one set of limits."""

    loop = staticmethod(guarded_iter)

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.max_len = limits.max_string_length
        self._percent_cache: dict[str, tuple[int, tuple[tuple[str | None, str, str, str], ...]]]
        self._percent_cache = {}
        #: formats whose size does not depend on the args ("%.2f"): the format filter's fast path
        self.fixed_size_formats: set[str] = set()

    # -- sizes -----------------------------------------------------------------------------

    def refuse_size(self, what: str, size: int, limit: int | None = None) -> LimitExceeded:
        return LimitExceeded(
            f"{what} would be {size:,} long; the limit is {limit or self.max_len:,}"
        )

    def bound(self, n: V, what: str) -> V:
        """Check a size argument (a width, a count) before it is used."""
        if isinstance(n, int) and abs(n) > self.max_len:
            raise self.refuse_size(what, abs(n))
        return n

    def built(self, value: V) -> V:
        """Check and charge a freshly built string, list, tuple or dict; other values pass.

        Every one is charged, small ones too (with their object overhead): a recursive macro
        whose body builds thousands of small strings would otherwise hold gigabytes unseen.
        """
        if type(value) is str or isinstance(value, (str, list, tuple, dict)):
            size = len(value)  # type: ignore[arg-type]
            if size > self.max_len:
                raise self.refuse_size(f"a {type(value).__name__}", size)
            budget = _budget.get()
            if budget is not None:  # RenderBudget.build, inlined: this runs per filter call
                budget.built_left -= size + OBJECT_OVERHEAD
                if budget.built_left < 0:
                    budget.build(0)  # raises
                if size > COSTLY:
                    budget.check()
        return value

    def measure(self, value: Any, cap: int) -> tuple[int, bool]:
        """The size of `value` (stops past `cap`) and whether all its leaves are scalars.

        Size is the characters of its strings plus one per other item, counted as often as an
        item is referenced: ``[l, l]`` twice the size of ``l``, as printing or JSON would see it.
        """
        size, plain, stack = 0, True, [value]
        while stack and size <= cap:
            item = stack.pop()
            if isinstance(item, (list, tuple, dict)):
                children: Iterable[Any] = item
                if isinstance(item, dict):
                    children = [*item.keys(), *item.values()]
                size += 1 + 2 * len(item) if isinstance(item, dict) else 1 + len(item)
                if size > cap:
                    break
                for child in children:  # scalars inline: lists of them are the common case
                    kind = type(child)
                    if kind is str or kind is Markup:
                        size += len(child)
                    elif kind not in _SCALARS:
                        stack.append(child)
            elif type(item) in _SCALARS or isinstance(item, (str, Undefined)):
                size += len(item) if isinstance(item, str) else 1
            elif isinstance(item, Namespace):
                plain = False
                stack.append(object.__getattribute__(item, "_Namespace__attrs"))
            elif isinstance(item, range):
                plain, size = False, size + len(item)
            else:
                plain, size = False, size + 1
        return size, plain

    def check_namespace(self, attrs: Mapping[str, Any]) -> None:
        """A namespace attribute, with everything it references, must stay within the limit."""
        for name, value in attrs.items():
            if type(value) not in _SCALARS or (type(value) is str and len(value) > 64):
                size = self.measure(value, self.max_len)[0]
                if size > self.max_len:
                    raise self.refuse_size(f"namespace attribute {name!r}", size)

    def check_replace(self, s: Any, old: Any, new: Any, count: Any) -> None:
        """``s.replace(old, new, count)`` must not outgrow the limit (``''`` matches everywhere)."""
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            hits = s.count(old) if old else len(s) + 1
            if isinstance(count, int) and count >= 0:
                hits = min(hits, count)
            size = len(s) + hits * max(len(new) - len(old), 0)
            if size > self.max_len:
                raise self.refuse_size("a replaced string", size)

    # -- text ------------------------------------------------------------------------------

    def printable(self, value: Any) -> str:
        """`value` as text for mail, refusing objects whose str() is a Python repr."""
        kind = type(value)
        if kind is str or kind is Markup:
            return value  # type: ignore[no-any-return]
        self.check_plain(value)
        return str(value)

    def check_plain(self, value: Any) -> None:
        """Raise unless `value` prints as text: a scalar, or a list/tuple/dict of scalars."""
        if type(value) in _SCALARS or isinstance(value, (str, Undefined)):
            return
        if isinstance(value, (list, tuple, dict)):
            size, plain = self.measure(value, self.max_len)
            if plain:
                if size > self.max_len:
                    raise self.refuse_size(f"printing a {type(value).__name__}", size)
                return
        raise SecurityError(f"cannot print a {type(value).__name__} value")

    def out_text(self, value: Any) -> str:
        """Finalize one ``{{ }}`` of a text part (fast paths first: this runs per expression)."""
        kind = type(value)
        if kind is str and len(value) <= SMALL_TEXT:
            return value  # type: ignore[no-any-return]
        if kind is int or kind is float:
            return str(value)
        return self._charged(self.printable(value), SMALL_TEXT)

    def out_html(self, value: Any) -> Markup:
        """Finalize and escape one ``{{ }}`` of an HTML part; escaping copies, so charge it."""
        kind = type(value)
        if kind is str and len(value) <= SMALL_TEXT:
            return escape(value)
        if kind is int or kind is float:
            return Markup(value)
        return self._charged(escape(self.printable(value)), SMALL_TEXT)

    def out_text_buffered(self, value: Any) -> str:
        """Like out_text inside a macro/block buffer, which grows unseen: charge everything."""
        return self._charged(self.printable(value), 0)

    def out_html_buffered(self, value: Any) -> Markup:
        return self._charged(escape(self.printable(value)), 0)

    def out_volatile(self, autoescape: bool, buffered: bool, value: Any) -> str:
        """Output under ``{% autoescape %}`` whose value is known only at run time."""
        text = self.printable(value)
        return self._charged(escape(text) if autoescape else text, 0 if buffered else SMALL_TEXT)

    @staticmethod
    def _charged(text: T, free: int) -> T:
        if len(text) > free:
            charge(len(text))
        return text

    def concat(self, pieces: tuple[Any, ...], autoescape: bool) -> str:
        """The ``~`` operator: sized before joining, so ``s ~ s`` cannot double forever."""
        texts = [self.printable(piece) for piece in pieces]
        size = sum(map(len, texts))
        if size > self.max_len:
            raise self.refuse_size("a string built with ~", size)
        if autoescape and any(isinstance(text, Markup) for text in texts):
            return self.built(Markup("").join(texts))
        return self.built("".join(texts))

    def render_output(self, chunks: Iterator[str], budget: RenderBudget) -> str:
        """Gather the root generator's output where `budget.check` can watch it grow."""
        output: list[str] = []
        budget.output = output
        output.extend(chunks)
        rv = "".join(output)
        limit = self.limits.max_output_bytes
        if len(rv) > limit or (
            not rv.isascii() and len(rv.encode("utf-8", "surrogatepass")) > limit
        ):
            raise output_too_large(limit)
        return rv

    def join_buffer(self, chunks: Iterable[str]) -> str:
        """Environment.concat: a macro's or block's output, sized before it is joined."""
        chunks = chunks if isinstance(chunks, list) else list(chunks)
        size, limit = sum(map(len, chunks)), self.limits.max_output_bytes
        if size > limit:
            raise LimitExceeded(f"a macro or block output is larger than {limit:,} bytes")
        return "".join(chunks)

    # -- operators -------------------------------------------------------------------------

    def mul(self, left: Any, right: Any) -> Any:
        if type(left) is float or type(right) is float:  # the common case: price * qty
            return left * right
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > self.limits.max_int_bits:
                raise self.refuse_size("an int", bits, self.limits.max_int_bits)
            return left * right
        if isinstance(left, int):
            left, right = right, left
        if isinstance(right, int) and isinstance(left, (str, list, tuple)):
            unit = len(left) if isinstance(left, str) else self.measure(left, self.max_len)[0]
            if unit * right > self.max_len:
                raise self.refuse_size(f"a repeated {type(left).__name__}", unit * right)
            return self.built(left * right)
        return left * right

    def power(self, base: Any, exponent: Any) -> Any:
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
            bits = self.limits.max_int_bits
            if exponent > bits or exponent * math.log2(abs(base)) > bits:
                raise LimitExceeded(f"an int power would have more than {bits} bits")
        return base**exponent

    def add(self, left: Any, right: Any) -> Any:
        if isinstance(left, str) and isinstance(right, str):
            if len(left) + len(right) > self.max_len:
                raise self.refuse_size("a string", len(left) + len(right))
            return self.built(left + right)
        if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            size = self.measure(left, self.max_len)[0] + self.measure(right, self.max_len)[0]
            if size > self.max_len:
                raise self.refuse_size(f"a {type(left).__name__}", size)
            return self.built(operator.add(left, right))
        return left + right

    def mod(self, left: Any, right: Any) -> Any:
        if isinstance(left, str):
            return self.percent_format(left, right)
        return left % right

    def floordiv(self, left: Any, right: Any) -> Any:
        return left // right

    # -- formatting ------------------------------------------------------------------------

    def percent_format(self, fmt: str, args: Any) -> str:
        """``fmt % args`` (the ``%`` operator and the ``format`` filter) with its size bounded."""
        static, specs = self._percent_cache.get(fmt) or self._parse_percent(fmt)
        if specs or static > self.max_len:
            size = static + self._percent_args_size(specs, args)
            if size > self.max_len:
                raise self.refuse_size("a %-formatted string", size)
        rv: str = fmt % args
        return self.built(rv)

    def _parse_percent(self, fmt: str) -> tuple[int, tuple[tuple[str | None, str, str, str], ...]]:
        """Size of `fmt` with fixed-width numbers, and the specs whose size depends on args."""
        cached = self._percent_cache.get(fmt)
        if cached is not None:
            return cached
        static, specs = len(fmt), []
        for match in _PERCENT.finditer(fmt):
            key, width, precision, conversion = match.groups()
            if conversion not in "diouxXeEfFgGcrsa%" or not conversion:
                raise SecurityError("unsupported %-format specification")
            fixed = [int(n) for n in (width, precision) if n and n.isdigit()]
            if any(n > self.max_len for n in fixed):
                raise self.refuse_size("a %-format width", max(fixed))
            static += sum(fixed)
            if conversion in "rsa" or "*" in (width, precision) or key is not None:
                specs.append((key, width or "", precision or "", conversion))
            elif conversion != "%":
                static += _NUMBER_TEXT
        if len(self._percent_cache) > 1024:
            self._percent_cache.clear()
            self.fixed_size_formats.clear()
        self._percent_cache[fmt] = result = static, tuple(specs)
        if not specs and static <= self.max_len:
            self.fixed_size_formats.add(fmt)
        return result

    def _percent_args_size(
        self, specs: tuple[tuple[str | None, str, str, str], ...], args: Any
    ) -> int:
        if any(key is not None for key, *_ in specs):
            mapping = args if isinstance(args, Mapping) else {}
            values: Iterator[Any] = iter(())
        else:
            mapping, values = {}, iter(args if isinstance(args, tuple) else (args,))
        size = 0
        for key, width, precision, conversion in specs:
            for star in (width, precision):
                if star == "*":
                    size += abs(self.bound(next(values, 0), "a %-format width"))
            value = mapping.get(key) if key is not None else next(values, "")
            if conversion in "rsa":
                size += 4 * len(self.printable(value)) + 2
            else:
                size += _NUMBER_TEXT
        return size

    def check_format_spec(self, spec: str) -> None:
        """A str.format spec such as ``>999999999`` must not ask for a huge width."""
        sizes = [len(digits) for digits in _DIGITS.findall(spec)]
        if sizes and (max(sizes) > 9 or sum(map(int, _DIGITS.findall(spec))) > self.max_len):
            raise LimitExceeded(f"format spec {spec[:40]!r} asks for more than {self.max_len:,}")

    def limited_range(self, *args: int) -> range:
        """The ``range`` global: at most max_iterations long; loops over it are counted."""
        rng = range(*args)
        if len(rng) > self.limits.max_iterations:
            raise self.refuse_size("a range", len(rng), self.limits.max_iterations)
        return rng
