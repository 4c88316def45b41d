"""Brevo transactional webhooks: Basic, bearer and header credentials, single and batched bodies.

Brevo signs nothing, so the direct tests check the configured credentials before anything else,
then every event of the documented set. The end-to-end tests send through a Brevo account at
the ESP simulator (so the message really carries our X-Mailin-custom id) and post its events.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import EspAccount, WebhookSettings
from swu_delivery.webhooks import receiver_class
from swu_delivery.webhooks.base import (
    BOUNCE_HARD,
    BOUNCE_SOFT,
    ET,
    BadRequest,
    ProviderEvent,
    Received,
    Unauthorized,
    WebhookRequest,
    stable_event_id,
)
from swu_delivery.webhooks.brevo import BrevoReceiver
from tests.adapter_kit import esp_table, toml_table
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk

DATA = Path(__file__).parent / "data" / "webhooks" / "brevo"
USER, SECRET, HEADER = "brevo-hooks", "s3cret-Brevo-Token", "X-Hook-Token"
BEARER = {"auth": "bearer"}
DOC_TIME = 1604933654.0
DOC_MESSAGE = "201798300811.5787683@relay.domain.com"
DOC_RECIPIENT = "example@domain.com"


def basic(user: str = USER, password: str = SECRET) -> dict[str, str]:
    """The header Brevo sends for a webhook URL `https://user:password@host/...`."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(token: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def receiver(secret: str = SECRET, **options: Any) -> BrevoReceiver:
    settings = WebhookSettings(secret=secret, options=options or {"username": USER})
    account = EspAccount(name="brevo", kind="brevo")
    return BrevoReceiver(account, settings, http=_no_http, clock=lambda: 0.0)


def _no_http() -> Any:
    raise AssertionError("the Brevo receiver makes no HTTP calls")


def request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    """The request as the server hands it over: headers case-insensitive, as aiohttp's are."""
    return WebhookRequest(
        method="POST",
        path="/webhooks/brevo",
        query={},
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        body=body,
    )


async def receive(body: bytes, headers: dict[str, str] | None = None, **options: Any) -> Received:
    return await receiver(**options).receive(request(body, basic() if headers is None else headers))


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def doc_event(name: str, **changes: Any) -> dict[str, Any]:
    event = orjson.loads(fixture(name))
    assert isinstance(event, dict)
    return {**event, **changes}


def batch(*events: Any) -> bytes:
    return orjson.dumps(list(events))


# -- authentication --------------------------------------------------------------------------


def test_registry_maps_brevo_to_this_receiver() -> None:
    """The server finds this class for kind "brevo"."""
    assert receiver_class("brevo") is BrevoReceiver


@pytest.mark.parametrize(
    ("options", "headers"),
    [
        ({"username": USER}, basic()),
        ({"username": USER, "auth": "basic"}, basic()),
        (BEARER, bearer()),
        (BEARER, {"authorization": f"bearer {SECRET}"}),
        ({"header": HEADER}, {HEADER: SECRET}),
        ({**BEARER, "header": HEADER}, {**bearer(), HEADER: SECRET}),
    ],
    ids=["basic", "basic-explicit", "bearer", "bearer-lowercase", "header", "bearer-and-header"],
)
async def test_configured_credentials_are_accepted(
    options: dict[str, str], headers: dict[str, str]
) -> None:
    """Each documented way to secure a Brevo webhook, with the right secret, gets through."""
    received = await receive(fixture("delivered.json"), headers, **options)
    assert len(received.events) == 1


@pytest.mark.parametrize(
    ("options", "headers"),
    [
        ({"username": USER}, {}),
        ({"username": USER}, basic(password="wrong")),
        ({"username": USER}, basic(user="other")),
        ({"username": USER}, bearer()),
        (BEARER, {}),
        (BEARER, bearer("wrong")),
        (BEARER, bearer(SECRET + "x")),
        (BEARER, basic()),
        (BEARER, {"Authorization": SECRET}),
        ({"header": HEADER}, {}),
        ({"header": HEADER}, {HEADER: "wrong"}),
        ({"header": HEADER}, bearer()),
        ({**BEARER, "header": HEADER}, bearer()),
        ({**BEARER, "header": HEADER}, {HEADER: SECRET}),
    ],
)
async def test_wrong_or_missing_credentials_are_unauthorized(
    options: dict[str, str], headers: dict[str, str]
) -> None:
    """Anything but exactly the configured credentials: 401, and the secret is not echoed."""
    with pytest.raises(Unauthorized) as err:
        await receive(fixture("delivered.json"), headers, **options)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("body", [b"not json", b'"delivered"', b"null", b"42", b""])
