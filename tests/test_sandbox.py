"""Pure-function tests of the template sandbox: rendering, escapes, leaks, DoS payloads, check()."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jinja2
import pytest

from swu_delivery.errors import TemplateRenderError, TemplateSyntaxError
from swu_delivery.sandbox import RenderLimits, TemplateEngine

BENCH = Path(os.environ.get("SWU_BENCH_DIR", "/work/shared/bench"))
BENCH_PARTS = ["order_shipped.subject.txt", "order_shipped.html", "order_shipped.text.txt"]
#: fragments of Python reprs that must never reach a mail
REPR_MARKERS = ("0x", "<function", "<class", "<built-in", "<module", "<bound", "Template")
#: in-process guards off: what check() must then stop on its own
LAX = RenderLimits(
    max_iterations=10**12,
    max_string_length=10**12,
    max_int_bits=10**12,
    render_timeout=1000.0,
    compile_timeout=1.0,
    compile_memory_bytes=256 * 1024 * 1024,
)


@pytest.fixture(scope="module")
def engine() -> Iterator[TemplateEngine]:
    engine = TemplateEngine()
    yield engine
    engine.close()


def render(engine: TemplateEngine, source: str, data: Any = None, *, html: bool = False) -> str:
    part = engine.compile(source, name="html" if html else "text", autoescape=html)
    return engine.render(part, data or {})


def assert_no_repr(text: str) -> None:
    assert not any(marker in text for marker in REPR_MARKERS), text


# -- normal templates -------------------------------------------------------------------------


def test_loops_filters_macros_and_set_render(engine: TemplateEngine) -> None:
    """Everyday template features render as in Jinja."""
    source = (
        "{% macro line(item) %}<{{ item.name|title }}>{% endmacro %}"
        "{% set total = items|map(attribute='qty')|sum %}"
        "{% for item in items %}{{ loop.index }}. {{ item.name|title }} x{{ item.qty }}"
        " {{ '%.2f'|format(item.price * item.qty) }}{% if not loop.last %}, {% endif %}"
        "{% endfor %} | {{ total }} | {{ user.name|default('friend')|upper }}"
        " | {{ 'a long sentence here'|truncate(12, leeway=0) }} | {{ 2.567|round(1) }}"
        " | {{ items|map(attribute='name')|join('/') }} | {{ line(items[0]) }}"
        "{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}{% endfor %}"
        " | {{ ns.n }} | {{ dict(a=1)['a'] }} | {{ 'x' ~ 1 }} | {{ '{}!'.format('hi') }}"
    )
    items = [{"name": "red hat", "qty": 2, "price": 1.5}, {"name": "cap", "qty": 1, "price": 3}]
    data = {"items": items, "user": {}}
    assert render(engine, source, data) == (
        "1. Red Hat x2 3.00, 2. Cap x1 3.00 | 3 | FRIEND | a long... | 2.6 | red hat/cap"
        " | <Red Hat> | 3 | 1 | x1 | hi!"
    )


def test_dict_attributes_still_win_over_keys(engine: TemplateEngine) -> None:
    """The fast path for dict data keeps Jinja's rule: ``d.items`` is the method, not the key."""
    data = {"d": {"items": 5, "x": 1}}
    source = "{{ d.items is callable }}|{{ d.x }}|{{ d['items'] }}|{{ d.nope }}"
    assert render(engine, source, data) == "True|1|5|"


def test_missing_variables_render_empty(engine: TemplateEngine) -> None:
    """Undefined names and attributes print nothing, as Handlebars users expect."""
    assert render(engine, "[{{ nope }}{{ user.name }}{{ user['x'] }}]", {"user": {}}) == "[]"


def test_html_part_escapes_data(engine: TemplateEngine) -> None:
    """Data is HTML-escaped in the HTML part, while `safe` and markup in the template are kept."""
    data = {"name": "<b>Jo & Co</b>", "raw": "<i>x</i>"}
    source = "<p>{{ name }} {{ raw|safe }} {{ name ~ '!' }}</p>"
    assert render(engine, source, data, html=True) == (
        "<p>&lt;b&gt;Jo &amp; Co&lt;/b&gt; <i>x</i> &lt;b&gt;Jo &amp; Co&lt;/b&gt;!</p>"
    )


