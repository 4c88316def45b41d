"""SparkPost event webhooks: Basic credentials, the ping batch, every documented event type.

SparkPost signs nothing, so the direct tests check the configured credentials (HTTP Basic and/or
a custom header) before anything else. The end-to-end tests send through a SparkPost account at
the ESP simulator and post batches about that message to the real service's endpoint.
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
from swu_delivery.webhooks.sparkpost import SparkPostReceiver
from tests.adapter_kit import esp_table, toml_table
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk

DATA = Path(__file__).parent / "data" / "webhooks" / "sparkpost"
USER, SECRET, HEADER = "sparkpost-hooks", "s3cret-Hook-Value", "X-Hook-Token"
DOC_TIME = datetime(2016, 4, 18, 14, 25, 7, tzinfo=UTC).timestamp()
DOC_EVENT_ID = "92356927693813856"
DOC_TRANSMISSION = "65832150921904138"
DOC_RECIPIENT = "recipient@example.com"
DOC_REASON = "MAIL REFUSED - IP (17.99.99.99) is in black list"
DOC_UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_10_3) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/41.0.2272.118 Safari/537.36"
)


def basic(user: str = USER, password: str = SECRET) -> dict[str, str]:
    """The header SparkPost sends for a webhook with `auth_type` basic."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _no_http() -> Any:
    raise AssertionError("the SparkPost receiver makes no HTTP calls")


def receiver(secret: str = SECRET, **options: Any) -> SparkPostReceiver:
    settings = WebhookSettings(secret=secret, options=options or {"username": USER})
    account = EspAccount(name="sp", kind="sparkpost")
    return SparkPostReceiver(account, settings, http=_no_http, clock=lambda: 0.0)


def request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    """The request as the server hands it over: headers case-insensitive, as aiohttp's are."""
    return WebhookRequest(
        method="POST",
        path="/webhooks/sp",
        query={},
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        body=body,
    )


async def receive(body: bytes, headers: dict[str, str] | None = None, **options: Any) -> Received:
    return await receiver(**options).receive(request(body, basic() if headers is None else headers))


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def doc_item(name: str, **changes: Any) -> dict[str, Any]:
    """The one `{"msys": {class: event}}` of a documented batch, the event's fields changed."""
    (item,) = orjson.loads(fixture(name))
    (cls,) = item["msys"]
    item["msys"][cls] = {**item["msys"][cls], **changes}
    return dict(item)


def batch(*items: Any) -> bytes:
    return orjson.dumps(list(items))


# -- authentication --------------------------------------------------------------------------


def test_registry_maps_sparkpost_to_this_receiver() -> None:
    """The server finds this class for kind "sparkpost"."""
    assert receiver_class("sparkpost") is SparkPostReceiver


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
        _token(f"{USER}{SECRET}"),
        {"Authorization": "Basic not-base64!"},
        {"Authorization": f"Bearer {SECRET}"},
        {"X-MessageSystems-Webhook-Token": SECRET},
        {HEADER: SECRET},
    ],
    ids=[
        "none",
        "wrong-password",
        "longer-password",
        "wrong-user",
        "no-colon",
        "not-base64",
        "bearer",
        "legacy-token",
        "header-instead",
    ],
)
async def test_wrong_or_missing_credentials_are_unauthorized(headers: dict[str, str]) -> None:
    """Anything but exactly the configured credentials: 401, and the secret is not echoed."""
    with pytest.raises(Unauthorized) as err:
        await receive(fixture("delivery.json"), headers)
    assert SECRET not in str(err.value)


async def test_secret_header_is_checked() -> None:
    """With `header` (set through SparkPost's custom_headers) it must carry exactly the secret."""
    body = fixture("open.json")
    assert len((await receive(body, {HEADER: SECRET}, header=HEADER)).events) == 1
    for headers in ({}, {HEADER: SECRET[:-1]}, basic()):
        with pytest.raises(Unauthorized):
            await receive(body, headers, header=HEADER)


async def test_both_configured_need_both() -> None:
    """username and header together: the request must carry both."""
    body = fixture("open.json")
    both = {**basic(), HEADER: SECRET}
    assert len((await receive(body, both, username=USER, header=HEADER)).events) == 1
    for headers in (basic(), {HEADER: SECRET}):
        with pytest.raises(Unauthorized):
            await receive(body, headers, username=USER, header=HEADER)


