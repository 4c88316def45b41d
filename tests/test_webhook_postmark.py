"""Postmark webhooks: Basic credentials and secret headers, every documented record, normalized.

Postmark signs nothing, so the direct tests check the configured credentials (HTTP Basic and/or
a custom header) before anything else. The end-to-end tests send through a Postmark account at
the ESP simulator and post the records for that message to the real service's endpoint.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
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
from swu_delivery.webhooks.postmark import PostmarkReceiver
from tests.adapter_kit import esp_table, toml_table
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk

DATA = Path(__file__).parent / "data" / "webhooks" / "postmark"
USER, SECRET, HEADER = "postmark-hooks", "s3cret-Hook-Value", "X-Hook-Token"
DOC_TIME = datetime(2026, 11, 5, 16, 33, 54, 907025, tzinfo=UTC).timestamp()
DOC_MESSAGE = "883953f4-6105-42a2-a16a-77a8eac79483"
DOC_RECIPIENT = "margareth@nasa.com"
DOC_UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 15_0) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/140.0.7339.80 Safari/537.36"
)


def basic(user: str = USER, password: str = SECRET) -> dict[str, str]:
    """The header Postmark sends for `https://user:password@host/...` (or HttpAuth)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def receiver(secret: str = SECRET, **options: Any) -> PostmarkReceiver:
    settings = WebhookSettings(secret=secret, options=options or {"username": USER})
    account = EspAccount(name="pm", kind="postmark")
    return PostmarkReceiver(account, settings, http=_no_http, clock=lambda: 0.0)


def _no_http() -> Any:
    raise AssertionError("the Postmark receiver makes no HTTP calls")


def request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    """The request as the server hands it over: headers case-insensitive, as aiohttp's are."""
    return WebhookRequest(
        method="POST",
        path="/webhooks/pm",
        query={},
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        body=body,
    )


async def receive(body: bytes, headers: dict[str, str] | None = None, **options: Any) -> Received:
    return await receiver(**options).receive(request(body, basic() if headers is None else headers))


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def doc_record(name: str, **changes: Any) -> dict[str, Any]:
    record = orjson.loads(fixture(name))
    assert isinstance(record, dict)
    return {**record, **changes}


# -- authentication --------------------------------------------------------------------------


def test_registry_maps_postmark_to_this_receiver() -> None:
    """The server finds this class for kind "postmark"."""
    assert receiver_class("postmark") is PostmarkReceiver


async def test_basic_credentials_are_accepted() -> None:
    """The configured user and the secret as password, in any case of the scheme name."""
    body = fixture("delivery.json")
    assert len((await receive(body)).events) == 1
    lower = {"Authorization": basic()["Authorization"].replace("Basic", "basic")}
    assert len((await receive(body, lower)).events) == 1


def _token(text: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(password="wrong"),
        basic(password=SECRET + "x"),
        basic(user="someone-else"),
        _token(f"{USER}{SECRET}"),  # no colon
        _token(f":{SECRET}"),
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
        {"Authorization": f"Bearer {SECRET}"},
        {"Authorization": "Basic"},
        {HEADER: SECRET},
    ],
    ids=[
        "none",
        "wrong-password",
        "longer-password",
        "wrong-user",
        "no-colon",
        "no-user",
        "not-base64",
        "not-utf8",
        "bearer",
        "empty",
        "header-instead",
    ],
)
async def test_wrong_or_missing_credentials_are_unauthorized(headers: dict[str, str]) -> None:
    """Anything but exactly the configured credentials: 401, and the secret is not echoed."""
    with pytest.raises(Unauthorized) as err:
        await receive(fixture("delivery.json"), headers)
    assert SECRET not in str(err.value)


