"""Resend webhooks: Svix signatures and timestamps, every documented event, normalized.

The direct tests sign each request the Svix way with a secret generated here and a fixed
clock. The end-to-end tests send through a Resend account at the ESP simulator and post signed
events for that message to the real service's endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
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
    Forbidden,
    ProviderEvent,
    Received,
    Unauthorized,
    WebhookRequest,
)
from swu_delivery.webhooks.resend import ResendReceiver
from tests.adapter_kit import esp_table, toml_table
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk

DATA = Path(__file__).parent / "data" / "webhooks" / "resend"
KEY = os.urandom(24)  # a fresh signing key per run: never a real one
SECRET = "whsec_" + base64.b64encode(KEY).decode()
NOW = 1_732_318_900  # the fixed clock of the direct tests
MSG_ID = "msg_2pE8RqQ0aDlY5Yd3sWmVTm3xK1p"
FEB = datetime(2024, 2, 22, 23, 41, 12, 126000, tzinfo=UTC).timestamp()
NOV = datetime(2024, 11, 22, 23, 41, 12, 126000, tzinfo=UTC).timestamp()
EMAIL_ID = "56761188-7520-42d8-8898-ff6fc54ce618"
RECIPIENT = "delivered@resend.dev"
SAFARI = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/16.1 Safari/605.1.15"
)


def signature(body: bytes, msg_id: str = MSG_ID, stamp: int = NOW, key: bytes = KEY) -> str:
    """`v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}`, as Svix signs."""
    signed = f"{msg_id}.{stamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed(body: bytes, msg_id: str = MSG_ID, stamp: int = NOW) -> dict[str, str]:
    """The three Svix headers for `body`, signed with the test key."""
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(stamp),
        "svix-signature": signature(body, msg_id, stamp),
    }


def _no_http() -> Any:
    raise AssertionError("the Resend receiver makes no HTTP calls")


def receiver(secret: str = SECRET, now: float = NOW, **options: Any) -> ResendReceiver:
    settings = WebhookSettings(secret=secret, options=options)
    account = EspAccount(name="rs", kind="resend")
    return ResendReceiver(account, settings, http=_no_http, clock=lambda: now)


def request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    """The request as the server hands it over: headers case-insensitive, as aiohttp's are."""
    return WebhookRequest(
        method="POST",
        path="/webhooks/rs",
        query={},
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        body=body,
    )


async def receive(
    body: bytes, headers: dict[str, str] | None = None, now: float = NOW, **options: Any
) -> Received:
    hdrs = signed(body) if headers is None else headers
    return await receiver(now=now, **options).receive(request(body, hdrs))


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def doc_event(name: str, **data_changes: Any) -> dict[str, Any]:
    event = orjson.loads(fixture(name))
    assert isinstance(event, dict)
    event["data"] = {**event["data"], **data_changes}
    return event


# -- authentication --------------------------------------------------------------------------


def test_registry_maps_resend_to_this_receiver() -> None:
    """The server finds this class for kind "resend"."""
    assert receiver_class("resend") is ResendReceiver


async def test_signed_request_is_accepted() -> None:
    """A request signed with the secret, at the current time, gives its event."""
    (event,) = (await receive(fixture("delivered.json"))).events
    assert (event.type, event.provider_event_id) == (ET.EVENT_TYPE_DELIVERED, MSG_ID)


async def test_any_matching_v1_signature_is_enough() -> None:
    """During a secret rotation Svix sends several signatures; other versions are skipped."""
    body = fixture("opened.json")
    other = signature(body, key=os.urandom(24))
    header = f"v1a,{other[3:]} {other} {signature(body)}"
    received = await receive(body, signed(body) | {"svix-signature": header})
    assert len(received.events) == 1


async def test_secret_without_prefix_is_the_same_key() -> None:
    """Svix's libraries accept the base64 part alone; so do we."""
    body = fixture("sent.json")
    received = await receive(body, secret=SECRET.removeprefix("whsec_"))
    assert received.events[0].type == ET.EVENT_TYPE_SENT


