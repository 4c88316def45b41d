"""Small builders shared by the end-to-end tests."""

from __future__ import annotations

from typing import Any

import orjson

from swu_delivery._proto.swu.delivery.v1 import common_pb2, delivery_pb2

ORDER = (
    "Order {{ order.number }} shipped, {{ user.first_name|title }}",
    "<p>Hi {{ user.first_name|title }}, {{ note }}</p>"
    "{% for it in order['items'] %}<li>{{ it.name }} x{{ it.qty }}</li>{% endfor %}",
    "Hi {{ user.first_name|title }}, {{ note }}\n"
    "{% for it in order['items'] %}- {{ it.name }} x{{ it.qty }}\n{% endfor %}",
)


def data(i: int, **extra: Any) -> dict[str, Any]:
    """Template data for message i."""
    return {
        "user": {"first_name": f"user{i}"},
        "order": {
            "number": 1000 + i,
            "items": [{"name": f"item{i}-{j}", "qty": j} for j in range(3)],
        },
        "note": "thanks",
        **extra,
    }


def mk(
    template_id: str = "order",
    to: str = "jane@example.com",
    payload: dict[str, Any] | None = None,
    **fields: Any,
) -> delivery_pb2.Email:
    """An Email item; `payload` becomes data_json."""
    email = delivery_pb2.Email(
        template_id=template_id,
        to=common_pb2.Address(email=to),
        data_json=orjson.dumps(payload if payload is not None else data(0)).decode(),
        **fields,
    )
    return email


def sent_ids(records: list[dict[str, Any]]) -> list[str]:
    """Our message ids as the simulator received them (custom_args.swu_message_id)."""
    return [
        p["custom_args"]["swu_message_id"] for r in records for p in r["body"]["personalizations"]
    ]
