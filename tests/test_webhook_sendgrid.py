"""SendGrid's Signed Event Webhook: signature, freshness, and every documented event, normalized.

The direct tests sign with a P-256 key generated here and run the receiver on a fixed clock;
one known-answer test replays the request SendGrid's own library signs in its tests. The
end-to-end tests post signed events to the real service's endpoint for the "sg" account.
"""

from __future__ import annotations

import base64
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

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
from swu_delivery.webhooks.sendgrid import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SendGridReceiver,
)
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.helpers import ORDER, data, mk

DATA = Path(__file__).parent / "data" / "webhooks" / "sendgrid"
NOW = 1_700_000_000  # the receivers' clock in the direct tests
KEY = ec.generate_private_key(ec.SECP256R1())
DOC_TIME = 1513299569.0  # the documented examples' timestamp
DOC_SG_ID = "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"
DOC_UA = "Mozilla/4.0 (compatible; MSIE 6.1; Windows XP; .NET CLR 1.1.4322; .NET CLR 2.0.50727)"


def public_b64(key: ec.EllipticCurvePrivateKey) -> str:
    """The verification key the way SendGrid shows it: base64 of the DER SubjectPublicKeyInfo."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def signed(
    body: bytes, timestamp: int | str = NOW, key: ec.EllipticCurvePrivateKey = KEY
) -> dict[str, str]:
    """SendGrid's headers: ECDSA P-256/SHA-256 over the timestamp's bytes, then the body."""
    stamp = str(timestamp)
    signature = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {SIGNATURE_HEADER: base64.b64encode(signature).decode(), TIMESTAMP_HEADER: stamp}


def receiver(secret: str | None = None, clock: float = NOW, **options: Any) -> SendGridReceiver:
    settings = WebhookSettings(
        secret=public_b64(KEY) if secret is None else secret, options=options
    )
    account = EspAccount(name="sg", kind="sendgrid")
    return SendGridReceiver(account, settings, http=_no_http, clock=lambda: clock)


def _no_http() -> Any:
    raise AssertionError("the SendGrid receiver makes no HTTP calls")


def request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    return WebhookRequest(method="POST", path="/webhooks/sg", query={}, headers=headers, body=body)


async def receive(body: bytes, headers: dict[str, str] | None = None, **kw: Any) -> Received:
    return await receiver(**kw).receive(request(body, signed(body) if headers is None else headers))


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def event_body(*events: Any) -> bytes:
    return orjson.dumps(list(events))


def doc_event(name: str) -> dict[str, Any]:
    (event,) = orjson.loads(fixture(name))
    assert isinstance(event, dict)
    return event


# -- authentication --------------------------------------------------------------------------


def test_registry_maps_sendgrid_to_this_receiver() -> None:
    """The server finds this class for kind "sendgrid"."""
    assert receiver_class("sendgrid") is SendGridReceiver


async def test_signed_request_is_accepted() -> None:
    """A body signed with the configured key at the current time is read."""
    received = await receive(fixture("delivered.json"))
    assert [e.provider_event_id for e in received.events] == ["rWVYmVk90MjZJ9iohOBa3w=="]
    assert received.skipped == 0


async def test_sendgrids_own_signed_request_verifies() -> None:
    """SendGrid's library test vector verifies byte for byte; one changed byte does not."""
    vector = orjson.loads(fixture("signed_request.json"))
    body = vector["body"].encode()
    headers = {SIGNATURE_HEADER: vector["signature"], TIMESTAMP_HEADER: vector["timestamp"]}
    clock = int(vector["timestamp"]) + 10
    received = await receive(body, headers, secret=vector["public_key"], clock=clock)
    assert [(e.type, e.provider_type, e.reason) for e in received.events] == [
        (ET.EVENT_TYPE_REJECTED, "dropped", "Bounced Address")
    ]
    with pytest.raises(Unauthorized):
        await receive(body.rstrip(b"\r\n"), headers, secret=vector["public_key"], clock=clock)


@pytest.mark.parametrize("missing", [SIGNATURE_HEADER, TIMESTAMP_HEADER])
async def test_missing_header_is_unauthorized(missing: str) -> None:
    """Without the signature or the timestamp there is nothing to verify: 401."""
    body = fixture("delivered.json")
    headers = signed(body)
    del headers[missing]
    with pytest.raises(Unauthorized):
        await receive(body, headers)


