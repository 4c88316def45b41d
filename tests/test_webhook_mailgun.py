"""Mailgun webhooks: the signature block (HMAC, age, token), every documented event, normalized.

Mailgun signs `timestamp + token` with the webhook signing key and puts the signature inside
the body, so the direct tests build the body and sign it with a key made up here, against a
fixed clock. The end-to-end tests send through a Mailgun account at the ESP simulator and post
signed events for that message to the real service's endpoint (signed at the current time,
since the service runs on the real clock).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
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
    Forbidden,
    ProviderEvent,
    Received,
    Unauthorized,
    WebhookRequest,
    stable_event_id,
)
from swu_delivery.webhooks.mailgun import MailgunReceiver, SeenTokens
from tests.adapter_kit import esp_table, toml_table
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk

DATA = Path(__file__).parent / "data" / "webhooks" / "mailgun"
KEY = "test-signing-key-" + "5f" * 12  # made up; Mailgun's look like "key-<32 hex>"
NOW = 1_770_920_772  # the fixed clock of the direct tests (the docs' example timestamp)
UA_DESKTOP = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/144.0.0.0 Safari/537.36"
)
UA_MOBILE = (
    "Mozilla/5.0 (Linux; Android 9; itel A27) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/133.0.6943.143 Mobile Safari/537.36"
)


class Clock:
    """A settable clock for the receiver."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _no_http() -> Any:
    raise AssertionError("the Mailgun receiver makes no HTTP calls")


def receiver(clock: Clock | None = None, secret: str = KEY, **options: Any) -> MailgunReceiver:
    settings = WebhookSettings(secret=secret, options=options)
    account = EspAccount(name="mg", kind="mailgun")
    return MailgunReceiver(account, settings, http=_no_http, clock=clock or Clock())


def sign(timestamp: str, token: str, key: str = KEY) -> str:
    """What Mailgun computes: hex HMAC-SHA256 of timestamp + token, keyed with the signing key."""
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def signature_block(
    timestamp: int | str = NOW, token: str | None = None, key: str = KEY
) -> dict[str, Any]:
    token = token if token is not None else secrets.token_hex(25)  # 50 characters, as Mailgun's
    return {
        "timestamp": str(timestamp),
        "token": token,
        "signature": sign(str(timestamp), token, key),
    }


def envelope(event_data: Any, block: dict[str, Any] | None = None) -> bytes:
    """A request body as Mailgun posts it: the signature block and the event."""
    return orjson.dumps({"signature": block or signature_block(), "event-data": event_data})


def request(body: bytes) -> WebhookRequest:
    return WebhookRequest(
        method="POST",
        path="/webhooks/mg",
        query={},
        headers=CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"})),
        body=body,
    )


async def receive(body: bytes, hook: MailgunReceiver | None = None) -> Received:
    return await (hook or receiver()).receive(request(body))


def doc_event(name: str, **changes: Any) -> dict[str, Any]:
    event = orjson.loads((DATA / name).read_bytes())
    assert isinstance(event, dict)
    return {**event, **changes}


async def one(event_data: dict[str, Any]) -> ProviderEvent:
    received = await receive(envelope(event_data))
    assert received.skipped == 0
    (event,) = received.events
    return event


# -- authentication --------------------------------------------------------------------------


def test_registry_maps_mailgun_to_this_receiver() -> None:
    """The server finds this class for kind "mailgun"."""
    assert receiver_class("mailgun") is MailgunReceiver


async def test_signed_request_is_accepted() -> None:
    """A body signed with the key, at the current time, gives its event."""
    event = await one(doc_event("delivered.json"))
    assert (event.type, event.message_id) == (ET.EVENT_TYPE_DELIVERED, "msg-delivered")


async def test_timestamp_sent_as_a_number_is_accepted() -> None:
    """The docs type the timestamp as an int and show a string: both verify."""
    block = signature_block()
    block["timestamp"] = int(block["timestamp"])
    assert len((await receive(envelope(doc_event("opened.json"), block))).events) == 1


