"""The sandbox's filter table: Jinja's filters, minus pprint and urlize, each one guarded.

Filters that turn values into text print through `SizeGuard.printable` (so ``range|string``
cannot print ``<function ... at 0x7f...>``); filters that build a string or a list charge it to
the render; filters that take a width or a count have it bounded before they allocate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, cast

from jinja2 import filters as jinja_filters
from jinja2.exceptions import FilterArgumentError, SecurityError
from jinja2.nodes import EvalContext
from jinja2.runtime import Undefined
from jinja2.utils import pass_environment, pass_eval_context, url_quote
from markupsafe import Markup, escape, soft_str

from swu_delivery.sandbox_guard import SizeGuard
from swu_delivery.sandbox_limits import current_budget

__all__ = ["TEXT_FILTERS", "guarded_filters"]

Filter = Callable[..., Any]

#: kept as they are: they return a number, a value they were given, or a lazy iterator
_AS_IS = [
    *("abs", "attr", "count", "d", "default", "filesizeformat", "first", "float", "int"),
    *("items", "last", "length", "map", "max", "min", "random", "reject", "rejectattr"),
    *("select", "selectattr", "wordcount"),
]
#: they build a new list or string from their input: kept, with the result charged
_BUILDING: dict[str, Filter] = {
    "dictsort": jinja_filters.do_dictsort,
    "groupby": jinja_filters.sync_do_groupby,
    "list": jinja_filters.sync_do_list,
    "reverse": jinja_filters.do_reverse,
    "sort": jinja_filters.do_sort,
    "unique": jinja_filters.sync_do_unique,
}
#: one-argument text filters: print the value, apply, charge the result
_TEXT = {
    "capitalize": jinja_filters.do_capitalize,
    "e": escape,
    "escape": escape,
    "forceescape": jinja_filters.do_forceescape,
    "lower": jinja_filters.do_lower,
    "safe": Markup,
    "string": soft_str,
    "striptags": jinja_filters.do_striptags,
    "title": jinja_filters.do_title,
    "upper": jinja_filters.do_upper,
}
# Dropped: pprint (prints Python reprs) and urlize (builds HTML from text; not for templates).
#: filters that always return (already charged) text, so their output skips the finalize
TEXT_FILTERS = frozenset(
    [
        *_TEXT,
        *("center", "filesizeformat", "format", "indent", "join", "replace", "tojson", "trim"),
        *("truncate", "urlencode", "wordwrap", "xmlattr"),
    ]
)
_MAX_JSON_INDENT = 64
_MAX_ROUND_DIGITS = 400


def guarded_filters(guard: SizeGuard) -> dict[str, Filter]:
    """The filter table for environments guarded by `guard`."""
    table: dict[str, Filter] = {name: jinja_filters.FILTERS[name] for name in _AS_IS}
    table.update({name: _charged_filter(guard, func) for name, func in _BUILDING.items()})
    table.update({name: _text_filter(guard, func) for name, func in _TEXT.items()})
    table.update(_sized_filters(guard))
    return table


def _charged_filter(guard: SizeGuard, func: Filter) -> Filter:
    built = guard.built

    @functools.wraps(func)  # keeps Jinja's pass_environment / pass_context marker
    def charged_filter(*args: Any, **kwargs: Any) -> Any:
        return built(func(*args, **kwargs))

    return charged_filter


def _text_filter(guard: SizeGuard, func: Filter) -> Filter:
    printable, built = guard.printable, guard.built

    def text_filter(value: Any) -> Any:
        rv = func(value if type(value) is str else printable(value))
        return built(rv)

    return text_filter


def _sized_filters(guard: SizeGuard) -> dict[str, Filter]:
    printable, built, bound = guard.printable, guard.built, guard.bound
    fixed_size_formats = guard.fixed_size_formats

    def text(value: Any) -> str:
        return value if type(value) is str else printable(value)

    def center(value: Any, width: int = 80) -> str:
        return built(text(value).center(bound(width, "a centered string")))

    def format_(value: Any, *args: Any, **kwargs: Any) -> str:
        if args and kwargs:
            raise FilterArgumentError(
                "can't handle positional and keyword arguments at the same time"
            )
        fmt = value if type(value) is str else printable(value)
        if fmt in fixed_size_formats:
            rv = fmt % (kwargs or args)
            return built(rv)
        return guard.percent_format(fmt, kwargs or args)

    def indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        s = text(s)
        unit = len(width) if isinstance(width, str) else bound(width, "an indent")
        size = len(s) + (s.count("\n") + 1) * unit
        if size > guard.max_len:
            raise guard.refuse_size("an indented string", size)
        return built(jinja_filters.do_indent(s, width, first, blank))

    @pass_eval_context
    def join(
        eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: Any = None
    ) -> str:
        if attribute is not None:
            getter = jinja_filters.make_attrgetter(eval_ctx.environment, attribute)
            value = map(getter, value)
        items = [item if isinstance(item, str) else printable(item) for item in value]
        d = text(d)
        size = sum(map(len, items)) + len(d) * max(len(items) - 1, 0)
        if size > guard.max_len:
            raise guard.refuse_size("a joined string", size)
        return built(jinja_filters.sync_do_join(eval_ctx, items, d))

    @pass_eval_context
    def replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: Any = None) -> str:
        s, old, new = text(s), text(old), text(new)
        guard.check_replace(s, old, new, count)
        return built(jinja_filters.do_replace(eval_ctx, s, old, new, count))

    def round_(value: Any, precision: int = 0, method: str = "common") -> float:
        if isinstance(precision, int) and abs(precision) > _MAX_ROUND_DIGITS:
            raise SecurityError(f"round() precision must be within ±{_MAX_ROUND_DIGITS}")
        return jinja_filters.do_round(value, precision, method)  # type: ignore[arg-type]

    def batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[Any]:
        rows = jinja_filters.do_batch(value, bound(linecount, "a batch"), fill_with)
        return map(built, rows)

    def slice_(value: Iterable[Any], slices: int, fill_with: Any = None) -> Iterator[Any]:
        budget = current_budget().get()
        if budget is not None and isinstance(slices, int):
            budget.spend(max(slices, 0))  # do_slice loops `slices` times in Python
        columns = jinja_filters.sync_do_slice(cast(Collection[Any], value), slices, fill_with)
        return map(built, columns)

    @pass_environment
    def sum_(env: Any, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
        if not isinstance(start, (int, float)):  # summing lists or strings is quadratic
            raise SecurityError("sum() start must be a number")
        return jinja_filters.sync_do_sum(env, iterable, attribute, start)

    @pass_eval_context
    def tojson(eval_ctx: EvalContext, value: Any, indent: int | None = None) -> Markup:
        if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 64):
            raise SecurityError(f"tojson indent must be an int from 0 to {_MAX_JSON_INDENT}")
        size = guard.measure(value, guard.max_len)[0]
        if size > guard.max_len:
            raise guard.refuse_size("a JSON document", size)
        return built(jinja_filters.do_tojson(eval_ctx, value, indent))

    def trim(value: Any, chars: Any = None) -> str:
        return built(text(value).strip(None if chars is None else text(chars)))

    @pass_environment
    def truncate(
        env: Any, s: Any, length: int = 255, killwords: bool = False, end: Any = "...",
        leeway: int | None = None,
    ) -> str:  # fmt: skip
        s = s if type(s) is str else printable(s)
        end = end if type(end) is str else printable(end)
        return built(jinja_filters.do_truncate(env, s, length, killwords, end, leeway))

    def urlencode(value: Any) -> str:
        if type(value) is str:
            rv = url_quote(value)
            return built(rv)
        if isinstance(value, Mapping):
            value = {text(k): text(v) for k, v in value.items()}
        elif isinstance(value, (list, tuple)):
            value = [(text(k), text(v)) for k, v in value]
        else:
            value = text(value)
        return built(jinja_filters.do_urlencode(value))

    @pass_environment
    def wordwrap(
        env: Any, s: Any, width: int = 79, break_long_words: bool = True,
        wrapstring: Any = None, break_on_hyphens: bool = True,
    ) -> str:  # fmt: skip
        s = text(s)
        sep = env.newline_sequence if wrapstring is None else text(wrapstring)
        lines = len(s) // max(width, 1) + s.count("\n") + 1 if isinstance(width, int) else len(s)
        if len(s) + lines * len(sep) > guard.max_len:
            raise guard.refuse_size("a wrapped string", len(s) + lines * len(sep))
        rv = jinja_filters.do_wordwrap(env, s, width, break_long_words, sep, break_on_hyphens)
        return built(rv)

    @pass_eval_context
    def xmlattr(eval_ctx: EvalContext, d: Mapping[str, Any], autospace: bool = True) -> str:
        values = {k: v if v is None or isinstance(v, Undefined) else text(v) for k, v in d.items()}
        return built(jinja_filters.do_xmlattr(eval_ctx, values, autospace))

    return {
        "batch": batch,
        "center": center,
        "format": format_,
        "indent": indent,
        "join": join,
        "replace": replace,
        "round": round_,
        "slice": slice_,
        "sum": sum_,
        "tojson": tojson,
        "trim": trim,
        "truncate": truncate,
        "urlencode": urlencode,
        "wordwrap": wordwrap,
        "xmlattr": xmlattr,
    }
