"""Mailjet webhooks: Basic credentials, single and grouped bodies, every documented event.

Mailjet signs nothing, so the direct tests check the configured Basic credentials before
anything else. The end-to-end tests send through a Mailjet account at the ESP simulator and post
the events for that message to the real service's endpoint.
"""

from __future__ import annotations

import base64
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
    ProviderEvent,
    Received,
    Unauthorized,
    WebhookRequest,
    stable_event_id,
)
from swu_delivery.webhooks.mailjet import MailjetReceiver
from tests.adapter_kit import esp_table, toml_table
from tests.conftest import STATE_NAMES, ServerHandle, write_config
from tests.fixtures_sim import SimulatorHandle
from tests.helpers import ORDER, data, mk

DATA = Path(__file__).parent / "data" / "webhooks" / "mailjet"
USER, SECRET = "mailjet-hooks", "s3cret-Hook-Value"
DOC_GUID = "1ab23cd4-e567-8901-2345-6789f0gh1i2j"
OPEN_UA = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0"
CLICK_UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_10_0) AppleWebKit/537.36"
UNSUB_UA = CLICK_UA + " (KHTML, like Gecko) Chrome/42.0.2311.135 Safari/537.36"
SMTP_REPLY = "sent (250 2.0.0 OK 1433333948 fa5si855896wjc.199 - gsmtp)"
BOUNCE_COMMENT = (
    "Host or domain name not found. Name service error for name=lbjsnrftlsiuvbsren.com type=A: "
    "Host not found"
)


def basic(user: str = USER, password: str = SECRET) -> dict[str, str]:
    """The header Mailjet sends for an endpoint URL `https://user:password@host/...`."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def receiver(secret: str = SECRET, **options: Any) -> MailjetReceiver:
    settings = WebhookSettings(secret=secret, options=options or {"username": USER})
    account = EspAccount(name="mj", kind="mailjet")
    return MailjetReceiver(account, settings, http=_no_http, clock=lambda: 0.0)


def _no_http() -> Any:
    raise AssertionError("the Mailjet receiver makes no HTTP calls")


def request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    """The request as the server hands it over: headers case-insensitive, as aiohttp's are."""
    return WebhookRequest(
        method="POST",
        path="/webhooks/mj",
        query={},
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        body=body,
    )


async def receive(body: bytes, headers: dict[str, str] | None = None) -> Received:
    return await receiver().receive(request(body, basic() if headers is None else headers))


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def doc_event(name: str, **changes: Any) -> dict[str, Any]:
    """A documented event (one of the data files) with `changes`; None removes a field."""
    event = orjson.loads(fixture(name))
    assert isinstance(event, dict)
    event.update(changes)
    return {key: value for key, value in event.items() if value is not None}


async def one(event: dict[str, Any]) -> ProviderEvent:
    """The single event the receiver makes of `event` posted alone."""
    received = await receive(orjson.dumps(event))
    assert received.skipped == 0
    (result,) = received.events
    return result


# -- authentication --------------------------------------------------------------------------


def test_registry_maps_mailjet_to_this_receiver() -> None:
    """The server finds this class for kind "mailjet"."""
    assert receiver_class("mailjet") is MailjetReceiver


async def test_basic_credentials_are_accepted() -> None:
    """The configured user and the secret as password, in any case of the scheme name."""
    body = fixture("sent.json")
    assert len((await receive(body)).events) == 1
    lower = {"authorization": basic()["Authorization"].replace("Basic", "basic")}
    assert len((await receive(body, lower)).events) == 1


def _token(text: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(password="wrong"),
        basic(password=SECRET + "x"),
        basic(password=SECRET[:-1]),
        basic(user="someone-else"),
        basic(user=USER.upper()),
        _token(f"{USER}{SECRET}"),  # no colon
        _token(f":{SECRET}"),
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
        {"Authorization": f"Bearer {SECRET}"},
        {"Authorization": "Basic"},
    ],
    ids=[
        "none",
        "wrong-password",
        "longer-password",
        "shorter-password",
        "wrong-user",
        "user-case",
        "no-colon",
        "no-user",
        "not-base64",
        "not-utf8",
        "bearer",
        "empty",
    ],
)
async def test_wrong_or_missing_credentials_are_unauthorized(headers: dict[str, str]) -> None:
    """Anything but exactly the configured credentials: 401, and the secret is not echoed."""
    with pytest.raises(Unauthorized) as err:
        await receive(fixture("sent.json"), headers)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("body", [b"not json", b"null", b'"sent"', b"42", b"true", b""])