async def test_ping_batch_is_accepted_with_no_events() -> None:
    """The `[{"msys": {}}]` SparkPost posts when a webhook is created: 200, nothing stored."""
    received = await receive(fixture("ping.json"))
    assert (received.events, received.skipped) == ([], 0)
    with pytest.raises(Unauthorized):
        await receive(fixture("ping.json"), {})


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"msys": {}}', b"null", b"5", b""])
async def test_unreadable_body_is_bad_request_after_auth(body: bytes) -> None:
    """Authenticated but not a JSON array: 400; the same body without credentials: 401."""
    with pytest.raises(BadRequest):
        await receive(body)
    with pytest.raises(Unauthorized):
        await receive(body, {})


# -- configuration ---------------------------------------------------------------------------


def test_an_authentication_method_is_required() -> None:
    """Neither username nor header: the endpoint would be open, so start-up fails."""
    settings = WebhookSettings(secret=SECRET, options={})
    with pytest.raises(ValueError, match=r"username.*header"):
        SparkPostReceiver(
            EspAccount(name="sp", kind="sparkpost"), settings, http=_no_http, clock=lambda: 0.0
        )


def test_missing_secret_is_refused() -> None:
    """Without a secret every request would need an empty password: refuse to start."""
    with pytest.raises(ValueError, match="secret_env or secret_file"):
        receiver(secret="", username=USER)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"username": ""}, "username"),
        ({"username": 5}, "username"),
        ({"header": "X Bad"}, "header"),
        ({"header": "Authorization"}, "header"),
        ({"username": USER, "max_age": 300}, "max_age"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict[str, Any], key: str) -> None:
    """Each bad option fails start-up with its key named, never the secret."""
    with pytest.raises(ValueError, match=key) as err:
        receiver(**options)
    assert SECRET not in str(err.value)


# -- normalization ---------------------------------------------------------------------------


def doc(kind: int, name: str, **fields: Any) -> ProviderEvent:
    """The expected event for a documented example: its common fields filled in."""
    return ProviderEvent(
        type=kind,
        time=DOC_TIME,
        provider_event_id=fields.pop("provider_event_id", DOC_EVENT_ID),
        message_id=fields.pop("message_id", "msg-" + name.replace("_", "-")),
        provider_type=name,
        recipient=fields.pop("recipient", DOC_RECIPIENT),
        esp_message_id=fields.pop("esp_message_id", DOC_TRANSMISSION),
        **fields,
    )


REFUSED = {"response": DOC_REASON}
DOCUMENTED: dict[str, ProviderEvent] = {
    "injection.json": doc(ET.EVENT_TYPE_SENT, "injection"),
    "delivery.json": doc(ET.EVENT_TYPE_DELIVERED, "delivery"),
    "delay.json": doc(
        ET.EVENT_TYPE_DEFERRED, "delay", reason="bounce class 1 (Undetermined)", **REFUSED
    ),
    "bounce.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "bounce",
        bounce=BOUNCE_SOFT,
        reason="bounce class 1 (Undetermined)",
        **REFUSED,
    ),
    "out_of_band.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "out_of_band",
        bounce=BOUNCE_SOFT,
        reason="bounce class 1 (Undetermined)",
        **REFUSED,
    ),
    "policy_rejection.json": doc(
        ET.EVENT_TYPE_REJECTED,
        "policy_rejection",
        reason="bounce class 25 (Admin Failure)",
        **REFUSED,
    ),
    "generation_rejection.json": doc(
        ET.EVENT_TYPE_REJECTED,
        "generation_rejection",
        reason="bounce class 25 (Admin Failure)",
        **REFUSED,
    ),
    "generation_failure.json": doc(
        ET.EVENT_TYPE_FAILED,
        "generation_failure",
        reason="MAIL REFUSED - IP (a.b.c.d) is in black list",
        **REFUSED,
    ),
    "spam_complaint.json": doc(ET.EVENT_TYPE_COMPLAINED, "spam_complaint", reason="abuse"),
    "open.json": doc(ET.EVENT_TYPE_OPENED, "open", user_agent=DOC_UA),
    "initial_open.json": doc(ET.EVENT_TYPE_OPENED, "initial_open", user_agent=DOC_UA),
    "click.json": doc(ET.EVENT_TYPE_CLICKED, "click", url="http://example.com", user_agent=DOC_UA),
    "list_unsubscribe.json": doc(ET.EVENT_TYPE_UNSUBSCRIBED, "list_unsubscribe"),
    "link_unsubscribe.json": doc(ET.EVENT_TYPE_UNSUBSCRIBED, "link_unsubscribe", user_agent=DOC_UA),
    "sms_status.json": doc(
        ET.EVENT_TYPE_UNKNOWN,
        "sms_status",
        provider_event_id=stable_event_id("sms_status", "", "", "1460989507", ""),
        message_id="",
        recipient="",
        esp_message_id="",
        reason="MAIL REFUSED - IP (a.b.c.d) is in black list",
        **REFUSED,
    ),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_documented_event_is_normalized(name: str) -> None:
    """Each documented example becomes exactly the expected event."""
    received = await receive(fixture(name))
    assert received.events == [DOCUMENTED[name]]
    assert received.skipped == 0