def test_text_parts_do_not_escape(engine: TemplateEngine) -> None:
    """Subject and text parts print data as is."""
    assert render(engine, "Hi {{ name }}", {"name": "<Jo & Co>"}) == "Hi <Jo & Co>"


def test_trailing_newline_is_dropped(engine: TemplateEngine) -> None:
    """A template file's final newline (editors add one) does not end up in the part."""
    assert render(engine, "Subject {{ n }}\n", {"n": 1}) == "Subject 1"


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_floor", BENCH / "floor.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (BENCH / "floor.py").exists(), reason="benchmark files not present")
@pytest.mark.parametrize("filename", BENCH_PARTS)
def test_bench_template_is_byte_identical_to_plain_sandbox(
    engine: TemplateEngine, filename: str
) -> None:
    """The standard benchmark parts render exactly as a plain SandboxedEnvironment renders them."""
    floor = _load_bench()
    plain = floor.templates()[BENCH_PARTS.index(filename)]  # DictLoader + select_autoescape
    source = (BENCH / filename).read_text()
    part = engine.compile(source, name=filename, autoescape=filename.endswith(".html"))
    for i in (0, 1, 7, 499):
        data = floor.make_data(i)
        assert engine.render(part, data) == plain.render(data)


# -- escapes and leaks ------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ (''|attr('__class__')).__mro__ }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ '{0.__class__.__base__.__subclasses__}'.format('') }}",
    "{{ '{a.__class__}'.format_map({'a': ''}) }}",
    "{{ namespace.__init__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ ().__class__.__base__ }}",
    "{{ range.__self__ }}",
    "{{ range.__func__.__globals__ }}",
    "{{ dict.__globals__ }}",
    "{{ config }}{{ request }}{{ environment }}{{ context }}",
    "{{ (1).__class__ }}",
    "{% for x in [1] %}{{ loop.__class__ }}{{ loop._iterator }}{% endfor %}",
    "{% macro m() %}{% endmacro %}{{ m.__call__ }}{{ m._func }}",
    "{{ [].__class__.__base__.__subclasses__() }}",
    "{{ ''.format.__globals__ }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_render_nothing_or_fail(engine: TemplateEngine, source: str) -> None:
    """Known SSTI payloads render empty or raise TemplateRenderError, never Python internals."""
    try:
        out = render(engine, source)
    except TemplateRenderError:
        return
    assert out == ""


LEAKS = [
    "{{ range }}",
    "{{ dict }}",
    "{{ namespace }}",
    "{{ namespace() }}",
    "{{ 'a'.upper }}",
    "{{ ''.format }}",
    "{% for x in [1] %}{{ loop }}{% endfor %}",
    "{% for x in [1] %}{{ loop.cycle }}{% endfor %}",
    "{% macro m() %}{% endmacro %}{{ m }}",
    "{{ [range] }}",
    "{{ {'a': range} }}",
    "{{ range|string }}",
    "{{ range|e }}",
    "{{ range|safe }}",
    "{{ range|upper }}",
    "{{ range|urlencode }}",
    "{{ [range]|join }}",
    "{{ range ~ '' }}",
    "{{ '%s' % range }}",
    "{{ '%r' % (range,) }}",
    "{{ '{}'.format(range) }}",
    "{{ '{!r}'.format(range) }}",
    "{{ {'k': range}|xmlattr }}",
    "{{ range(3) }}",
    "{{ {'a': 1}.items() }}",
    "{{ [1]|map('string') }}",
    "{{ [range]|map('string')|join }}",
    "{{ 'x' ~ dict(a=range) }}",
    "{{ ('x'|safe).escape(range) }}",
    "{{ ('x'|safe).join([range]) }}",
    "{{ ''.join([range]) }}",
    "{{ 'a'.startswith(range) }}",
    "{% filter upper %}{{ range }}{% endfilter %}",
    "{% set b %}{{ range }}{% endset %}{{ b }}",
]


