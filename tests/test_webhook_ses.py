"""Amazon SES over SNS: signature v1/v2, certificate and topic rules, every documented record.

The tests make their own RSA key and certificate and sign SNS messages with it. The direct tests
pin the certificate with `cert_files`; the fetch, cache and subscription confirmation tests run
a local HTTPS server (a test CA, `cert_hosts` set to 127.0.0.1:port). The end-to-end tests send
a message through the real service and post signed notifications for it to the SES account's
endpoint.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
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
from swu_delivery.webhooks.ses import SesReceiver, SnsUnavailable
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk

DATA = Path(__file__).parent / "data" / "webhooks" / "ses"
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem"
DOC_CERT_URL = "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem"
NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
NOW_ISO = "2026-03-01T12:00:00.000Z"
SNS_ID = "165545c9-2a5c-472c-8df2-7ff2be2b3b1b"
SES_ID = "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(key: rsa.RSAPrivateKey, name: str, ip: str | None = None) -> bytes:
    """A self-signed PEM certificate for `key` (with an IP address SAN for a TLS server)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2099, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if ip:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


KEY, OTHER_KEY = _key(), _key()
CERT_PEM = _certificate(KEY, "sns.amazonaws.com")


@pytest.fixture
def cert_file(tmp_path: Path) -> Path:
    path = tmp_path / "sns.pem"
    path.write_bytes(CERT_PEM)
    return path


def string_to_sign(message: dict[str, Any]) -> bytes:
    """The documented string to sign, written out here independently of the receiver."""
    if message["Type"] == "Notification":
        names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    return "".join(f"{n}\n{message[n]}\n" for n in names if n in message).encode()


def sign(
    message: dict[str, Any],
    version: str = "1",
    key: rsa.RSAPrivateKey = KEY,
    url: str = CERT_URL,
) -> dict[str, Any]:
    """`message` with SignatureVersion, SigningCertURL and its Signature, as SNS sends it."""
    signed = {**message, "SignatureVersion": version, "SigningCertURL": url}
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    raw = key.sign(string_to_sign(signed), padding.PKCS1v15(), algorithm)
    return {**signed, "Signature": base64.b64encode(raw).decode()}


def envelope(
    record: Any, *, sns_id: str = SNS_ID, topic: str = TOPIC, timestamp: str = NOW_ISO
) -> dict[str, Any]:
    """An unsigned SNS Notification carrying `record` (a dict is sent as its JSON)."""
    text = record if isinstance(record, str) else orjson.dumps(record).decode()
    return {
        "Type": "Notification",
        "MessageId": sns_id,
        "TopicArn": topic,
        "Message": text,
        "Timestamp": timestamp,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&x=1",
    }


def doc(name: str) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads((DATA / name).read_bytes())
    return result


def _no_http() -> Any:
    raise AssertionError("no HTTP call expected: the certificate is pinned")


def receiver(
    cert_file: Path | None,
    *,
    http: Callable[[], Any] = _no_http,
    clock: float = NOW.timestamp(),
    secret: str = "",
    **options: Any,
) -> SesReceiver:
    settings = WebhookSettings(
        secret=secret,
        options={
            "topic_arns": [TOPIC],
            **({"cert_files": {CERT_URL: str(cert_file)}} if cert_file else {}),
            **options,
        },
    )
    account = EspAccount(name="ses", kind="ses", options={"region": "us-east-1"})
    return SesReceiver(account, settings, http=http, clock=lambda: clock)


def request(message: Any, headers: dict[str, str] | None = None) -> WebhookRequest:
    """The POST as SNS makes it: JSON body as text/plain, the type in a header."""
    body = message if isinstance(message, bytes) else orjson.dumps(message)
    kind = message.get("Type") if isinstance(message, dict) else None
    default = {"x-amz-sns-message-type": kind} if isinstance(kind, str) else {}
    return WebhookRequest(
        method="POST",
        path="/webhooks/ses",
        query={},
        headers=CIMultiDictProxy(CIMultiDict(headers if headers is not None else default)),
        body=body,
    )


async def receive(cert_file: Path, message: Any, **kw: Any) -> Received:
    return await receiver(cert_file, **kw).receive(request(message))


# --- authentication -----------------------------------------------------------------------


def test_registry_maps_ses_to_this_receiver() -> None:
    """The registry's "ses" entry is this class."""
    assert receiver_class("ses") is SesReceiver


