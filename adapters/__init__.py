"""ESP adapters: the built-in registry plus third-party adapters from the entry-point group.

A third-party package adds a provider by declaring, in its own pyproject.toml::

    [project.entry-points."swu_delivery.adapters"]
    myesp = "my_package.myesp:MyEspAdapter"

and naming `kind = "myesp"` in an `[[esp]]` table of the service's config.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from adapters.base import Adapter, AdapterError
from adapters.brevo import BrevoAdapter
from adapters.mailgun import MailgunAdapter
from adapters.mailjet import MailjetAdapter
from adapters.postmark import PostmarkAdapter
from adapters.resend import ResendAdapter
from adapters.sendgrid import SendGridAdapter
from adapters.ses import SesAdapter
from adapters.smtp import SmtpAdapter
from adapters.sparkpost import SparkPostAdapter
from swu_delivery.config import EspAccount

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "adapter_class", "create_adapter"]

ENTRY_POINT_GROUP = "swu_delivery.adapters"

BUILTIN: dict[str, type[Adapter]] = {
    SesAdapter.kind: SesAdapter,
    SmtpAdapter.kind: SmtpAdapter,
    PostmarkAdapter.kind: PostmarkAdapter,
    ResendAdapter.kind: ResendAdapter,
    MailjetAdapter.kind: MailjetAdapter,
    BrevoAdapter.kind: BrevoAdapter,
    SendGridAdapter.kind: SendGridAdapter,
    MailgunAdapter.kind: MailgunAdapter,
    SparkPostAdapter.kind: SparkPostAdapter,
}


def adapter_class(kind: str) -> type[Adapter]:
    """The adapter class for `kind`: built-in first, then installed entry points."""
    if kind in BUILTIN:
        return BUILTIN[kind]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Adapter)):
                raise AdapterError(f"entry point {ep.value} is not an Adapter subclass")
            return cls
    known = sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
    raise AdapterError(f"unknown ESP kind {kind!r}; known kinds: {', '.join(known)}")


def create_adapter(account: EspAccount) -> Adapter:
    """A new, not yet started adapter for `account`."""
    return adapter_class(account.kind)(account)