def test_every_fixture_is_checked() -> None:
    """No documented example in the data folder goes untested (ping has its own test)."""
    assert {p.name for p in DATA.glob("*.json")} == {*DOCUMENTED, "ping.json"}


async def test_batch_keeps_every_event_in_order() -> None:
    """A batch mixing event classes gives one event per item, in the batch's order."""
    names = ["injection.json", "delivery.json", "open.json", "click.json", "list_unsubscribe.json"]
    body = batch(*(doc_item(n) for n in names))
    received = await receive(body)
    assert received.events == [DOCUMENTED[n] for n in names]


@pytest.mark.parametrize(
    "broken",
    [
        {"msys": {"message_event": {"type": "delivery"}}},  # no timestamp
        {"msys": {"message_event": {"timestamp": "1460989507"}}},  # no type
        {"msys": {"message_event": {"type": "delivery", "timestamp": "yesterday"}}},
        {"msys": {"message_event": {"type": "delivery", "timestamp": "nan"}}},
        {"msys": {"message_event": {"type": "delivery", "timestamp": True}}},
        {"msys": {"message_event": "delivery"}},
        {"msys": {"message_event": {}, "track_event": {}}},
        {"msys": []},
        {"event": "delivery"},
        "msys",
        None,
    ],
)
async def test_one_broken_event_is_skipped_the_others_kept(broken: Any) -> None:
    """An unreadable item in a batch is counted in skipped; the readable ones are returned."""
    body = batch(doc_item("delivery.json"), broken, doc_item("bounce.json"))
    received = await receive(body)
    assert received.events == [DOCUMENTED["delivery.json"], DOCUMENTED["bounce.json"]]
    assert received.skipped == 1


