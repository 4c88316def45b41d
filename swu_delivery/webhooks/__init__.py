"""ESP event webhooks: one receiver per provider kind, registered here by kind."""

from __future__ import annotations

import importlib

from swu_delivery.webhooks.base import Receiver

__all__ = ["RECEIVERS", "receiver_class"]

# kind -> "module:Class"; imported on first use, so a provider's dependencies load only if used.
RECEIVERS: dict[str, str] = {
    "sendgrid": "swu_delivery.webhooks.sendgrid:SendGridReceiver",
    "mailgun": "swu_delivery.webhooks.mailgun:MailgunReceiver",
    "ses": "swu_delivery.webhooks.ses:SesReceiver",
    "postmark": "swu_delivery.webhooks.postmark:PostmarkReceiver",
    "resend": "swu_delivery.webhooks.resend:ResendReceiver",
    "sparkpost": "swu_delivery.webhooks.sparkpost:SparkPostReceiver",
    "mailjet": "swu_delivery.webhooks.mailjet:MailjetReceiver",
    "brevo": "swu_delivery.webhooks.brevo:BrevoReceiver",
}


def receiver_class(kind: str) -> type[Receiver]:
    """The receiver for ESP `kind`; ValueError if that kind has no webhook support."""
    target = RECEIVERS.get(kind)
    if target is None:
        raise ValueError(f"ESP kind {kind!r} has no webhook receiver")
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Receiver)):
        raise TypeError(f"{target} is not a Receiver")
    return cls
