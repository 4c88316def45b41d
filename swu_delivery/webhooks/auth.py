"""Shared-secret checks for providers that do not sign their webhooks: credentials in headers.

Postmark, Brevo (and others) authenticate a webhook only by what the request carries: HTTP Basic
credentials (from `https://user:password@host/...` in the webhook URL), a bearer token, or a
custom header with a fixed value. Each check raises `Unauthorized` without saying which part
was wrong and never quotes what was expected.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from swu_delivery.webhooks.base import Unauthorized, constant_time_equal

__all__ = [
    "basic_username",
    "check_basic_auth",
    "check_bearer_token",
    "check_secret_header",
    "header_name",
    "option_text",
]

AUTHORIZATION = "Authorization"
# RFC 9110 field-name: a token of visible characters without separators.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def check_basic_auth(headers: Mapping[str, str], username: str, password: str) -> None:
    """`Authorization: Basic base64(username:password)` with exactly these credentials."""
    given = _credentials(headers, "basic")
    try:
        user, sep, secret = base64.b64decode(given, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("Basic credentials are not base64 of user:password") from None
    # Both compared, whatever the first gives: the time taken says nothing about which differs.
    user_ok = constant_time_equal(user, username)
    secret_ok = constant_time_equal(secret, password)
    if not (sep and user_ok and secret_ok):
        raise Unauthorized("Basic credentials do not match")


def check_bearer_token(headers: Mapping[str, str], token: str) -> None:
    """`Authorization: Bearer <token>` with exactly this token."""
    if not constant_time_equal(_credentials(headers, "bearer"), token):
        raise Unauthorized("bearer token does not match")


def check_secret_header(headers: Mapping[str, str], name: str, secret: str) -> None:
    """Header `name` present with exactly the value `secret`."""
    value = headers.get(name)
    if value is None:
        raise Unauthorized(f"missing header {name}")
    if not constant_time_equal(value, secret):
        raise Unauthorized(f"header {name} does not match")


def _credentials(headers: Mapping[str, str], scheme: str) -> str:
    """The credentials after `scheme` (case-insensitive) in the Authorization header."""
    given, _, credentials = headers.get(AUTHORIZATION, "").strip().partition(" ")
    if given.lower() != scheme or not credentials.strip():
        raise Unauthorized(f"missing {scheme.title()} credentials in {AUTHORIZATION}")
    return credentials.strip()


def option_text(account: str, key: str, value: Any) -> str:
    """A non-empty string option of [esp.webhook], or ValueError naming the key."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"esp {account}: [esp.webhook] {key} must be a non-empty string")
    return value.strip()


def basic_username(account: str, key: str, value: Any) -> str:
    """A Basic user name: non-empty and without a colon, which RFC 7617 reserves."""
    name = option_text(account, key, value)
    if ":" in name:
        raise ValueError(f"esp {account}: [esp.webhook] {key} cannot contain ':'")
    return name


def header_name(account: str, key: str, value: Any) -> str:
    """A custom header name: an HTTP token, and not Authorization (which `username` covers)."""
    name = option_text(account, key, value)
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"esp {account}: [esp.webhook] {key} {name!r} is not an HTTP header name")
    if name.lower() == AUTHORIZATION.lower():
        raise ValueError(
            f"esp {account}: [esp.webhook] {key} cannot be {AUTHORIZATION}: "
            "use username (Basic) or the bearer option instead"
        )
    return name