async def test_unreadable_body_is_bad_request_after_auth(body: bytes) -> None:
    """Authenticated but neither an event nor an array: 400; without credentials: 401 first."""
    with pytest.raises(BadRequest):
        await receive(body)
    with pytest.raises(Unauthorized):
        await receive(body, {})


# -- configuration ---------------------------------------------------------------------------


def test_username_is_required() -> None:
    """Without username the endpoint could not check anything, so start-up fails."""
    settings = WebhookSettings(secret=SECRET, options={})
    with pytest.raises(ValueError, match="username"):
        MailjetReceiver(
            EspAccount(name="mj", kind="mailjet"), settings, http=_no_http, clock=lambda: 0.0
        )


def test_missing_secret_is_refused() -> None:
    """Without a secret every request would need an empty password: refuse to start."""
    with pytest.raises(ValueError, match="secret_env or secret_file"):
        receiver(secret="")


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"username": ""}, "username"),
        ({"username": "  "}, "username"),
        ({"username": 5}, "username"),
        ({"username": "a:b"}, "username"),
        ({"username": USER, "header": "X-Token"}, "header"),
        ({"username": USER, "max_age": 300}, "max_age"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict[str, Any], key: str) -> None:
    """Each bad option fails start-up with its key named, never the secret."""
    with pytest.raises(ValueError, match=key) as err:
        receiver(**options)
    assert SECRET not in str(err.value)


# -- normalization ---------------------------------------------------------------------------


def event_id(name: str) -> str:
    """The id a documented event gets: Mailjet has none, so a digest of what identifies it."""
    e = doc_event(name)
    return stable_event_id(
        e["event"],
        DOC_GUID,
        e["email"],
        e["time"],
        e.get("url", ""),
        e.get("ip", ""),
        e.get("agent", ""),
    )


def doc(type: int, name: str, **fields: Any) -> ProviderEvent:
    """The expected event for the documented example `<name>.json`, common fields filled in."""
    e = doc_event(f"{name}.json")
    return ProviderEvent(
        type=type,
        time=float(e["time"]),
        provider_event_id=event_id(f"{name}.json"),
        message_id=f"msg-{name}",
        provider_type=name,
        recipient=e["email"],
        esp_message_id=DOC_GUID,
        **fields,
    )