async def test_subaccount_parent_signature_is_accepted() -> None:
    """A subaccount's event verifies with the primary account's key in `parent-signature`."""
    block = signature_block(key="the-subaccount-key")
    block["parent-signature"] = sign(block["timestamp"], block["token"])
    assert len((await receive(envelope(doc_event("opened.json"), block))).events) == 1
    block = signature_block(key="the-subaccount-key", token="t" * 50)
    block["parent-signature"] = sign(block["timestamp"], block["token"], key="another-parent")
    with pytest.raises(Unauthorized):
        await receive(envelope(doc_event("opened.json"), block))


def _tampered(**changes: Any) -> dict[str, Any]:
    block = signature_block(token="a" * 50)
    return {**block, **changes}


@pytest.mark.parametrize(
    "block",
    [
        signature_block(key="some-other-key"),
        _tampered(timestamp=str(NOW - 1)),  # signed for another time
        _tampered(token="b" * 50),  # signed for another token
        _tampered(signature=sign(str(NOW), "a" * 50)[:-1]),  # one digit short
        _tampered(signature=""),
        _tampered(signature=None),
        _tampered(signature=12),
        _tampered(token=""),
        _tampered(token=5),
        _tampered(token="a" * 257),
        _tampered(timestamp="17709207.72"),
        _tampered(timestamp="-1770920772"),
        _tampered(timestamp=None),
        _tampered(timestamp=True),
        _tampered(timestamp="1" * 5000),
        {},
        "signature",
        [signature_block()],
    ],
    ids=[
        "wrong-key",
        "other-timestamp",
        "other-token",
        "truncated",
        "empty",
        "null",
        "number",
        "empty-token",
        "token-not-text",
        "token-too-long",
        "timestamp-not-integer",
        "timestamp-negative",
        "no-timestamp",
        "timestamp-bool",
        "timestamp-too-long",
        "empty-block",
        "block-not-object",
        "block-list",
    ],
)
async def test_bad_or_missing_signature_is_unauthorized(block: Any) -> None:
    """Anything but a valid HMAC over the block's own timestamp and token: 401."""
    body = orjson.dumps({"signature": block, "event-data": doc_event("delivered.json")})
    with pytest.raises(Unauthorized) as err:
        await receive(body)
    assert KEY not in str(err.value)


async def test_body_without_signature_is_unauthorized() -> None:
    """The event alone (or an empty object) is not authenticated: 401, not 400."""
    for body in (orjson.dumps({"event-data": doc_event("delivered.json")}), b"{}"):
        with pytest.raises(Unauthorized):
            await receive(body)


async def test_uppercase_hex_signature_verifies() -> None:
    """Hex digits are compared without regard to case."""
    block = signature_block()
    block["signature"] = block["signature"].upper()
    assert len((await receive(envelope(doc_event("delivered.json"), block))).events) == 1


@pytest.mark.parametrize("offset", [-301, 301, -86_400, 10**9])
async def test_timestamp_outside_the_window_is_forbidden(offset: int) -> None:
    """Correctly signed, but older (or later) than max_age from now: 403."""
    block = signature_block(timestamp=NOW + offset)
    with pytest.raises(Forbidden, match="outside"):
        await receive(envelope(doc_event("delivered.json"), block))


@pytest.mark.parametrize("offset", [-300, 0, 300])
async def test_timestamp_at_the_window_edge_is_accepted(offset: int) -> None:
    """Exactly max_age either way still passes: the window is inclusive."""
    block = signature_block(timestamp=NOW + offset)
    assert len((await receive(envelope(doc_event("delivered.json"), block))).events) == 1


async def test_max_age_option_widens_the_window() -> None:
    """max_age = 3600 accepts a request signed 20 minutes ago, which 300 refuses."""
    body = envelope(doc_event("delivered.json"), signature_block(timestamp=NOW - 1200))
    assert len((await receive(body, receiver(max_age=3600))).events) == 1
    with pytest.raises(Forbidden):
        await receive(body, receiver())