def _other_key(body: bytes) -> dict[str, str]:
    return signed(body, key=ec.generate_private_key(ec.SECP256R1()))


def _changed_body(body: bytes) -> dict[str, str]:
    return signed(body.replace(b"250 OK", b"250 Ok"))


def _changed_timestamp(body: bytes) -> dict[str, str]:
    return {**signed(body), TIMESTAMP_HEADER: str(NOW - 1)}


def _not_base64(body: bytes) -> dict[str, str]:
    return {**signed(body), SIGNATURE_HEADER: "not base64!"}


def _not_der(body: bytes) -> dict[str, str]:
    return {**signed(body), SIGNATURE_HEADER: base64.b64encode(b"\x30\x02junk").decode()}


def _non_ascii_timestamp(body: bytes) -> dict[str, str]:
    return {**signed(body), TIMESTAMP_HEADER: "１７００"}


@pytest.mark.parametrize(
    "forge",
    [_other_key, _changed_body, _changed_timestamp, _not_base64, _not_der, _non_ascii_timestamp],
)
async def test_bad_signature_is_unauthorized(forge: Any) -> None:
    """Another key, or a body or timestamp other than the signed ones: 401."""
    body = fixture("delivered.json")
    with pytest.raises(Unauthorized):
        await receive(body, forge(body))


@pytest.mark.parametrize(
    ("age", "max_age", "accepted"),
    [
        (300, None, True),
        (301, None, False),
        (-301, None, False),  # from the future beyond the window: a clock or a forgery
        (61, 60, False),
        (60, 60, True),
        (10 * 86400, 0, True),  # max_age = 0 turns the check off
    ],
)
async def test_signed_timestamp_must_be_fresh(
    age: int, max_age: int | None, accepted: bool
) -> None:
    """A validly signed request older than max_age (default 300 s) is refused with 403."""
    body = fixture("delivered.json")
    options = {} if max_age is None else {"max_age": max_age}
    headers = signed(body, timestamp=NOW - age)
    if accepted:
        assert len((await receive(body, headers, **options)).events) == 1
    else:
        with pytest.raises(Forbidden):
            await receive(body, headers, **options)


async def test_signed_non_numeric_timestamp_is_forbidden() -> None:
    """A signature over a timestamp that is not a Unix time proves nothing about freshness."""
    body = fixture("delivered.json")
    with pytest.raises(Forbidden):
        await receive(body, signed(body, timestamp="yesterday"))


@pytest.mark.parametrize("body", [b"not json", b'{"event": "delivered"}', b"", b"null"])
async def test_unreadable_body_is_bad_request_after_auth(body: bytes) -> None:
    """Signed but not a JSON array: 400; the same body unsigned: 401, auth comes first."""
    with pytest.raises(BadRequest):
        await receive(body)
    with pytest.raises(Unauthorized):
        await receive(body, {})


# -- configuration ---------------------------------------------------------------------------


def test_missing_secret_is_refused() -> None:
    """An endpoint without the verification key would accept anything: refuse to start."""
    with pytest.raises(ValueError, match="secret_env or secret_file"):
        receiver(secret="")


@pytest.mark.parametrize(
    "secret",
    [
        "not a key",
        base64.b64encode(b"not a DER key").decode(),
        base64.b64encode(
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).decode(),
        public_b64(ec.generate_private_key(ec.SECP384R1())),
    ],
    ids=["text", "not-der", "rsa", "p384"],
)
def test_wrong_verification_key_is_refused_without_echoing_it(secret: str) -> None:
    """Anything but a P-256 public key fails at start-up; the error does not quote it."""
    with pytest.raises(ValueError, match=r"\[esp.webhook\] secret") as err:
        receiver(secret=secret)
    assert secret not in str(err.value)