async def test_unreadable_body_is_bad_request_after_auth(body: bytes) -> None:
    """Authenticated but neither an event nor an array: 400; without credentials: 401."""
    with pytest.raises(BadRequest):
        await receive(body)
    with pytest.raises(Unauthorized):
        await receive(body, {})


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"auth": "basic"}, "needs username"),
        ({"auth": "bearer", "username": USER}, "takes no username"),
        ({"auth": "hmac"}, "auth must be"),
        ({"auth": True}, "auth must be"),
        ({"username": ""}, "username"),
        ({"header": "X Bad"}, "header"),
        ({"header": "Authorization"}, "header"),
        ({"username": USER, "signing_key": "x"}, "signing_key"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict[str, Any], match: str) -> None:
    """Each bad option fails start-up with its key named, never the secret."""
    with pytest.raises(ValueError, match=match) as err:
        receiver(**options)
    assert SECRET not in str(err.value)


def test_an_authentication_method_is_required() -> None:
    """No username, bearer or header: the endpoint would be open, so start-up fails."""
    settings = WebhookSettings(secret=SECRET, options={})
    with pytest.raises(ValueError, match="needs username"):
        BrevoReceiver(
            EspAccount(name="brevo", kind="brevo"), settings, http=_no_http, clock=lambda: 0.0
        )


@pytest.mark.parametrize("options", [{"username": USER}, BEARER, {"header": HEADER}])
def test_missing_secret_is_refused(options: dict[str, str]) -> None:
    """Without a secret any request with an empty token would pass: refuse to start."""
    with pytest.raises(ValueError, match="secret_env or secret_file"):
        receiver(secret="", **options)


# -- normalization ---------------------------------------------------------------------------


def derived(name: str) -> str:
    """The id derived for a documented event (Brevo has none): from what identifies it."""
    event = doc_event(name)
    return stable_event_id(
        event["event"], DOC_MESSAGE, DOC_RECIPIENT, event["ts_epoch"], event.get("link", "")
    )


def doc(type: int, name: str, **fields: Any) -> ProviderEvent:
    """The expected event for a documented example: its common fields filled in."""
    return ProviderEvent(
        type=type,
        time=DOC_TIME,
        provider_event_id=derived(f"{name}.json"),
        message_id=f"msg-{name}",
        provider_type=name,
        recipient=DOC_RECIPIENT,
        esp_message_id=DOC_MESSAGE,
        **fields,
    )


DOCUMENTED: dict[str, ProviderEvent] = {
    "request.json": doc(ET.EVENT_TYPE_SENT, "request"),
    "delivered.json": doc(ET.EVENT_TYPE_DELIVERED, "delivered"),
    "deferred.json": doc(
        ET.EVENT_TYPE_DEFERRED,
        "deferred",
        response="550 RecipientError: 550 5.1.1 <notauser@example.com>: Recipient address "
        "rejected: User unknown in virtual alias table",
    ),
    "soft_bounce.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "soft_bounce",
        bounce=BOUNCE_SOFT,
        response="undefined Unable to find MX of domain no-mx.example.com",
    ),
    "hard_bounce.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "hard_bounce",
        bounce=BOUNCE_HARD,
        response="RecipientError: 550 5.5.0 Requested action not taken: mailbox unavailable.",
    ),
    "invalid_email.json": doc(ET.EVENT_TYPE_BOUNCED, "invalid_email", bounce=BOUNCE_HARD),
    "blocked.json": doc(
        ET.EVENT_TYPE_REJECTED, "blocked", reason="blocked : due to blacklist user"
    ),
    "error.json": doc(ET.EVENT_TYPE_FAILED, "error"),
    "spam.json": doc(ET.EVENT_TYPE_COMPLAINED, "spam"),
    "unique_opened.json": doc(ET.EVENT_TYPE_OPENED, "unique_opened"),
    "opened.json": doc(ET.EVENT_TYPE_OPENED, "opened"),
    "click.json": doc(ET.EVENT_TYPE_CLICKED, "click", url="https://example.com/confirm"),
    "unsubscribed.json": doc(ET.EVENT_TYPE_UNSUBSCRIBED, "unsubscribed"),
    "proxy_open.json": doc(ET.EVENT_TYPE_UNKNOWN, "proxy_open"),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_documented_event_is_normalized(name: str) -> None:
    """Each documented event, posted alone, becomes exactly the expected event."""
    received = await receive(fixture(name))
    assert received.events == [DOCUMENTED[name]]
    assert received.skipped == 0


