"""Service configuration: frozen, typed settings read once from TOML and passed down.

A config file is optional. Without one, the service runs with embedded defaults: a SQLite data
directory (`./swu-data`) and the built-in ESP simulator as its only ESP account, so it works with
no provider account at all. See docs/configuration.md for every key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from swu_delivery.sandbox import RenderLimits

__all__ = [
    "SIMULATOR_ACCOUNT",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "EspAccount",
    "MetricsConfig",
    "SimulatorSettings",
    "WebhookSettings",
    "WebhooksConfig",
    "load_config",
]

SIMULATOR_ACCOUNT = "simulator"
SIMULATOR_KEY = "sim-key"  # the embedded simulator's own key; not a secret
MIN_IDEMPOTENCY_TTL = 24 * 3600.0  # seconds; the API promises keys are kept at least this long


class ConfigError(ValueError):
    """The config file or a flag is invalid; the message names the key."""


@dataclass(frozen=True, kw_only=True)
class EspAccount:
    """One ESP account: which adapter speaks to it, where, and with which credentials."""

    name: str
    kind: str
    base_url: str = ""  # empty: the adapter's documented default endpoint
    api_key: str = field(default="", repr=False)  # resolved from api_key_env / api_key_file
    sender: str = ""  # default From address when a message does not override it
    sender_name: str = ""
    timeout: float = 30.0  # seconds for one ESP call, connect included
    max_concurrency: int = 64  # ESP calls in flight at once for this account
    # Rate limits (docs/delivery.md); a rate of 0 is unlimited, a burst of 0 the default.
    messages_per_second: float = 0.0  # messages, or recipients where the ESP counts them
    messages_burst: int = 0
    requests_per_second: float = 0.0  # provider API calls
    requests_burst: int = 0
    # Circuit breaker (docs/delivery.md): open after this many retryable failures in a row,
    # probe again after the cooldown.
    breaker_failures: int = 5
    breaker_cooldown_seconds: float = 30.0
    options: Mapping[str, Any] = field(default_factory=dict)  # provider-specific keys
    webhook: WebhookSettings | None = None  # its [esp.webhook] table; None: no endpoint


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """How the webhook endpoint of one ESP account authenticates the provider's requests."""

    secret: str = field(default="", repr=False)  # resolved from secret_env / secret_file
    options: Mapping[str, Any] = field(default_factory=dict)  # the receiver's own keys


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    """How delivery lanes claim, retry and give up."""

    default_esp: str = ""  # empty: the first [[esp]] account (the simulator when there is none)
    # ESP accounts in order of preference; empty: [default_esp]. [[route]] tables set one per
    # template (template_routes, filled from them).
    route: tuple[str, ...] = ()
    template_routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    retry_share: float = 0.25  # of each claim kept for due retries; fresh mail takes the rest
    max_attempts: int = 5  # attempts per message before it fails with "retries exhausted"
    retry_base: float = 2.0  # seconds; backoff is full-jitter exponential from here
    retry_max: float = 600.0  # cap of one backoff, seconds
    claim_batch: int = 500  # messages claimed from the outbox at once
    max_inflight_batches: int = 8  # claimed batches being rendered/sent at once
    lease_seconds: float = 120.0  # a claim not finished by then is taken over
    idle_poll: float = 0.25  # seconds between outbox polls when nothing is due

    def route_for(self, template_id: str) -> tuple[str, ...]:
        """The ESP accounts a message of `template_id` tries, in order of preference."""
        return self.template_routes.get(template_id) or self.route or (self.default_esp,)


@dataclass(frozen=True, kw_only=True)
class WebhooksConfig:
    """The HTTP server that receives ESP event webhooks (POST /webhooks/<account name>)."""

    listen: str = "127.0.0.1:50052"  # empty: no webhook server
    max_body_bytes: int = 5 * 1024 * 1024  # larger requests get 413


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """The Prometheus `/metrics` HTTP endpoint (docs/operating.md)."""

    listen: str = ""  # host:port (port 0: any free port); empty: no endpoint


