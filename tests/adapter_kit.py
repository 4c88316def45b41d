"""Builders shared by the adapter tests: accounts, messages, started adapters, the real service.

The provider modules (tests/test_adapter_*.py) and the shared fault tests build from here, so
an account, a message or a started adapter means the same thing in all of them::

    account("postmark", sim.url, timeout=0.3)   an EspAccount with that provider's defaults
    message(3, cc=[...])                        a rendered message numbered 3
    every_field(tags=[...])                     message 0 with every field set
    async with running(acc) as adapter: ...     a started adapter, closed afterwards
    adapter = adapter_fixture("postmark")       a module's `adapter` fixture at the simulator
    send_once(acc, [message()])                 start an adapter, send, close
    with serving(tmp_path, {...}) as server:    the real service with that [[esp]] as default
    postmark_server = server_fixture("postmark")  a module's fixture of that service
    final_states(deliver(server, emails))       SendBatch, wait, (state, esp, their id) by id
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from adapters import adapter_class
from adapters.base import Adapter, Attachment, Mailbox, OutboundEmail, SendOutcome
from swu_delivery._proto.swu.delivery.v1 import delivery_pb2
from swu_delivery.config import EspAccount
from tests.conftest import SIM_KEY_ENV, STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER

SENDER = Mailbox("orders@shop.example.com", "Shop")
MAILGUN_DOMAIN = "mg.example.com"
MAILJET_PUBLIC_KEY = "sim-public"
NO_SIMULATOR = "http://127.0.0.1:9"  # the built-in "sg" account's URL when no simulator runs

# Per provider kind (which is also the simulator's provider name): the account name and the
# fields that differ from the defaults below. `options` are the provider-specific keys, which
# in the service's TOML are plain keys of the [[esp]] table.
ACCOUNTS: dict[str, dict[str, Any]] = {
    "sendgrid": {"name": "sg"},
    "postmark": {"name": "pm", "options": {"message_stream": "outbound"}},
    "resend": {"name": "rs"},
    "mailgun": {
        "name": "mg",
        "sender": f"orders@{MAILGUN_DOMAIN}",
        "options": {"domain": MAILGUN_DOMAIN},
    },
    "sparkpost": {"name": "sp"},
    "brevo": {"name": "brevo"},
    "mailjet": {"name": "mj", "options": {"api_key_public": MAILJET_PUBLIC_KEY}},
}
HTTP_KINDS = tuple(ACCOUNTS)


def account(kind: str, base_url: str, **changes: Any) -> EspAccount:
    """An account of provider `kind` at `base_url` with the simulator's key; `changes` override.

    `options` in `changes` are merged into the provider's default options, so a test can set
    one option without restating the required ones.
    """
    defaults = ACCOUNTS[kind]
    options = {**defaults.get("options", {}), **changes.pop("options", {})}
    fields: dict[str, Any] = {
        "name": defaults["name"],
        "kind": kind,
        "base_url": base_url,
        "api_key": "sim-key",
        "sender": defaults.get("sender", SENDER.email),
        "timeout": 5.0,
    }
    return EspAccount(**(fields | changes), options=options)


def message(i: int = 0, **fields: Any) -> OutboundEmail:
    """A rendered message numbered `i` (id m-i, to user{i}@example.com); `fields` override."""
    defaults: dict[str, Any] = {
        "message_id": f"m-{i}",
        "sender": SENDER,
        "to": Mailbox(f"user{i}@example.com"),
        "subject": f"Order {i} shipped",
        "html": f"<p>Order {i}</p>",
        "text": f"Order {i}",
    }
    return OutboundEmail(**(defaults | fields))


def every_field(i: int = 0, **fields: Any) -> OutboundEmail:
    """Message `i` using every field: named addresses (quotes and commas included), cc, bcc,
    reply-to, headers, tags, metadata, an attachment and an inline image."""
    defaults: dict[str, Any] = {
        "sender": Mailbox("team@shop.example.com", "Shop, Inc."),
        "to": Mailbox("jane@example.com", "Jane Doe"),
        "cc": [Mailbox("cc@example.com", 'Ann "A" Lee'), Mailbox("cc2@example.com")],
        "bcc": [Mailbox("bcc@example.com")],
        "reply_to": Mailbox("reply@example.com", "Help Desk"),
        "headers": {"X-Campaign": "spring", "List-Unsubscribe": "<https://x.example/u>"},
        "tags": ["orders", "shipped"],
        "metadata": {"order": "42"},
        "attachments": [
            Attachment("a.txt", "text/plain", b"hi"),
            Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo"),
        ],
    }
    return message(i, **(defaults | fields))


@contextlib.asynccontextmanager
async def running(acc: EspAccount) -> AsyncIterator[Any]:
    """The adapter registered for `acc.kind`, started, and closed on the way out."""
    adapter: Adapter = adapter_class(acc.kind)(acc)
    await adapter.start()
    try:
        yield adapter
    finally:
        await adapter.close()


def adapter_fixture(kind: str, **changes: Any) -> Callable[..., AsyncIterator[Any]]:
    """A function-scoped fixture: a started `kind` adapter at the simulator.

    Assign it in a test module, e.g. ``adapter = adapter_fixture("postmark")``: pytest names
    the fixture after the module attribute.
    """

    @pytest.fixture
    async def started(esp_simulator: SimulatorHandle) -> AsyncIterator[Any]:
        async with running(account(kind, esp_simulator.url, **changes)) as adapter:
            yield adapter

    return started


def wait_for_records(
    sim: SimulatorHandle, provider: str, count: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Poll until the simulator has recorded `count` requests for `provider`; returns them.

    A request the adapter gave up on (a timeout) is still answered and recorded later; waiting
    for it keeps that record from landing in the next test's fresh simulator state.
    """
    deadline = time.monotonic() + timeout
    while len(found := sim.requests(provider=provider)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def esp_table(kind: str, sim: SimulatorHandle, **keys: Any) -> dict[str, Any]:
    """The service's [[esp]] table for provider `kind` at the simulator; `keys` add or override."""
    defaults = ACCOUNTS[kind]
    table: dict[str, Any] = {
        "name": defaults["name"],
        "kind": kind,
        "base_url": sim.url,
        "api_key_env": SIM_KEY_ENV,
        "sender": defaults.get("sender", SENDER.email),
        "sender_name": SENDER.name,
        "timeout": 5,
        **defaults.get("options", {}),
    }
    return table | keys


def toml_table(table: Mapping[str, Any]) -> str:
    def value(v: Any) -> str:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else f'"{v}"'

    return "\n[[esp]]\n" + "".join(f"{key} = {value(v)}\n" for key, v in table.items())


@contextlib.contextmanager
def serving(
    tmp_path: Path, esp: Mapping[str, Any], sim: SimulatorHandle | None = None
) -> Iterator[ServerHandle]:
    """The real service whose default ESP is the account `esp`, with the "order" template."""
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "swu.toml",
        data_dir,
        sim.url if sim is not None else NO_SIMULATOR,
        extra=toml_table(esp),
        default_esp=esp["name"],
    )
    handle = ServerHandle(config, data_dir, sim)
    handle.start()
    try:
        handle.put_template("order", {"en": ORDER})
        yield handle
    finally:
        handle.stop()


