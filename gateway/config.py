"""Configuration: YAML with `${ENV}` expansion, parsed into frozen dataclasses.

Every error names the field it is about, e.g. `keys[1].key_env: AGNES_KEY_SPARE is not set`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import time as dtime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from .clock import QuotaSchedule

DEFAULT_UPSTREAM = "https://apihub.agnes-ai.com"
DEFAULT_KEY_FILE = "~/.agnes_api_key"
DEFAULT_BACKUP_KEY_FILE = "~/.agnes_api_key_old"
# English and Chinese wordings of a spent daily quota (UPSTREAM.md); a plain rate limit does not match.
DEFAULT_QUOTA_PATTERN = r"(?i)quota|daily.?limit|limit.{0,20}(reached|exceeded)|exceeded|额度|次数|上限|配额"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")

T = TypeVar("T")

#: The sections a config file may have.
TOP_LEVEL = {
    "listen",
    "upstream",
    "database",
    "quota",
    "keys",
    "clients",
    "admin_token",
    "limits",
    "resilience",
    "log",
    "metrics",
    "shutdown",
    "openai",
    "archive",
    "poll",
    "retention",
}


class ConfigError(ValueError):
    """A config that cannot be used; the message starts with the field's path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class Secret:
    """A credential whose `str`/`repr` never show it; `reveal()` is the one way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def masked(self) -> str:
        """The last four characters, enough for an operator to tell keys apart."""
        return "…" + self._value[-4:] if len(self._value) > 8 else "…"

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Gateway processes sharing the port (SO_REUSEPORT), each a full gateway on the same store.
    workers: int = 1

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class UpstreamConfig:
    base_url: str = DEFAULT_UPSTREAM
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    quota_statuses: tuple[int, ...] = (429, 403)
    quota_pattern: str = DEFAULT_QUOTA_PATTERN
    rate_limit_cooldown_s: float = 60.0
    max_connections: int = 100


@dataclass(frozen=True)
class KeyConfig:
    """One upstream key of the pool."""

    name: str
    secret: Secret
    daily_limit: int | None = None
    priority: int = 0


@dataclass(frozen=True)
class ClientConfig:
    """A caller of the gateway, known by its bearer token."""

    name: str
    token: Secret
    daily_limit: int | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """What one gateway process takes on before it refuses work instead of piling it up."""

    max_body_bytes: int = 20 * 1024 * 1024
    #: A create body must arrive within this; a slower one gets 408 and its connection is closed.
    body_read_timeout_s: float = 30.0
    #: A connection with no request under way (idle keep-alive, or headers trickling in) closes after this.
    idle_timeout_s: float = 75.0
    #: Upstream calls in flight at once.
    max_concurrent_upstream: int = 64
    #: Requests waiting for an upstream slot; one more gets 503 with Retry-After at once.
    max_queued: int = 256
    #: The longest a request waits for an upstream slot before it gets 503.
    queue_timeout_s: float = 10.0


@dataclass(frozen=True)
class ResilienceConfig:
    """Retries of transient poll failures, and the circuit breaker of each key."""

    #: Extra attempts of a poll after a connect error, reset or 502/503/504 (0 = no retry).
    poll_retries: int = 2
    #: The first retry waits up to this (full jitter); each next one up to twice as long.
    poll_backoff_s: float = 0.2
    #: No retry starts once this much time has passed since the poll's first attempt.
    poll_retry_budget_s: float = 3.0
    #: Consecutive failures (connect error, reset, timeout, 5xx) that open a key's breaker (0 = never).
    breaker_failures: int = 5
    #: How long an open breaker keeps calls off the key before one probe is let through.
    breaker_open_s: float = 30.0


@dataclass(frozen=True)
class ShutdownConfig:
    """On SIGTERM: how long in-flight requests may take to finish before they are cut off."""

    drain_s: float = 30.0


@dataclass(frozen=True)
class PollConfig:
    """How polls are spared upstream calls."""

    #: Repeated polls of one task within this many seconds get the last answer; 0 = every poll asks upstream.
    freshness_s: float = 1.0
    #: Serve completed/failed tasks from the database instead of asking upstream again.
    terminal_cache: bool = True
    #: Answer polls on the connection itself, without aiohttp's request handling (see `gateway.fastpath`).
    fast_path: bool = True


@dataclass(frozen=True)
class RetentionConfig:
    """How long task routes are kept, and how the background pruning paces itself."""

    #: Routes of tasks created longer ago than this are deleted; 0 keeps them forever.
    days: float = 30.0
    interval_s: float = 3600.0
    #: Rows deleted per statement, so requests never wait long behind a prune.
    batch: int = 1000


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class MetricsConfig:
    """Where `/metrics` is served and whether scraping needs a bearer token."""

    #: A separate listener for `/metrics` only; None serves it on the main port.
    port: int | None = None
    #: Address of that listener; None means `listen.host`.
    host: str | None = None
    token: Secret | None = None


@dataclass(frozen=True)
class OpenAIConfig:
    """The OpenAI Videos dialect under `/openai/v1`: how its requests map onto the upstream's fields."""

    #: OpenAI's `seconds` becomes `num_frames = seconds * frame_rate + 1` (121 frames = 5 s at 24 fps).
    frame_rate: int = 24
    #: OpenAI model names and the upstream model each one means; a name not listed is sent as it is.
    models: tuple[tuple[str, str], ...] = (("sora-2", "agnes-video-v2.0"), ("sora-2-pro", "agnes-video-v2.0"))
    #: The upstream model when the request names none.
    default_model: str = "agnes-video-v2.0"
    #: The upstream's (undocumented) image-to-video field that carries `input_reference`.
    image_field: str = "image"
    #: `data_url`: a JSON create with the image as a base64 data URL; `multipart`: a form with the file.
    image_format: str = "data_url"
    #: `openai-poll-after-ms` on every answer: how long the SDK's `poll()` waits between polls.
    poll_after_ms: int = 5000

    def upstream_model(self, name: str | None) -> str:
        if not name:
            return self.default_model
        return dict(self.models).get(name, name)