@dataclass(frozen=True, kw_only=True)
class SimulatorSettings:
    """The embedded ESP simulator, used when no ESP account is configured."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything the service needs, built once at start-up."""

    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("swu-data")
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC receive/send limit, set explicitly
    idempotency_ttl: float = 48 * 3600.0  # keys are kept at least this long (seconds)
    grace_seconds: float = 20.0  # SIGTERM: how long in-flight ESP calls may take to finish
    log_level: str = "INFO"
    log_format: str = "auto"  # json, text, or auto: JSON unless stderr is a terminal
    esps: tuple[EspAccount, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    simulator: SimulatorSettings = field(default_factory=SimulatorSettings)
    render: RenderLimits = field(default_factory=RenderLimits)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def account(self, name: str) -> EspAccount:
        for acc in self.esps:
            if acc.name == name:
                return acc
        raise ConfigError(f"delivery.default_esp: no ESP account named {name!r}")


def _secret(raw: Mapping[str, Any], where: str, name: str = "api_key") -> str:
    """The secret `name` from `<name>_env` (an environment variable) or `<name>_file`."""
    if name in raw:
        raise ConfigError(f"{where}.{name}: put it in {name}_env or {name}_file, not in config")
    if env := raw.get(f"{name}_env"):
        if env not in os.environ:
            raise ConfigError(f"{where}.{name}_env: environment variable {env} is not set")
        return os.environ[env]
    if path := raw.get(f"{name}_file"):
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.{name}_file: cannot read ({exc.strerror})") from None
    return ""


_RATE_KEYS = {"messages_per_second", "messages_burst", "requests_per_second", "requests_burst"}
_ACCOUNT_KEYS = {"name", "kind", "base_url", "sender", "sender_name", "timeout", "max_concurrency"}
_ACCOUNT_KEYS |= _RATE_KEYS | {"breaker_failures", "breaker_cooldown_seconds"}
_SECRET_KEYS = {"api_key", "api_key_env", "api_key_file", "webhook"}
_WEBHOOK_SECRET_KEYS = {"secret", "secret_env", "secret_file"}


def _webhook(raw: Any, where: str) -> WebhookSettings | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.webhook: expected a table ([esp.webhook])")
    options = {k: v for k, v in raw.items() if k not in _WEBHOOK_SECRET_KEYS}
    return WebhookSettings(secret=_secret(raw, f"{where}.webhook", "secret"), options=options)


def _check_limits(raw: Mapping[str, Any], where: str) -> None:
    """Rates are numbers >= 0, bursts integers >= 0 that need their rate, concurrency >= 1."""
    for key in ("messages_per_second", "requests_per_second"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"{where}.{key}: must be a number >= 0 (0: unlimited), got {value!r}")
        if value == float("inf"):
            raise ConfigError(f"{where}.{key}: must be finite; leave it out for unlimited")
    for key in ("messages_burst", "requests_burst"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}.{key}: must be an integer >= 0, got {value!r}")
        rate = key.replace("_burst", "_per_second")
        if value and not raw.get(rate):
            raise ConfigError(f"{where}.{key}: needs {rate} (a burst of an unlimited rate)")
    value = raw.get("breaker_failures", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.breaker_failures: must be an integer >= 1, got {value!r}")
    value = raw.get("breaker_cooldown_seconds", 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise ConfigError(f"{where}.breaker_cooldown_seconds: must be a number >= 0, got {value!r}")
    value = raw.get("max_concurrency", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.max_concurrency: must be an integer >= 1, got {value!r}")


def _account(raw: Mapping[str, Any], index: int) -> EspAccount:
    where = f"esp[{index}]"
    for key in ("name", "kind"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: required string")
    _check_limits(raw, where)
    known = {k: raw[k] for k in _ACCOUNT_KEYS if k in raw}
    options = {k: v for k, v in raw.items() if k not in _ACCOUNT_KEYS | _SECRET_KEYS}
    try:
        return EspAccount(
            **known,
            api_key=_secret(raw, where),
            options=options,
            webhook=_webhook(raw.get("webhook"), where),
        )
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _section(cls: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _esp_list(value: Any, where: str, names: list[str]) -> tuple[str, ...]:
    """A route: a non-empty list of distinct, configured account names."""
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, str) for v in value)
    ):
        raise ConfigError(f"{where}: expected a non-empty list of ESP account names")
    for name in value:
        if name not in names:
            raise ConfigError(
                f"{where}: no ESP account named {name!r} (accounts: {', '.join(names)})"
            )
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: an account appears twice")
    return tuple(value)


def _routes(delivery: DeliveryConfig, tables: list[Any], names: list[str]) -> DeliveryConfig:
    """Check [delivery] route and the [[route]] tables; the routes as tuples."""
    if not 0 <= delivery.retry_share <= 1:
        raise ConfigError(f"delivery.retry_share: must lie in [0, 1], got {delivery.retry_share!r}")
    given = delivery.route != ()  # the file's list, even an empty one (an error)
    route = _esp_list(delivery.route, "delivery.route", names) if given else ()
    by_template: dict[str, tuple[str, ...]] = {}
    for i, table in enumerate(tables):
        where = f"route[{i}]"
        if unknown := sorted(set(table) - {"template", "esps"}):
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (keys: template, esps)")
        template = table.get("template")
        if not isinstance(template, str) or not template:
            raise ConfigError(f"{where}.template: required string")
        if template in by_template:
            raise ConfigError(f"{where}.template: {template!r} has a route already")
        by_template[template] = _esp_list(table.get("esps"), f"{where}.esps", names)
    return replace(delivery, route=route, template_routes=by_template)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text", "auto")


def _check_logging(config: Config) -> None:
    level, form = config.log_level, config.log_format
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level: one of {', '.join(LOG_LEVELS).lower()}, not {level!r}")
    if form not in LOG_FORMATS:
        raise ConfigError(f"log_format: one of {', '.join(LOG_FORMATS)}, not {form!r}")


def load_config(
    path: Path | None = None,
    *,
    listen: str | None = None,
    data_dir: Path | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
) -> Config:
    """Read `path` (TOML) if given, apply the command-line overrides, fill embedded defaults."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    tables = raw.pop("esp", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("esp: ESP accounts are an array of tables; write [[esp]], not [esp]")
    esps = tuple(_account(a, i) for i, a in enumerate(tables))
    route_tables = raw.pop("route", [])
    if not isinstance(route_tables, list) or not all(isinstance(t, dict) for t in route_tables):
        raise ConfigError("route: routes are an array of tables; write [[route]], not [route]")
    sections = {
        "delivery": (DeliveryConfig, "delivery"),
        "simulator": (SimulatorSettings, "simulator"),
        "render": (RenderLimits, "render"),
        "webhooks": (WebhooksConfig, "webhooks"),
        "metrics": (MetricsConfig, "metrics"),
    }
    kwargs: dict[str, Any] = {}
    for key, (cls, where) in sections.items():
        if key in raw:
            kwargs[key] = _section(cls, raw.pop(key), where)
    if "data_dir" in raw:
        raw["data_dir"] = Path(raw["data_dir"])
    try:
        config = Config(**raw, **kwargs, esps=esps)
    except TypeError as exc:
        raise ConfigError(f"config: {exc}") from None
    if listen is not None:
        config = replace(config, listen=listen)
    if data_dir is not None:
        config = replace(config, data_dir=data_dir)
    if log_level is not None:
        config = replace(config, log_level=log_level)
    if log_format is not None:
        config = replace(config, log_format=log_format)
    _check_logging(config)
    if not config.esps:
        # Embedded default: deliver to the built-in simulator so no provider account is needed.
        sim = replace(config.simulator, enabled=True)
        account = EspAccount(
            name=SIMULATOR_ACCOUNT,
            kind="sendgrid",
            api_key=SIMULATOR_KEY,
            sender="noreply@example.com",
            sender_name="swu-delivery",
        )
        config = replace(config, simulator=sim, esps=(account,))
    names = [a.name for a in config.esps]
    if len(set(names)) != len(names):
        raise ConfigError("esp: account names must be unique")
    if not config.delivery.default_esp:
        config = replace(config, delivery=replace(config.delivery, default_esp=names[0]))
    elif config.delivery.default_esp not in names:
        raise ConfigError(
            f"delivery.default_esp: no ESP account named {config.delivery.default_esp!r} "
            f"(accounts: {', '.join(names)})"
        )
    config = replace(config, delivery=_routes(config.delivery, route_tables, names))
    if config.idempotency_ttl < MIN_IDEMPOTENCY_TTL:
        raise ConfigError(
            f"idempotency_ttl: {config.idempotency_ttl:g} s is below the guaranteed "
            f"{MIN_IDEMPOTENCY_TTL:g} s (24 h)"
        )
    return config