def server_fixture(kind: str, **keys: Any) -> Callable[..., Iterator[ServerHandle]]:
    """A function-scoped fixture: the real service delivering through `kind` at the simulator.

    Assign it in a test module, e.g. ``postmark_server = server_fixture("postmark")``; `keys`
    add to or override the account's [[esp]] table.
    """

    @pytest.fixture
    def server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
        with serving(tmp_path, esp_table(kind, esp_simulator, **keys), esp_simulator) as handle:
            yield handle

    return server


async def send_once(acc: EspAccount, emails: list[OutboundEmail]) -> list[SendOutcome]:
    """One adapter's life for `acc`: start, send `emails`, close."""
    async with running(acc) as adapter:
        outcomes: list[SendOutcome] = await adapter.send(emails)
    return outcomes


def deliver(server: ServerHandle, emails: list[delivery_pb2.Email]) -> dict[str, Any]:
    """SendBatch `emails` through the gRPC API; wait until each is done; the messages by id."""
    results = server.delivery.SendBatch(delivery_pb2.SendBatchRequest(emails=emails)).results
    return server.wait_for_state([r.message_id for r in results])


def final_states(done: Mapping[str, Any]) -> dict[str, tuple[str, str, str]]:
    """(state, account, provider's message id) of each finished message, by our message id."""
    return {mid: (STATE_NAMES[m.state], m.esp, m.esp_message_id) for mid, m in done.items()}
