"""Amazon SES events through an Amazon SNS HTTPS subscription: verify SNS's signature, read SES's.

SNS signs each POST with RSA (`SignatureVersion` "1": SHA1withRSA, "2": SHA256withRSA) over
"name\\nvalue\\n" pairs of fixed fields, with the certificate at `SigningCertURL`: that URL must
be https on an allowed host (`cert_hosts`), or be pinned to a local file (`cert_files`). The
topic must be one of `topic_arns`, and the signed `Timestamp` within `max_age`. A
`SubscriptionConfirmation` is confirmed by a GET on its `SubscribeURL`. A `Notification` carries
one SES record (event publishing `eventType`, or identity notifications' `notificationType`) as
a JSON string; our id is its `mail.tags.swu_message_id`, the tag adapters/ses.py sets.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from swu_delivery.config import EspAccount, WebhookSettings
from swu_delivery.webhooks.base import (
    BOUNCE_HARD,
    BOUNCE_SOFT,
    ET,
    BadRequest,
    Forbidden,
    ProviderEvent,
    Received,
    Receiver,
    Unauthorized,
    Unavailable,
    WebhookRequest,
    parse_json,
    stable_event_id,
)

__all__ = ["SesReceiver", "SnsUnavailable", "read_record"]

log = logging.getLogger(__name__)

TYPE_HEADER = "x-amz-sns-message-type"
MESSAGE_ID_TAG = "swu_message_id"  # the SES message tag adapters/ses.py sets
# The signed fields, in the documented (byte-sorted) order; Subject only when present.
_CONFIRMATION = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
SIGNED_FIELDS: dict[str, tuple[str, ...]] = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": _CONFIRMATION,
    "UnsubscribeConfirmation": _CONFIRMATION,
}
HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
# No dot inside the region part: `sns.<bucket>.s3.amazonaws.com` must not pass.
DEFAULT_CERT_HOSTS = (r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?",)
# SNS retries an HTTPS delivery for at most 3600 s (a hard limit) and keeps the original
# message; 5 more minutes cover the time to the first attempt and clock skew.
DEFAULT_MAX_AGE = 3900.0
MAX_CERT_BYTES = 64 * 1024
MAX_CACHED_KEYS = 64
# Record type -> its detail object's key, and the key of its recipient list for the records
# that give one event per recipient ("": one event about the message).
RECORDS = {
    "Bounce": ("bounce", "bouncedRecipients"),
    "Complaint": ("complaint", "complainedRecipients"),
    "Delivery": ("delivery", "recipients"),
    "DeliveryDelay": ("deliveryDelay", "delayedRecipients"),
    "Send": ("send", ""),
    "Reject": ("reject", ""),
    "Open": ("open", ""),
    "Click": ("click", ""),
    "Rendering Failure": ("failure", ""),
    "Subscription": ("subscription", ""),
}
# SES did not send to an address on its suppression lists: a refusal, not a bounce or complaint.
SUPPRESSED = frozenset({"Suppressed", "OnAccountSuppressionList"})


class SnsUnavailable(Unavailable):
    """SNS could not be reached (certificate, confirmation): the request fails with 503, so SNS
    delivers it again later instead of taking a refusal as final."""


class SesReceiver(Receiver):
    """Verifies the SNS envelope, confirms subscriptions, maps each SES record to events."""

    kind = "ses"
    option_keys: ClassVar[frozenset[str]] = frozenset(
        {"topic_arns", "cert_hosts", "cert_files", "confirm_subscriptions", "max_age"}
    )

    def __init__(
        self,
        account: EspAccount,
        settings: WebhookSettings,
        *,
        http: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(account, settings, http=http, clock=clock)
        options, where = settings.options, f"esp {account.name}: [esp.webhook]"
        if settings.secret:
            raise ValueError(f"{where}: SNS signs its messages, set no secret_env/secret_file")
        self.topic_arns = frozenset(_arns(where, options.get("topic_arns")))
        self.cert_hosts = _patterns(where, options.get("cert_hosts", list(DEFAULT_CERT_HOSTS)))
        self.confirm_subscriptions = options.get("confirm_subscriptions", True)
        if not isinstance(self.confirm_subscriptions, bool):
            raise ValueError(f"{where} confirm_subscriptions must be true or false")
        self.max_age = _seconds(where, options.get("max_age", DEFAULT_MAX_AGE))
        self._pinned_keys = _pinned(where, options.get("cert_files", {}), self.cert_hosts)
        self._keys = dict(self._pinned_keys)  # by SigningCertURL: pinned, then fetched ones

    async def receive(self, request: WebhookRequest) -> Received:
        message = _envelope(request)
        await self._verify(message)
        kind, topic = message["Type"], message["TopicArn"]
        if kind == "SubscriptionConfirmation":
            await self._confirm(message["SubscribeURL"], topic)
            return Received()
        if kind == "UnsubscribeConfirmation":
            log.warning("esp %s: SNS unsubscribed this endpoint from %s", self.account.name, topic)
            return Received()
        return read_record(message["MessageId"], message["Message"])

    async def _verify(self, message: Mapping[str, Any]) -> None:
        """Allowed certificate URL and topic (403), signature (401), then freshness (403).

        The static checks come first so nothing is fetched for a request refused anyway; only
        a signed timestamp says anything, so its age is checked after the signature."""
        url, topic = message.get("SigningCertURL"), message.get("TopicArn")
        if not isinstance(url, str) or not _allowed(url, self.cert_hosts):
            raise Forbidden("SigningCertURL is not an https URL on an allowed SNS host")
        if topic not in self.topic_arns:
            raise Forbidden(f"topic {str(topic)[:200]!r} is not in topic_arns")
        key = await self._signing_key(url)
        _check_signature(key, message)
        when = _time(message["Timestamp"])
        if when is None:
            raise BadRequest("the signed Timestamp is not ISO 8601")
        if self.max_age and abs(self.clock() - when) > self.max_age:
            raise Forbidden(f"Timestamp {message['Timestamp']!r} is outside ±{self.max_age:g}s")

    async def _signing_key(self, url: str) -> rsa.RSAPublicKey:
        """The pinned or cached key, else the certificate fetched once from `url`."""
        if (key := self._keys.get(url)) is not None:
            return key
        try:
            async with self.http().get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise SnsUnavailable(f"signing certificate: HTTP {response.status}")
                pem = await response.content.read(MAX_CERT_BYTES + 1)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SnsUnavailable(f"signing certificate: {type(exc).__name__}") from None
        try:
            if len(pem) > MAX_CERT_BYTES:
                raise ValueError(f"over {MAX_CERT_BYTES} bytes")
            key = _rsa_key(pem)
        except ValueError as exc:
            raise SnsUnavailable(f"signing certificate: {exc}") from None
        if len(self._keys) >= MAX_CACHED_KEYS:  # SNS rotates rarely; a full cache is an anomaly
            self._keys = dict(self._pinned_keys)
        self._keys[url] = key
        return key

    async def _confirm(self, url: str, topic: str) -> None:
        """GET the SubscribeURL (same host rules as certificates): SNS then starts delivering."""
        if not self.confirm_subscriptions:
            log.warning("esp %s: SNS subscription to %s left unconfirmed", self.account.name, topic)
            return
        if not _allowed(url, self.cert_hosts):
            raise Forbidden("SubscribeURL is not an https URL on an allowed SNS host")
        try:
            async with self.http().get(url, allow_redirects=False) as response:
                await response.read()
                if response.status != 200:
                    raise SnsUnavailable(f"confirming the subscription: HTTP {response.status}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SnsUnavailable(f"confirming the subscription: {type(exc).__name__}") from None
        log.info("esp %s: confirmed the SNS subscription to %s", self.account.name, topic)


def _pinned(
    where: str, files: Any, hosts: tuple[re.Pattern[str], ...]
) -> dict[str, rsa.RSAPublicKey]:
    """Certificates configured locally for given SigningCertURLs: used, never fetched."""
    if not isinstance(files, dict):
        raise ValueError(f"{where} cert_files must be a table of URL = certificate file")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for url, path in files.items():
        if not _allowed(url, hosts):
            raise ValueError(f"{where} cert_files: {url!r} is not https on a cert_hosts host")
        try:
            keys[url] = _rsa_key(Path(str(path)).read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where} cert_files: {path!r}: {exc}") from None
    return keys


def _arns(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} topic_arns is required: the SNS topic ARNs to accept")
    if not all(isinstance(arn, str) and arn.startswith("arn:") for arn in value):
        raise ValueError(f"{where} topic_arns must be topic ARNs (strings starting 'arn:')")
    return value


def _seconds(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{where} max_age must be seconds >= 0 (0: off)")
    return float(value)


def _patterns(where: str, value: Any) -> tuple[re.Pattern[str], ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{where} cert_hosts must be a non-empty list of regular expressions")
    try:
        return tuple(re.compile(p, re.ASCII) for p in value)
    except re.error as exc:
        raise ValueError(f"{where} cert_hosts: {exc}") from None


def _allowed(url: str, hosts: tuple[re.Pattern[str], ...]) -> bool:
    """https, no credentials, and `host` (or `host:port` when a port is given) matches."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme != "https" or parts.username is not None or not parts.hostname:
        return False
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    return any(p.fullmatch(netloc) for p in hosts)