async def test_replayed_token_is_forbidden() -> None:
    """A token used once is refused again within the window, with this or any other body."""
    hook = receiver()
    block = signature_block()
    await receive(envelope(doc_event("delivered.json"), block), hook)
    for event in (doc_event("delivered.json"), doc_event("complained.json")):
        with pytest.raises(Forbidden, match="replay"):
            await receive(envelope(event, block), hook)


async def test_unauthenticated_requests_do_not_use_up_tokens() -> None:
    """A badly signed or stale request with a token leaves that token usable."""
    clock = Clock()
    hook = receiver(clock)
    forged = {**signature_block(token="x" * 50), "signature": "00" * 32}
    stale = signature_block(timestamp=NOW - 1000, token="y" * 50)
    for block, error in ((forged, Unauthorized), (stale, Forbidden)):
        with pytest.raises(error):
            await receive(envelope(doc_event("opened.json"), block), hook)
    assert len(hook.seen) == 0
    for token in ("x" * 50, "y" * 50):
        body = envelope(doc_event("opened.json"), signature_block(token=token))
        assert len((await receive(body, hook)).events) == 1


async def test_tokens_are_forgotten_once_their_timestamp_is_stale() -> None:
    """Memory holds only tokens whose requests could still pass the age check."""
    clock = Clock()
    hook = receiver(clock, max_age=60)
    for token in ("a" * 50, "b" * 50):
        await receive(envelope(doc_event("opened.json"), signature_block(token=token)), hook)
    assert len(hook.seen) == 2
    clock.now = NOW + 61
    fresh = signature_block(timestamp=NOW + 61, token="c" * 50)
    await receive(envelope(doc_event("opened.json"), fresh), hook)
    assert len(hook.seen) == 1
    with pytest.raises(Forbidden, match="outside"):  # the forgotten token is refused by age
        await receive(envelope(doc_event("opened.json"), signature_block(token="a" * 50)), hook)


def test_token_memory_is_capped() -> None:
    """At capacity the token closest to expiring is forgotten first; the size never grows."""
    seen = SeenTokens(capacity=3)
    for i, expires in enumerate((50, 10, 40)):
        assert seen.add(f"t{i}", expires, now=0)
    assert seen.add("t3", 60, now=0)  # forgets t1, which expires first
    assert len(seen) == 3
    assert seen.add("t1", 70, now=0)  # so t1 is new again
    assert not seen.add("t0", 80, now=0) and not seen.add("t3", 80, now=0)
    assert len(seen) == 3


async def test_max_tokens_option_caps_the_receiver() -> None:
    """max_tokens bounds what the receiver remembers."""
    hook = receiver(max_tokens=2)
    for _ in range(5):
        await receive(envelope(doc_event("opened.json")), hook)
    assert len(hook.seen) == 2


@pytest.mark.parametrize("body", [b"not json", b"", b"[]", b"null", b'"failed"', b"3"])
async def test_unreadable_body_is_bad_request(body: bytes) -> None:
    """A body that is no JSON object cannot carry a signature block: 400."""
    with pytest.raises(BadRequest):
        await receive(body)


async def test_legacy_form_webhook_is_bad_request() -> None:
    """The retired form-encoded webhooks are refused as not JSON, however signed."""
    block = signature_block()
    form = "&".join(f"{k}={v}" for k, v in {**block, "event": "delivered"}.items())
    with pytest.raises(BadRequest):
        await receive(form.encode())


# -- configuration ---------------------------------------------------------------------------


def test_missing_signing_key_is_refused() -> None:
    """Without a key nothing could be verified: start-up fails, naming secret_env."""
    with pytest.raises(ValueError, match="secret_env or secret_file"):
        receiver(secret="")


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"max_age": 0}, "max_age"),
        ({"max_age": -5}, "max_age"),
        ({"max_age": "300"}, "max_age"),
        ({"max_age": True}, "max_age"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"username": "x"}, "username"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict[str, Any], key: str) -> None:
    """Each bad option fails start-up with its key named, never the key's secret."""
    with pytest.raises(ValueError, match=key) as err:
        receiver(**options)
    assert KEY not in str(err.value)


