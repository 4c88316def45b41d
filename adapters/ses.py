"""Amazon SES v2 `SendEmail` through one long-lived aioboto3 client per account.

Plain messages go as `Content.Simple`; messages with attachments or custom headers as
`Content.Raw` built by `adapters.mime`. Our id travels as the `swu_message_id` message tag, which
SES copies into every event it publishes for the message (configuration-set event destinations).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping
from email.utils import formataddr
from typing import Any, ClassVar

import aioboto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    ParamValidationError,
)

from adapters.base import (
    Adapter,
    AdapterError,
    BatchLimits,
    Mailbox,
    OutboundEmail,
    SendOutcome,
    account_option,
)
from adapters.mime import ascii_address, build_mime
from swu_delivery.config import EspAccount
from swu_delivery.errors import InvalidArgument
from swu_delivery.validation import check_header_text

__all__ = ["MESSAGE_ID_TAG", "SesAdapter", "classify_error", "email_tags"]

log = logging.getLogger(__name__)

MESSAGE_ID_TAG = "swu_message_id"
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # SES tag names and values: ASCII letters, digits, _ -
# Throttling and sending-quota errors: slow the lane down, then retry.
_THROTTLED = frozenset(
    {"TooManyRequestsException", "Throttling", "ThrottlingException", "LimitExceededException"}
)
# Transient on AWS's side (or our clock/credentials were briefly stale): retry.
_TRANSIENT = frozenset(
    {
        "InternalFailure",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "RequestExpired",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)


def _tag_text(value: str) -> str:
    return _TAG_UNSAFE.sub("_", value)[:256]


def email_tags(email: OutboundEmail) -> list[dict[str, str]]:
    """`swu_message_id`, `swu_tag_<tag>` = "1" per tag, then metadata; sanitized, first wins."""
    tags = {MESSAGE_ID_TAG: _tag_text(email.message_id)}
    for tag in email.tags:
        tags.setdefault(_tag_text(f"swu_tag_{tag}"), "1")
    for key, value in email.metadata.items():
        if value := _tag_text(value):  # an empty value has nothing to carry
            tags.setdefault(_tag_text(key), value)
    return [{"Name": name, "Value": value} for name, value in tags.items()]


def classify_error(response: Mapping[str, Any]) -> SendOutcome:
    """The outcome for a botocore `ClientError.response`: throttled, transient or permanent."""
    error = response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    reason = f"Amazon SES {status} {code}: {message}"[:300].rstrip(": ")
    if code in _THROTTLED or status == 429:
        return SendOutcome.retry(reason, rate_limited=True)
    if code in _TRANSIENT or status >= 500:
        return SendOutcome.retry(reason)
    # MessageRejected, MailFromDomainNotVerifiedException, AccountSuspendedException,
    # SendingPausedException, NotFoundException, BadRequestException, AccessDenied, ...
    return SendOutcome.rejected(reason)


def _mailbox(box: Mailbox, field: str) -> str:
    """'Name <addr>', the name quoted or RFC 2047-encoded and the domain in punycode (SES rules)."""
    check_header_text(box.name, f"{field}.name")
    return formataddr((box.name, ascii_address(box.email)), charset="utf-8")


def _content(text: str) -> dict[str, str]:
    return {"Data": text, "Charset": "UTF-8"}


class SesAdapter(Adapter):
    """One `SendEmail` per message; its sending quota counts recipients."""

    kind = "ses"
    display_name = "Amazon SES"
    counts_recipients = True
    option_keys = frozenset({"region", "access_key_id", "configuration_set"})
    # SES v2: 50 recipients (to + cc + bcc) and 40 MB per message, attachments base64-encoded.
    limits: ClassVar[BatchLimits] = BatchLimits(
        messages_per_call=1, recipients_per_message=50, bytes_per_call=40 * 1024 * 1024
    )

    def __init__(self, account: EspAccount) -> None:
        super().__init__(account)
        self.region = account_option(account, "region", str, "")
        access_key_id = account_option(account, "access_key_id", str, "")
        self.configuration_set = account_option(account, "configuration_set", str, "")
        if not self.region:
            raise AdapterError(f"esp {account.name}: region is required")
        if bool(access_key_id) != bool(account.api_key):
            raise AdapterError(
                f"esp {account.name}: give access_key_id and the secret key "
                "(api_key_env/api_key_file) together, or neither for the default AWS chain"
            )
        if account.base_url and not account.base_url.startswith(("http://", "https://")):
            raise AdapterError(f"esp {account.name}: base_url must be an http(s) URL")
        self._credentials = (
            {"aws_access_key_id": access_key_id, "aws_secret_access_key": account.api_key}
            if access_key_id
            else {}
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        session = aioboto3.Session(region_name=self.region, **self._credentials)
        config = Config(
            connect_timeout=self.account.timeout,
            read_timeout=self.account.timeout,
            max_pool_connections=self.account.max_concurrency,
            retries={"mode": "standard", "total_max_attempts": 1},  # the dispatcher retries
        )
        client = session.client("sesv2", endpoint_url=self.account.base_url or None, config=config)
        self._client = await self._stack.enter_async_context(client)
        if self.account.messages_per_second <= 0:
            await self._adopt_send_quota()

    async def _adopt_send_quota(self) -> None:
        """Pace by the account's `MaxSendRate` (recipients a second) when no rate is configured.

        Reading it needs `ses:GetAccount`; without it (or offline) the lane runs unpaced and
        relies on throttling answers, which is what the log line says.
        """
        try:
            answer = await self._client.get_account()
            rate = float(answer["SendQuota"]["MaxSendRate"])
        except (ClientError, BotoCoreError, KeyError, TypeError, ValueError) as exc:
            log.warning(
                "esp %s: sending quota not read (%s: %s); no messages_per_second limit",
                self.account.name,
                type(exc).__name__,
                str(exc)[:200],
            )
            return
        self.limiter.with_messages_rate(rate)
        log.info("esp %s: pacing at the account's MaxSendRate, %g/s", self.account.name, rate)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    def build_request(self, email: OutboundEmail) -> dict[str, Any]:
        """The `SendEmail` keyword arguments for one message."""
        destination = {"ToAddresses": [_mailbox(email.to, "to")]}
        if email.cc:
            destination["CcAddresses"] = [_mailbox(b, f"cc[{i}]") for i, b in enumerate(email.cc)]
        if email.bcc:
            bcc = [_mailbox(b, f"bcc[{i}]") for i, b in enumerate(email.bcc)]
            destination["BccAddresses"] = bcc
        request: dict[str, Any] = {
            "FromEmailAddress": _mailbox(email.sender, "sender"),
            "Destination": destination,
            "EmailTags": email_tags(email),
        }
        if self.configuration_set:
            request["ConfigurationSetName"] = self.configuration_set
        if email.attachments or email.headers:
            # SES replaces the Message-ID with its own; ours only fills the required header.
            domain = ascii_address(email.sender.email).split("@")[1]
            mime = build_mime(email, message_id=f"<{email.message_id}@{domain}>")
            request["Content"] = {"Raw": {"Data": mime.as_bytes()}}
            return request
        check_header_text(email.subject, "subject")
        body = {"Text": _content(email.text)} if email.text or not email.html else {}
        if email.html:
            body["Html"] = _content(email.html)
        request["Content"] = {"Simple": {"Subject": _content(email.subject), "Body": body}}
        if email.reply_to is not None:
            request["ReplyToAddresses"] = [_mailbox(email.reply_to, "reply_to")]
        return request

    async def send_call(self, call: list[OutboundEmail]) -> list[SendOutcome]:
        (email,) = call
        if self._client is None:
            raise RuntimeError(f"adapter {self.account.name} used before start()")
        try:
            request = self.build_request(email)
        except (InvalidArgument, ValueError) as exc:
            return [SendOutcome.rejected(f"{self.display_name}: {exc}")]
        try:
            response = await self._client.send_email(**request)
        except ClientError as exc:
            return [classify_error(exc.response)]
        except ParamValidationError as exc:  # the request breaks the API model: never succeeds
            return [SendOutcome.rejected(f"{self.display_name}: {exc}")]
        except BotoCoreError as exc:  # connection, timeout, credential lookup: try again later
            # A read timeout or a closed connection (HTTPClientError) may follow a request SES
            # got; connect errors and credential lookups happen before anything is sent.
            reason = f"{self.display_name}: {type(exc).__name__}: {exc}"
            return [SendOutcome.retry(reason, maybe_sent=isinstance(exc, HTTPClientError))]
        return [SendOutcome.sent(str(response.get("MessageId", "")))]