def _rsa_key(pem: bytes) -> rsa.RSAPublicKey:
    try:
        key = x509.load_pem_x509_certificate(pem).public_key()
    except ValueError:
        raise ValueError("not a PEM X.509 certificate") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA certificate")
    return key


def _envelope(request: WebhookRequest) -> dict[str, Any]:
    """The SNS JSON message; BadRequest if it is not one, Unauthorized if it is not signed."""
    message = parse_json(request.body)
    if not isinstance(message, dict):
        raise BadRequest("body is not an SNS message (a JSON object)")
    kind = message.get("Type")
    if kind not in SIGNED_FIELDS:
        raise Unauthorized("not a signed SNS message (is raw message delivery on?)")
    header = request.headers.get(TYPE_HEADER)
    if header is not None and header != kind:
        raise BadRequest(f"{TYPE_HEADER} {header[:40]!r} differs from Type {kind!r}")
    return message


def _check_signature(key: rsa.RSAPublicKey, message: Mapping[str, Any]) -> None:
    """RSA PKCS#1 v1.5 over the documented string to sign, SHA1 or SHA256 by version."""
    algorithm = HASHES.get(str(message.get("SignatureVersion")))
    if algorithm is None:
        raise Unauthorized("unknown SignatureVersion")
    signed = bytearray()
    for name in SIGNED_FIELDS[message["Type"]]:
        value = message.get(name)
        if name == "Subject" and value is None:
            continue
        if not isinstance(value, str):
            raise Unauthorized(f"signed field {name} missing")
        signed += f"{name}\n{value}\n".encode()
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
        key.verify(signature, bytes(signed), padding.PKCS1v15(), algorithm())
    except (binascii.Error, ValueError, InvalidSignature):
        raise Unauthorized("signature does not verify") from None


