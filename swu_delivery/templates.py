"""Versioned, localized templates: the store, and the cache of compiled versions.

A template is a named series of immutable versions; one is active. A version holds one
`LocaleContent` (subject, html, text) per locale and a default locale. Versions are compiled
once — on save, or on first use in a process — and cached by (template, version); rendering
never compiles.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from swu_delivery import metrics
from swu_delivery._proto.swu.delivery.v1 import template_pb2
from swu_delivery.db import Database, transaction
from swu_delivery.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    SwuError,
    TemplateRenderError,
)
from swu_delivery.sandbox import CompiledPart, TemplateEngine
from swu_delivery.validation import check_header_text

__all__ = ["CompiledLocale", "CompiledVersion", "Rendered", "TemplateCache", "TemplateStore"]

TEMPLATE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LOCALE_RE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")
MAX_LOCALES = 100
MAX_DESCRIPTION = 1024
PARTS = (("subject", False), ("html", True), ("text", False))  # (part, autoescape)


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def check_template_id(template_id: str, field: str = "template_id") -> None:
    if not template_id:
        raise InvalidArgument("required", field=field)
    if not TEMPLATE_ID_RE.fullmatch(template_id):
        raise InvalidArgument(
            "must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit",
            field=field,
        )


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str
    text: str
    locale: str


@dataclass(frozen=True, slots=True)
class CompiledLocale:
    locale: str
    subject: CompiledPart
    html: CompiledPart | None
    text: CompiledPart | None

    def render(self, engine: TemplateEngine, context: dict[str, Any]) -> Rendered:
        """Render all parts; the subject must come out as one line."""
        started = perf_counter()
        subject = engine.render(self.subject, context).strip()
        if "\n" in subject or "\r" in subject:
            raise TemplateRenderError("rendered subject contains a line break", field="subject")
        check_header_text(subject, "subject")
        html = engine.render(self.html, context) if self.html else ""
        text = engine.render(self.text, context) if self.text else ""
        metrics.RENDER_SECONDS.observe(perf_counter() - started)
        return Rendered(subject, html, text, self.locale)


class CompiledVersion:
    """All locales of one template version, compiled, with memoized locale fallback."""

    def __init__(
        self,
        template_id: str,
        version: int,
        default_locale: str,
        locales: dict[str, CompiledLocale],
    ) -> None:
        self.template_id = template_id
        self.version = version
        self.default_locale = default_locale
        self._by_key = {k.lower(): v for k, v in locales.items()}
        self._resolved: dict[str, CompiledLocale] = {}

    def resolve(self, locale: str) -> CompiledLocale:
        """`fr-CA` → `fr-CA`, else `fr`, else the default locale."""
        hit = self._resolved.get(locale)
        if hit is not None:
            return hit
        key = locale.lower()
        found = None
        while key:
            found = self._by_key.get(key)
            if found is not None:
                break
            key = key.rpartition("-")[0]
        if found is None:
            found = self._by_key[self.default_locale.lower()]
        if len(self._resolved) < 1000:
            self._resolved[locale] = found
        return found


def _contents_json(contents: Sequence[template_pb2.LocaleContent]) -> bytes:
    return orjson.dumps(
        [
            {"locale": c.locale, "subject": c.subject, "html": c.html, "text": c.text}
            for c in contents
        ]
    )


def _template_pb(row: Sequence[Any]) -> template_pb2.Template:
    return template_pb2.Template(
        template_id=row[0],
        description=row[1],
        active_version=row[2],
        latest_version=row[3],
        created_at=_ts(row[5]),
        updated_at=_ts(row[6]),
    )


def _version_pb(row: Sequence[Any], with_contents: bool = True) -> template_pb2.TemplateVersion:
    version = template_pb2.TemplateVersion(
        template_id=row[0], version=row[1], default_locale=row[2], created_at=_ts(row[4])
    )
    if with_contents:
        for c in orjson.loads(row[3]):
            version.contents.append(template_pb2.LocaleContent(**c))
    return version


_TEMPLATE_COLS = (
    "template_id, description, active_version, latest_version, deleted, created_at, updated_at"
)
_VERSION_COLS = "template_id, version, default_locale, contents, created_at"


def _get_template_row(conn: sqlite3.Connection, template_id: str) -> Sequence[Any]:
    row = conn.execute(
        f"SELECT {_TEMPLATE_COLS} FROM templates WHERE template_id = ? AND deleted = 0",
        (template_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no template {template_id!r}", field="template_id")
    return tuple(row)


def _get_version_row(conn: sqlite3.Connection, template_id: str, version: int) -> Sequence[Any]:
    row = conn.execute(
        f"SELECT {_VERSION_COLS} FROM template_versions WHERE template_id = ? AND version = ?",
        (template_id, version),
    ).fetchone()
    if row is None:
        raise NotFound(f"template {template_id!r} has no version {version}", field="version")
    return tuple(row)


def _save(
    conn: sqlite3.Connection,
    template_id: str,
    description: str | None,
    default_locale: str,
    contents: bytes,
    create: bool,
    activate: bool,
) -> tuple[template_pb2.Template, template_pb2.TemplateVersion]:
    now = time.time()
    with transaction(conn):
        existing = conn.execute(
            "SELECT latest_version, deleted FROM templates WHERE template_id = ?", (template_id,)
        ).fetchone()
        if create:
            if existing is not None and not existing[1]:
                raise AlreadyExists(f"template {template_id!r} exists", field="template_id")
            version = 1 if existing is None else existing[0] + 1
            conn.execute(
                "INSERT OR REPLACE INTO templates VALUES (?, ?, ?, ?, 0, ?, ?)",
                (template_id, description or "", version, version, now, now),
            )
        else:
            if existing is None or existing[1]:
                raise NotFound(f"no template {template_id!r}", field="template_id")
            version = existing[0] + 1
            conn.execute(
                "UPDATE templates SET latest_version = ?, updated_at = ?,"
                " active_version = CASE WHEN ? THEN ? ELSE active_version END,"
                " description = coalesce(?, description) WHERE template_id = ?",
                (version, now, activate, version, description, template_id),
            )
        conn.execute(
            "INSERT INTO template_versions VALUES (?, ?, ?, ?, ?)",
            (template_id, version, default_locale, contents, now),
        )
        tmpl = _template_pb(_get_template_row(conn, template_id))
        ver = _version_pb(_get_version_row(conn, template_id, version))
    return tmpl, ver


def _get(
    conn: sqlite3.Connection, template_id: str, version: int
) -> tuple[template_pb2.Template, template_pb2.TemplateVersion]:
    row = _get_template_row(conn, template_id)
    return _template_pb(row), _version_pb(_get_version_row(conn, template_id, version or row[2]))


def _list(conn: sqlite3.Connection, after: str, limit: int) -> list[template_pb2.Template]:
    cur = conn.execute(
        f"SELECT {_TEMPLATE_COLS} FROM templates WHERE deleted = 0 AND template_id > ?"
        " ORDER BY template_id LIMIT ?",
        (after, limit),
    )
    return [_template_pb(tuple(r)) for r in cur]


def _delete(conn: sqlite3.Connection, template_id: str) -> None:
    with transaction(conn):
        _get_template_row(conn, template_id)
        conn.execute(
            "UPDATE templates SET deleted = 1, updated_at = ? WHERE template_id = ?",
            (time.time(), template_id),
        )


def _versions(conn: sqlite3.Connection, template_id: str) -> list[template_pb2.TemplateVersion]:
    _get_template_row(conn, template_id)
    cur = conn.execute(
        f"SELECT {_VERSION_COLS} FROM template_versions WHERE template_id = ?"
        " ORDER BY version DESC",
        (template_id,),
    )
    return [_version_pb(tuple(r), with_contents=False) for r in cur]


def _activate(conn: sqlite3.Connection, template_id: str, version: int) -> template_pb2.Template:
    with transaction(conn):
        _get_template_row(conn, template_id)
        _get_version_row(conn, template_id, version)
        conn.execute(
            "UPDATE templates SET active_version = ?, updated_at = ? WHERE template_id = ?",
            (version, time.time(), template_id),
        )
        return _template_pb(_get_template_row(conn, template_id))


def _pins(conn: sqlite3.Connection, template_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    marks = ",".join("?" * len(template_ids))
    cur = conn.execute(
        f"SELECT template_id, active_version, latest_version FROM templates"
        f" WHERE deleted = 0 AND template_id IN ({marks})",
        tuple(template_ids),
    )
    return {t: (a, latest) for t, a, latest in cur}


def _load_versions(
    conn: sqlite3.Connection, keys: Sequence[tuple[str, int]]
) -> list[tuple[str, int, str, bytes]]:
    out = []
    for template_id, version in keys:
        row = conn.execute(
            "SELECT template_id, version, default_locale, contents FROM template_versions"
            " WHERE template_id = ? AND version = ?",
            (template_id, version),
        ).fetchone()
        if row is not None:
            out.append(tuple(row))
    return out


class TemplateStore:
    """Template CRUD over the database; content is checked (and compiled) before it is stored."""

    def __init__(self, db: Database, engine: TemplateEngine, cache: TemplateCache) -> None:
        self.db = db
        self.engine = engine
        self.cache = cache

    async def _check_contents(
        self, default_locale: str, contents: Sequence[template_pb2.LocaleContent]
    ) -> str:
        if not contents:
            raise InvalidArgument("at least one locale is required", field="contents")
        if len(contents) > MAX_LOCALES:
            raise InvalidArgument(f"at most {MAX_LOCALES} locales", field="contents")
        seen: set[str] = set()
        for i, c in enumerate(contents):
            where = f"contents[{i}]"
            if not LOCALE_RE.fullmatch(c.locale):
                raise InvalidArgument(
                    "not a BCP 47 locale like en or fr-CA", field=f"{where}.locale"
                )
            if c.locale.lower() in seen:
                raise InvalidArgument(f"locale {c.locale} given twice", field=f"{where}.locale")
            seen.add(c.locale.lower())
            if not c.subject.strip():
                raise InvalidArgument("required", field=f"{where}.subject")
            if "\n" in c.subject.strip() or "\r" in c.subject.strip():
                problem = "must be one line (a subject is a header; it cannot contain a line break)"
                raise InvalidArgument(problem, field=f"{where}.subject")
            if not (c.html.strip() or c.text.strip()):
                raise InvalidArgument("html or text is required", field=f"{where}.html")
            for part, autoescape in PARTS:
                source = getattr(c, part)
                if source:
                    try:
                        await self.engine.check_async(source, name=part, autoescape=autoescape)
                    except SwuError as exc:
                        exc.field = f"{where}.{part}"
                        raise
        default = default_locale or contents[0].locale
        if default.lower() not in seen:
            raise InvalidArgument(
                f"default locale {default} has no content", field="default_locale"
            )
        return default

    async def create(
        self, request: template_pb2.CreateTemplateRequest
    ) -> tuple[template_pb2.Template, template_pb2.TemplateVersion]:
        check_template_id(request.template_id)
        if len(request.description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"at most {MAX_DESCRIPTION} characters", field="description")
        default = await self._check_contents(request.default_locale, request.contents)
        return await self.db.run(
            _save,
            request.template_id,
            request.description,
            default,
            _contents_json(request.contents),
            True,
            True,
        )

    async def update(
        self, request: template_pb2.UpdateTemplateRequest
    ) -> tuple[template_pb2.Template, template_pb2.TemplateVersion]:
        check_template_id(request.template_id)
        if len(request.description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"at most {MAX_DESCRIPTION} characters", field="description")
        default = await self._check_contents(request.default_locale, request.contents)
        return await self.db.run(
            _save,
            request.template_id,
            request.description or None,
            default,
            _contents_json(request.contents),
            False,
            not request.draft,
        )

    async def get(
        self, template_id: str, version: int = 0
    ) -> tuple[template_pb2.Template, template_pb2.TemplateVersion]:
        check_template_id(template_id)
        return await self.db.run(_get, template_id, version)

    async def page(
        self, page_size: int, page_token: str
    ) -> tuple[list[template_pb2.Template], str]:
        size = min(page_size or 100, 1000)
        templates = await self.db.run(_list, page_token, size + 1)
        more = len(templates) > size
        templates = templates[:size]
        return templates, (templates[-1].template_id if more else "")

    async def delete(self, template_id: str) -> None:
        check_template_id(template_id)
        await self.db.run(_delete, template_id)

    async def versions(self, template_id: str) -> list[template_pb2.TemplateVersion]:
        check_template_id(template_id)
        return await self.db.run(_versions, template_id)

    async def activate(self, template_id: str, version: int) -> template_pb2.Template:
        check_template_id(template_id)
        if version <= 0:
            raise InvalidArgument("must be a version number", field="version")
        return await self.db.run(_activate, template_id, version)

    async def pin(self, wanted: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int | SwuError]:
        """For each (template_id, version or 0): the version to pin, or why it cannot be used."""
        wanted = set(wanted)
        pins = await self.db.run(_pins, sorted({t for t, _ in wanted}))
        out: dict[tuple[str, int], int | SwuError] = {}
        for template_id, version in wanted:
            found = pins.get(template_id)
            if found is None:
                out[(template_id, version)] = NotFound(
                    f"no template {template_id!r}", field="template_id"
                )
            elif version == 0:
                out[(template_id, version)] = found[0]
            elif version > found[1]:
                out[(template_id, version)] = NotFound(
                    f"template {template_id!r} has no version {version}", field="template_version"
                )
            else:
                out[(template_id, version)] = version
        return out


class TemplateCache:
    """Compiled versions by (template, version), least recently used evicted past `capacity`."""

    def __init__(self, db: Database, engine: TemplateEngine, capacity: int = 2000) -> None:
        self.db = db
        self.engine = engine
        self.capacity = capacity
        self._versions: OrderedDict[tuple[str, int], CompiledVersion] = OrderedDict()

    def get(self, template_id: str, version: int) -> CompiledVersion | None:
        key = (template_id, version)
        hit = self._versions.get(key)
        if hit is not None:
            self._versions.move_to_end(key)
        return hit

    async def ensure(
        self, keys: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], CompiledVersion | SwuError]:
        """Compiled versions for `keys`, loading and compiling the missing ones."""
        out: dict[tuple[str, int], CompiledVersion | SwuError] = {}
        missing = []
        for key in set(keys):
            hit = self.get(*key)
            if hit is None:
                missing.append(key)
            else:
                out[key] = hit
        metrics.CACHE_HIT.inc(len(out))
        metrics.CACHE_MISS.inc(len(missing))
        if missing:
            loaded = {(r[0], r[1]): r for r in await self.db.run(_load_versions, missing)}
            for key in missing:
                row = loaded.get(key)
                if row is None:
                    out[key] = NotFound(f"template {key[0]!r} has no version {key[1]}")
                    continue
                try:
                    out[key] = self._compile(row[0], row[1], row[2], orjson.loads(row[3]))
                except SwuError as exc:
                    out[key] = exc
        return out

    def _compile(
        self, template_id: str, version: int, default_locale: str, contents: list[dict[str, str]]
    ) -> CompiledVersion:
        locales = {}
        for c in contents:
            parts = {}
            for part, autoescape in PARTS:
                source = c.get(part, "")
                parts[part] = (
                    self.engine.compile(
                        source,
                        name=part,
                        autoescape=autoescape,
                    )
                    if source
                    else None
                )
            subject = parts["subject"]
            assert subject is not None  # checked on save
            locales[c["locale"]] = CompiledLocale(
                c["locale"], subject, parts["html"], parts["text"]
            )
        compiled = CompiledVersion(template_id, version, default_locale, locales)
        metrics.TEMPLATE_COMPILES.inc()
        self._versions[(template_id, version)] = compiled
        while len(self._versions) > self.capacity:
            self._versions.popitem(last=False)
        return compiled