@pytest.mark.parametrize("version", ["1", "2"])
async def test_signed_notification_is_accepted(cert_file: Path, version: str) -> None:
    """SignatureVersion 1 (SHA1withRSA) and 2 (SHA256withRSA) both verify."""
    received = await receive(cert_file, sign(envelope(doc("event_delivery.json")), version))
    assert [e.type for e in received.events] == [ET.EVENT_TYPE_DELIVERED]


async def test_documented_envelope_with_subject_verifies(cert_file: Path) -> None:
    """SNS's own example notification (with Subject) re-signed by us verifies; "Hello world!"
    is no SES record, so it is skipped, not refused."""
    message = doc("sns_notification.json")
    message["TopicArn"], message["Timestamp"] = TOPIC, NOW_ISO
    received = await receive(cert_file, sign(message))
    assert (received.events, received.skipped) == ([], 1)


def _forge(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    message = sign({**envelope(doc("event_delivery.json")), "Subject": "Amazon SES Email Event"})
    change(message)
    return message


FORGERIES: dict[str, Callable[[dict[str, Any]], None]] = {
    "other key": lambda m: m.update(sign(m, key=OTHER_KEY)),
    "message changed": lambda m: m.update(Message=m["Message"].replace("250", "550")),
    "subject changed": lambda m: m.update(Subject="Other"),
    "subject removed": lambda m: m.pop("Subject"),
    "timestamp removed": lambda m: m.pop("Timestamp"),
    "signature removed": lambda m: m.pop("Signature"),
    "signature not base64": lambda m: m.update(Signature="not base64!"),
    "v1 signature claimed as v2": lambda m: m.update(SignatureVersion="2"),
    "unknown version": lambda m: m.update(SignatureVersion="3"),
    "version missing": lambda m: m.pop("SignatureVersion"),
}


@pytest.mark.parametrize("change", FORGERIES.values(), ids=FORGERIES.keys())
async def test_bad_signature_is_unauthorized(
    cert_file: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    """Any change to a signed field, another key or a wrong version fails verification."""
    with pytest.raises(Unauthorized):
        await receive(cert_file, _forge(change))


async def test_unsigned_sns_body_is_unauthorized(cert_file: Path) -> None:
    """A bare SES record (raw message delivery on) carries no signature: refused."""
    with pytest.raises(Unauthorized, match="raw message delivery"):
        await receive(cert_file, doc("event_delivery.json"))


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-1.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-1.pem",
        "https://sns.bucket.s3.amazonaws.com/SimpleNotificationService-1.pem",
        "https://evil.example/SimpleNotificationService-1.pem",
        "https://user@sns.us-east-1.amazonaws.com/SimpleNotificationService-1.pem",
        "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-1.pem",
        "https://sns.us-east-1.amazonaws.com:bad/x.pem",
        "sns.us-east-1.amazonaws.com/x.pem",
    ],
)
async def test_certificate_url_off_the_allow_list_is_forbidden(cert_file: Path, url: str) -> None:
    """Only https on sns.<region>.amazonaws.com(.cn): checked before anything is fetched."""
    with pytest.raises(Forbidden, match="SigningCertURL"):
        await receive(cert_file, sign(envelope(doc("event_send.json")), url=url))


async def test_china_region_host_is_allowed_by_default(cert_file: Path) -> None:
    """The default cert_hosts also covers sns.<region>.amazonaws.com.cn."""
    url = "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-1.pem"
    ses = receiver(None, cert_files={url: str(cert_file)})
    message = sign(envelope(doc("event_send.json")), url=url)
    assert len((await ses.receive(request(message))).events) == 1


async def test_foreign_topic_is_forbidden(cert_file: Path) -> None:
    """A correctly signed message for a topic not in topic_arns is refused."""
    other = "arn:aws:sns:us-east-1:999999999999:someone-else"
    with pytest.raises(Forbidden, match="topic_arns"):
        await receive(cert_file, sign(envelope(doc("event_send.json"), topic=other)))


