"""Configuration: TOML in, frozen dataclasses out, validated once at load.

Every key is optional. ``RELAY_<SECTION>_<KEY>`` environment variables override the file
(``RELAY_STORE_URL``, ``RELAY_SMTP_LISTEN="127.0.0.1:2525,127.0.0.2:2525"``); a value is read
as a TOML value when it parses as one, else as a string, and lists also take commas.
Durations are seconds in the dataclasses and strings such as "30s", "5m", "2h", "3d" in TOML.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from relay.errors import ConfigError
from relay.model import WEBHOOK_TYPES

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Parser = Callable[[Any, str], Any]
T = TypeVar("T")

TLS_MODES = ("none", "opportunistic", "required")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def setting(default: Any, parse: Parser) -> Any:
    """A config field: its default and the function that reads and checks a raw value."""
    return field(default=default, metadata={"parse": parse})


# -- value parsers: each takes (raw value, dotted key) and raises ConfigError naming the key


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _int(lo: int, hi: int | None = None) -> Parser:
    def parse(value: Any, key: str) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(key, f"must be {bounds}, got {value}")
        return value

    return parse


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, key: str) -> float:
    """ "30s", "5m", "2h", "3d", "250ms" or a number of seconds -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ConfigError(key, f'expected a duration such as "30s", "5m", "2h" or "3d", got {value!r}')