def _bad_headers(body: bytes) -> dict[str, dict[str, str]]:
    good = signed(body)
    return {
        "none": {},
        "no-id": {k: v for k, v in good.items() if k != "svix-id"},
        "no-timestamp": {k: v for k, v in good.items() if k != "svix-timestamp"},
        "no-signature": {k: v for k, v in good.items() if k != "svix-signature"},
        "other-key": good | {"svix-signature": signature(body, key=os.urandom(24))},
        "other-body": good | {"svix-signature": signature(body + b" ")},
        "other-id": good | {"svix-id": "msg_other"},
        "other-timestamp": good | {"svix-timestamp": str(NOW + 1)},
        "float-timestamp": good | {"svix-timestamp": f"{NOW}.0"},
        "v2-version": good | {"svix-signature": "v2," + good["svix-signature"][3:]},
        "bare-signature": good | {"svix-signature": good["svix-signature"][3:]},
        "not-base64": good | {"svix-signature": "v1,not*base64"},
        "truncated": good | {"svix-signature": good["svix-signature"][:-8]},
    }


BAD = sorted(_bad_headers(b"{}"))


@pytest.mark.parametrize("case", BAD)
async def test_bad_or_missing_signature_is_unauthorized(case: str) -> None:
    """Anything but a valid signature over exactly these bytes: 401, the secret not echoed."""
    body = fixture("delivered.json")
    with pytest.raises(Unauthorized) as err:
        await receive(body, _bad_headers(body)[case])
    assert SECRET not in str(err.value) and KEY.hex() not in str(err.value)


@pytest.mark.parametrize(
    ("offset", "max_age", "ok"),
    [
        (-300, None, True),
        (300, None, True),
        (-301, None, False),
        (301, None, False),  # from the future: the same tolerance
        (-86_400, None, False),
        (-61, 60, False),
        (-59, 60, True),
        (-3599, 3600, True),
    ],
)
async def test_timestamp_outside_max_age_is_forbidden(
    offset: int, max_age: int | None, ok: bool
) -> None:
    """A correctly signed but stale (or future) request is refused as a possible replay: 403."""
    body = fixture("delivered.json")
    headers = signed(body, stamp=NOW + offset)
    options = {} if max_age is None else {"max_age": max_age}
    if ok:
        assert len((await receive(body, headers, **options)).events) == 1
    else:
        with pytest.raises(Forbidden):
            await receive(body, headers, **options)


async def test_stale_and_badly_signed_is_unauthorized() -> None:
    """The signature is checked before the clock: a forgery is 401 whatever its timestamp."""
    body = fixture("delivered.json")
    headers = signed(body, stamp=NOW - 3600) | {"svix-signature": signature(body + b"x")}
    with pytest.raises(Unauthorized):
        await receive(body, headers)


@pytest.mark.parametrize("body", [b"not json", b"[]", b"null", b'"email.sent"', b""])
async def test_unreadable_body_is_bad_request_after_auth(body: bytes) -> None:
    """Signed but not a JSON object: 400; the same body unsigned: 401."""
    with pytest.raises(BadRequest):
        await receive(body)
    with pytest.raises(Unauthorized):
        await receive(body, {})


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_not base64!", "   "])
def test_missing_or_malformed_secret_is_refused(secret: str) -> None:
    """Start-up fails without a usable signing secret, naming the key but not the value."""
    with pytest.raises(ValueError, match="secret") as err:
        receiver(secret=secret)
    assert "not base64!" not in str(err.value)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"max_age": 0}, "max_age"),
        ({"max_age": -5}, "max_age"),
        ({"max_age": "300"}, "max_age"),
        ({"max_age": True}, "max_age"),
        ({"username": "x"}, "username"),
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
        time=fields.pop("time", FEB),
        provider_event_id=MSG_ID,
        message_id=fields.pop("message_id", "msg-" + name.split(".")[1].replace("_", "-")),
        provider_type=name,
        recipient=RECIPIENT,
        esp_message_id=EMAIL_ID,
        **fields,
    )