@pytest.mark.parametrize(
    ("clock_offset", "max_age", "accepted"),
    [
        (3899, None, True),  # the default window: one hour of SNS retries + 5 minutes
        (3901, None, False),
        (-3901, None, False),  # from the future
        (61, 60, False),
        (59, 60, True),
        (10**9, 0, True),  # 0: no age check
    ],
)
async def test_signed_timestamp_must_be_fresh(
    cert_file: Path, clock_offset: int, max_age: int | None, accepted: bool
) -> None:
    """Timestamp outside ±max_age (default 3900 s) is Forbidden, even correctly signed."""
    options: dict[str, Any] = {} if max_age is None else {"max_age": max_age}
    message = sign(envelope(doc("event_send.json")))
    ses = receiver(cert_file, clock=NOW.timestamp() + clock_offset, **options)
    if accepted:
        assert len((await ses.receive(request(message))).events) == 1
    else:
        with pytest.raises(Forbidden, match="Timestamp"):
            await ses.receive(request(message))


async def test_unreadable_signed_timestamp_is_bad_request(cert_file: Path) -> None:
    """A signed Timestamp that is not ISO 8601 is a malformed message."""
    message = sign(envelope(doc("event_send.json"), timestamp="yesterday"))
    with pytest.raises(BadRequest, match="Timestamp"):
        await receive(cert_file, message)


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"Notification"'])
async def test_garbage_body_is_bad_request(cert_file: Path, body: bytes) -> None:
    """A body that is not a JSON object cannot be an SNS message."""
    with pytest.raises(BadRequest):
        await receive(cert_file, body)


async def test_type_header_must_match_the_signed_type(cert_file: Path) -> None:
    """x-amz-sns-message-type is unsigned; a value differing from the signed Type is refused."""
    message = sign(envelope(doc("event_send.json")))
    ses = receiver(cert_file)
    bad = request(message, {"x-amz-sns-message-type": "SubscriptionConfirmation"})
    with pytest.raises(BadRequest):
        await ses.receive(bad)
    assert len((await ses.receive(request(message, {}))).events) == 1  # header optional


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"topic_arns": []}, "topic_arns"),
        ({"topic_arns": "arn:aws:sns:us-east-1:1:t"}, "topic_arns"),
        ({"topic_arns": ["ses-events"]}, "topic_arns"),
        ({"cert_hosts": ["sns\\.(unclosed"]}, "cert_hosts"),
        ({"cert_hosts": []}, "cert_hosts"),
        ({"confirm_subscriptions": "yes"}, "confirm_subscriptions"),
        ({"max_age": -1}, "max_age"),
        ({"max_age": True}, "max_age"),
        ({"cert_files": ["x.pem"]}, "cert_files"),
        ({"cert_files": {"http://sns.us-east-1.amazonaws.com/x.pem": "x.pem"}}, "cert_files"),
        ({"cert_files": {CERT_URL: "/nonexistent/sns.pem"}}, "cert_files"),
        ({"signing_key": "x"}, "signing_key"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict[str, Any], key: str) -> None:
    """Each invalid [esp.webhook] key is refused at start-up, naming the key."""
    with pytest.raises(ValueError, match=key):
        receiver(None, **options)


def test_topic_arns_are_required() -> None:
    """Without topic_arns any AWS account's topic could post: start-up refuses."""
    account = EspAccount(name="ses", kind="ses")
    with pytest.raises(ValueError, match="topic_arns is required"):
        SesReceiver(account, WebhookSettings(), http=_no_http, clock=lambda: 0.0)


def test_a_secret_is_refused(cert_file: Path) -> None:
    """SNS has no shared secret; a configured one would be silently useless."""
    with pytest.raises(ValueError, match="secret"):
        receiver(cert_file, secret="s3cret")


def test_pinned_file_must_be_an_rsa_certificate(tmp_path: Path) -> None:
    """cert_files pointing at something other than a PEM certificate is refused."""
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=r"not a PEM X\.509 certificate"):
        receiver(bad)


# --- documented records -------------------------------------------------------------------


def at(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp).timestamp()


def per_recipient(address: str) -> str:
    return stable_event_id("ses", SNS_ID, address)


def event(**fields: Any) -> ProviderEvent:
    base: dict[str, Any] = {
        "provider_event_id": SNS_ID,
        "recipient": "recipient@example.com",
        "esp_message_id": SES_ID,
    }
    return ProviderEvent(**(base | fields))