@pytest.mark.parametrize("source", LEAKS)
@pytest.mark.parametrize("html", [False, True])
def test_python_objects_are_never_printed(engine: TemplateEngine, source: str, html: bool) -> None:
    """Printing a function, method, loop, macro or a container of them fails instead of a repr."""
    with pytest.raises(TemplateRenderError, match="cannot print") as info:
        render(engine, source, html=html)
    assert_no_repr(str(info.value))


def test_error_messages_carry_no_addresses(engine: TemplateEngine) -> None:
    """Python's own messages (``<function f at 0x7f..> is not in list``) lose the address."""
    with pytest.raises(TemplateRenderError, match="is not in list") as info:
        render(engine, "{{ [1].index(range) }}")
    assert "0x" not in str(info.value)


@pytest.mark.parametrize("source", ["{{ self }}", "{{ self._TemplateReference__context }}"])
def test_self_is_refused_at_compile_time(engine: TemplateEngine, source: str) -> None:
    """`self` (block references, and a way to the template context) does not compile."""
    with pytest.raises(TemplateSyntaxError, match="'self' is not available"):
        engine.compile(source, name="text", autoescape=False)


def test_plain_values_and_containers_of_them_print(engine: TemplateEngine) -> None:
    """Scalars, and lists/dicts/tuples of scalars, print as Jinja prints them."""
    source = "{{ 1 }} {{ 1.5 }} {{ true }} {{ none }} {{ [1, 'a'] }} {{ {'k': (1, 2)} }}"
    assert render(engine, source) == "1 1.5 True None [1, 'a'] {'k': (1, 2)}"


def test_dict_global_cannot_mutate_data(engine: TemplateEngine) -> None:
    """Jinja's `dict` global is the type, whose `dict.update(data, ...)` would mutate data."""
    data: dict[str, Any] = {"user": {"name": "a"}}
    with pytest.raises(TemplateRenderError):
        render(engine, "{{ dict.update(user, name='b') }}", data)
    assert data == {"user": {"name": "a"}}


@pytest.mark.parametrize(
    "source",
    [
        "{{ user.update(a=1) }}",
        "{{ items.append(1) }}",
        "{{ items.clear() }}",
        "{{ user.pop('a') }}",
    ],
)
def test_data_is_immutable(engine: TemplateEngine, source: str) -> None:
    """Template code cannot call the mutating methods of the data's dicts and lists."""
    data: dict[str, Any] = {"user": {"a": 0}, "items": [0]}
    with pytest.raises(TemplateRenderError):
        render(engine, source, data)
    assert data == {"user": {"a": 0}, "items": [0]}


# -- compile-time DoS --------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a' * 10**10 }}",
        "{{ 9**999999999 }}",
        "{{ (9**9)**(9**9) }}",
        "{{ 'x'|center(10**9) }}",
        "{{ 'x'|center(1000000000) }}",
        "{{ '%0999999999d'|format(1) }}",
        "{% set x = 'x'|center(999999) %}" * 200 + "{{ [1] * 999999999 }}",
    ],
)
def test_constant_expressions_are_not_folded_at_compile_time(
    engine: TemplateEngine, source: str
) -> None:
    """Constant DoS expressions compile instantly (nothing is folded) and fail when rendered."""
    part = engine.compile(source, name="text", autoescape=False)
    with pytest.raises(TemplateRenderError):
        engine.render(part, {})


@pytest.mark.parametrize(
    "source",
    [
        "{{ " + "(" * 10_000 + "1" + ")" * 10_000 + " }}",
        "{{ " + "[" * 10_000 + "]" * 10_000 + " }}",
        "{% if 1 %}" * 10_000 + "x" + "{% endif %}" * 10_000,
        "".join(f"{{% for a{i} in [1] %}}" for i in range(30)) + "x" + "{% endfor %}" * 30,
    ],
)
def test_deep_nesting_is_a_syntax_error(engine: TemplateEngine, source: str) -> None:
    """Nesting too deep for Jinja's parser or Python's compiler becomes TemplateSyntaxError."""
    with pytest.raises(TemplateSyntaxError, match="nested too deeply"):
        engine.compile(source, name="text", autoescape=False)