DOCUMENTED: dict[str, Any] = {
    "sent.json": lambda: doc(ET.EVENT_TYPE_DELIVERED, "sent", response=SMTP_REPLY),
    "open.json": lambda: doc(ET.EVENT_TYPE_OPENED, "open", user_agent=OPEN_UA),
    "click.json": lambda: doc(
        ET.EVENT_TYPE_CLICKED, "click", url="https://mailjet.com", user_agent=CLICK_UA
    ),
    "bounce.json": lambda: doc(
        ET.EVENT_TYPE_BOUNCED,
        "bounce",
        bounce=BOUNCE_HARD,
        reason="recipient: user unknown",
        response=BOUNCE_COMMENT,
    ),
    "blocked.json": lambda: doc(
        ET.EVENT_TYPE_REJECTED, "blocked", reason="recipient: user unknown"
    ),
    "spam.json": lambda: doc(ET.EVENT_TYPE_COMPLAINED, "spam", reason="feedback loop JMRPP"),
    "unsub.json": lambda: doc(ET.EVENT_TYPE_UNSUBSCRIBED, "unsub", user_agent=UNSUB_UA),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_documented_event_is_normalized(name: str) -> None:
    """Each documented example, posted alone (grouping off), becomes exactly the expected event."""
    received = await receive(fixture(name))
    assert received.events == [DOCUMENTED[name]()]
    assert received.skipped == 0 and received.reply == b""
    assert received.events[0].provider_event_id.startswith("swu:")


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_documented_event_in_a_group_is_the_same(name: str) -> None:
    """Grouping on: the same event inside an array is read the same way."""
    body = b"[" + fixture(name) + b"]"
    assert (await receive(body)).events == [DOCUMENTED[name]()]


async def test_documented_group_gives_every_event() -> None:
    """The guide's grouped sample: two `sent` events, two deliveries with their own ids."""
    received = await receive(fixture("grouped.json"))
    assert received.skipped == 0
    assert [(e.type, e.message_id, e.esp_message_id, e.time) for e in received.events] == [
        (ET.EVENT_TYPE_DELIVERED, "msg-grouped-0", DOC_GUID, 1433333949.0),
        (
            ET.EVENT_TYPE_DELIVERED,
            "msg-grouped-1",
            "j2i1hg0-f987-6543-2109-8765e4dc32ba1",
            1433333949.0,
        ),
    ]
    assert len({e.provider_event_id for e in received.events}) == 2


def test_every_fixture_is_checked() -> None:
    """No documented example in the data folder goes untested."""
    assert {p.name for p in DATA.glob("*.json")} == set(DOCUMENTED) | {"grouped.json"}


@pytest.mark.parametrize(
    "broken",
    [
        {"time": 1433333949, "email": "a@example.com"},  # no event
        {"event": "", "time": 1433333949},
        {"event": 5, "time": 1433333949},
        {"event": "sent"},  # no time
        {"event": "sent", "time": "1433333949"},
        {"event": "sent", "time": "2015-06-03T12:19:09Z"},
        {"event": "sent", "time": True},
        {"event": "sent", "time": None},
        "sent",
        ["sent"],
        None,
    ],
)
async def test_group_with_one_broken_event_keeps_the_others(broken: Any) -> None:
    """One unreadable item in a group is skipped and counted; the others are all returned."""
    group = [doc_event("sent.json"), broken, doc_event("open.json")]
    received = await receive(orjson.dumps(group))
    assert received.skipped == 1
    assert received.events == [DOCUMENTED["sent.json"](), DOCUMENTED["open.json"]()]


async def test_a_lone_broken_event_is_skipped() -> None:
    """A single object that is no readable event: 200 with skipped = 1, nothing stored."""
    received = await receive(orjson.dumps({"event": "sent", "MessageID": 1}))
    assert (received.events, received.skipped) == ([], 1)


async def test_empty_group_is_nothing() -> None:
    """An empty array is a valid, empty group."""
    received = await receive(b"[]")
    assert (received.events, received.skipped) == ([], 0)


async def test_unknown_event_is_kept_as_unknown() -> None:
    """An event name added later is stored as UNKNOWN under its own name, not dropped."""
    event = await one(doc_event("sent.json", event="deferred", smtp_reply=None))
    assert (event.type, event.provider_type, event.message_id, event.time) == (
        ET.EVENT_TYPE_UNKNOWN,
        "deferred",
        "msg-sent",
        1433333949.0,
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"hard_bounce": True}, (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD)),
        ({"hard_bounce": False}, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        ({"hard_bounce": None}, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),  # unknown: not suppressed
        ({"hard_bounce": "true"}, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
        (
            {"hard_bounce": False, "error_related_to": "domain", "error": "greylisted"},
            (ET.EVENT_TYPE_DEFERRED, 0),
        ),
        (
            {"hard_bounce": True, "error_related_to": "domain", "error": "greylisted"},
            (ET.EVENT_TYPE_BOUNCED, BOUNCE_HARD),
        ),
        (
            {"hard_bounce": False, "error_related_to": "recipient", "error": "quota exceeded"},
            (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT),
        ),
        ({"hard_bounce": False, "blocked": True}, (ET.EVENT_TYPE_BOUNCED, BOUNCE_SOFT)),
    ],
)
async def test_hard_bounce_flag_decides_the_kind(
    changes: dict[str, Any], expected: tuple[int, int]
) -> None:
    """Only `hard_bounce: true` is hard; a greylisted soft bounce will be retried: deferred."""
    event = await one(doc_event("bounce.json", **changes))
    assert (event.type, event.bounce) == expected