EXPECTED: dict[str, list[ProviderEvent]] = {
    "event_bounce.json": [
        event(
            type=ET.EVENT_TYPE_BOUNCED,
            time=at("2017-08-05T00:41:02.669Z"),
            provider_event_id=per_recipient("recipient@example.com"),
            message_id="msg-bounce",
            provider_type="Bounce",
            bounce=BOUNCE_HARD,
            reason="Permanent/General (5.1.1)",
            response="smtp; 550 5.1.1 user unknown",
        )
    ],
    "event_complaint.json": [
        event(
            type=ET.EVENT_TYPE_COMPLAINED,
            time=at("2017-08-05T00:41:02.669Z"),
            provider_event_id=per_recipient("recipient@example.com"),
            message_id="msg-complaint",
            provider_type="Complaint",
            reason="abuse",
        )
    ],
    "event_delivery.json": [
        event(
            type=ET.EVENT_TYPE_DELIVERED,
            time=at("2016-10-19T23:21:04.133Z"),
            provider_event_id=per_recipient("recipient@example.com"),
            message_id="msg-delivery",
            provider_type="Delivery",
            response="250 2.6.0 Message received",
        )
    ],
    "event_send.json": [
        event(
            type=ET.EVENT_TYPE_SENT,
            time=at("2016-10-14T05:02:16.645Z"),
            message_id="msg-send",
            provider_type="Send",
        )
    ],
    "event_reject.json": [
        event(
            type=ET.EVENT_TYPE_REJECTED,
            time=at("2016-10-14T17:38:15.211Z"),
            message_id="msg-reject",
            provider_type="Reject",
            recipient="sender@example.com",  # the documented example's destination
            reason="Bad content",
        )
    ],
    "event_open.json": [
        event(
            type=ET.EVENT_TYPE_OPENED,
            time=at("2017-08-09T22:00:19.652Z"),
            message_id="msg-open",
            provider_type="Open",
            user_agent="Mozilla/5.0 (iPhone; CPU iPhone OS 10_3_3 like Mac OS X) "
            "AppleWebKit/603.3.8 (KHTML, like Gecko) Mobile/14G60",
        )
    ],
    "event_click.json": [
        event(
            type=ET.EVENT_TYPE_CLICKED,
            time=at("2017-08-09T23:51:25.570Z"),
            message_id="msg-click",
            provider_type="Click",
            url="http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html",
            user_agent="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/60.0.3112.90 Safari/537.36",
        )
    ],
    "event_rendering_failure.json": [
        event(
            type=ET.EVENT_TYPE_FAILED,
            time=at("2018-01-22T18:43:06.197Z"),
            message_id="msg-rendering",
            provider_type="Rendering Failure",
            reason="Attribute 'attributeName' is not present in the rendering data.",
        )
    ],
    "event_delivery_delay.json": [
        event(
            type=ET.EVENT_TYPE_DEFERRED,
            time=at("2020-06-16T00:25:40.095Z"),
            provider_event_id=per_recipient("recipient@example.com"),
            message_id="msg-delay",
            provider_type="DeliveryDelay",
            reason="TransientCommunicationFailure",
            response="smtp; 421 4.4.1 Unable to connect to remote host",
        )
    ],
    "event_subscription.json": [
        event(
            type=ET.EVENT_TYPE_UNSUBSCRIBED,
            time=at("2022-01-12T01:00:17.910Z"),
            message_id="msg-subscription",
            provider_type="Subscription",
            reason="UnsubscribeHeader",
        )
    ],
    "notification_bounce_dsn.json": [
        event(
            type=ET.EVENT_TYPE_BOUNCED,
            time=at("2016-01-27T14:59:38.237Z"),
            provider_event_id=per_recipient("jane@example.com"),
            message_id="msg-legacy-bounce",
            provider_type="Bounce",
            recipient="jane@example.com",
            esp_message_id="00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000",
            bounce=BOUNCE_HARD,
            reason="Permanent/General (5.1.1)",
            response="smtp; 550 5.1.1 <jane@example.com>... User",
        )
    ],
    "notification_bounce_no_dsn.json": [
        event(
            type=ET.EVENT_TYPE_BOUNCED,
            time=at("2016-01-27T14:59:38.237Z"),
            provider_event_id=per_recipient(to),
            message_id="msg-legacy-bounce2",
            provider_type="Bounce",
            recipient=to,
            esp_message_id="00000137860315fd-34208509-5b74-41f3-95c5-22c1edc3c924-000000",
            bounce=BOUNCE_HARD,
            reason="Permanent/General",
        )
        for to in ("jane@example.com", "richard@example.com")
    ],
    "notification_complaint.json": [
        event(
            type=ET.EVENT_TYPE_COMPLAINED,
            time=at("2016-01-27T14:59:38.237Z"),
            provider_event_id=per_recipient("richard@example.com"),
            message_id="msg-legacy-complaint",
            provider_type="Complaint",
            recipient="richard@example.com",
            esp_message_id="000001378603177f-7a5433e7-8edb-42ae-af10-f0181f34d6ee-000000",
            reason="abuse",
        )
    ],
    "notification_complaint_no_feedback.json": [
        event(
            type=ET.EVENT_TYPE_COMPLAINED,
            time=at("2016-01-27T14:59:38.237Z"),
            provider_event_id=per_recipient("richard@example.com"),
            message_id="msg-legacy-complaint2",
            provider_type="Complaint",
            recipient="richard@example.com",
            esp_message_id="0000013786031775-163e3910-53eb-4c8e-a04a-f29debf88a84-000000",
        )
    ],
    "notification_delivery.json": [
        event(
            type=ET.EVENT_TYPE_DELIVERED,
            time=at("2016-01-27T14:59:38.237Z"),
            provider_event_id=per_recipient("jane@example.com"),
            message_id="msg-legacy-delivery",
            provider_type="Delivery",
            recipient="jane@example.com",
            esp_message_id="0000014644fe5ef6-9a483358-9170-4cb4-a269-f5dcdf415321-000000",
            response="250 ok:  Message 64111812 accepted",
        )
    ],
}