async def test_secret_header_is_checked() -> None:
    """With `header`, the custom header must carry exactly the secret."""
    body = fixture("open.json")
    assert len((await receive(body, {HEADER: SECRET}, header=HEADER)).events) == 1
    assert len((await receive(body, {HEADER.lower(): SECRET}, header=HEADER)).events) == 1
    for headers in ({}, {HEADER: SECRET[:-1]}, {HEADER: SECRET + " "}, basic()):
        with pytest.raises(Unauthorized):
            await receive(body, headers, header=HEADER)


async def test_both_configured_need_both() -> None:
    """username and header together: the request must carry both."""
    body = fixture("open.json")
    both = {**basic(), HEADER: SECRET}
    assert len((await receive(body, both, username=USER, header=HEADER)).events) == 1
    for headers in (basic(), {HEADER: SECRET}, {**basic(), HEADER: "other"}):
        with pytest.raises(Unauthorized):
            await receive(body, headers, username=USER, header=HEADER)


@pytest.mark.parametrize("body", [b"not json", b"[]", b"null", b'"Delivery"', b""])
async def test_unreadable_body_is_bad_request_after_auth(body: bytes) -> None:
    """Authenticated but not a JSON object: 400; the same body without credentials: 401."""
    with pytest.raises(BadRequest):
        await receive(body)
    with pytest.raises(Unauthorized):
        await receive(body, {})


# -- configuration ---------------------------------------------------------------------------


def test_an_authentication_method_is_required() -> None:
    """Neither username nor header: the endpoint would be open, so start-up fails."""
    settings = WebhookSettings(secret=SECRET, options={})
    with pytest.raises(ValueError, match=r"username.*header"):
        PostmarkReceiver(
            EspAccount(name="pm", kind="postmark"), settings, http=_no_http, clock=lambda: 0.0
        )


@pytest.mark.parametrize("options", [{"username": USER}, {"header": HEADER}])
def test_missing_secret_is_refused(options: dict[str, str]) -> None:
    """Without a secret every request would need an empty password: refuse to start."""
    with pytest.raises(ValueError, match="secret_env or secret_file"):
        receiver(secret="", **options)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"username": ""}, "username"),
        ({"username": 5}, "username"),
        ({"username": "a:b"}, "username"),
        ({"header": ""}, "header"),
        ({"header": "X Bad"}, "header"),
        ({"header": "X-Bad:"}, "header"),
        ({"header": "authorization"}, "header"),
        ({"username": USER, "token": "x"}, "token"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict[str, Any], key: str) -> None:
    """Each bad option fails start-up with its key named, never the secret."""
    with pytest.raises(ValueError, match=key) as err:
        receiver(**options)
    assert SECRET not in str(err.value)


# -- normalization ---------------------------------------------------------------------------


def doc(type: int, message_id: str, record: str, event_id: str, **fields: Any) -> ProviderEvent:
    """The expected event for a documented example: its common fields filled in."""
    return ProviderEvent(
        type=type,
        time=fields.pop("time", DOC_TIME),
        provider_event_id=event_id,
        message_id=message_id,
        provider_type=record,
        recipient=fields.pop("recipient", DOC_RECIPIENT),
        esp_message_id=fields.pop("esp_message_id", DOC_MESSAGE),
        **fields,
    )


def stable(name: str) -> str:
    """The id derived for a documented record without an ID: from what identifies it."""
    record = doc_record(name)
    when = next(record[f] for f in ("DeliveredAt", "ReceivedAt", "ChangedAt") if f in record)
    return stable_event_id(
        record["RecordType"],
        record.get("MessageID") or "",
        record.get("Recipient") or record.get("Email"),
        when,
        record.get("OriginalLink", ""),
        record.get("SuppressSending"),
    )