def _positive_duration(value: Any, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(key, "must be longer than zero")
    return seconds


def _list(item: Parser, *, non_empty: bool = False) -> Parser:
    def parse(value: Any, key: str) -> tuple[Any, ...]:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if non_empty and not value:
            raise ConfigError(key, "must not be empty")
        return tuple(item(v, f"{key}[{i}]") for i, v in enumerate(value))

    return parse


def _choice(*choices: str) -> Parser:
    def parse(value: Any, key: str) -> str:
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


def parse_listen(value: Any, key: str) -> Listen:
    text = _str(value, key).strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise ConfigError(key, f'expected "host:port" or "[ipv6]:port", got {text!r}')
    host = m.group(1) or m.group(3)
    port = _int(0, 65535)(int(m.group(2) or m.group(4)), key)
    return Listen(host, port)


def _network(value: Any, key: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(_str(value, key), strict=False)
    except ValueError as exc:
        raise ConfigError(key, f"not an IP network: {value!r}") from exc


def _hostname(value: Any, key: str) -> str:
    text = _str(value, key).strip().rstrip(".").lower()
    if not re.fullmatch(
        r"(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*", text
    ):
        raise ConfigError(key, f"not a valid host name: {value!r}")
    return text


def _domain_pattern(value: Any, key: str) -> str:
    text = _str(value, key).strip().lower()
    return text if text == "*" else _hostname(text, key)


def _url(value: Any, key: str) -> str:
    text = _str(value, key).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(key, f"expected an http(s) URL, got {value!r}")
    return text


Processes = int | Literal["auto"]


def _processes(value: Any, key: str) -> Processes:
    """ "auto" (one worker per usable CPU core, counted when `relay serve` starts) or a count >= 1."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f'expected "auto" or a number of processes, got {value!r}')
    if value < 1:
        raise ConfigError(key, f'must be "auto" or at least 1, got {value}')
    return value


# -- sections


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str = setting("relay.localhost", _hostname)
    data_dir: str = setting("./relay-data", _str)
    processes: Processes = setting("auto", _processes)  # `relay serve` workers; --processes N overrides


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    listen: tuple[Listen, ...] = setting((Listen("127.0.0.1", 2525),), _list(parse_listen, non_empty=True))
    tls_cert: str = setting("", _str)
    tls_key: str = setting("", _str)
    trusted_networks: tuple[IPNetwork, ...] = setting(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")), _list(_network)
    )
    max_message_size: int = setting(26_214_400, _int(1))
    max_recipients: int = setting(100, _int(1))
    max_hops: int = setting(50, _int(1))  # Received headers; more is a mail loop (Postfix's hopcount_limit)
    # Both per worker process (with N workers up to N times as many), not divided by N: the kernel
    # spreads connections unevenly, so a share of the limit would refuse a client below it.
    max_sessions: int = setting(1000, _int(1))  # open sessions in one process
    max_sessions_per_ip: int = setting(50, _int(1))  # open sessions from one client IP in one process
    max_junk_commands: int = setting(100, _int(1))  # NOOP/RSET/VRFY/HELP without a message, then 421
    listen_tls: tuple[Listen, ...] = setting((), _list(parse_listen))  # implicit TLS submission (RFC 8314), e.g. 465
    timeout: float = setting(300.0, _positive_duration)  # each read waits this long before the session is closed
    shutdown_grace: float = setting(10.0, parse_duration)  # in-flight sessions get this long on SIGTERM

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = setting("", _str)  # filled in from server.data_dir at load when empty


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    concurrency: int = setting(100, _int(1))  # transactions in flight in one process
    per_domain: int = setting(10, _int(1))
    port: int = setting(25, _int(1, 65535))
    tls: str = setting("opportunistic", _choice(*TLS_MODES))
    helo: str = setting("", _str)  # empty: server.hostname
    connect_timeout: float = setting(30.0, _positive_duration)
    command_timeout: float = setting(120.0, _positive_duration)
    retry_schedule: tuple[float, ...] = setting(
        tuple(60.0 * m for m in (1, 5, 15, 30, 60, 120, 240, 480)), _list(_positive_duration, non_empty=True)
    )
    max_age: float = setting(3 * 86400.0, _positive_duration)
    lease: float = setting(300.0, _positive_duration)
    messages_per_connection: int = setting(100, _int(1))  # then QUIT and reconnect
    idle_connection_timeout: float = setting(5.0, parse_duration)  # keep an idle connection this long
    shutdown_grace: float = setting(10.0, parse_duration)  # on SIGTERM, attempts in flight get this long
    hold: bool = setting(False, _bool)  # staging: keep every new message as "held" until released in the console
    hold_users: tuple[str, ...] = setting((), _list(_str))  # hold only the mail of these SMTP/API users
    # Look for due work this often even when no wake-up came (NOTIFY is lost while disconnected).
    poll_interval: float = setting(1.0, _positive_duration)
    # per_domain counts transactions of every node on the store ("cluster") or of this process ("node").
    per_domain_scope: str = setting("cluster", _choice("cluster", "node"))


def _nameserver(value: Any, key: str) -> Listen:
    text = _str(value, key).strip()
    if re.fullmatch(r"[0-9.]+|[0-9A-Fa-f:]+", text):
        try:
            ipaddress.ip_address(text)
        except ValueError as exc:
            raise ConfigError(key, f"not an IP address: {text!r}") from exc
        return Listen(text, 53)
    listen = parse_listen(text, key)
    try:
        ipaddress.ip_address(listen.host)
    except ValueError as exc:
        raise ConfigError(key, f"a nameserver must be an IP address, got {listen.host!r}") from exc
    return listen


@dataclass(frozen=True, slots=True)
class DnsConfig:
    nameservers: tuple[Listen, ...] = setting((), _list(_nameserver))
    timeout: float = setting(5.0, _positive_duration)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    domains: tuple[str, ...] = setting((), _list(_domain_pattern, non_empty=True))
    host: str = setting("", _str)
    port: int = setting(25, _int(1, 65535))
    username: str = setting("", _str)
    password: str = setting("", _str)
    tls: str = setting("", _choice("", *TLS_MODES))  # empty: delivery.tls


HTTP_DEFAULT = Listen("127.0.0.1", 8025)


def _token(value: Any, key: str) -> str:
    text = _str(value, key)
    if not text.strip() or any(c.isspace() for c in text):
        raise ConfigError(key, "an API token must be non-empty, without spaces")
    return text


def _url_or_empty(value: Any, key: str) -> str:
    return "" if isinstance(value, str) and not value.strip() else _url(value, key)


def _hostname_or_empty(value: Any, key: str) -> str:
    return "" if isinstance(value, str) and not value.strip() else _hostname(value, key)


def _optional(parse: Parser) -> Parser:
    """An empty string means "not set" (None); anything else is parsed."""

    def parser(value: Any, key: str) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return parse(value, key)

    return parser


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: Listen = setting(HTTP_DEFAULT, parse_listen)  # the private side: metrics, health, API
    api_tokens: tuple[str, ...] = setting((), _list(_token))
    metrics_token: str = setting("", _str)  # when set, /metrics needs it as a bearer token
    api_tokens_readonly: tuple[str, ...] = setting((), _list(_token))  # GET only, and no message bodies


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    session_idle: float = setting(8 * 3600.0, _positive_duration)  # a session unused this long is signed out
    case_sla: float = setting(24 * 3600.0, _positive_duration)  # a case open longer is overdue


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    heartbeat: float = setting(5.0, _positive_duration)  # a node silent for 3 of these is dead: its leases are freed


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long finished mail and its traces are kept; "0" keeps them forever."""

    bodies: float = setting(7 * 86400.0, parse_duration)  # raw messages of finished recipients; the timeline stays
    messages: float = setting(90 * 86400.0, parse_duration)  # finished messages with recipients, events, links
    webhook_deliveries: float = setting(14 * 86400.0, parse_duration)  # finished outbox rows
    audit: float = setting(400 * 86400.0, parse_duration)  # the access audit


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    base_url: str = setting("", _url_or_empty)  # public URL the pixel and links point at; empty: tracking off
    listen: Listen | None = setting(None, _optional(parse_listen))  # the public side for /t/...; None: [http] listen
    secret: str = setting("", _str)  # HMAC key; generated into data_dir when empty
    opens: bool = setting(True, _bool)
    clicks: bool = setting(True, _bool)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


@dataclass(frozen=True, slots=True)
class BouncesConfig:
    domain: str = setting("", _hostname_or_empty)  # the return path domain; empty: VERP and the listener off
    listen: tuple[Listen, ...] = setting((), _list(parse_listen))  # the MX of `domain` points here
    max_message_size: int = setting(2_097_152, _int(1024))
    notify_sender: bool = setting(False, _bool)  # also send an RFC 3464 DSN to the original sender

    @property
    def enabled(self) -> bool:
        """A return path domain is set: VERP on outbound mail."""
        return bool(self.domain)


@dataclass(frozen=True, slots=True)
class SuppressionConfig:
    hard_bounces: bool = setting(True, _bool)  # suppress addresses whose bounce is hard
    complaints: bool = setting(True, _bool)  # suppress addresses that complained
    reject_at_rcpt: bool = setting(False, _bool)  # 550 at RCPT instead of accepting and skipping


def _selector(value: Any, key: str) -> str:
    text = _str(value, key).strip().lower()
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?)*", text):
        raise ConfigError(key, f"not a valid DKIM selector: {value!r}")
    return text


@dataclass(frozen=True, slots=True)
class DkimConfig:
    """One [[dkim]] entry: sign mail whose From: domain is ``domain`` (or, with ``subdomains``,
    under it) with this key. Several entries for one domain each sign (RSA and Ed25519)."""

    domain: str = setting("", _hostname_or_empty)
    subdomains: bool = setting(False, _bool)
    selector: str = setting("", _selector)
    key_file: str = setting("", _str)  # PEM: RSA >= 2048 bits, or Ed25519; checked when `relay serve` starts
    algorithm: str = setting("rsa-sha256", _choice("rsa-sha256", "ed25519-sha256"))


def _secrets(value: Any, key: str) -> tuple[str, ...]:
    """One "whsec_..." secret, or several (a list, or space-separated) while rotating."""
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(key, f"expected a string or a list of strings, got {value!r}")
    out = []
    for i, item in enumerate(items):
        text = _str(item, f"{key}[{i}]").strip()
        try:
            raw = base64.b64decode(text.removeprefix("whsec_"), validate=True) if text.startswith("whsec_") else b""
        except (ValueError, binascii.Error):
            raw = b""
        if len(raw) < 24:
            raise ConfigError(
                key, 'expected "whsec_" + base64 of at least 24 random bytes (`relay webhooks secret` prints one)'
            )
        out.append(text)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """One [[webhooks]] endpoint (Standard Webhooks 1.0)."""

    url: str = setting("", _url_or_empty)
    events: tuple[str, ...] = setting((), _list(_choice(*WEBHOOK_TYPES)))  # empty: every type
    secret: tuple[str, ...] = setting((), _secrets)  # several while rotating: one signature each
    timeout: float = setting(15.0, _positive_duration)
    deferred: str = setting("first", _choice("first", "every"))  # message.deferred for each deferral, or the first

    def wants(self, kind: str) -> bool:
        return not self.events or kind in self.events


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    routes: tuple[RouteConfig, ...] = ()
    dkim: tuple[DkimConfig, ...] = ()
    webhooks: tuple[WebhookConfig, ...] = ()

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def helo(self) -> str:
        return self.delivery.helo or self.server.hostname

    def route_for(self, domain: str) -> RouteConfig | None:
        """The first static route naming the domain, then the first wildcard route."""
        for route in self.routes:
            if domain in route.domains:
                return route
        return next((r for r in self.routes if "*" in r.domains), None)


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "smtp": SmtpConfig,
    "store": StoreConfig,
    "delivery": DeliveryConfig,
    "dns": DnsConfig,
    "http": HttpConfig,
    "tracking": TrackingConfig,
    "bounces": BouncesConfig,
    "suppression": SuppressionConfig,
    "console": ConsoleConfig,
    "cluster": ClusterConfig,
    "retention": RetentionConfig,
}