async def test_bounce_that_blocks_the_recipient_says_so() -> None:
    """`blocked: true` keeps the bounce a bounce, and the reason tells that Mailjet blocks now."""
    event = await one(doc_event("bounce.json", blocked=True))
    assert event.type == ET.EVENT_TYPE_BOUNCED
    assert event.reason == "recipient: user unknown (Mailjet now blocks the recipient)"


@pytest.mark.parametrize(
    ("related", "error"),
    [("mailjet", "preblocked"), ("mailjet", "duplicate in campaign"), ("domain", "typofix")],
)
async def test_blocked_is_rejected_with_its_error(related: str, error: str) -> None:
    """Mailjet did not send at all: REJECTED, with the error table's words as reason."""
    event = await one(doc_event("blocked.json", error_related_to=related, error=error))
    assert (event.type, event.bounce, event.reason) == (
        ET.EVENT_TYPE_REJECTED,
        0,
        f"{related}: {error}",
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"CustomID": None}, "msg-sent"),  # from Payload
        ({"CustomID": ""}, "msg-sent"),
        ({"CustomID": None, "Payload": {"swu_message_id": "m-obj"}}, "m-obj"),
        ({"CustomID": "m-custom", "Payload": '{"swu_message_id":"m-other"}'}, "m-custom"),
        ({"CustomID": None, "Payload": ""}, ""),
        ({"CustomID": None, "Payload": "not json"}, ""),
        ({"CustomID": None, "Payload": '{"swu_message_id": 7}'}, ""),
        ({"CustomID": None, "Payload": '["msg-sent"]'}, ""),
        ({"CustomID": 12, "Payload": None}, ""),
    ],
)
async def test_our_id_is_read_from_custom_id_then_payload(
    changes: dict[str, Any], expected: str
) -> None:
    """CustomID first, else `swu_message_id` in the Payload JSON; mail sent elsewhere has ""."""
    event = await one(doc_event("sent.json", **changes))
    assert (event.message_id, event.type) == (expected, ET.EVENT_TYPE_DELIVERED)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, DOC_GUID),
        ({"Message_GUID": None}, "19421777835146490"),  # a big number, read exactly
        ({"Message_GUID": ""}, "19421777835146490"),
        ({"Message_GUID": None, "MessageID": "123"}, "123"),
        ({"Message_GUID": None, "MessageID": None}, "19421777835146490"),  # mj_message_id
        ({"Message_GUID": None, "MessageID": None, "mj_message_id": None}, ""),
    ],
)
async def test_esp_message_id_prefers_the_guid(changes: dict[str, Any], expected: str) -> None:
    """Message_GUID (= the MessageUUID the adapter records), else MessageID, else mj_message_id."""
    assert (await one(doc_event("sent.json", **changes))).esp_message_id == expected


async def test_fractional_time_and_useragent_alias_are_read() -> None:
    """A float `time` is kept; `useragent` stands in for `agent` when that is absent."""
    event = await one(doc_event("open.json", time=1433103519.5, agent=None, useragent="UA/1"))
    assert (event.time, event.user_agent) == (1433103519.5, "UA/1")


async def test_retried_request_gets_the_same_ids() -> None:
    """Mailjet retries the same body: each of its events gets the same id again."""
    body = fixture("grouped.json")
    first = [e.provider_event_id for e in (await receive(body)).events]
    again = [e.provider_event_id for e in (await receive(body)).events]
    assert first == again


@pytest.mark.parametrize(
    "changes",
    [
        {"time": 1433334654},
        {"email": "other@example.com"},
        {"url": "https://mailjet.com/other"},
        {"event": "open", "url": None},
        {"Message_GUID": "00000000-0000-0000-0000-000000000000"},
        {"agent": "Other/1.0"},
        {"ip": "192.0.2.7"},
    ],
)
async def test_different_events_get_different_ids(changes: dict[str, Any]) -> None:
    """Another time, recipient, link, type, message or client is another event."""
    base = await one(doc_event("click.json"))
    other = await one(doc_event("click.json", **changes))
    assert base.provider_event_id != other.provider_event_id