DOCUMENTED: dict[str, Any] = {
    "bounce.json": lambda: doc(
        ET.EVENT_TYPE_BOUNCED,
        "msg-bounce",
        "Bounce",
        "692560173",
        bounce=BOUNCE_HARD,
        reason="HardBounce: The server was unable to deliver your message "
        "(ex: unknown user, mailbox not found).",
        response="Test bounce details",
    ),
    "spam_complaint.json": lambda: doc(
        ET.EVENT_TYPE_COMPLAINED,
        "msg-spam",
        "SpamComplaint",
        "692560174",
        reason="SpamComplaint: The subscriber explicitly marked this message as spam.",
        response="Test spam complaint details",
    ),
    "delivery.json": lambda: doc(
        ET.EVENT_TYPE_DELIVERED,
        "msg-delivery",
        "Delivery",
        stable("delivery.json"),
        response="250 2.0.0 OK  1762360434 x12-20020a05 - gsmtp",
    ),
    "open.json": lambda: doc(
        ET.EVENT_TYPE_OPENED, "msg-open", "Open", stable("open.json"), user_agent=DOC_UA
    ),
    "click.json": lambda: doc(
        ET.EVENT_TYPE_CLICKED,
        "msg-click",
        "Click",
        stable("click.json"),
        url="https://example.com/confirm-your-address",
        user_agent=DOC_UA,
    ),
    "subscription_change.json": lambda: doc(
        ET.EVENT_TYPE_BOUNCED,
        "msg-subscription-change",
        "SubscriptionChange",
        stable("subscription_change.json"),
        bounce=BOUNCE_HARD,
        reason="HardBounce (by Recipient)",
    ),
    "subscription_change_unsubscribe.json": lambda: doc(
        ET.EVENT_TYPE_UNSUBSCRIBED,
        "msg-unsubscribe",
        "SubscriptionChange",
        stable("subscription_change_unsubscribe.json"),
        time=datetime(2022, 6, 5, 17, 17, 32, tzinfo=UTC).timestamp(),
        recipient="john@example.com",
        esp_message_id="a4909a96-73d7-4c49-b148-a54522d3f7ac",
        reason="ManualSuppression (by Recipient)",
    ),
    "subscription_change_reactivation.json": lambda: doc(
        ET.EVENT_TYPE_UNKNOWN,
        "",
        "SubscriptionChange",
        stable("subscription_change_reactivation.json"),
        time=datetime(2022, 6, 5, 17, 17, 32, tzinfo=UTC).timestamp(),
        recipient="john@example.com",
        esp_message_id="",
    ),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_documented_record_is_normalized(name: str) -> None:
    """Each documented example becomes exactly the expected event."""
    received = await receive(fixture(name))
    assert received.events == [DOCUMENTED[name]()]
    assert received.skipped == 0
    assert received.events[0].provider_event_id.startswith(("swu:", "69256017"))


def test_every_fixture_is_checked() -> None:
    """No documented example in the data folder goes untested."""
    assert {p.name for p in DATA.glob("*.json")} == set(DOCUMENTED)


@pytest.mark.parametrize(
    "broken",
    [
        {"DeliveredAt": "2026-11-05T16:33:54Z", "MessageID": "x"},  # no RecordType
        {"RecordType": 5, "DeliveredAt": "2026-11-05T16:33:54Z"},
        {"RecordType": "Delivery", "MessageID": "x"},  # no time
        {"RecordType": "Delivery", "DeliveredAt": "yesterday"},
        {"RecordType": "Delivery", "DeliveredAt": 1762360434},
        {"RecordType": "Delivery", "ReceivedAt": "2026-11-05T16:33:54Z"},  # not its time field
    ],
)
async def test_unreadable_record_is_skipped(broken: dict[str, Any]) -> None:
    """A JSON object that is no readable record: 200 with skipped = 1, nothing stored."""
    received = await receive(orjson.dumps(broken))
    assert (received.events, received.skipped) == ([], 1)


async def test_unknown_record_type_is_kept_as_unknown() -> None:
    """A RecordType added later is stored as UNKNOWN under its own name, not dropped."""
    record = doc_record("delivery.json", RecordType="Rerouted", DeliveredAt=None)
    record["ChangedAt"] = "2026-11-05T16:33:54.9070259Z"
    (event,) = (await receive(orjson.dumps(record))).events
    assert (event.type, event.provider_type, event.time, event.message_id) == (
        ET.EVENT_TYPE_UNKNOWN,
        "Rerouted",
        DOC_TIME,
        "msg-delivery",
    )


@pytest.mark.parametrize(
    ("type_name", "code", "expected"),
    [
        ("HardBounce", 1, (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ("BadEmailAddress", 100000, (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ("Transient", 2, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("SoftBounce", 4096, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("DnsError", 256, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("Blocked", 100006, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("DMARCPolicy", 100009, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("SpamNotification", 512, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("Unknown", 2048, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("SpamComplaint", 100001, (ET.EVENT_TYPE_COMPLAINED, 0)),
        ("Unsubscribe", 16, (ET.EVENT_TYPE_UNSUBSCRIBED, 0)),
        ("ManuallyDeactivated", 100002, (ET.EVENT_TYPE_REJECTED, 0)),
        ("SMTPApiError", 100007, (ET.EVENT_TYPE_REJECTED, 0)),
        ("TemplateRenderingFailed", 100010, (ET.EVENT_TYPE_FAILED, 0)),
        ("AutoResponder", 64, (ET.EVENT_TYPE_UNKNOWN, 0)),
        ("AddressChange", 128, (ET.EVENT_TYPE_UNKNOWN, 0)),
        ("SomethingNew", 999, (ET.EVENT_TYPE_UNKNOWN, 0)),
        (None, 1, (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),  # no Type: TypeCode decides
        (None, 4096, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
    ],
)
async def test_bounce_type_decides_type_and_kind(
    type_name: str | None, code: int, expected: tuple[int, int]
) -> None:
    """Only a missing mailbox or invalid address is a hard bounce; notices are not bounces."""
    record = doc_record("bounce.json", TypeCode=code)
    if type_name is None:
        del record["Type"]
    else:
        record["Type"] = type_name
    (event,) = (await receive(orjson.dumps(record))).events
    assert (event.type, event.bounce) == expected


async def test_records_without_id_get_a_stable_one() -> None:
    """Opens have no ID: the same record gets the same id again, another open another id."""
    first = fixture("open.json")
    later = orjson.dumps(doc_record("open.json", ReceivedAt="2026-11-05T17:00:00Z"))
    other = orjson.dumps(doc_record("open.json", Recipient="other@nasa.com"))
    ids = [(await receive(body)).events[0].provider_event_id for body in (first, first, later)]
    ids.append((await receive(other)).events[0].provider_event_id)
    assert ids[0] == ids[1] and len(set(ids)) == 3


async def test_clicks_on_different_links_are_different_events() -> None:
    """Two links clicked in the same second are two events."""
    one = fixture("click.json")
    two = orjson.dumps(doc_record("click.json", OriginalLink="https://example.com/other"))
    ids = {(await receive(body)).events[0].provider_event_id for body in (one, two)}
    assert len(ids) == 2


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2014-08-01T13:28:10.2735393-04:00", datetime(2014, 8, 1, 17, 28, 10, 273539, UTC)),
        ("2022-06-05T17:17:32Z", datetime(2022, 6, 5, 17, 17, 32, tzinfo=UTC)),
        ("2022-06-05T17:17:32", datetime(2022, 6, 5, 17, 17, 32, tzinfo=UTC)),  # naive: UTC
    ],
)
async def test_iso_timestamps_with_offsets_are_read(stamp: str, expected: datetime) -> None:
    """Postmark's ISO 8601 times, with 7 fraction digits and offsets, become epoch seconds."""
    (event,) = (await receive(orjson.dumps(doc_record("delivery.json", DeliveredAt=stamp)))).events
    assert event.time == expected.timestamp()


@pytest.mark.parametrize("metadata", [None, {}, {"swu_message_id": 5}, "swu_message_id"])
async def test_record_without_our_id_has_an_empty_message_id(metadata: Any) -> None:
    """Mail sent outside this service (no Metadata id) is still read, with message_id ""."""
    (event,) = (await receive(orjson.dumps(doc_record("delivery.json", Metadata=metadata)))).events
    assert (event.message_id, event.type) == ("", ET.EVENT_TYPE_DELIVERED)


# -- end to end ------------------------------------------------------------------------------

SECRET_ENV = "SWU_TEST_PM_WEBHOOK_SECRET"


@pytest.fixture
def server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The service sending through Postmark account "pm" at the simulator, webhook on Basic."""
    table = toml_table(esp_table("postmark", esp_simulator))
    webhook = f'[esp.webhook]\nsecret_env = "{SECRET_ENV}"\nusername = "{USER}"\n'
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "swu.toml", data_dir, esp_simulator.url, extra=table + webhook, default_esp="pm"
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
        f"{server.webhooks}/webhooks/pm",
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
    assert message.esp == "pm" and message.esp_message_id
    return message


def record_for(message: delivery_pb2.Message, name: str, **changes: Any) -> bytes:
    """A documented record about `message`, as Postmark would post it for this send."""
    record = doc_record(name, MessageID=message.esp_message_id, **changes)
    record["Metadata"] = {"swu_message_id": message.message_id}
    record["Recipient" if "Recipient" in record else "Email"] = message.to
    return orjson.dumps(record)


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def test_delivery_and_click_reach_the_message(server: ServerHandle) -> None:
    """A sent message's Delivery and Click show in GetMessage; a redelivery is a duplicate."""
    message = sent(server, "jane@example.com")
    delivered = record_for(message, "delivery.json", Details="smtp;250 2.0.0 OK")
    clicked = record_for(message, "click.json", OriginalLink="https://shop.example/o")
    assert post(server, delivered, basic()) == (200, {"stored": 1, "duplicates": 0, "skipped": 0})
    assert post(server, clicked, basic())[1] == {"stored": 1, "duplicates": 0, "skipped": 0}
    assert post(server, delivered, basic())[1] == {"stored": 0, "duplicates": 1, "skipped": 0}
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "DELIVERED"
    assert [
        (e.type, e.provider_type, e.recipient, e.esp, e.response, e.url, e.user_agent)
        for e in webhook_events(after)
    ] == [
        (
            ET.EVENT_TYPE_DELIVERED,
            "Delivery",
            "jane@example.com",
            "pm",
            "smtp;250 2.0.0 OK",
            "",
            "",
        ),
        (
            ET.EVENT_TYPE_CLICKED,
            "Click",
            "jane@example.com",
            "pm",
            "",
            "https://shop.example/o",
            DOC_UA,
        ),
    ]
    assert all(e.provider_event_id.startswith("swu:") for e in webhook_events(after))


def test_hard_bounce_marks_the_message_bounced(server: ServerHandle) -> None:
    """A HardBounce record makes the message BOUNCED, keyed by Postmark's bounce ID."""
    message = sent(server, "gone@example.com")
    body = record_for(message, "bounce.json", ID=77001, Details="smtp;550 5.1.1 no such user")
    assert post(server, body, basic())[0] == 200
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "BOUNCED"
    (event,) = webhook_events(after)
    assert (event.provider_event_id, event.bounce, event.response, event.recipient) == (
        "77001",
        BOUNCE_HARD,
        "smtp;550 5.1.1 no such user",
        "gone@example.com",
    )
    assert event.detail.startswith("HardBounce: ")


def test_wrong_credentials_are_refused_and_store_nothing(server: ServerHandle) -> None:
    """A wrong password or none gets 401; the message keeps no webhook event and stays SENT."""
    message = sent(server, "jane@example.com")
    body = record_for(message, "delivery.json")
    assert post(server, body, basic(password="guess"))[0] == 401
    assert post(server, body, {})[0] == 401
    after = server.get(message.message_id)
    assert webhook_events(after) == [] and STATE_NAMES[after.state] == "SENT"