@pytest.mark.parametrize("source", ["x" * (256 * 1024 + 1), "é" * (130 * 1024)])
def test_oversized_source_is_refused(engine: TemplateEngine, source: str) -> None:
    """A part above max_source_bytes (in UTF-8) is refused before parsing."""
    with pytest.raises(TemplateSyntaxError, match="larger than 262,144 bytes"):
        engine.compile(source, name="text", autoescape=False)


def test_syntax_error_names_the_line(engine: TemplateEngine) -> None:
    """A syntax error says what is wrong and on which line; the part name is the field."""
    with pytest.raises(TemplateSyntaxError) as info:
        engine.compile("ok\nok\n{% for x in %}", name="html", autoescape=True)
    assert info.value.field == "html"
    assert info.value.message.startswith("line 3: ")


# -- render-time DoS ---------------------------------------------------------------------------

RENDER_DOS = {
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "range to list": "{{ range(10**9)|list }}",
    "iterate big string": "{% for c in big %}{% endfor %}",
    "iterate big list": "{% for c in biglist %}{% endfor %}",
    "namespace doubling +": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}"
    ),
    "namespace doubling ~": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}"
    ),
    "list doubling": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}"
        "{% endfor %}"
    ),
    "recursive macro": "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
    "exponential macro": (
        "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(60) }}"
    ),
    "recursive loop": "{% for x in [1] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "%-format width": "{{ '%0999999999d'|format(1) }}",
    "%-format operator": "{{ '%0999999999d' % 1 }}",
    "%-format star": "{{ '%*d' % (999999999, 1) }}",
    "%-format repeated arg": "{{ '%(a)s%(a)s%(a)s' % {'a': big} }}",
    "center": "{{ 'x'|center(10**9) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "zfill": "{{ '1'.zfill(10**9) }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "str.format nested width": "{{ '{:>{w}}'.format(1, w=999999999) }}",
    "str.format repeated field": "{{ ('{0}' * 1000).format(big) }}",
    "wordwrap": "{{ big|wordwrap(1, wrapstring='x' * 1000) }}",
    "indent": "{{ 'a'|indent(10**9) }}",
    "replace": "{{ big|replace('', 'xxxxxxxx') }}",
    "str.replace": "{{ big.replace('', 'xxxxxxxx') }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(999999) }}",
    "join": "{{ (big, big)|join }}",
    "str.join": "{{ ''.join([big, big]) }}",
    "list repeat": "{{ [1] * 10**9 }}",
    "tuple repeat": "{{ (1,) * 10**9 }}",
    "nested list repeat": "{{ [big] * 10 }}",
    "int power": "{{ 10**5000 }}",
    "int product": "{% set n = 2**4000 %}{{ n * n }}",
    "round": "{{ 1.5|round(10**9, 'ceil') }}",
    "slice": "{{ [1, 2]|slice(10**9) }}",
    "batch": "{{ [1]|batch(10**9, 0)|list }}",
    "output": "{% for i in range(2000) %}{{ big }}{% endfor %}",
    "static output": "{% for i in range(100000) %}" + "x" * 100 + "{% endfor %}",
    "macro buffer": (
        "{% macro m() %}{% for i in range(2000) %}{{ big }}{% endfor %}{% endmacro %}{{ m() }}"
    ),
    "set block": "{% set b %}{% for i in range(2000) %}{{ big }}{% endfor %}{% endset %}",
    "many built values": "{% set l = [" + "big|upper, " * 40 + "] %}",
    "tojson of a shared list": (
        "{% set ns = namespace(l=[big]) %}{% for i in range(30) %}{% set ns.l = [ns.l, ns.l] %}"
        "{% endfor %}{{ ns.l|tojson }}"
    ),
    "print a shared list": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}"
        "{% endfor %}{{ ns.l }}"
    ),
    "sum of lists": "{{ ([[1]] * 3)|sum(start=[]) }}",
    "many lists": "{% set l = [" + "big|list, " * 40 + "] %}",
    "namespace nesting": (
        "{% set ns = namespace(l=[]) %}{% for i in range(100) %}{% set ns.l = [ns.l, ns.l, i] %}"
        "{% endfor %}"
    ),
    "namespace of namespaces": (
        "{% set ns = namespace(l=[]) %}{% for i in range(100) %}"
        "{% set ns.l = [namespace(a=ns.l, b=ns.l)] %}{% endfor %}"
    ),
    "small strings in a recursive macro": (
        "{% macro m(n) %}{% set l = [" + "s ~ n, " * 2000 + "] %}{{ m(n + 1) }}{% endmacro %}"
        "{{ m(0) }}"
    ),
}