@pytest.mark.parametrize("name", EXPECTED)
async def test_documented_record_is_normalized(cert_file: Path, name: str) -> None:
    """Every documented SES record, in a signed notification, gives exactly these events."""
    received = await receive(cert_file, sign(envelope(doc(name)), "2"))
    assert received == Received(events=EXPECTED[name])


def test_every_record_fixture_is_checked() -> None:
    """No SES record fixture is left out of the expectations."""
    records = {p.name for p in DATA.glob("*.json") if not p.name.startswith("sns_")}
    assert records == set(EXPECTED)


def _bounce(kind: str, sub: str, recipients: Any) -> dict[str, Any]:
    record = doc("event_bounce.json")
    record["bounce"].update(bounceType=kind, bounceSubType=sub, bouncedRecipients=recipients)
    return record


async def test_broken_recipient_entry_is_skipped_the_others_kept(cert_file: Path) -> None:
    """A bounce for three entries, one unreadable: two events, skipped == 1, distinct ids."""
    entries = [{"emailAddress": "a@example.com"}, {"status": "5.1.1"}, {"emailAddress": "b@x.org"}]
    received = await receive(cert_file, sign(envelope(_bounce("Permanent", "NoEmail", entries))))
    assert received.skipped == 1
    assert [(e.recipient, e.provider_event_id) for e in received.events] == [
        ("a@example.com", per_recipient("a@example.com")),
        ("b@x.org", per_recipient("b@x.org")),
    ]