def read_record(sns_id: str, text: str) -> Received:
    """The events of one SES record (a Notification's Message), one per recipient where it
    lists several; a record or recipient entry that cannot be read is counted as skipped."""
    try:
        record = orjson.loads(text)
    except orjson.JSONDecodeError:
        return Received(skipped=1)
    mail = record.get("mail") if isinstance(record, dict) else None
    if not isinstance(mail, dict):
        return Received(skipped=1)
    name = record.get("eventType") or record.get("notificationType")  # notifications: the latter
    if not isinstance(name, str):
        return Received(skipped=1)
    detail_key, list_key = RECORDS.get(name, ("", ""))
    detail = record.get(detail_key)
    detail = detail if isinstance(detail, dict) else {}
    if list_key:
        entries = detail.get(list_key)
        targets = [_target(sns_id, e) for e in (entries if isinstance(entries, list) else [None])]
    else:  # about the message: its recipient when it has only one
        destination = mail.get("destination")
        only = destination[0] if isinstance(destination, list) and len(destination) == 1 else ""
        targets = [(only if isinstance(only, str) else "", sns_id, {})]
    received = Received()
    for recipient, event_id, entry in targets:
        event = _event(name, mail, detail, entry, recipient=recipient, event_id=event_id)
        if event is None:
            received.skipped += 1
        else:
            received.events.append(event)
    return received


