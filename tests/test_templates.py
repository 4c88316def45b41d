"""Template lifecycle, versions, locale fallback and rendering, through the real gRPC server."""

from __future__ import annotations

import grpc
import pytest

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2, template_pb2
from tests.conftest import ServerHandle
from tests.helpers import ORDER, data, mk

LOCALES = {
    "en": ("Hello {{ name }}", "<p>Hello {{ name }}</p>", "Hello {{ name }}"),
    "fr": ("Bonjour {{ name }}", "<p>Bonjour {{ name }}</p>", "Bonjour {{ name }}"),
    "fr-CA": ("Allô {{ name }}", "<p>Allô {{ name }}</p>", "Allô {{ name }}"),
}


def render(
    server: ServerHandle, template_id: str, locale: str, **kw: object
) -> delivery_pb2.RenderResponse:
    import orjson

    return server.delivery.Render(
        delivery_pb2.RenderRequest(
            template_id=template_id, locale=locale, data_json=orjson.dumps(kw).decode()
        )
    )


def test_create_get_list_delete(swu_server: ServerHandle) -> None:
    """A template can be created, read back, listed and deleted; then it is gone."""
    created = swu_server.put_template("welcome", LOCALES)
    assert created.template.active_version == 1
    got = swu_server.templates.GetTemplate(template_pb2.GetTemplateRequest(template_id="welcome"))
    assert {c.locale for c in got.version.contents} == {"en", "fr", "fr-CA"}
    assert got.version.default_locale == "en"
    swu_server.put_template("other", {"en": LOCALES["en"]})
    listed = swu_server.templates.ListTemplates(template_pb2.ListTemplatesRequest())
    assert [t.template_id for t in listed.templates] == ["other", "welcome"]
    swu_server.templates.DeleteTemplate(template_pb2.DeleteTemplateRequest(template_id="welcome"))
    with pytest.raises(grpc.RpcError) as err:
        swu_server.templates.GetTemplate(template_pb2.GetTemplateRequest(template_id="welcome"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        swu_server.delivery.Send(delivery_pb2.SendRequest(email=mk("welcome")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "template_id" in (err.value.details() or "")


def test_list_pages(swu_server: ServerHandle) -> None:
    """ListTemplates pages with a token until every template was seen once."""
    for i in range(5):
        swu_server.put_template(f"t{i}", {"en": LOCALES["en"]})
    seen: list[str] = []
    token = ""
    while True:
        page = swu_server.templates.ListTemplates(
            template_pb2.ListTemplatesRequest(page_size=2, page_token=token)
        )
        seen += [t.template_id for t in page.templates]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"t{i}" for i in range(5)]


def test_create_twice_is_already_exists(swu_server: ServerHandle) -> None:
    """Creating an existing template id fails with ALREADY_EXISTS."""
    swu_server.put_template("dup", {"en": LOCALES["en"]})
    with pytest.raises(grpc.RpcError) as err:
        swu_server.put_template("dup", {"en": LOCALES["en"]})
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_update_creates_versions_and_pins(swu_server: ServerHandle) -> None:
    """Each update is a new version; drafts do not activate; activation switches renders."""
    swu_server.put_template("t", {"en": ("v1 {{ name }}", "", "one")})
    req = template_pb2.UpdateTemplateRequest(
        template_id="t",
        contents=[template_pb2.LocaleContent(locale="en", subject="v2 {{ name }}", text="two")],
    )
    upd = swu_server.templates.UpdateTemplate(req)
    assert (upd.version.version, upd.template.active_version) == (2, 2)
    assert render(swu_server, "t", "en", name="x").subject == "v2 x"
    req.draft = True
    req.contents[0].subject = "v3 {{ name }}"
    upd = swu_server.templates.UpdateTemplate(req)
    assert (upd.version.version, upd.template.active_version) == (3, 2)
    versions = swu_server.templates.ListTemplateVersions(
        template_pb2.ListTemplateVersionsRequest(template_id="t")
    )
    assert [v.version for v in versions.versions] == [3, 2, 1]
    old = swu_server.templates.GetTemplate(
        template_pb2.GetTemplateRequest(template_id="t", version=1)
    )
    assert old.version.contents[0].subject == "v1 {{ name }}"
    swu_server.templates.ActivateTemplateVersion(
        template_pb2.ActivateTemplateVersionRequest(template_id="t", version=3)
    )
    assert render(swu_server, "t", "en", name="x").subject == "v3 x"


@pytest.mark.parametrize(
    ("asked", "expected"),
    [
        ("fr-CA", "Allô"),
        ("fr-ca", "Allô"),
        ("fr-BE", "Bonjour"),
        ("fr", "Bonjour"),
        ("de-DE", "Hello"),
        ("", "Hello"),
    ],
)
def test_locale_fallback(swu_server: ServerHandle, asked: str, expected: str) -> None:
    """fr-CA uses fr-CA, fr-BE falls back to fr, unknown locales to the default."""
    swu_server.put_template("welcome", LOCALES)
    assert render(swu_server, "welcome", asked, name="Zoë").subject == f"{expected} Zoë"


def test_html_escapes_data_text_does_not(swu_server: ServerHandle) -> None:
    """Data is autoescaped in the HTML part only."""
    swu_server.put_template("t", {"en": ORDER})
    out = render(swu_server, "t", "en", **data(1, note="<b>&</b>"))
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in out.html
    assert "<b>&</b>" in out.text


@pytest.mark.parametrize(
    ("source", "part"),
    [
        ("{% for %}", "html"),
        ("{{ x", "text"),
        ("{% include 'other' %}", "html"),
        ("{{ 'a' * 10**10 }}", "html"),
    ],
)
def test_bad_templates_rejected_at_save(swu_server: ServerHandle, source: str, part: str) -> None:
    """Syntax errors, includes and compile-time bombs are INVALID_ARGUMENT naming the part."""
    parts = {"subject": "s", "html": "", "text": ""} | {part: source}
    with pytest.raises(grpc.RpcError) as err:
        swu_server.put_template("bad", {"en": (parts["subject"], parts["html"], parts["text"])})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"contents[0].{part}" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("contents", "default", "field"),
    [
        ({"en": ("", "<p>x</p>", "")}, "en", "contents[0].subject"),
        ({"en": ("s", "", "")}, "en", "contents[0].html"),
        ({"e n": ("s", "x", "")}, "en", "contents[0].locale"),
        ({"en": ("s", "x", "")}, "fr", "default_locale"),
        ({"en": ("Order\n{{ n }}", "x", "")}, "en", "contents[0].subject"),
        ({"en": ("s", "x", ""), "fr": ("a\rb", "x", "")}, "en", "contents[1].subject"),
    ],
)
def test_invalid_template_fields(
    swu_server: ServerHandle, contents: dict[str, tuple[str, str, str]], default: str, field: str
) -> None:
    """Missing or multi-line subject, no body, bad locale, content-less default are named."""
    with pytest.raises(grpc.RpcError) as err:
        swu_server.put_template("t", contents, default_locale=default)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")


def test_render_errors_are_invalid_argument(swu_server: ServerHandle) -> None:
    """A preview whose template code raises answers INVALID_ARGUMENT, not INTERNAL."""
    swu_server.put_template("t", {"en": ("s", "{{ 10 / n }}", "")})
    with pytest.raises(grpc.RpcError) as err:
        render(swu_server, "t", "en", n=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert render(swu_server, "t", "en", n=5).html == "2.0"