# -- end to end ------------------------------------------------------------------------------

SECRET_ENV = "SWU_TEST_MJ_WEBHOOK_SECRET"


@pytest.fixture
def server(tmp_path: Path, esp_simulator: SimulatorHandle) -> Iterator[ServerHandle]:
    """The service sending through Mailjet account "mj" at the simulator, webhook on Basic."""
    table = toml_table(esp_table("mailjet", esp_simulator))
    webhook = f'[esp.webhook]\nsecret_env = "{SECRET_ENV}"\nusername = "{USER}"\n'
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "swu.toml", data_dir, esp_simulator.url, extra=table + webhook, default_esp="mj"
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
        f"{server.webhooks}/webhooks/mj",
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
    assert message.esp == "mj" and message.esp_message_id
    return message


def event_for(message: delivery_pb2.Message, name: str, **changes: Any) -> dict[str, Any]:
    """A documented event about `message`, as Mailjet would post it for this send."""
    return doc_event(
        name,
        Message_GUID=message.esp_message_id,
        email=message.to,
        CustomID=message.message_id,
        Payload=orjson.dumps({"swu_message_id": message.message_id}).decode(),
        **changes,
    )


def webhook_events(message: delivery_pb2.Message) -> list[delivery_pb2.MessageEvent]:
    return [e for e in message.events if e.provider_event_id]


def test_grouped_sent_and_click_reach_the_message(server: ServerHandle) -> None:
    """A group with `sent` and `click` shows in GetMessage; the retried group is all duplicates."""
    message = sent(server, "jane@example.com")
    group = orjson.dumps(
        [
            event_for(message, "sent.json", smtp_reply="sent (250 2.0.0 OK)"),
            event_for(message, "click.json", url="https://shop.example/o"),
        ]
    )
    assert post(server, group, basic()) == (200, {"stored": 2, "duplicates": 0, "skipped": 0})
    assert post(server, group, basic())[1] == {"stored": 0, "duplicates": 2, "skipped": 0}
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "DELIVERED"
    assert [
        (e.type, e.provider_type, e.recipient, e.esp, e.response, e.url, e.user_agent)
        for e in webhook_events(after)
    ] == [
        (ET.EVENT_TYPE_DELIVERED, "sent", "jane@example.com", "mj", "sent (250 2.0.0 OK)", "", ""),
        (
            ET.EVENT_TYPE_CLICKED,
            "click",
            "jane@example.com",
            "mj",
            "",
            "https://shop.example/o",
            CLICK_UA,
        ),
    ]
    assert all(e.provider_event_id.startswith("swu:") for e in webhook_events(after))


def test_single_hard_bounce_marks_the_message_bounced(server: ServerHandle) -> None:
    """One bounce object (grouping off) with `hard_bounce: true` makes the message BOUNCED."""
    message = sent(server, "gone@example.com")
    body = orjson.dumps(event_for(message, "bounce.json", comment="550 5.1.1 no such user"))
    assert post(server, body, basic()) == (200, {"stored": 1, "duplicates": 0, "skipped": 0})
    after = server.get(message.message_id)
    assert STATE_NAMES[after.state] == "BOUNCED"
    (event,) = webhook_events(after)
    assert (event.type, event.bounce, event.response, event.recipient, event.detail) == (
        ET.EVENT_TYPE_BOUNCED,
        BOUNCE_HARD,
        "550 5.1.1 no such user",
        "gone@example.com",
        "recipient: user unknown",
    )


def test_wrong_credentials_are_refused_and_store_nothing(server: ServerHandle) -> None:
    """A wrong password or none gets 401; the message keeps no webhook event and stays SENT."""
    message = sent(server, "jane@example.com")
    body = orjson.dumps([event_for(message, "sent.json")])
    assert post(server, body, basic(password="guess"))[0] == 401
    assert post(server, body, {})[0] == 401
    after = server.get(message.message_id)
    assert webhook_events(after) == [] and STATE_NAMES[after.state] == "SENT"