def test_every_fixture_is_checked() -> None:
    """No documented example in the data folder goes untested."""
    assert {p.name for p in DATA.glob("*.json")} == set(DOCUMENTED)


async def test_batched_body_gives_every_event_in_order() -> None:
    """A `batched` webhook posts an array: every event of it, in order."""
    names = sorted(DOCUMENTED)
    received = await receive(batch(*(doc_event(n) for n in names)))
    assert received.events == [DOCUMENTED[n] for n in names]
    assert (await receive(b"[]")).events == []


@pytest.mark.parametrize(
    "broken",
    [
        "a string",
        ["a", "list"],
        {"email": DOC_RECIPIENT, "ts_epoch": 1604933654000},  # no event name
        {"event": 5, "ts_epoch": 1604933654000},
        {"event": "delivered", "email": DOC_RECIPIENT},  # no time
        {"event": "delivered", "ts_epoch": "soon", "ts_event": None},
        {"event": "delivered", "ts_epoch": True},
        {"event": "delivered", "ts_epoch": -1},
    ],
)
async def test_broken_event_in_a_batch_is_skipped_and_the_others_kept(broken: Any) -> None:
    """An unreadable event is counted in skipped; the events around it are returned."""
    body = batch(doc_event("delivered.json"), broken, doc_event("click.json"))
    received = await receive(body)
    assert received.events == [DOCUMENTED["delivered.json"], DOCUMENTED["click.json"]]
    assert received.skipped == 1


async def test_single_unreadable_event_is_skipped() -> None:
    """A lone object that is no event: 200 with skipped = 1 (Brevo would only retry it)."""
    received = await receive(orjson.dumps({"event": "delivered"}))
    assert (received.events, received.skipped) == ([], 1)


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({"ts_epoch": 1604933654123}, 1604933654.123),  # milliseconds, as documented
        ({"ts_epoch": 1604933654}, 1604933654.0),  # seconds, as the documented example has
        ({"ts_epoch": "1604933654000"}, 1604933654.0),
        ({"ts_event": 1604933650}, 1604933650.0),  # no ts_epoch: the event's seconds
        ({"ts_epoch": None, "ts_event": 1604933650}, 1604933650.0),
    ],
)
async def test_timestamps_are_read_in_seconds(times: dict[str, Any], expected: float) -> None:
    """ts_epoch (milliseconds, or seconds-sized) first, then ts_event; ts is never used."""
    event = {
        k: v for k, v in doc_event("delivered.json").items() if k not in ("ts_epoch", "ts_event")
    }
    (result,) = (await receive(orjson.dumps({**event, **times}))).events
    assert result.time == expected


@pytest.mark.parametrize(
    ("custom", "expected"),
    [
        ('{"swu_message_id":"msg-1","order":"42"}', "msg-1"),
        ({"swu_message_id": "msg-2"}, "msg-2"),  # already parsed
        ("some_custom_header", ""),  # not ours: not JSON
        ('{"order":"42"}', ""),
        ('{"swu_message_id":7}', ""),
        ("[1, 2]", ""),
        (None, ""),
    ],
)
async def test_our_id_is_read_from_the_custom_header(custom: Any, expected: str) -> None:
    """Our id is swu_message_id in the X-Mailin-custom JSON; anything else leaves it empty."""
    event = doc_event("delivered.json", **{"X-Mailin-custom": custom})
    (result,) = (await receive(orjson.dumps(event))).events
    assert result.message_id == expected


async def test_custom_header_name_in_another_case_is_found() -> None:
    """Brevo normalizes header names' case; the echoed field is found in any case."""
    event = doc_event("delivered.json")
    event["X-Mailin-Custom"] = event.pop("X-Mailin-custom")
    (result,) = (await receive(orjson.dumps(event))).events
    assert result.message_id == "msg-delivered"


async def test_redelivered_event_keeps_its_id_and_others_differ() -> None:
    """Same event again: same id; another time, recipient or link: another id."""
    click = doc_event("click.json")
    variants = [
        click,
        click,
        {**click, "ts_epoch": click["ts_epoch"] + 1000},
        {**click, "email": "other@domain.com"},
        {**click, "link": "https://example.com/other"},
        {**click, "event": "opened"},
    ]
    ids = [e.provider_event_id for e in (await receive(batch(*variants))).events]
    assert ids[0] == ids[1] and len(set(ids)) == 5
    assert all(i.startswith("swu:") for i in ids)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("complaint", ET.EVENT_TYPE_COMPLAINED), ("unsubscribe", ET.EVENT_TYPE_UNSUBSCRIBED)],
)
async def test_alternative_event_names_are_mapped(name: str, expected: int) -> None:
    """The names seen in live traffic besides the documented ones map the same way."""
    (result,) = (await receive(orjson.dumps(doc_event("spam.json", event=name)))).events
    assert (result.type, result.provider_type) == (expected, name)