DOS_DATA = {"big": "x" * 900_000, "biglist": list(range(300_000)), "s": "x" * 100}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source", RENDER_DOS.values(), ids=RENDER_DOS.keys())
def test_render_dos_payloads_hit_a_limit(engine: TemplateEngine, source: str) -> None:
    """Render-time DoS payloads stop at a limit (or recursion) with TemplateRenderError."""
    with pytest.raises(TemplateRenderError):
        render(engine, source, DOS_DATA)


@pytest.mark.parametrize(
    "name", ["output", "static output", "macro buffer", "set block", "str.format repeated field"]
)
def test_render_dos_payloads_hit_a_limit_in_html(engine: TemplateEngine, name: str) -> None:
    """The HTML part's escaping output paths are bounded the same way."""
    with pytest.raises(TemplateRenderError):
        render(engine, RENDER_DOS[name], DOS_DATA, html=True)


def test_render_timeout_stops_slow_loops() -> None:
    """A loop that keeps going under the iteration limit still stops at the render deadline."""
    engine = TemplateEngine(RenderLimits(render_timeout=0.05, max_iterations=10**9))
    with pytest.raises(TemplateRenderError, match=r"longer than 0\.05s"):
        render(engine, "{% for i in range(10**8) %}{% endfor %}")


def test_output_limit_counts_utf8_bytes() -> None:
    """max_output_bytes is measured in UTF-8 bytes, not characters."""
    engine = TemplateEngine(RenderLimits(max_output_bytes=1000))
    assert len(render(engine, "{{ 'a' * 1000 }}")) == 1000
    with pytest.raises(TemplateRenderError, match="larger than 1,000 bytes"):
        render(engine, "{{ 'é' * 501 }}")


def test_limits_are_per_render_and_per_thread(engine: TemplateEngine) -> None:
    """Concurrent renders in threads each get their own iteration budget and deadline."""
    part = engine.compile(
        "{% for i in range(150000) %}{% endfor %}done", name="text", autoescape=False
    )
    barrier = threading.Barrier(4)

    def run(_: int) -> str:
        barrier.wait()
        return engine.render(part, {})

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, range(4))) == ["done"] * 4


# -- includes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "tag"),
    [
        ("{% include 'other' %}", "include"),
        ("{% import 'other' as o %}", "import"),
        ("{% from 'other' import a %}", "from ... import"),
        ("x\n{% extends 'other' %}", "extends"),
    ],
)
def test_templates_cannot_load_other_templates(
    engine: TemplateEngine, source: str, tag: str
) -> None:
    """include/import/from/extends are refused at compile time with a clear message."""
    with pytest.raises(TemplateSyntaxError, match=f"{{% {tag} %}} is not allowed"):
        engine.compile(source, name="text", autoescape=False)


def test_loader_refuses_every_load(engine: TemplateEngine) -> None:
    """Even below the compiler, the environment's loader loads nothing."""
    env = engine.compile("x", name="text", autoescape=False).template.environment
    with pytest.raises(jinja2.TemplateNotFound):
        env.get_template("anything")