def test_default_window_and_cap() -> None:
    """Five minutes either way and 100,000 tokens unless configured."""
    hook = receiver()
    assert (hook.max_age, hook.seen.capacity) == (300.0, 100_000)
    assert receiver(max_age=90.5).max_age == 90.5


# -- normalization ---------------------------------------------------------------------------


def doc(
    type: int, name: str, event_id: str, when: float, message_id: str, **fields: Any
) -> ProviderEvent:
    """The expected event for a documented example: its common fields filled in."""
    return ProviderEvent(
        type=type,
        time=when,
        provider_event_id=f"{event_id}@{when!r}",
        message_id=message_id,
        provider_type=name,
        recipient=fields.pop("recipient", "recipient@sample.mailgun.com"),
        **fields,
    )


DOCUMENTED: dict[str, ProviderEvent] = {
    "accepted.json": doc(
        ET.EVENT_TYPE_SENT,
        "accepted",
        "CCXMjJ7nQi2N3BPigGOdgQ",
        1770146798.372891,
        "msg-accepted",
        esp_message_id="20260203192638.000be97f99f8cea1@sample.mailgun.com",
    ),
    "delivered.json": doc(
        ET.EVENT_TYPE_DELIVERED,
        "delivered",
        "MXcc2gEpS-eN8HfkOnmK2w",
        1770146431.6585283,
        "msg-delivered",
        esp_message_id="20260203192030.53383e583ab41f62@sample.mailgun.com",
        response="250 OK",
    ),
    "opened.json": doc(
        ET.EVENT_TYPE_OPENED,
        "opened",
        "q7DMpbLFRKW1QuiLC9XV4Q",
        1770327074.5549328,
        "msg-opened",
        esp_message_id="20260205213049.8e3a7bf607f78309@sample.mailgun.com",
        user_agent=UA_DESKTOP,
    ),
    "clicked.json": doc(
        ET.EVENT_TYPE_CLICKED,
        "clicked",
        "A9dLUrCXQjK92TlnW3zkIA",
        1770327118.6648676,
        "msg-clicked",
        esp_message_id="20260205213049.8e3a7bf607f78309@sample.mailgun.com",
        url="https://sample.mailgun.com",
        user_agent=UA_MOBILE,
    ),
    "failed_permanent.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "failed",
        "2kFItcrLQuKTdp-Ia2Xr7w",
        1770918175.5923693,
        "msg-failed-permanent",
        recipient="badrecipient@sample.mailgun.com",
        esp_message_id="20260212174255.58bbb7ce85a423e5@mailgun.com",
        bounce=BOUNCE_HARD,
        reason="bounce",
        response="550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302). "
        "[BN3PEPF0000B36D.namprd21.prod.outlook.com 2026-02-12T17:42:55.527Z 08DE657A58651558]",
    ),
    "failed_temporary.json": doc(
        ET.EVENT_TYPE_DEFERRED,
        "failed",
        "YusK9KhoTwe2C00iRxsEqQ",
        1770919267.4288595,
        "msg-failed-temporary",
        recipient="tempfailrecipient@sample.mailgun.com",
        esp_message_id="20260212180106.5c8f35804ae3fd54@sample.mailgun.com",
        reason="generic",
        response="421 Your IP (161.38.194.10) is temporary blacklisted by an anti-troyan rule, "
        "retry later and/or visit http://sample.mailgun.com/",
    ),
    "unsubscribed.json": doc(
        ET.EVENT_TYPE_UNSUBSCRIBED,
        "unsubscribed",
        "89QcW8YuSv6lhSeN3n4qnA",
        1770327090.4656289,
        "msg-unsubscribed",
        esp_message_id="20260205213049.8e3a7bf607f78309@sample.mailgun.com",
        user_agent=UA_DESKTOP,
    ),
    "complained.json": doc(
        ET.EVENT_TYPE_COMPLAINED,
        "complained",
        "rIVDlyk8SY-mJauQoYmNFA",
        1770920772.2684145,
        "msg-complained",
        esp_message_id="20260212182531.0d5ed3254c319957@sample.mailgun.com",
    ),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_documented_event_is_normalized(name: str) -> None:
    """Each documented example becomes exactly the expected event."""
    assert await one(doc_event(name)) == DOCUMENTED[name]