@dataclass(frozen=True)
class ArchiveConfig:
    """Where completed videos are kept once downloaded; None serves them from upstream's URL each time."""

    dir: str | None = None


@dataclass(frozen=True)
class Config:
    """Everything the gateway needs to run; built by `load_config` or `parse_config`."""

    keys: tuple[KeyConfig, ...]
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    database: str = "./agnes-gateway.db"
    schedule: QuotaSchedule = field(default_factory=QuotaSchedule)
    clients: tuple[ClientConfig, ...] = ()
    admin_token: Secret | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    source: str = "<defaults>"
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)


# --- reading --------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file at `path`, or build the zero-config default when `path` is None."""
    env = os.environ if env is None else env
    if path is None:
        return default_config(env)
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {_yaml_problem(exc)}") from None
    return parse_config(raw if raw is not None else {}, env=env, base_dir=p.parent, source=str(p))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without the quoted line (it may hold a key)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"{exc.problem}{context} at line {mark.line + 1}, column {mark.column + 1}"
    return type(exc).__name__


def default_config(env: Mapping[str, str] | None = None) -> Config:
    """No config file: the upstream guide's own key files, the second one as a backup."""
    env = os.environ if env is None else env
    keys: list[dict[str, Any]] = []
    for name, path, priority in (("primary", DEFAULT_KEY_FILE, 0), ("backup", DEFAULT_BACKUP_KEY_FILE, 1)):
        if Path(path).expanduser().is_file():
            keys.append({"name": name, "key_file": path, "priority": priority})
    if not keys:
        raise ConfigError(
            "keys",
            f"no config file given and neither {DEFAULT_KEY_FILE} nor {DEFAULT_BACKUP_KEY_FILE} exists; "
            "pass --config FILE (see config.example.yaml) or try `agnes-gateway demo`",
        )
    return parse_config({"keys": keys}, env=env)


