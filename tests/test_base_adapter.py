"""The shared adapter base: provider wait signals, and request bodies larger than 1 MiB."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from adapters.base import Attachment, Mailbox, OutboundEmail, OutcomeKind, retry_after_seconds
from adapters.sendgrid import SendGridAdapter
from swu_delivery.config import EspAccount
from tests.fixtures_sim import SimulatorHandle

NOW = 1_800_000_000.0  # a fixed "now" in epoch seconds, so no case depends on the clock


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"X-RateLimit-Reset": str(int(NOW) + 30)}, 30.0),  # epoch seconds
        ({"X-RateLimit-Reset": str(int(NOW * 1000) + 4_000)}, 4.0),  # epoch milliseconds
        ({"X-RateLimit-Reset": str(int(NOW) - 30)}, 0.0),  # already past: no wait
        ({"Retry-After": format_datetime(datetime.fromtimestamp(NOW + 60, UTC), usegmt=True)}, 60),
        ({"Retry-After": "soon", "X-RateLimit-Reset": "3"}, 3.0),  # unreadable: next header
        ({"Retry-After": "-5"}, 0.0),
        ({}, None),
    ],
)
def test_retry_after_reads_every_form_providers_use(
    headers: dict[str, str], expected: float | None
) -> None:
    """Deltas, epoch seconds, epoch milliseconds and HTTP dates all become seconds to wait."""
    assert retry_after_seconds(headers, "Retry-After", "X-RateLimit-Reset", now=NOW) == expected


async def test_a_body_over_one_mebibyte_is_streamed_and_delivered(
    esp_simulator: SimulatorHandle,
) -> None:
    """A 2 MB attachment goes out whole (aiohttp warns on large raw bytes; tests make it fatal)."""
    content = bytes(range(256)) * 8192  # 2 MiB
    adapter = SendGridAdapter(
        EspAccount(name="sg", kind="sendgrid", base_url=esp_simulator.url, api_key="sim-key")
    )
    email = OutboundEmail(
        message_id="big-1",
        sender=Mailbox("orders@shop.example.com"),
        to=Mailbox("jane@example.com"),
        subject="Your invoice",
        html="<p>Attached.</p>",
        text="Attached.",
        attachments=[Attachment("invoice.bin", "application/octet-stream", content)],
    )
    await adapter.start()
    try:
        (outcome,) = await adapter.send([email])
    finally:
        await adapter.close()
    assert outcome.kind is OutcomeKind.SENT, outcome.reason
    (record,) = [
        r
        for r in esp_simulator.requests(provider="sendgrid", status=202)
        if r["body"]["personalizations"][0]["custom_args"]["swu_message_id"] == "big-1"
    ]
    (attachment,) = record["body"]["attachments"]
    assert base64.b64decode(attachment["content"]) == content