BOUNCE_TEXT = (
    "The recipient's email address is on the suppression list because it has a recent history "
    "of producing hard bounces."
)
SUPPRESSED_TEXT = (
    "Resend has suppressed sending to this address because it is on the account-level "
    "suppression list. This does not count toward your bounce rate metric"
)
DOCUMENTED: dict[str, ProviderEvent] = {
    "sent.json": doc(ET.EVENT_TYPE_SENT, "email.sent"),
    "scheduled.json": doc(ET.EVENT_TYPE_UNKNOWN, "email.scheduled"),
    "delivered.json": doc(ET.EVENT_TYPE_DELIVERED, "email.delivered"),
    "delivery_delayed.json": doc(ET.EVENT_TYPE_DEFERRED, "email.delivery_delayed"),
    "complained.json": doc(ET.EVENT_TYPE_COMPLAINED, "email.complained"),
    "opened.json": doc(ET.EVENT_TYPE_OPENED, "email.opened"),
    "bounced.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "email.bounced",
        time=NOV,
        bounce=BOUNCE_HARD,
        reason=f"Permanent/Suppressed: {BOUNCE_TEXT}",
    ),
    "clicked.json": doc(
        ET.EVENT_TYPE_CLICKED,
        "email.clicked",
        time=datetime(2024, 11, 24, 5, 0, 57, 163000, tzinfo=UTC).timestamp(),
        url="https://resend.com",
        user_agent=SAFARI,
    ),
    "failed.json": doc(
        ET.EVENT_TYPE_FAILED, "email.failed", time=NOV, reason="reached_daily_quota"
    ),
    "suppressed.json": doc(
        ET.EVENT_TYPE_REJECTED,
        "email.suppressed",
        time=NOV,
        reason=f"OnAccountSuppressionList: {SUPPRESSED_TEXT}",
    ),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_documented_event_is_normalized(name: str) -> None:
    """Each documented example becomes exactly the expected event."""
    received = await receive(fixture(name))
    assert received.events == [DOCUMENTED[name]]
    assert received.skipped == 0


def test_every_fixture_is_checked() -> None:
    """No documented example in the data folder goes untested."""
    assert {p.name for p in DATA.glob("*.json")} == set(DOCUMENTED)


@pytest.mark.parametrize(
    ("bounce_type", "kind"),
    [
        ("Permanent", BOUNCE_HARD),
        ("Transient", BOUNCE_SOFT),
        ("Temporary", BOUNCE_SOFT),
        ("Undetermined", BOUNCE_SOFT),
        ("", BOUNCE_SOFT),
    ],
)
async def test_only_permanent_bounces_are_hard(bounce_type: str, kind: int) -> None:
    """Resend's `Permanent` is a hard bounce; transient and undetermined ones are soft."""
    event = doc_event("bounced.json", bounce={"type": bounce_type, "subType": "General"})
    (got,) = (await receive(orjson.dumps(event))).events
    assert (got.type, got.bounce) == (ET.EVENT_TYPE_BOUNCED, kind)


async def test_diagnostic_codes_become_the_response() -> None:
    """`bounce.diagnosticCode` (a list of SMTP replies) is the remote server's response."""
    codes = ["smtp; 550 5.1.1 user unknown", "smtp; 550 5.1.1 try again never"]
    event = doc_event(
        "bounced.json",
        bounce={"type": "Permanent", "subType": "General", "diagnosticCode": codes},
    )
    (got,) = (await receive(orjson.dumps(event))).events
    assert got.response == "\n".join(codes)
    assert got.reason == "Permanent/General"


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ([{"name": "category", "value": "x"}, {"name": "swu_message_id", "value": "m-9"}], "m-9"),
        ({"swu_message_id": "m-7"}, "m-7"),
        (None, ""),
        ({}, ""),
        ({"swu_message_id": 5}, ""),
        ("swu_message_id", ""),
    ],
)
async def test_our_id_is_read_from_either_tags_shape(tags: Any, expected: str) -> None:
    """Tags as the documented object or as the {name, value} list; mail sent elsewhere: ""."""
    (got,) = (await receive(orjson.dumps(doc_event("delivered.json", tags=tags)))).events
    assert (got.message_id, got.type) == (expected, ET.EVENT_TYPE_DELIVERED)


async def test_unknown_type_is_kept_as_unknown() -> None:
    """An event type added later is stored as UNKNOWN under its own name, not dropped."""
    event = {**doc_event("delivered.json"), "type": "email.rerouted"}
    (got,) = (await receive(orjson.dumps(event))).events
    assert (got.type, got.provider_type, got.time) == (ET.EVENT_TYPE_UNKNOWN, "email.rerouted", FEB)


@pytest.mark.parametrize(
    "broken",
    [
        {"created_at": "2024-02-22T23:41:12.126Z", "data": {}},  # no type
        {"type": 7, "created_at": "2024-02-22T23:41:12.126Z"},
        {"type": "email.sent", "data": {}},  # no time
        {"type": "email.sent", "created_at": "yesterday"},
        {"type": "email.sent", "created_at": 1708645272},
    ],
)
async def test_unreadable_event_is_skipped(broken: dict[str, Any]) -> None:
    """A signed JSON object that is no readable event: 200 with skipped = 1, nothing stored."""
    received = await receive(orjson.dumps(broken))
    assert (received.events, received.skipped) == ([], 1)