def parse_config(
    raw: Any,
    *,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    source: str = "<inline>",
) -> Config:
    """Validate a decoded YAML document and build a `Config` from it."""
    env = os.environ if env is None else env
    doc = _expand(raw, env, "")
    top = _mapping(doc, "", TOP_LEVEL)
    base = base_dir or Path.cwd()

    listen_raw = _mapping(top.get("listen", {}), "listen", {"host", "port", "workers"})
    listen = ListenConfig(
        host=_get(listen_raw, "host", str, "listen", "127.0.0.1"),
        port=_port(listen_raw.get("port", 8080), "listen.port"),
        workers=_whole(listen_raw, "workers", "listen", 1, 1),
    )

    up_raw = _mapping(
        top.get("upstream", {}),
        "upstream",
        {
            "base_url",
            "timeout_s",
            "connect_timeout_s",
            "quota_statuses",
            "quota_pattern",
            "rate_limit_cooldown_s",
            "max_connections",
        },
    )
    base_url = _get(up_raw, "base_url", str, "upstream", DEFAULT_UPSTREAM).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", base_url):
        raise ConfigError("upstream.base_url", f"must be an http(s) URL, got {base_url!r}")
    pattern = _get(up_raw, "quota_pattern", str, "upstream", DEFAULT_QUOTA_PATTERN)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError("upstream.quota_pattern", f"not a valid regular expression: {exc}") from None
    statuses = up_raw.get("quota_statuses", [429, 403])
    if not isinstance(statuses, list) or not all(isinstance(s, int) and 400 <= s <= 599 for s in statuses):
        raise ConfigError("upstream.quota_statuses", "must be a list of HTTP status codes (400-599)")
    upstream = UpstreamConfig(
        base_url=base_url,
        timeout_s=_positive(up_raw, "timeout_s", "upstream", 30.0),
        connect_timeout_s=_positive(up_raw, "connect_timeout_s", "upstream", 5.0),
        quota_statuses=tuple(statuses),
        quota_pattern=pattern,
        rate_limit_cooldown_s=_positive(up_raw, "rate_limit_cooldown_s", "upstream", 60.0),
        max_connections=int(_positive(up_raw, "max_connections", "upstream", 100)),
    )

    quota_raw = _mapping(top.get("quota", {}), "quota", {"timezone", "reset_time"})
    tz_name = _get(quota_raw, "timezone", str, "quota", "Asia/Shanghai")
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            "quota.timezone", f"unknown time zone {tz_name!r} (use an IANA name such as Asia/Shanghai)"
        ) from None
    reset_raw = _get(quota_raw, "reset_time", str, "quota", "00:00")
    match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", reset_raw)
    if not match:
        raise ConfigError("quota.reset_time", f"must be HH:MM, got {reset_raw!r}")
    schedule = QuotaSchedule(tz=tz, reset=dtime(int(match[1]), int(match[2])))

    database = _get(top, "database", str, "", "./agnes-gateway.db")
    if not database.startswith(("postgres://", "postgresql://")) and database != ":memory:":
        database = str(
            (base / Path(database).expanduser())
            if not Path(database).expanduser().is_absolute()
            else Path(database).expanduser()
        )

    keys = _keys(top.get("keys"), env, base)
    clients = _clients(top.get("clients", []), keys)

    admin = top.get("admin_token")
    if admin is not None and not isinstance(admin, str):
        raise ConfigError("admin_token", "must be a string")
    admin_token = Secret(admin) if admin else None
    if admin and len(admin) < 16:
        raise ConfigError("admin_token", "must be at least 16 characters")
    if admin_token is not None and any(c.token == admin_token for c in clients):
        raise ConfigError("admin_token", "must differ from every client token")

    limits = _limits(top.get("limits", {}))
    resilience = _resilience(top.get("resilience", {}))

    log_raw = _mapping(top.get("log", {}), "log", {"level", "format"})
    level = _get(log_raw, "level", str, "log", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level", f"must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    fmt = _get(log_raw, "format", str, "log", "text")
    if fmt not in {"text", "json"}:
        raise ConfigError("log.format", f"must be text or json, got {fmt!r}")

    shutdown_raw = _mapping(top.get("shutdown", {}), "shutdown", {"drain_s"})
    shutdown = ShutdownConfig(drain_s=_positive(shutdown_raw, "drain_s", "shutdown", 30.0))
    poll_raw = _mapping(top.get("poll", {}), "poll", {"freshness_s", "terminal_cache", "fast_path"})
    poll = PollConfig(
        freshness_s=_non_negative(poll_raw, "freshness_s", "poll", 1.0),
        terminal_cache=_get(poll_raw, "terminal_cache", bool, "poll", True),
        fast_path=_get(poll_raw, "fast_path", bool, "poll", True),
    )

    retention_raw = _mapping(top.get("retention", {}), "retention", {"days", "interval_s", "batch"})
    retention = RetentionConfig(
        days=_non_negative(retention_raw, "days", "retention", 30.0),
        interval_s=_positive(retention_raw, "interval_s", "retention", 3600.0),
        batch=int(_positive(retention_raw, "batch", "retention", 1000)),
    )

    return Config(
        keys=keys,
        listen=listen,
        upstream=upstream,
        database=database,
        schedule=schedule,
        clients=clients,
        admin_token=admin_token,
        limits=limits,
        resilience=resilience,
        log=LogConfig(level=level, format=fmt),
        metrics=_metrics(top.get("metrics", {}), listen, keys, clients, admin_token),
        shutdown=shutdown,
        poll=poll,
        retention=retention,
        source=source,
        openai=_openai(top.get("openai", {})),
        archive=_archive(top.get("archive", {}), base),
    )


# --- client-facing extras: the OpenAI dialect and the video archive ----------------------

IMAGE_FORMATS = ("data_url", "multipart")


def _openai(raw: Any) -> OpenAIConfig:
    section = _mapping(
        raw, "openai", {"frame_rate", "models", "default_model", "image_field", "image_format", "poll_after_ms"}
    )
    default = OpenAIConfig()
    models_raw = section.get("models", dict(default.models))
    if not isinstance(models_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in models_raw.items()
    ):
        raise ConfigError("openai.models", "must map OpenAI model names to upstream model names (strings)")
    frame_rate = section.get("frame_rate", default.frame_rate)
    if isinstance(frame_rate, bool) or not isinstance(frame_rate, int) or not 1 <= frame_rate <= 240:
        raise ConfigError("openai.frame_rate", f"must be whole frames per second (1-240), got {frame_rate!r}")
    poll_after = section.get("poll_after_ms", default.poll_after_ms)
    if isinstance(poll_after, bool) or not isinstance(poll_after, int) or poll_after < 0:
        raise ConfigError("openai.poll_after_ms", f"must be a whole number of milliseconds >= 0, got {poll_after!r}")
    image_format = _get(section, "image_format", str, "openai", default.image_format)
    if image_format not in IMAGE_FORMATS:
        raise ConfigError("openai.image_format", f"must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    image_field = _get(section, "image_field", str, "openai", default.image_field)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", image_field):
        raise ConfigError("openai.image_field", f"must be a field name, got {image_field!r}")
    default_model = _get(section, "default_model", str, "openai", default.default_model)
    if not default_model:
        raise ConfigError("openai.default_model", "must not be empty")
    return OpenAIConfig(
        frame_rate=frame_rate,
        models=tuple(models_raw.items()),
        default_model=default_model,
        image_field=image_field,
        image_format=image_format,
        poll_after_ms=poll_after,
    )


def _archive(raw: Any, base: Path) -> ArchiveConfig:
    section = _mapping(raw, "archive", {"dir"})
    value = section.get("dir")
    if value is None or value == "":
        return ArchiveConfig()
    if not isinstance(value, str):
        raise ConfigError("archive.dir", "must be a directory path")
    path = Path(value).expanduser()
    return ArchiveConfig(dir=str(path if path.is_absolute() else base / path))


def _limits(raw: Any) -> LimitsConfig:
    d = LimitsConfig()
    section = _mapping(raw, "limits", {f.name for f in fields(LimitsConfig)})
    return LimitsConfig(
        max_body_bytes=_whole(section, "max_body_bytes", "limits", d.max_body_bytes, minimum=1),
        body_read_timeout_s=_positive(section, "body_read_timeout_s", "limits", d.body_read_timeout_s),
        idle_timeout_s=_positive(section, "idle_timeout_s", "limits", d.idle_timeout_s),
        max_concurrent_upstream=_whole(section, "max_concurrent_upstream", "limits", d.max_concurrent_upstream, 1),
        max_queued=_whole(section, "max_queued", "limits", d.max_queued, minimum=0),
        queue_timeout_s=_positive(section, "queue_timeout_s", "limits", d.queue_timeout_s),
    )


def _resilience(raw: Any) -> ResilienceConfig:
    d = ResilienceConfig()
    section = _mapping(raw, "resilience", {f.name for f in fields(ResilienceConfig)})
    return ResilienceConfig(
        poll_retries=_whole(section, "poll_retries", "resilience", d.poll_retries, minimum=0),
        poll_backoff_s=_positive(section, "poll_backoff_s", "resilience", d.poll_backoff_s),
        poll_retry_budget_s=_positive(section, "poll_retry_budget_s", "resilience", d.poll_retry_budget_s),
        breaker_failures=_whole(section, "breaker_failures", "resilience", d.breaker_failures, minimum=0),
        breaker_open_s=_positive(section, "breaker_open_s", "resilience", d.breaker_open_s),
    )


def _keys(raw: Any, env: Mapping[str, str], base: Path) -> tuple[KeyConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("keys", "must be a non-empty list of upstream keys")
    keys: list[KeyConfig] = []
    seen_names: dict[str, int] = {}
    seen_secrets: dict[Secret, int] = {}
    for i, item in enumerate(raw):
        path = f"keys[{i}]"
        entry = _mapping(item, path, {"name", "key", "key_env", "key_file", "daily_limit", "priority"})
        name = _name(entry.get("name"), f"{path}.name")
        if name in seen_names:
            raise ConfigError(f"{path}.name", f"duplicate key name {name!r} (also keys[{seen_names[name]}])")
        seen_names[name] = i
        secret = _key_secret(entry, path, env, base)
        if secret in seen_secrets:
            raise ConfigError(path, f"same upstream key as keys[{seen_secrets[secret]}]")
        seen_secrets[secret] = i
        limit = entry.get("daily_limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise ConfigError(f"{path}.daily_limit", "must be a whole number >= 0, or absent for unlimited")
        priority = entry.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ConfigError(f"{path}.priority", "must be a whole number (lower is tried first)")
        keys.append(KeyConfig(name=name, secret=secret, daily_limit=limit, priority=priority))
    return tuple(keys)


def _key_secret(entry: Mapping[str, Any], path: str, env: Mapping[str, str], base: Path) -> Secret:
    sources = [s for s in ("key", "key_env", "key_file") if entry.get(s) not in (None, "")]
    if len(sources) != 1:
        raise ConfigError(path, "needs exactly one of key, key_env or key_file")
    source = sources[0]
    value = entry[source]
    if not isinstance(value, str):
        raise ConfigError(f"{path}.{source}", "must be a string")
    if source == "key":
        secret = value.strip()
    elif source == "key_env":
        if value not in env or not env[value].strip():
            raise ConfigError(f"{path}.key_env", f"environment variable {value} is not set")
        secret = env[value].strip()
    else:
        file = Path(value).expanduser()
        file = file if file.is_absolute() else base / file
        try:
            secret = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{path}.key_file", f"cannot read {file}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"{path}.key_file", f"{file} is empty")
    if any(c.isspace() for c in secret) or not secret.isprintable():
        raise ConfigError(f"{path}.{source}", "the key contains whitespace or control characters")
    return Secret(secret)


def _clients(raw: Any, keys: tuple[KeyConfig, ...]) -> tuple[ClientConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("clients", "must be a list of {name, token, daily_limit}")
    clients: list[ClientConfig] = []
    upstream_secrets = {k.secret for k in keys}
    names: set[str] = set()
    tokens: set[Secret] = set()
    for i, item in enumerate(raw):
        path = f"clients[{i}]"
        entry = _mapping(item, path, {"name", "token", "daily_limit"})
        name = _name(entry.get("name"), f"{path}.name")
        if name in names:
            raise ConfigError(f"{path}.name", f"duplicate client name {name!r}")
        names.add(name)
        token = entry.get("token")
        if not isinstance(token, str) or len(token) < 16:
            raise ConfigError(f"{path}.token", "must be a string of at least 16 characters")
        secret = Secret(token)
        if secret in upstream_secrets:
            raise ConfigError(f"{path}.token", "must not be an upstream key")
        if secret in tokens:
            raise ConfigError(f"{path}.token", "duplicate client token")
        tokens.add(secret)
        limit = entry.get("daily_limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise ConfigError(f"{path}.daily_limit", "must be a whole number >= 0, or absent for unlimited")
        clients.append(ClientConfig(name=name, token=secret, daily_limit=limit))
    return tuple(clients)


# --- small validators -------------------------------------------------------------------


def _metrics(
    raw: Any,
    listen: ListenConfig,
    keys: tuple[KeyConfig, ...],
    clients: tuple[ClientConfig, ...],
    admin_token: Secret | None,
) -> MetricsConfig:
    section = _mapping(raw, "metrics", {"port", "host", "token"})
    port = section.get("port")
    if port is not None:
        port = _port(port, "metrics.port")
        if port == 0:
            raise ConfigError("metrics.port", "must be 1-65535, or absent to serve /metrics on listen.port")
        if port == listen.port:
            raise ConfigError("metrics.port", f"must differ from listen.port ({port}), or be absent")
    host = section.get("host")
    if host is not None:
        if port is None:
            raise ConfigError("metrics.host", "needs metrics.port (without it /metrics is served on listen.host)")
        if not isinstance(host, str) or not host:
            raise ConfigError("metrics.host", "must be a host name or address")
    token = section.get("token")
    if token is not None and not isinstance(token, str):
        raise ConfigError("metrics.token", "must be a string")
    secret = Secret(token) if token else None
    if token and len(token) < 16:
        raise ConfigError("metrics.token", "must be at least 16 characters")
    if secret is not None and (
        secret == admin_token or any(c.token == secret for c in clients) or any(k.secret == secret for k in keys)
    ):
        raise ConfigError("metrics.token", "must differ from every client token, the admin token and upstream key")
    return MetricsConfig(port=port, host=host, token=secret)


def _expand(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Replace `${VAR}` (or `${VAR:-default}`) in every string of the document."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, has_default, default = m[1], m[2], m[3]
            if name in env:
                return env[name]
            if has_default is not None:
                return default or ""
            raise ConfigError(
                path or "<root>", f"environment variable {name} is not set (write ${{{name}:-}} to allow it empty)"
            )

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _mapping(value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(path or "<root>", "must be a mapping")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(where, f"unknown option (known: {', '.join(sorted(allowed))})")
    return value


def _get(section: Mapping[str, Any], name: str, kind: type[T], path: str, default: T) -> T:
    value = section.get(name, default)
    if not isinstance(value, kind):
        where = f"{path}.{name}" if path else name
        raise ConfigError(where, f"must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _positive(section: Mapping[str, Any], name: str, path: str, default: float) -> float:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{path}.{name}", f"must be a positive number, got {value!r}")
    return float(value)


def _whole(section: Mapping[str, Any], name: str, path: str, default: int, minimum: int) -> int:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}.{name}", f"must be a whole number >= {minimum}, got {value!r}")
    return value


def _non_negative(section: Mapping[str, Any], name: str, path: str, default: float) -> float:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{path}.{name}", f"must be a number >= 0, got {value!r}")
    return float(value)


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(path, f"must be a port number 0-65535, got {value!r}")
    return value


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(path, "must be a name of letters, digits, '_', '.' or '-' (at most 64)")
    return value


def replace_listen(config: Config, host: str | None, port: int | None, workers: int | None = None) -> Config:
    """The config with `--host`/`--port`/`--workers` from the command line applied."""
    from dataclasses import replace

    if workers is not None and workers < 1:
        raise ConfigError("--workers", f"must be a whole number >= 1, got {workers}")
    listen = replace(
        config.listen,
        host=host if host is not None else config.listen.host,
        port=_port(port, "--port") if port is not None else config.listen.port,
        workers=workers if workers is not None else config.listen.workers,
    )
    return replace(config, listen=listen)


Validator = Callable[[Any, str], Any]