def _target(sns_id: str, entry: Any) -> tuple[str | None, str, Mapping[str, Any]]:
    """(recipient, event id, entry) of a recipient entry: an object or a bare address."""
    fields = entry if isinstance(entry, dict) else {"emailAddress": entry}
    address = fields.get("emailAddress")
    if not isinstance(address, str) or not address:
        return None, "", fields
    return address, stable_event_id("ses", sns_id, address), fields


def _event(
    name: str,
    mail: Mapping[str, Any],
    detail: Mapping[str, Any],
    entry: Mapping[str, Any],
    *,
    recipient: str | None,
    event_id: str,
) -> ProviderEvent | None:
    """One event of record `name`; None without a recipient entry or a readable time."""
    when = _time(detail.get("timestamp")) or _time(mail.get("timestamp"))
    if when is None or recipient is None:
        return None
    return ProviderEvent(
        time=when,
        provider_event_id=event_id,
        message_id=_our_id(mail.get("tags")),
        provider_type=name,
        recipient=recipient,
        esp_message_id=_text(mail, "messageId"),
        **_classify(name, detail, entry),
    )


def _classify(name: str, detail: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """Our type and the describing fields, by record type (unknown types: EVENT_TYPE_UNKNOWN)."""
    match name:
        case "Bounce":
            return _bounce(detail, entry)
        case "Complaint":
            if (sub := _text(detail, "complaintSubType")) in SUPPRESSED:
                return {"type": ET.EVENT_TYPE_REJECTED, "reason": sub}
            return {
                "type": ET.EVENT_TYPE_COMPLAINED,
                "reason": _text(detail, "complaintFeedbackType"),
            }
        case "Delivery":
            return {"type": ET.EVENT_TYPE_DELIVERED, "response": _text(detail, "smtpResponse")}
        case "DeliveryDelay":
            reason, response = _text(detail, "delayType"), _text(entry, "diagnosticCode")
            return {"type": ET.EVENT_TYPE_DEFERRED, "reason": reason, "response": response}
        case "Send":
            return {"type": ET.EVENT_TYPE_SENT}
        case "Reject":
            return {"type": ET.EVENT_TYPE_REJECTED, "reason": _text(detail, "reason")}
        case "Open":
            return {"type": ET.EVENT_TYPE_OPENED, "user_agent": _text(detail, "userAgent")}
        case "Click":
            url, agent = _text(detail, "link"), _text(detail, "userAgent")
            return {"type": ET.EVENT_TYPE_CLICKED, "url": url, "user_agent": agent}
        case "Rendering Failure":
            return {"type": ET.EVENT_TYPE_FAILED, "reason": _text(detail, "errorMessage")}
        case "Subscription":
            new = detail.get("newTopicPreferences")
            if isinstance(new, dict) and new.get("unsubscribeAll") is True:
                return {"type": ET.EVENT_TYPE_UNSUBSCRIBED, "reason": _text(detail, "source")}
    return {"type": ET.EVENT_TYPE_UNKNOWN}


def _bounce(detail: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """Permanent: hard; Transient and Undetermined: soft; not sent (suppressed): rejected."""
    kind, sub = _text(detail, "bounceType"), _text(detail, "bounceSubType")
    status = _text(entry, "status")
    fields = {
        "reason": f"{kind}/{sub}" + (f" ({status})" if status else ""),
        "response": _text(entry, "diagnosticCode"),
    }
    if sub in SUPPRESSED:
        return {"type": ET.EVENT_TYPE_REJECTED, **fields}
    bounce = BOUNCE_HARD if kind == "Permanent" else BOUNCE_SOFT
    return {"type": ET.EVENT_TYPE_BOUNCED, "bounce": bounce, **fields}


def _our_id(tags: Any) -> str:
    """`swu_message_id` from `mail.tags` (a list of values per tag name); "" when absent."""
    values = tags.get(MESSAGE_ID_TAG) if isinstance(tags, dict) else None
    return values[0] if isinstance(values, list) and values and isinstance(values[0], str) else ""


def _time(value: Any) -> float | None:
    """ISO 8601 (`...T00:41:02.669Z`, or `... +0000` in identity notifications) as epoch."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()  # GMT


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""