def test_every_fixture_is_checked() -> None:
    """No documented example in the data folder goes untested."""
    assert {p.name for p in DATA.glob("*.json")} == set(DOCUMENTED)


@pytest.mark.parametrize(
    ("severity", "reason", "bounce_type", "expected"),
    [
        ("permanent", "bounce", "hard", (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ("permanent", "bounce", None, (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ("permanent", "bounce", "soft", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("permanent", "generic", None, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("permanent", "espblock", None, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("permanent", "generic", "hard", (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ("permanent", "old", None, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("temporary", "old", None, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("permanent", "suppress-bounce", None, (ET.EVENT_TYPE_REJECTED, 0)),
        ("permanent", "suppress-unsubscribe", None, (ET.EVENT_TYPE_REJECTED, 0)),
        ("permanent", "suppress-complaint", None, (ET.EVENT_TYPE_REJECTED, 0)),
        ("temporary", "generic", None, (ET.EVENT_TYPE_DEFERRED, 0)),
        ("temporary", "greylisted", None, (ET.EVENT_TYPE_DEFERRED, 0)),
        ("temporary", "bounce", "hard", (ET.EVENT_TYPE_DEFERRED, 0)),
        (None, "bounce", None, (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),  # no severity: permanent
    ],
)
async def test_failure_severity_and_reason_decide_type_and_bounce(
    severity: str | None, reason: str, bounce_type: str | None, expected: tuple[int, int]
) -> None:
    """Temporary is a deferral; suppressions are rejections; only real bounces are hard."""
    event = doc_event("failed_permanent.json", reason=reason)
    event["delivery-status"] = {**event["delivery-status"], "bounce-type": bounce_type}
    if severity is None:
        del event["severity"]
    else:
        event["severity"] = severity
    got = await one(event)
    assert (got.type, got.bounce) == expected


async def test_suppressed_address_failure_is_a_rejection_with_mailgun_s_words() -> None:
    """The drop of a previously bounced address (code 605, no SMTP session): REJECTED."""
    event = doc_event("failed_permanent.json", reason="suppress-bounce")
    event["delivery-status"] = {
        "attempt-no": 1,
        "message": "",
        "code": 605,
        "enhanced-code": "",
        "description": "Not delivering to previously bounced address",
        "session-seconds": 0,
    }
    got = await one(event)
    assert (got.type, got.bounce, got.reason, got.response) == (
        ET.EVENT_TYPE_REJECTED,
        0,
        "suppress-bounce: Not delivering to previously bounced address",
        "605 Not delivering to previously bounced address",
    )


async def test_rejected_event_carries_mailgun_s_reason() -> None:
    """A `rejected` event (Mailgun refused the send) reads its `reject` object."""
    event = doc_event("accepted.json", event="rejected", id="rejected-1")
    event["reject"] = {"reason": "Sandbox subdomains are for test purposes only", "description": ""}
    got = await one(event)
    assert (got.type, got.provider_type, got.reason, got.message_id) == (
        ET.EVENT_TYPE_REJECTED,
        "rejected",
        "Sandbox subdomains are for test purposes only",
        "msg-accepted",
    )


@pytest.mark.parametrize("name", ["stored", "list_member_uploaded", "something_new"])
async def test_other_event_types_are_kept_as_unknown(name: str) -> None:
    """Events with no equivalent are stored as UNKNOWN under Mailgun's own name."""
    got = await one(doc_event("accepted.json", event=name))
    assert (got.type, got.provider_type, got.bounce) == (ET.EVENT_TYPE_UNKNOWN, name, 0)


@pytest.mark.parametrize(
    "variables", [[], {}, None, {"swu_message_id": 42}, {"other": "x"}, "swu_message_id"]
)
async def test_event_without_our_id_has_an_empty_message_id(variables: Any) -> None:
    """Mail sent outside this service (Mailgun sends `[]` for no variables) is still read."""
    got = await one(doc_event("delivered.json", **{"user-variables": variables}))
    assert (got.message_id, got.type) == ("", ET.EVENT_TYPE_DELIVERED)


async def test_message_id_in_angle_brackets_is_stored_bare() -> None:
    """The ESP id is compared with the adapter's, which has no angle brackets."""
    event = doc_event("opened.json")
    event["message"] = {"headers": {"message-id": "<20260205.abc@mg.example.com>"}}
    assert (await one(event)).esp_message_id == "20260205.abc@mg.example.com"


async def test_event_id_is_keyed_with_its_timestamp() -> None:
    """Mailgun's id is unique only within a day: the same id a day later is another event."""
    first = await one(doc_event("opened.json"))
    again = await one(doc_event("opened.json"))
    later = await one(doc_event("opened.json", timestamp=1770327074.5549328 + 86_400))
    assert (
        first.provider_event_id
        == again.provider_event_id
        == "q7DMpbLFRKW1QuiLC9XV4Q@1770327074.5549328"
    )
    assert later.provider_event_id != first.provider_event_id


async def test_event_without_id_gets_a_stable_one() -> None:
    """No id: a digest of what identifies the event, the same for a redelivery."""
    event = doc_event("clicked.json")
    del event["id"]
    ids = {(await one(event)).provider_event_id for _ in range(2)}
    assert ids == {
        stable_event_id(
            "clicked",
            1770327118.6648676,
            "recipient@sample.mailgun.com",
            "20260205213049.8e3a7bf607f78309@sample.mailgun.com",
            "https://sample.mailgun.com",
        )
    }


@pytest.mark.parametrize(
    "event_data",
    [
        None,
        [],
        "delivered",
        {"timestamp": 1770146431.6, "id": "x"},  # no event name
        {"event": 5, "timestamp": 1770146431.6},
        {"event": "delivered", "id": "x"},  # no timestamp
        {"event": "delivered", "timestamp": "1770146431.6"},
        {"event": "delivered", "timestamp": True},
        {"event": "delivered", "timestamp": -1},
    ],
)
async def test_unreadable_event_is_skipped(event_data: Any) -> None:
    """Authenticated, but the event cannot be read: 200 with skipped = 1, nothing stored.

    Mailgun posts one event per request, so this is the whole of "one broken event among
    several": the signature block is fine, and only the event is dropped (and logged).
    """
    received = await receive(envelope(event_data))
    assert (received.events, received.skipped) == ([], 1)


async def test_event_data_missing_entirely_is_skipped() -> None:
    """A signed body with no event-data at all: skipped, since the request itself verified."""
    received = await receive(orjson.dumps({"signature": signature_block()}))
    assert (received.events, received.skipped) == ([], 1)


# -- end to end ------------------------------------------------------------------------------

KEY_ENV = "SWU_TEST_MG_WEBHOOK_SIGNING_KEY"


@pytest.fixture
def server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The service sending through Mailgun account "mg" at the simulator, its webhook on."""
    table = toml_table(esp_table("mailgun", esp_simulator))
    webhook = f'[esp.webhook]\nsecret_env = "{KEY_ENV}"\nmax_age = 300\n'
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "swu.toml", data_dir, esp_simulator.url, extra=table + webhook, default_esp="mg"
    )
    handle = ServerHandle(config, data_dir, esp_simulator)
    handle.env[KEY_ENV] = KEY
    handle.start()
    try:
        handle.put_template("order", {"en": ORDER})
        yield handle
    finally:
        handle.stop()


def post(server: ServerHandle, body: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{server.webhooks}/webhooks/mg",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
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
    assert message.esp == "mg" and message.esp_message_id
    return message


def event_for(message: delivery_pb2.Message, name: str, **changes: Any) -> dict[str, Any]:
    """A documented event about `message`, as Mailgun would post it for this send."""
    event = doc_event(name, recipient=message.to, **changes)
    event["message"] = {"headers": {"message-id": message.esp_message_id}}
    event["user-variables"] = {"swu_message_id": message.message_id}
    return event


def signed_now(event: dict[str, Any], key: str = KEY) -> bytes:
    """Signed as Mailgun signs, at the service's (real) current time."""
    return envelope(event, signature_block(timestamp=int(time.time()), key=key))


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def test_delivered_and_clicked_reach_the_message(server: ServerHandle) -> None:
    """A sent message's delivered and clicked events show in GetMessage; resending is a dup."""
    message = sent(server, "jane@example.com")
    delivered = event_for(message, "delivered.json")
    clicked = event_for(message, "clicked.json", url="https://shop.example/o")
    assert post(server, signed_now(delivered)) == (
        200,
        {"stored": 1, "duplicates": 0, "skipped": 0},
    )
    assert post(server, signed_now(clicked))[1] == {"stored": 1, "duplicates": 0, "skipped": 0}
    # Mailgun retrying the same event (a new signature block): stored once only.
    assert post(server, signed_now(delivered))[1] == {"stored": 0, "duplicates": 1, "skipped": 0}
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "DELIVERED"
    assert [
        (e.type, e.provider_type, e.provider_event_id, e.recipient, e.esp, e.response, e.url)
        for e in webhook_events(after)
    ] == [
        (
            ET.EVENT_TYPE_DELIVERED,
            "delivered",
            "MXcc2gEpS-eN8HfkOnmK2w@1770146431.6585283",
            "jane@example.com",
            "mg",
            "250 OK",
            "",
        ),
        (
            ET.EVENT_TYPE_CLICKED,
            "clicked",
            "A9dLUrCXQjK92TlnW3zkIA@1770327118.6648676",
            "jane@example.com",
            "mg",
            "",
            "https://shop.example/o",
        ),
    ]
    assert webhook_events(after)[1].user_agent == UA_MOBILE


def test_permanent_failure_marks_the_message_bounced(server: ServerHandle) -> None:
    """A hard bounce makes the message BOUNCED, with Mailgun's reason and the SMTP reply."""
    message = sent(server, "gone@example.com")
    assert post(server, signed_now(event_for(message, "failed_permanent.json")))[0] == 200
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "BOUNCED"
    (event,) = webhook_events(after)
    assert (event.type, event.bounce, event.detail, event.recipient) == (
        ET.EVENT_TYPE_BOUNCED,
        BOUNCE_HARD,
        "bounce",
        "gone@example.com",
    )
    assert event.response.startswith("550 5.5.0 Requested action not taken")


def test_bad_signature_and_replay_are_refused_and_store_nothing(server: ServerHandle) -> None:
    """Wrong key: 401; a signature block used twice: 403; the message keeps only what passed."""
    message = sent(server, "jane@example.com")
    assert post(server, signed_now(event_for(message, "delivered.json"), key="guess"))[0] == 401
    unsigned = orjson.dumps({"event-data": event_for(message, "delivered.json")})
    assert post(server, unsigned)[0] == 401
    after = server.get(message.message_id)
    assert webhook_events(after) == [] and STATE_NAMES[after.state] == "SENT"
    block = signature_block(timestamp=int(time.time()))
    assert post(server, envelope(event_for(message, "opened.json"), block))[0] == 200
    status, body = post(server, envelope(event_for(message, "complained.json"), block))
    assert status == 403 and "replay" in body["error"]
    after = server.get(message.message_id)
    assert [e.provider_type for e in webhook_events(after)] == ["opened"]
    assert STATE_NAMES[after.state] == "DELIVERED"