async def test_pem_verification_key_is_accepted() -> None:
    """A key pasted as PEM works as well as SendGrid's bare base64."""
    pem = (
        KEY.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert len((await receive(fixture("open.json"), secret=pem)).events) == 1


@pytest.mark.parametrize("max_age", [-1, "300", True])
def test_bad_max_age_is_refused(max_age: Any) -> None:
    """max_age is a number of seconds, 0 or more."""
    with pytest.raises(ValueError, match="max_age"):
        receiver(max_age=max_age)


def test_unknown_option_is_refused() -> None:
    """Only max_age is a SendGrid option (OAuth is not supported)."""
    with pytest.raises(ValueError, match="oauth_client_id"):
        receiver(oauth_client_id="x")


# -- normalization ---------------------------------------------------------------------------


def doc(
    type: int, message_id: str, provider_type: str, event_id: str, **fields: Any
) -> ProviderEvent:
    """The expected event for a documented example: its common fields filled in."""
    return ProviderEvent(
        type=type,
        time=DOC_TIME,
        provider_event_id=event_id,
        message_id=message_id,
        provider_type=provider_type,
        recipient=fields.pop("recipient", "example@test.com"),
        esp_message_id=fields.pop("esp_message_id", DOC_SG_ID),
        **fields,
    )


DOCUMENTED: dict[str, ProviderEvent] = {
    "processed.json": doc(
        ET.EVENT_TYPE_SENT,
        "msg-processed",
        "processed",
        "rbtnWrG1DVDGGGFHFyun0A==",
        esp_message_id=DOC_SG_ID + "00000000000000000000",
    ),
    "dropped.json": doc(
        ET.EVENT_TYPE_REJECTED,
        "msg-dropped",
        "dropped",
        "zmzJhfJgAfUSOW80yEbPyw==",
        reason="Bounced Address",
    ),
    "delivered.json": doc(
        ET.EVENT_TYPE_DELIVERED,
        "msg-delivered",
        "delivered",
        "rWVYmVk90MjZJ9iohOBa3w==",
        response="250 OK",
    ),
    "deferred.json": doc(
        ET.EVENT_TYPE_DEFERRED,
        "msg-deferred",
        "deferred",
        "t7LEShmowp86DTdUW8M-GQ==",
        response="400 try again later",
    ),
    "bounce.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "msg-bounce",
        "bounce",
        "6g4ZI7SA-xmRDv57GoPIPw==",
        bounce=BOUNCE_HARD,
        response="500 unknown recipient",
    ),
    "blocked.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "msg-blocked",
        "bounce",
        "6g4ZI7SA-xmRDv57GoPIPw==",
        bounce=BOUNCE_SOFT,
        response="500 unknown recipient",
    ),
    "bounce_classified.json": doc(
        ET.EVENT_TYPE_BOUNCED,
        "msg-bounce-classified",
        "bounce",
        "6g4ZI7SA-xmRDv57GoPIPw==",
        recipient="alex@example.com",
        bounce=BOUNCE_HARD,
        reason="Invalid Address",
        response="500 unknown recipient",
    ),
    "open.json": doc(
        ET.EVENT_TYPE_OPENED,
        "msg-open",
        "open",
        "FOTFFO0ecsBE-zxFXfs6WA==",
        user_agent=DOC_UA,
    ),
    "click.json": doc(
        ET.EVENT_TYPE_CLICKED,
        "msg-click",
        "click",
        "kCAi1KttyQdEKHhdC-nuEA==",
        url="http://www.sendgrid.com/",
        user_agent=DOC_UA,
    ),
    "spamreport.json": doc(
        ET.EVENT_TYPE_COMPLAINED, "msg-spamreport", "spamreport", "37nvH5QBz858KGVYCM4uOA=="
    ),
    "unsubscribe.json": doc(
        ET.EVENT_TYPE_UNSUBSCRIBED, "msg-unsubscribe", "unsubscribe", "zz_BjPgU_5pS-J8vlfB1sg=="
    ),
    "group_unsubscribe.json": doc(
        ET.EVENT_TYPE_UNSUBSCRIBED,
        "msg-group-unsubscribe",
        "group_unsubscribe",
        "ahSCB7xYcXFb-hEaawsPRw==",
        user_agent=DOC_UA,
    ),
    "group_resubscribe.json": doc(
        ET.EVENT_TYPE_UNKNOWN,
        "msg-group-resubscribe",
        "group_resubscribe",
        "w_u0vJhLT-OFfprar5N93g==",
        user_agent=DOC_UA,
    ),
    "account_status_change.json": ProviderEvent(
        type=ET.EVENT_TYPE_UNKNOWN,
        time=1709142428.0,
        provider_event_id="MjEzNTg5OTcyOC10ZXJtaW5hdGUtMTcwNzg1MTUzMQ",
        message_id="",
        provider_type="account_status_change",
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
    event_files = {p.name for p in DATA.glob("*.json")} - {"signed_request.json"}
    assert event_files == set(DOCUMENTED)


async def test_all_documented_events_in_one_body() -> None:
    """SendGrid batches events: one body with every example gives them all, in order."""
    names = sorted(DOCUMENTED)
    received = await receive(event_body(*(doc_event(n) for n in names)))
    assert received.events == [DOCUMENTED[n] for n in names]


@pytest.mark.parametrize(
    "broken",
    [
        "a string",
        ["a", "list"],
        {"email": "x@example.com", "timestamp": 1513299569, "sg_event_id": "no-name"},
        {"event": "delivered", "sg_event_id": "no-time"},
        {"event": "delivered", "timestamp": "soon", "sg_event_id": "bad-time"},
        {"event": "delivered", "timestamp": True, "sg_event_id": "bool-time"},
        {"event": 5, "timestamp": 1513299569},
    ],
)
async def test_broken_event_is_skipped_and_the_others_kept(broken: Any) -> None:
    """An unreadable event is counted in skipped; the events around it are returned."""
    body = event_body(doc_event("delivered.json"), broken, doc_event("open.json"))
    received = await receive(body)
    assert received.events == [DOCUMENTED["delivered.json"], DOCUMENTED["open.json"]]
    assert received.skipped == 1


async def test_event_without_id_gets_a_stable_one() -> None:
    """Without sg_event_id the id is derived: the same on redelivery, distinct per event."""
    first = {k: v for k, v in doc_event("click.json").items() if k != "sg_event_id"}
    other = {**first, "url": "http://www.sendgrid.com/other"}
    once = (await receive(event_body(first, other))).events
    again = (await receive(event_body(first))).events
    assert once[0].provider_event_id == again[0].provider_event_id
    assert once[0].provider_event_id.startswith("swu:")
    assert once[0].provider_event_id != once[1].provider_event_id


@pytest.mark.parametrize(
    ("type_", "classification", "expected"),
    [
        ("bounce", None, BOUNCE_HARD),
        ("blocked", None, BOUNCE_SOFT),
        ("bounce", "Invalid Address", BOUNCE_HARD),
        ("blocked", "Invalid Address", BOUNCE_HARD),
        ("bounce", "Mailbox Unavailable", BOUNCE_SOFT),
        ("bounce", "Technical", BOUNCE_SOFT),
        ("bounce", "Content", BOUNCE_SOFT),
        ("bounce", "Reputation", BOUNCE_SOFT),
        ("bounce", "Frequency or Volume", BOUNCE_SOFT),
        ("bounce", "Unclassified", BOUNCE_HARD),
        ("blocked", "Unclassified", BOUNCE_SOFT),
        (None, None, BOUNCE_HARD),
    ],
)
async def test_bounce_kind_follows_classification_then_type(
    type_: str | None, classification: str | None, expected: int
) -> None:
    """Only an invalid address is hard; a known classification wins over `type`."""
    event = {k: v for k, v in doc_event("bounce.json").items() if k != "type"}
    if type_ is not None:
        event["type"] = type_
    if classification is not None:
        event["bounce_classification"] = classification
    (result,) = (await receive(event_body(event))).events
    assert (result.type, result.bounce) == (ET.EVENT_TYPE_BOUNCED, expected)


async def test_asynchronous_bounce_without_sendgrid_message_id() -> None:
    """SendGrid omits sg_message_id for asynchronous bounces; our id still links the event."""
    event = {k: v for k, v in doc_event("bounce.json").items() if k != "sg_message_id"}
    (result,) = (await receive(event_body(event))).events
    assert (result.message_id, result.esp_message_id) == ("msg-bounce", "")


async def test_string_timestamp_in_event_is_read() -> None:
    """The reference shows one event with a quoted timestamp; it is read as Unix seconds."""
    event = {**doc_event("processed.json"), "timestamp": "1513299569"}
    (result,) = (await receive(event_body(event))).events
    assert result.time == DOC_TIME


# -- end to end ------------------------------------------------------------------------------

KEY_ENV = "SWU_TEST_SG_WEBHOOK_KEY"


@pytest.fixture
def server(swu_server: ServerHandle) -> ServerHandle:
    """The service with [esp.webhook] on its SendGrid account "sg" (the default, at the sim)."""
    swu_server.stop()
    extra = f'[esp.webhook]\nsecret_env = "{KEY_ENV}"\n'
    write_config(swu_server.config, swu_server.data_dir, swu_server.sim.url, extra=extra)
    swu_server.env[KEY_ENV] = public_b64(KEY)
    swu_server.start()
    swu_server.put_template("order", {"en": ORDER})
    return swu_server


def post(server: ServerHandle, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{server.webhooks}/webhooks/sg",
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
    return server.wait_for_state([result.message_id], states=("SENT",))[result.message_id]


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def sendgrid_event(message: delivery_pb2.Message, event: str, **fields: Any) -> dict[str, Any]:
    """An event as SendGrid posts it for a message the service sent through the simulator."""
    return {
        "email": message.to,
        "timestamp": int(time.time()),
        "smtp-id": f"<{message.esp_message_id}@ismtpd-555>",
        "event": event,
        "sg_message_id": f"{message.esp_message_id}.filter0001.16648.5515E0B88.0",
        "swu_message_id": message.message_id,
        **fields,
    }


def test_signed_events_reach_the_message(server: ServerHandle) -> None:
    """Delivered and click events for a sent message show in GetMessage and set its state."""
    message = sent(server, "jane@example.com")
    body = event_body(
        sendgrid_event(message, "delivered", sg_event_id="sg-dlv-1", response="250 OK"),
        sendgrid_event(message, "click", sg_event_id="sg-clk-1", url="https://shop.example/o"),
    )
    now = int(time.time())
    assert post(server, body, signed(body, now)) == (
        200,
        {"stored": 2, "duplicates": 0, "skipped": 0},
    )
    assert post(server, body, signed(body, now))[1] == {"stored": 0, "duplicates": 2, "skipped": 0}
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "DELIVERED"
    assert [
        (e.type, e.provider_event_id, e.provider_type, e.recipient, e.esp, e.response, e.url)
        for e in webhook_events(after)
    ] == [
        (ET.EVENT_TYPE_DELIVERED, "sg-dlv-1", "delivered", "jane@example.com", "sg", "250 OK", ""),
        (
            ET.EVENT_TYPE_CLICKED,
            "sg-clk-1",
            "click",
            "jane@example.com",
            "sg",
            "",
            "https://shop.example/o",
        ),
    ]


def test_hard_bounce_marks_the_message_bounced(server: ServerHandle) -> None:
    """A classified bounce makes the message BOUNCED with a hard bounce and the classification."""
    message = sent(server, "gone@example.com")
    body = event_body(
        sendgrid_event(
            message,
            "bounce",
            sg_event_id="sg-bnc-1",
            type="bounce",
            bounce_classification="Invalid Address",
            reason="550 5.1.1 no such user",
            status="5.1.1",
        )
    )
    assert post(server, body, signed(body, int(time.time())))[0] == 200
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "BOUNCED"
    (event,) = webhook_events(after)
    assert (event.bounce, event.detail, event.response) == (
        BOUNCE_HARD,
        "Invalid Address",
        "550 5.1.1 no such user",
    )


def test_badly_signed_post_is_refused_and_stores_nothing(server: ServerHandle) -> None:
    """Another key's signature gets 401, a stale one 403; the message keeps no webhook event."""
    message = sent(server, "jane@example.com")
    body = event_body(sendgrid_event(message, "delivered", sg_event_id="sg-forged"))
    now = int(time.time())
    forged = signed(body, now, key=ec.generate_private_key(ec.SECP256R1()))
    assert post(server, body, forged)[0] == 401
    assert post(server, body, {})[0] == 401
    assert post(server, body, signed(body, now - 3600))[0] == 403
    after = server.get(message.message_id)
    assert webhook_events(after) == [] and STATE_NAMES[after.state] == "SENT"