# -- every failure becomes one of two errors ---------------------------------------------------


class _Exploding:
    """Data whose attribute access raises whatever it was built with."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    @property
    def boom(self) -> Any:
        raise self._exc


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        ("{{ 1 / 0 }}", {}, "ZeroDivisionError"),
        ("{{ 1 + 'a' }}", {}, "TypeError"),
        ("{{ '%(a)s' % {} }}", {}, "KeyError"),
        ("{{ '{:d}'.format('a') }}", {}, "ValueError"),
        ("{{ 2.0 ** 10000 }}", {}, "OverflowError"),
        ("{{ '{}{}'.format(1) }}", {}, "IndexError"),
        ("{{ x|urlencode }}", {"x": "\ud800"}, "UnicodeEncodeError"),
        ("{{ user.name.first }}", {}, "undefined"),
        ("{{ x.boom }}", {"x": _Exploding(MemoryError())}, "out of memory"),
        ("{{ x.boom }}", {"x": _Exploding(RecursionError())}, "recurse too deeply"),
        ("{{ x.boom }}", {"x": _Exploding(jinja2.exceptions.SecurityError("nope"))}, "nope"),
        ("{{ x.boom }}", {"x": _Exploding(StopIteration())}, "StopIteration"),
    ],
)
def test_any_failure_becomes_template_render_error(
    engine: TemplateEngine, source: str, data: dict[str, Any], expected: str
) -> None:
    """Whatever template code raises surfaces as TemplateRenderError naming the cause and line."""
    part = engine.compile("\n" + source, name="text", autoescape=False)
    with pytest.raises(TemplateRenderError, match=expected) as info:
        engine.render(part, data)
    assert info.value.message.startswith("line 2: ")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)])
def test_interrupts_are_not_swallowed(engine: TemplateEngine, exc: BaseException) -> None:
    """KeyboardInterrupt and SystemExit pass through render untouched."""
    part = engine.compile("{{ x.boom }}", name="text", autoescape=False)
    with pytest.raises(type(exc)):
        engine.render(part, {"x": _Exploding(exc)})


# -- guarded check -----------------------------------------------------------------------------


def test_check_accepts_good_and_data_dependent_templates(engine: TemplateEngine) -> None:
    """check() passes valid templates, including ones that only fail without data."""
    engine.check("Hi {{ user.name|title }}", name="subject", autoescape=False)
    engine.check("{{ user.name.upper() }}", name="text", autoescape=False)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{% for x in %}", "line 1"),
        ("{% include 'x' %}", "self-contained"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "200,000",
        ),
        ("{{ range }}", "cannot print"),
        ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "recurse"),
    ],
)
def test_check_refuses_templates_that_fail_whatever_the_data(
    engine: TemplateEngine, source: str, message: str
) -> None:
    """check() refuses syntax errors and templates that break a limit even with empty data."""
    with pytest.raises(TemplateSyntaxError, match=message):
        engine.check(source, name="text", autoescape=False)


def test_check_kills_runaway_templates_and_recovers() -> None:
    """With the in-process limits off, check() still kills a runaway and a memory hog."""
    engine = TemplateEngine(LAX)
    try:
        with pytest.raises(TemplateSyntaxError, match="took too long to compile"):
            engine.check("{% for i in range(10**12) %}{% endfor %}", name="text", autoescape=False)
        with pytest.raises(TemplateSyntaxError, match="memory"):
            engine.check("{% set s = 'a' * 10**10 %}{{ s|length }}", name="text", autoescape=False)
        engine.check("Hi {{ name }}", name="text", autoescape=False)  # a fresh worker
    finally:
        engine.close()


async def test_check_async(engine: TemplateEngine) -> None:
    """check_async runs the check off the event loop."""
    await engine.check_async("<b>{{ x }}</b>", name="html", autoescape=True)
    with pytest.raises(TemplateSyntaxError):
        await asyncio.wait_for(engine.check_async("{{", name="html", autoescape=True), 30)