def _build(cls: type[T], raw: Mapping[str, Any], prefix: str) -> T:
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, "expected a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", "unknown key")
    values = {name: f.metadata["parse"](raw[name], f"{prefix}.{name}") for name, f in known.items() if name in raw}
    return cls(**values)


# Arrays of tables ([[routes]], [[dkim]], [[webhooks]]): from the file only, no RELAY_* variables.
ARRAYS: dict[str, type[Any]] = {"routes": RouteConfig, "dkim": DkimConfig, "webhooks": WebhookConfig}

ENV_NOT_KEYS = frozenset({"RELAY_CONFIG"})  # RELAY_* variables that are not configuration keys


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """RELAY_<SECTION>_<KEY> values; any other RELAY_* variable is a mistake (a typo would
    otherwise be ignored silently), like an unknown key in the file."""
    known = {
        f"RELAY_{section}_{f.name}".upper(): (section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
    }
    out: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith("RELAY_") or name in ENV_NOT_KEYS:
            continue
        if name not in known:
            raise ConfigError(name, "unknown environment variable (expected RELAY_<SECTION>_<KEY> of a known key)")
        section, key = known[name]
        out.setdefault(section, {})[key] = _env_value(value)
    return out


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, check and freeze the configuration: the file (if any), then RELAY_* overrides."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError("--config", f"no such file: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    return from_mapping(raw, environ)


def from_mapping(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from parsed TOML and RELAY_* overrides."""
    raw = dict(raw)
    for key in raw:
        if key not in SECTIONS and key not in ARRAYS:
            raise ConfigError(key, "unknown section")
    for section, values in _env_overrides(environ or {}).items():
        merged = dict(raw.get(section) or {})
        merged.update(values)
        raw[section] = merged

    sections = {name: _build(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    arrays: dict[str, Any] = {}
    for name, cls in ARRAYS.items():
        items = raw.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(name, f"expected [[{name}]] tables")
        arrays[name] = tuple(_build(cls, item, f"{name}[{i}]") for i, item in enumerate(items))
    config = Config(**arrays, **sections)
    return _check(config)


def _check(config: Config) -> Config:
    smtp = config.smtp
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        raise ConfigError(
            "smtp.tls_cert" if not smtp.tls_cert else "smtp.tls_key", "set both tls_cert and tls_key, or neither"
        )
    if config.bounces.listen and not config.bounces.domain:
        raise ConfigError("bounces.domain", "required when bounces.listen is set")
    if smtp.listen_tls and not smtp.tls_enabled:
        raise ConfigError("smtp.listen_tls", "needs smtp.tls_cert and smtp.tls_key")
    _check_arrays(config)
    # Whether the TLS files can be read and loaded is checked when `relay serve` starts (relay.service.listeners).
    for i, route in enumerate(config.routes):
        if not route.domains:
            raise ConfigError(f"routes[{i}].domains", "required")
        if not route.host:
            raise ConfigError(f"routes[{i}].host", "required")
        if not _is_ip(route.host):
            _hostname(route.host, f"routes[{i}].host")
        if bool(route.username) != bool(route.password):
            raise ConfigError(f"routes[{i}].password", "set both username and password, or neither")
    url = config.store.url or f"sqlite+aiosqlite:///{Path(config.server.data_dir) / 'relay.db'}"
    if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://", "postgresql://", "sqlite://")):
        raise ConfigError("store.url", f"expected a sqlite+aiosqlite:// or postgresql+asyncpg:// URL, got {url!r}")
    scheme, rest = url.split("://", 1)
    url = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}.get(scheme, scheme) + "://" + rest
    return replace(config, store=replace(config.store, url=url))


def _check_arrays(config: Config) -> None:
    for i, d in enumerate(config.dkim):
        for name in ("domain", "selector", "key_file"):
            if not getattr(d, name):
                raise ConfigError(f"dkim[{i}].{name}", "required")
    for i, w in enumerate(config.webhooks):
        if not w.url:
            raise ConfigError(f"webhooks[{i}].url", "required")
        if not w.secret:
            raise ConfigError(f"webhooks[{i}].secret", "required (`relay webhooks secret` prints one)")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