async def test_retried_delivery_keeps_its_event_id() -> None:
    """Svix re-sends a failed message with the same svix-id: the same provider_event_id."""
    body = fixture("clicked.json")
    first = await receive(body, signed(body, stamp=NOW - 100), now=NOW)
    retry = await receive(body, signed(body, stamp=NOW + 200), now=NOW + 250)
    assert first.events[0].provider_event_id == retry.events[0].provider_event_id == MSG_ID


# -- end to end ------------------------------------------------------------------------------

SECRET_ENV = "SWU_TEST_RS_WEBHOOK_SECRET"


@pytest.fixture
def server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The service sending through Resend account "rs" at the simulator, webhook signed."""
    table = toml_table(esp_table("resend", esp_simulator))
    webhook = f'[esp.webhook]\nsecret_env = "{SECRET_ENV}"\nmax_age = 300\n'
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "swu.toml", data_dir, esp_simulator.url, extra=table + webhook, default_esp="rs"
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
        f"{server.webhooks}/webhooks/rs",
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
    assert message.esp == "rs" and message.esp_message_id
    return message


def event_for(message: delivery_pb2.Message, name: str, **data_changes: Any) -> bytes:
    """A documented event about `message`, as Resend would post it for this send."""
    event = doc_event(name, email_id=message.esp_message_id, to=[message.to], **data_changes)
    event["data"]["tags"] = {"swu_message_id": message.message_id}
    return orjson.dumps(event)


def now_signed(body: bytes, msg_id: str) -> dict[str, str]:
    """Signed at the real current time: the service's clock is the wall clock."""
    return signed(body, msg_id, int(time.time()))


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def test_delivery_and_click_reach_the_message(server: ServerHandle) -> None:
    """A sent message's delivered and clicked events show in GetMessage; a retry is a dup."""
    message = sent(server, "jane@example.com")
    delivered = event_for(message, "delivered.json")
    clicked = event_for(
        message, "clicked.json", click={"link": "https://shop.example/o", "userAgent": "UA/1"}
    )
    ok = {"stored": 1, "duplicates": 0, "skipped": 0}
    assert post(server, delivered, now_signed(delivered, "msg_d1")) == (200, ok)
    assert post(server, clicked, now_signed(clicked, "msg_c1")) == (200, ok)
    again = post(server, delivered, now_signed(delivered, "msg_d1"))
    assert again == (200, {"stored": 0, "duplicates": 1, "skipped": 0})
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "DELIVERED"
    assert [
        (e.type, e.provider_event_id, e.provider_type, e.recipient, e.esp, e.url, e.user_agent)
        for e in webhook_events(after)
    ] == [
        (ET.EVENT_TYPE_DELIVERED, "msg_d1", "email.delivered", "jane@example.com", "rs", "", ""),
        (
            ET.EVENT_TYPE_CLICKED,
            "msg_c1",
            "email.clicked",
            "jane@example.com",
            "rs",
            "https://shop.example/o",
            "UA/1",
        ),
    ]


def test_permanent_bounce_marks_the_message_bounced(server: ServerHandle) -> None:
    """An email.bounced of type Permanent makes the message BOUNCED with a hard bounce."""
    message = sent(server, "gone@example.com")
    body = event_for(message, "bounced.json")
    assert post(server, body, now_signed(body, "msg_b1"))[0] == 200
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "BOUNCED"
    (event,) = webhook_events(after)
    assert (event.provider_event_id, event.bounce, event.recipient, event.detail) == (
        "msg_b1",
        BOUNCE_HARD,
        "gone@example.com",
        f"Permanent/Suppressed: {BOUNCE_TEXT}",
    )


def test_bad_signature_or_stale_request_stores_nothing(server: ServerHandle) -> None:
    """A forged request gets 401 and a replayed old one 403; the message stays SENT."""
    message = sent(server, "jane@example.com")
    body = event_for(message, "delivered.json")
    forged = now_signed(body, "msg_f1") | {"svix-signature": signature(body, "msg_f1", key=b"x")}
    assert post(server, body, forged)[0] == 401
    assert post(server, body, {})[0] == 401
    old = int(time.time()) - 3600
    assert post(server, body, signed(body, "msg_f2", old))[0] == 403
    after = server.get(message.message_id)
    assert webhook_events(after) == [] and STATE_NAMES[after.state] == "SENT"