async def test_ping_inside_a_batch_is_neither_event_nor_skipped() -> None:
    """An empty msys among events is ignored, not counted as broken."""
    received = await receive(batch({"msys": {}}, doc_item("click.json")))
    assert (received.events, received.skipped) == ([DOCUMENTED["click.json"]], 0)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("10", (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ("30", (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ("1", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("20", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("21", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("22", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("23", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("24", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("40", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("50", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("51", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("52", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("53", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("54", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("70", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("25", (ET.EVENT_TYPE_REJECTED, 0)),
        ("90", (ET.EVENT_TYPE_UNSUBSCRIBED, 0)),
        ("60", (ET.EVENT_TYPE_UNKNOWN, 0)),
        ("80", (ET.EVENT_TYPE_UNKNOWN, 0)),
        ("100", (ET.EVENT_TYPE_UNKNOWN, 0)),
        ("999", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        (None, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
    ],
)
@pytest.mark.parametrize("name", ["bounce.json", "out_of_band.json"])
async def test_bounce_class_decides_type_and_kind(
    name: str, code: str | None, expected: tuple[int, int]
) -> None:
    """Only Invalid Recipient (10) and No RCPT (30) are hard; 25/60/80/90/100 are not bounces."""
    item = doc_item(name, bounce_class=code)
    (event,) = (await receive(batch(item))).events
    assert (event.type, event.bounce) == expected


async def test_not_spam_feedback_is_no_complaint() -> None:
    """An ARF report of type not-spam says the opposite of a complaint: UNKNOWN."""
    item = doc_item("spam_complaint.json", fbtype="not-spam")
    (event,) = (await receive(batch(item))).events
    assert (event.type, event.reason) == (ET.EVENT_TYPE_UNKNOWN, "not-spam")


@pytest.mark.parametrize(
    "stamp", ["1460989507", 1460989507, 1460989507.0, "2016-04-18T14:25:07.000+00:00"]
)
async def test_unix_and_iso_timestamps_are_read(stamp: Any) -> None:
    """Webhooks carry Unix seconds (string or number); the ISO form of the samples works too."""
    (event,) = (await receive(batch(doc_item("delivery.json", timestamp=stamp)))).events
    assert event.time == DOC_TIME


async def test_unknown_type_is_kept_as_unknown() -> None:
    """A type added later (here an A/B test event) is stored as UNKNOWN under its own name."""
    item = {"msys": {"ab_test_event": {"type": "ab_test_completed", "timestamp": "1460989507"}}}
    (event,) = (await receive(batch(item))).events
    assert (event.type, event.provider_type, event.message_id) == (
        ET.EVENT_TYPE_UNKNOWN,
        "ab_test_completed",
        "",
    )
    assert event.provider_event_id.startswith("swu:")


@pytest.mark.parametrize("meta", [None, {}, {"swu_message_id": 5}, "swu_message_id"])
async def test_event_without_our_id_has_an_empty_message_id(meta: Any) -> None:
    """Mail sent outside this service (no rcpt_meta id) is still read, with message_id ""."""
    (event,) = (await receive(batch(doc_item("delivery.json", rcpt_meta=meta)))).events
    assert (event.message_id, event.type) == ("", ET.EVENT_TYPE_DELIVERED)


async def test_recipient_keeps_its_case_from_raw_rcpt_to() -> None:
    """`raw_rcpt_to` keeps the address as sent; `rcpt_to` is lower-cased by SparkPost."""
    item = doc_item("delivery.json", raw_rcpt_to="Jane@Example.com", rcpt_to="jane@example.com")
    (event,) = (await receive(batch(item))).events
    assert event.recipient == "Jane@Example.com"


# -- end to end ------------------------------------------------------------------------------

SECRET_ENV = "SWU_TEST_SP_WEBHOOK_SECRET"


@pytest.fixture
def server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The service sending through SparkPost account "sp" at the simulator, webhook on Basic."""
    table = toml_table(esp_table("sparkpost", esp_simulator))
    webhook = f'[esp.webhook]\nsecret_env = "{SECRET_ENV}"\nusername = "{USER}"\n'
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "swu.toml", data_dir, esp_simulator.url, extra=table + webhook, default_esp="sp"
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
        f"{server.webhooks}/webhooks/sp",
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
    assert message.esp == "sp" and message.esp_message_id
    return message


def item_for(message: delivery_pb2.Message, name: str, event_id: str, **changes: Any) -> Any:
    """A documented event about `message`, as SparkPost would post it for this transmission."""
    return doc_item(
        name,
        event_id=event_id,
        transmission_id=message.esp_message_id,
        rcpt_to=message.to,
        raw_rcpt_to=message.to,
        rcpt_meta={"swu_message_id": message.message_id},
        **changes,
    )


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def test_ping_then_a_batch_reach_the_message(server: ServerHandle) -> None:
    """The creation ping stores nothing; a batch of injection, delivery and click is stored
    once (a retried batch is all duplicates) and shows in GetMessage."""
    assert post(server, fixture("ping.json"), basic()) == (
        200,
        {"stored": 0, "duplicates": 0, "skipped": 0},
    )
    message = sent(server, "jane@example.com")
    body = batch(
        item_for(message, "injection.json", "1001"),
        item_for(message, "delivery.json", "1002"),
        item_for(message, "click.json", "1003", target_link_url="https://shop.example/o"),
    )
    assert post(server, body, basic()) == (200, {"stored": 3, "duplicates": 0, "skipped": 0})
    assert post(server, body, basic())[1] == {"stored": 0, "duplicates": 3, "skipped": 0}
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "DELIVERED"
    assert [
        (e.type, e.provider_event_id, e.provider_type, e.recipient, e.esp, e.url)
        for e in webhook_events(after)
    ] == [
        (ET.EVENT_TYPE_SENT, "1001", "injection", "jane@example.com", "sp", ""),
        (ET.EVENT_TYPE_DELIVERED, "1002", "delivery", "jane@example.com", "sp", ""),
        (
            ET.EVENT_TYPE_CLICKED,
            "1003",
            "click",
            "jane@example.com",
            "sp",
            "https://shop.example/o",
        ),
    ]


def test_hard_bounce_marks_the_message_bounced(server: ServerHandle) -> None:
    """A bounce of class 10 (Invalid Recipient) makes the message BOUNCED, hard; a broken
    event beside it is skipped."""
    message = sent(server, "gone@example.com")
    bounce = item_for(
        message, "bounce.json", "2001", bounce_class="10", raw_reason="550 5.1.1 no such user"
    )
    assert post(server, batch(bounce, {"msys": "?"}), basic())[1] == {
        "stored": 1,
        "duplicates": 0,
        "skipped": 1,
    }
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "BOUNCED"
    (event,) = webhook_events(after)
    assert (event.provider_event_id, event.bounce, event.response, event.detail) == (
        "2001",
        BOUNCE_HARD,
        "550 5.1.1 no such user",
        "bounce class 10 (Invalid Recipient)",
    )


def test_wrong_credentials_are_refused_and_store_nothing(server: ServerHandle) -> None:
    """A wrong password or none gets 401; the message keeps no webhook event and stays SENT."""
    message = sent(server, "jane@example.com")
    body = batch(item_for(message, "delivery.json", "3001"))
    assert post(server, body, basic(password="guess"))[0] == 401
    assert post(server, body, {})[0] == 401
    after = server.get(message.message_id)
    assert webhook_events(after) == [] and STATE_NAMES[after.state] == "SENT"