# -- end to end ------------------------------------------------------------------------------

SECRET_ENV = "SWU_TEST_BREVO_WEBHOOK_TOKEN"


@pytest.fixture
def server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The service sending through Brevo account "brevo" at the simulator, webhook on bearer."""
    table = toml_table(esp_table("brevo", esp_simulator))
    webhook = f'[esp.webhook]\nsecret_env = "{SECRET_ENV}"\nauth = "bearer"\n'
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "swu.toml",
        data_dir,
        esp_simulator.url,
        extra=table + webhook,
        default_esp="brevo",
    )
    handle = ServerHandle(config, data_dir, esp_simulator)
    handle.env[SECRET_ENV] = SECRET
    handle.start()
    try:
        handle.put_template("order", {"en": ORDER})
        yield handle
    finally:
        handle.stop()


def post(server: ServerHandle, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{server.webhooks}/webhooks/brevo",
        data=body,
        method="POST",
        headers={**headers, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, orjson.loads(exc.read() or b"{}")


def sent(server: ServerHandle, to: str) -> delivery_pb2.Message:
    response = server.delivery.SendBatch(
        delivery_pb2.SendBatchRequest(emails=[mk(to=to, payload=data(1))])
    )
    (result,) = response.results
    assert result.message_id, result.error
    message = server.wait_for_state([result.message_id], states=("SENT",))[result.message_id]
    assert message.esp == "brevo" and message.esp_message_id
    return message


def event_for(message: delivery_pb2.Message, name: str, **changes: Any) -> dict[str, Any]:
    """A documented event about `message`, with the X-Mailin-custom our adapter sent."""
    custom = orjson.dumps({"swu_message_id": message.message_id}).decode()
    return doc_event(
        name,
        **{"email": message.to, "message-id": message.esp_message_id, "X-Mailin-custom": custom},
        **changes,
    )


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def test_batched_events_reach_the_message(server: ServerHandle) -> None:
    """A batch of request, delivered and click shows in GetMessage; a redelivery is deduped."""
    message = sent(server, "jane@example.com")
    body = batch(
        event_for(message, "request.json"),
        event_for(message, "delivered.json"),
        event_for(message, "click.json", link="https://shop.example/o"),
    )
    assert post(server, body, bearer()) == (200, {"stored": 3, "duplicates": 0, "skipped": 0})
    assert post(server, body, bearer())[1] == {"stored": 0, "duplicates": 3, "skipped": 0}
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "DELIVERED"
    assert [
        (e.type, e.provider_type, e.recipient, e.esp, e.url) for e in webhook_events(after)
    ] == [
        (ET.EVENT_TYPE_SENT, "request", "jane@example.com", "brevo", ""),
        (ET.EVENT_TYPE_DELIVERED, "delivered", "jane@example.com", "brevo", ""),
        (ET.EVENT_TYPE_CLICKED, "click", "jane@example.com", "brevo", "https://shop.example/o"),
    ]
    assert all(e.provider_event_id.startswith("swu:") for e in webhook_events(after))


def test_hard_bounce_marks_the_message_bounced(server: ServerHandle) -> None:
    """A single hard_bounce event makes the message BOUNCED with the server's reply."""
    message = sent(server, "gone@example.com")
    body = orjson.dumps(event_for(message, "hard_bounce.json", reason="550 5.1.1 no such user"))
    assert post(server, body, bearer())[1] == {"stored": 1, "duplicates": 0, "skipped": 0}
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "BOUNCED"
    (event,) = webhook_events(after)
    assert (event.bounce, event.response, event.provider_type) == (
        BOUNCE_HARD,
        "550 5.1.1 no such user",
        "hard_bounce",
    )


def test_wrong_token_is_refused_and_stores_nothing(server: ServerHandle) -> None:
    """A wrong bearer token, Basic credentials or none get 401; nothing joins the message."""
    message = sent(server, "jane@example.com")
    body = orjson.dumps(event_for(message, "delivered.json"))
    assert post(server, body, bearer("guess"))[0] == 401
    assert post(server, body, basic())[0] == 401
    assert post(server, body, {})[0] == 401
    after = server.get(message.message_id)
    assert webhook_events(after) == [] and STATE_NAMES[after.state] == "SENT"
