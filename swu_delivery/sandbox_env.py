"""The hardened Jinja environment that customer templates compile and run in.

It is an `ImmutableSandboxedEnvironment` whose code generator routes template code through
`SizeGuard`: every ``{{ }}`` through a finalize that refuses Python objects, ``* ** % + //``
and ``~`` through size-checked operators, every ``for`` through an iteration counter. Nothing
is folded at compile time (``{{ 'a' * 10**10 }}`` cannot hang the compiler), and templates are
self-contained: include, import, extends and ``self`` are refused at compile time.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from functools import update_wrapper
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateNotFound
from jinja2.loaders import BaseLoader
from jinja2.runtime import Context, LoopContext, Macro, Undefined
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEnvironment,
    SandboxedFormatter,
)
from jinja2.utils import Namespace
from markupsafe import EscapeFormatter, Markup

from swu_delivery.sandbox_filters import TEXT_FILTERS, guarded_filters
from swu_delivery.sandbox_guard import SizeGuard
from swu_delivery.sandbox_limits import RenderLimits, current_budget, guarded_iter

__all__ = ["GuardedEnvironment"]

_budget = current_budget()
#: names the generated module binds once, so the hot paths are plain global calls
_GUARD_ALIASES = [
    *("add", "built", "concat", "floordiv", "loop", "mod", "mul", "power"),
    *("out_html", "out_html_buffered", "out_text", "out_text_buffered", "out_volatile"),
]
_REFUSED_TAGS: dict[type[nodes.Node], str] = {
    nodes.Extends: "extends",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from ... import",
}
_NEVER_MUTABLE = frozenset(
    {str, Markup, int, float, bool, tuple, range, LoopContext, Macro, Undefined}
)
_DICT_ATTRIBUTES = frozenset(dir({}))
#: str methods that amplify without a size argument to check, or are no use in a template
_REFUSED_STR_METHODS = frozenset(
    {"encode", "expandtabs", "format", "format_map", "maketrans", "translate"}
)


def _guarded_binop(name: str) -> Callable[[GuardedCodeGenerator, nodes.BinExpr, Frame], None]:
    def visit(self: GuardedCodeGenerator, node: nodes.BinExpr, frame: Frame) -> None:
        self.write(f"swu_{name}(")
        self.visit(node.left, frame)
        self.write(", ")
        self.visit(node.right, frame)
        self.write(")")

    return visit


class GuardedCodeGenerator(CodeGenerator):
    """Jinja's code generator, emitting calls into `SizeGuard` at the dangerous spots."""

    visit_Add = _guarded_binop("add")
    visit_FloorDiv = _guarded_binop("floordiv")
    visit_Mod = _guarded_binop("mod")
    visit_Mul = _guarded_binop("mul")
    visit_Pow = _guarded_binop("power")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop_iterables: set[int] = set()  # ids of For.iter nodes, wrapped in swu_loop()

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for tag in node.find_all(tuple(_REFUSED_TAGS)):
            self.fail(
                f"{{% {_REFUSED_TAGS[type(tag)]} %}} is not allowed: templates are self-contained",
                tag.lineno,
            )
        for name in node.find_all(nodes.Name):
            if name.name == "self":
                self.fail("'self' is not available in templates", name.lineno)
        super().visit_Template(node, frame)
        for alias in _GUARD_ALIASES:
            self.writeline(f"swu_{alias} = environment.guard.{alias}")

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._loop_iterables.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        # Jinja forbids custom node types, so a loop's iterable is recognised by identity.
        if id(node) not in self._loop_iterables:
            return super().visit(node, *args, **kwargs)
        self.write("swu_loop(")
        super().visit(node, *args, **kwargs)
        self.write(")")
        return None

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            return super().visit_Getitem(node, frame)
        self.write("swu_built(")  # a slice copies: charge it like any string the template builds
        super().visit_Getitem(node, frame)
        self.write(")")
        return None

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("swu_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        if frame.eval_ctx.volatile:
            self.write("), context.eval_ctx.autoescape)")
        else:
            self.write(f"), {bool(frame.eval_ctx.autoescape)})")

    def _make_finalize(self) -> CodeGenerator._FinalizeInfo:
        # No compile-time finalize: only literal template text is folded into constants.
        return self._FinalizeInfo(None, None)

    def _output_child_pre(
        self, node: nodes.Expr, frame: Frame, finalize: CodeGenerator._FinalizeInfo
    ) -> None:
        buffered = frame.buffer is not None
        if frame.eval_ctx.volatile:
            self.write(f"swu_out_volatile(context.eval_ctx.autoescape, {buffered}, ")
        elif not buffered and isinstance(node, nodes.Filter) and node.name in TEXT_FILTERS:
            self.write("escape(" if frame.eval_ctx.autoescape else "str(")  # text already
        else:
            kind = "html" if frame.eval_ctx.autoescape else "text"
            self.write(f"swu_out_{kind}{'_buffered' if buffered else ''}(")

    def _output_child_post(
        self, node: nodes.Expr, frame: Frame, finalize: CodeGenerator._FinalizeInfo
    ) -> None:
        self.write(")")


class _SelfContained(BaseLoader):
    """The loader of an environment whose templates may only read themselves."""

    def get_source(self, environment: Any, template: str) -> tuple[str, str | None, None]:
        raise TemplateNotFound(template, "templates are self-contained; nothing can be loaded")


class _LimitedFormatter(SandboxedFormatter):
    """str.format for templates: no huge widths, no reprs of Python objects, sized output."""

    _env: GuardedEnvironment
    _size = 0

    def vformat(self, format_string: str, args: Sequence[Any], kwargs: Any) -> str:
        self._size = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            self._env.guard.printable(value)  # !r / !s / !a of a function would leak a repr
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        guard = self._env.guard
        if format_spec:
            guard.check_format_spec(format_spec)
        else:
            value = guard.printable(value)
        rv = super().format_field(value, format_spec)
        self._size += len(rv)
        if self._size > guard.max_len:
            raise guard.refuse_size("a formatted string", self._size)
        return rv


class _LimitedEscapeFormatter(_LimitedFormatter, EscapeFormatter):
    pass


def _template_globals(guard: SizeGuard) -> dict[str, Any]:
    """range, dict and namespace: the only globals; lipsum, cycler and joiner are no use in mail."""

    def range_(*args: int) -> range:
        """At most max_iterations long; loops over it are counted."""
        return guard.limited_range(*args)

    def dict_(*args: Any, **kwargs: Any) -> dict[Any, Any]:
        """A new dict; the dict type itself would offer ``dict.update(data, ...)``."""
        return guard.built(dict(*args, **kwargs))

    class GuardedNamespace(Namespace):
        """A namespace whose attributes cannot grow past max_string_length in size.

        A namespace is the only state a loop iteration can leave to the next, so bounding
        it bounds what a loop can pile up (``{% set ns.l = [ns.l, ns.l ~ x] %}``).
        """

        def __init__(*args: Any, **kwargs: Any) -> None:  # self in args: a kwarg may be "self"
            Namespace.__init__(*args, **kwargs)
            guard.check_namespace(object.__getattribute__(args[0], "_Namespace__attrs"))

        def __setitem__(self, name: str, value: Any) -> None:
            guard.check_namespace({name: value})
            super().__setitem__(name, value)

    return {"range": range_, "dict": dict_, "namespace": GuardedNamespace}


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox for one autoescape mode, holding the `SizeGuard` its templates call."""

    code_generator_class = GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+", "//"})  # also stops constant folding

    def __init__(self, limits: RenderLimits, *, autoescape: bool) -> None:
        super().__init__(
            autoescape=autoescape,
            auto_reload=False,
            optimized=False,  # the optimizer folds constants, e.g. 'x'|center(999999) into code
            loader=_SelfContained(),
            keep_trailing_newline=False,  # editors add one; subjects must not end with it
        )
        self.guard = guard = SizeGuard(limits)
        self.concat = guard.join_buffer  # type: ignore[method-assign]
        self.filters = guarded_filters(guard)
        self.globals.clear()
        self.globals.update(_template_globals(guard))
        self.binop_table = {
            "+": guard.add,
            "-": self.binop_table["-"],
            "*": guard.mul,
            "/": self.binop_table["/"],
            "//": guard.floordiv,
            "**": guard.power,
            "%": guard.mod,
        }

    def getattr(self, obj: Any, attribute: str) -> Any:
        """``obj.attr``; for JSON data (dicts) the key is looked up without a costly exception.

        Same result as Jinja's: a dict's own attributes (``d.items``) still win over its keys.
        """
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if type(obj) in _NEVER_MUTABLE:  # skip the immutable sandbox's slow ABC checks
            return SandboxedEnvironment.is_safe_attribute(self, obj, attr, value)
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's str.format sandboxing, with `_LimitedFormatter` doing the formatting."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or (
            value.__name__ not in ("format", "format_map")
        ):
            return None
        owner = value.__self__
        if not isinstance(owner, str):
            return None
        is_format_map = value.__name__ == "format_map"
        formatter: _LimitedFormatter
        if isinstance(owner, Markup):
            formatter = _LimitedEscapeFormatter(self, escape=owner.escape)
        else:
            formatter = _LimitedFormatter(self)
        kind, built = type(owner), self.guard.built

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                return built(kind(formatter.vformat(owner, (), args[0])))
            return built(kind(formatter.vformat(owner, args, kwargs)))

        return update_wrapper(wrapper, value)

    def call(
        __self,  # Jinja's signature: names that cannot clash with the call's kwargs
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Call from template code: counted as a step, sizes checked, the result charged."""
        budget = _budget.get()
        if budget is not None:
            budget.spend(1)
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"calling a {type(__obj).__name__} is not allowed")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, int)) or owner is Markup:  # Markup.escape is a classmethod
            args = __self._checked_method_args(owner, __obj.__name__, args, kwargs)
        elif type(__obj) is LoopContext and args:  # loop(children) of a recursive loop
            args = (guarded_iter(args[0]), *args[1:])
        rv = __context.call(__obj, *args, **kwargs)
        return __self.guard.built(rv)

    def _checked_method_args(
        self, owner: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...]:
        """Check a str/Markup/int method call: no huge sizes, no Python objects made text."""
        guard, text_method = self.guard, not isinstance(owner, int)
        if text_method and name in _REFUSED_STR_METHODS:
            raise SecurityError(f"str.{name}() is not available in templates")
        if text_method and name == "join" and args:  # materialize, then size (and check) it
            items = list(args[0])
            size = guard.measure(items, guard.max_len)[0] + len(owner) * max(len(items) - 1, 0)
            if size > guard.max_len:
                raise guard.refuse_size("a joined string", size)
            args = (items, *args[1:])
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int):
                guard.bound(arg, f"an argument of {name}()")
            elif not isinstance(arg, str):  # Markup.escape/join would print a function's repr
                guard.check_plain(arg)
        if text_method and name == "replace" and len(args) >= 2:
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            guard.check_replace(owner, args[0], args[1], count)
        return args