@pytest.mark.parametrize(
    ("kind", "sub", "expected"),
    [
        ("Permanent", "NoEmail", (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ("Transient", "MailboxFull", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("Undetermined", "Undetermined", (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ("Permanent", "Suppressed", (ET.EVENT_TYPE_REJECTED, 0)),
        ("Permanent", "OnAccountSuppressionList", (ET.EVENT_TYPE_REJECTED, 0)),
    ],
)
async def test_bounce_type_decides_kind(
    cert_file: Path, kind: str, sub: str, expected: tuple[int, int]
) -> None:
    """Permanent is hard, Transient/Undetermined soft; suppressed (never sent) is rejected."""
    record = _bounce(kind, sub, [{"emailAddress": "r@example.com"}])
    (got,) = (await receive(cert_file, sign(envelope(record)))).events
    assert (got.type, got.bounce, got.reason) == (*expected, f"{kind}/{sub}")


async def test_complaint_on_suppression_list_is_a_rejection(cert_file: Path) -> None:
    """complaintSubType OnAccountSuppressionList: SES did not send, nobody complained."""
    record = doc("event_complaint.json")
    record["complaint"]["complaintSubType"] = "OnAccountSuppressionList"
    (got,) = (await receive(cert_file, sign(envelope(record)))).events
    assert (got.type, got.reason) == (ET.EVENT_TYPE_REJECTED, "OnAccountSuppressionList")


async def test_topic_level_subscription_change_is_unknown(cert_file: Path) -> None:
    """Without unsubscribeAll a Subscription record is a topic preference: UNKNOWN."""
    record = doc("event_subscription.json")
    record["subscription"]["newTopicPreferences"]["unsubscribeAll"] = False
    (got,) = (await receive(cert_file, sign(envelope(record)))).events
    assert (got.type, got.provider_type) == (ET.EVENT_TYPE_UNKNOWN, "Subscription")


async def test_unknown_event_type_is_kept_as_unknown(cert_file: Path) -> None:
    """A record type SES may add later is stored as UNKNOWN under its own name."""
    record = {**doc("event_send.json"), "eventType": "Quarantine"}
    (got,) = (await receive(cert_file, sign(envelope(record)))).events
    assert (got.type, got.provider_type, got.message_id) == (
        ET.EVENT_TYPE_UNKNOWN,
        "Quarantine",
        "msg-send",
    )


@pytest.mark.parametrize(
    "message",
    [
        "Hello world!",
        "[]",
        orjson.dumps({"eventType": "Send"}).decode(),  # no mail object
        orjson.dumps({"mail": {}, "notificationType": 7}).decode(),
        orjson.dumps({**doc("event_send.json"), "mail": {"timestamp": "soon"}}).decode(),
    ],
)
async def test_unreadable_record_is_skipped(cert_file: Path, message: str) -> None:
    """A verified notification whose Message is no readable SES record: nothing, skipped 1."""
    assert await receive(cert_file, sign(envelope(message))) == Received(skipped=1)


@pytest.mark.parametrize("tags", [None, {}, {"swu_message_id": []}, {"swu_message_id": "x"}])
async def test_record_without_our_tag_has_an_empty_message_id(cert_file: Path, tags: Any) -> None:
    """Identity notifications carry no tags (SES docs); the event keeps SES's id only."""
    record = doc("notification_delivery.json")
    if tags is None:
        del record["mail"]["tags"]
    else:
        record["mail"]["tags"] = tags
    (got,) = (await receive(cert_file, sign(envelope(record)))).events
    assert (got.message_id, got.esp_message_id) == ("", record["mail"]["messageId"])


async def test_message_level_event_with_several_recipients_names_none(cert_file: Path) -> None:
    """An Open of a message to two addresses cannot say who opened: recipient is empty."""
    record = doc("event_open.json")
    record["mail"]["destination"] = ["a@example.com", "b@example.com"]
    (got,) = (await receive(cert_file, sign(envelope(record)))).events
    assert got.recipient == ""


# --- confirmations, certificate fetching (local HTTPS server) -------------------------------


def confirmation(kind: str, subscribe_url: str) -> dict[str, Any]:
    name = "sns_subscription_confirmation.json"
    message = doc(
        name if kind == "SubscriptionConfirmation" else "sns_unsubscribe_confirmation.json"
    )
    message.update(TopicArn=TOPIC, Timestamp=NOW_ISO, SubscribeURL=subscribe_url)
    return message


@pytest.mark.parametrize("kind", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
async def test_confirmations_without_confirming_make_no_call(cert_file: Path, kind: str) -> None:
    """Verified confirmations give no events; with confirm_subscriptions off nothing is called."""
    message = sign(confirmation(kind, "https://sns.us-east-1.amazonaws.com/?Action=Confirm"))
    ses = receiver(cert_file, confirm_subscriptions=False)
    assert await ses.receive(request(message)) == Received()


async def test_confirmation_signature_covers_subscribe_url(cert_file: Path) -> None:
    """SubscribeURL and Token are signed: changing the URL breaks the signature."""
    message = sign(confirmation("SubscriptionConfirmation", "https://sns.us-east-1.amazonaws.com/"))
    message["SubscribeURL"] = "https://sns.us-east-1.amazonaws.com/?Action=Other"
    with pytest.raises(Unauthorized):
        await receive(cert_file, message, confirm_subscriptions=False)


@dataclass
class SnsHost:
    """A local HTTPS stand-in for sns.<region>.amazonaws.com and a client that trusts it."""

    base: str
    session: aiohttp.ClientSession
    hits: list[str] = field(default_factory=list)

    def receiver(self, **options: Any) -> SesReceiver:
        hosts = [r"127\.0\.0\.1:\d+"]
        return receiver(None, http=lambda: self.session, cert_hosts=hosts, **options)


@pytest.fixture
async def sns_host(tmp_path: Path) -> AsyncIterator[SnsHost]:
    tls_key = _key()
    tls_pem = _certificate(tls_key, "127.0.0.1", ip="127.0.0.1")
    (tmp_path / "tls.pem").write_bytes(tls_pem)
    (tmp_path / "tls.key").write_bytes(
        tls_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(tmp_path / "tls.pem", tmp_path / "tls.key")
    client_ssl = ssl.create_default_context(cafile=str(tmp_path / "tls.pem"))
    hits: list[str] = []

    async def handle(req: web.Request) -> web.StreamResponse:
        hits.append(req.path_qs)
        if req.path == "/cert.pem":
            return web.Response(body=CERT_PEM)
        if req.path == "/redirect.pem":
            raise web.HTTPFound("/cert.pem")
        if req.path == "/confirm":
            return web.Response(text="<ConfirmSubscriptionResponse/>")
        return web.Response(status=404 if req.path.endswith(".pem") else 500)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
    await site.start()
    port = runner.addresses[0][1]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl))
    try:
        yield SnsHost(f"https://127.0.0.1:{port}", session, hits)
    finally:
        await session.close()
        await runner.cleanup()


async def test_certificate_is_fetched_once_and_cached(sns_host: SnsHost) -> None:
    """The certificate at SigningCertURL is fetched over https the first time only."""
    ses = sns_host.receiver()
    url = f"{sns_host.base}/cert.pem"
    for sns_id in ("one", "two"):
        message = sign(envelope(doc("event_send.json"), sns_id=sns_id), "2", url=url)
        assert len((await ses.receive(request(message))).events) == 1
    assert sns_host.hits == ["/cert.pem"]


@pytest.mark.parametrize("path", ["/missing.pem", "/redirect.pem", "/broken.pem"])
async def test_unavailable_certificate_fails_for_a_retry(sns_host: SnsHost, path: str) -> None:
    """404, a redirect (not followed) or a server error: SnsUnavailable, nothing cached."""
    ses = sns_host.receiver()
    message = sign(envelope(doc("event_send.json")), url=f"{sns_host.base}{path}")
    for _ in range(2):
        with pytest.raises(SnsUnavailable):
            await ses.receive(request(message))
    assert sns_host.hits == [path, path]


async def test_subscription_is_confirmed_by_get_on_subscribe_url(sns_host: SnsHost) -> None:
    """A verified SubscriptionConfirmation GETs its SubscribeURL and stores nothing."""
    ses = sns_host.receiver()
    subscribe = f"{sns_host.base}/confirm?Action=ConfirmSubscription&Token=2336"
    message = sign(
        confirmation("SubscriptionConfirmation", subscribe), url=f"{sns_host.base}/cert.pem"
    )
    assert await ses.receive(request(message)) == Received()
    assert sns_host.hits == ["/cert.pem", "/confirm?Action=ConfirmSubscription&Token=2336"]


async def test_unsubscribe_confirmation_is_not_reconfirmed(sns_host: SnsHost) -> None:
    """An UnsubscribeConfirmation is only logged: its SubscribeURL would resubscribe."""
    ses = sns_host.receiver()
    message = sign(
        confirmation("UnsubscribeConfirmation", f"{sns_host.base}/confirm"),
        url=f"{sns_host.base}/cert.pem",
    )
    assert await ses.receive(request(message)) == Received()
    assert sns_host.hits == ["/cert.pem"]


async def test_subscribe_url_off_the_allow_list_is_forbidden(sns_host: SnsHost) -> None:
    """A signed SubscribeURL on another host is not called."""
    ses = sns_host.receiver()
    message = sign(
        confirmation("SubscriptionConfirmation", "https://evil.example/confirm"),
        url=f"{sns_host.base}/cert.pem",
    )
    with pytest.raises(Forbidden, match="SubscribeURL"):
        await ses.receive(request(message))
    assert sns_host.hits == ["/cert.pem"]


async def test_failed_confirmation_fails_for_a_retry(sns_host: SnsHost) -> None:
    """SNS answering the confirmation with an error: SnsUnavailable (503, SNS retries)."""
    ses = sns_host.receiver()
    message = sign(
        confirmation("SubscriptionConfirmation", f"{sns_host.base}/confirm-fails"),
        url=f"{sns_host.base}/cert.pem",
    )
    with pytest.raises(SnsUnavailable):
        await ses.receive(request(message))


# --- end to end ---------------------------------------------------------------------------

SES_KEY_ENV = "SWU_TEST_SES_SECRET_KEY"


@pytest.fixture
def server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The service sending through "sg" at the simulator, with an SES account "ses" whose
    webhook accepts TOPIC, its signing certificate pinned to a local file."""
    cert = tmp_path / "sns.pem"
    cert.write_bytes(CERT_PEM)
    extra = f"""
[[esp]]
name = "ses"
kind = "ses"
region = "us-east-1"
base_url = "http://127.0.0.1:9"
access_key_id = "AKIDTESTONLY"
api_key_env = "{SES_KEY_ENV}"
[esp.webhook]
topic_arns = ["{TOPIC}"]
confirm_subscriptions = false
max_age = 0
[esp.webhook.cert_files]
"{CERT_URL}" = "{cert}"
"""
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "swu.toml", data_dir, esp_simulator.url, extra=extra)
    handle = ServerHandle(config, data_dir, esp_simulator)
    handle.env[SES_KEY_ENV] = "not-a-real-secret"
    handle.start()
    try:
        handle.put_template("order", {"en": ORDER})
        yield handle
    finally:
        handle.stop()


def post(server: ServerHandle, message: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{server.webhooks}/webhooks/ses",
        data=orjson.dumps(message),
        method="POST",
        headers={
            "Content-Type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": "Notification",
        },
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


def record_for(message: delivery_pb2.Message, name: str) -> dict[str, Any]:
    """A documented SES record about `message`, as SES would publish it for this send."""
    record = doc(name)
    record["mail"]["tags"]["swu_message_id"] = [message.message_id]
    record["mail"]["destination"] = [message.to]
    for key in ("bounce", "delivery"):
        if key in record:
            list_key = "bouncedRecipients" if key == "bounce" else "recipients"
            entries = record[key][list_key]
            record[key][list_key] = [
                {**e, "emailAddress": message.to} if isinstance(e, dict) else message.to
                for e in entries[:1]
            ]
    return record


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def test_signed_delivery_and_bounce_reach_the_message(server: ServerHandle) -> None:
    """A signed Delivery shows in GetMessage (DELIVERED), a redelivery is a duplicate; a hard
    bounce of another message makes that one BOUNCED."""
    message = sent(server, "jane@example.com")
    delivered = sign(envelope(record_for(message, "event_delivery.json"), sns_id="sns-1"), "2")
    assert post(server, delivered) == (200, {"stored": 1, "duplicates": 0, "skipped": 0})
    assert post(server, delivered)[1] == {"stored": 0, "duplicates": 1, "skipped": 0}
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "DELIVERED"
    (got,) = webhook_events(after)
    assert (
        got.type,
        got.provider_type,
        got.provider_event_id,
        got.recipient,
        got.esp,
        got.response,
    ) == (
        ET.EVENT_TYPE_DELIVERED,
        "Delivery",
        stable_event_id("ses", "sns-1", "jane@example.com"),
        "jane@example.com",
        "ses",
        "250 2.6.0 Message received",
    )

    gone = sent(server, "gone@example.com")
    bounced = sign(envelope(record_for(gone, "event_bounce.json"), sns_id="sns-2"))
    assert post(server, bounced)[0] == 200
    after = server.get(gone.message_id)
    assert STATE_NAMES[after.state] == "BOUNCED"
    (got,) = webhook_events(after)
    assert (got.bounce, got.recipient, got.detail, got.response) == (
        BOUNCE_HARD,
        "gone@example.com",
        "Permanent/General (5.1.1)",
        "smtp; 550 5.1.1 user unknown",
    )


def test_badly_signed_post_is_refused_and_stores_nothing(server: ServerHandle) -> None:
    """Another key's signature gets 401, a foreign topic 403; the message stays SENT."""
    message = sent(server, "jane@example.com")
    record = record_for(message, "event_delivery.json")
    assert post(server, sign(envelope(record), key=OTHER_KEY))[0] == 401
    other_topic = envelope(record, topic="arn:aws:sns:us-east-1:999999999999:x")
    assert post(server, sign(other_topic))[0] == 403
    after = server.get(message.message_id)
    assert webhook_events(after) == [] and STATE_NAMES[after.state] == "SENT"
