"""One frozen, typed configuration, loaded once from TOML with environment overrides.

Every key has a default except ``agent.store_id``. Unknown keys are errors (a typo in a
config on a store box should fail loudly at start, not silently fall back to a default).
Layers, later wins: the TOML file, its ``conf.d/*.toml`` drop-ins in name order, systemd
credentials (``$CREDENTIALS_DIRECTORY/sync-token`` ...), then environment variables
``EDGE_AGENT__SECTION__KEY``.

The loader is total: whatever the file or the environment holds (malformed TOML, wrong
types, NaN or infinite numbers, integers beyond 64 bits, NUL bytes or undecodable text,
absurd values), the only exception it raises is one ``ConfigError`` naming the key
(tests/fuzz/ fuzzes it). Once the TOML parses, that error is a ``ConfigProblemsError``
listing every problem at once, each with where its value was set (``file:line``, the
credential file, or ``environment EDGE_AGENT__...``).

Types are checked by msgspec in strict mode (a string is not a port, ``"no"`` is not a
boolean); environment values, which are always text, are read as the key's type first.
msgspec over pydantic: 0.7 MB against about 10 MB on a store box whose venv is at its
200 MB target, and the dataclasses below stay as they are for the rest of the code.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import ipaddress
import os
import re
import string
import sys
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

from edge_agent.errors import ConfigError, ConfigProblem, ConfigProblemsError

if TYPE_CHECKING:
    from edge_agent.config_positions import Path as KeyPath

DEFAULT_CONFIG_PATH: Final = Path("/etc/edge-agent/agent.toml")
ENV_PREFIX: Final = "EDGE_AGENT__"
CONF_D: Final = "conf.d"  # drop-ins beside the config file, merged in name order
# systemd credentials (LoadCredential=ID:PATH) read from $CREDENTIALS_DIRECTORY/ID: secrets
# stay out of the unit's Environment= (visible to every local user through D-Bus).
CREDENTIALS: Final = {
    "sync-token": ("sync", "token"),
    "mqtt-password": ("mqtt", "password"),
    "pseudonym-key": ("governance", "pseudonym_key"),
    "nats-password": ("sync", "nats_password"),
}
# File credentials: the key names the file systemd placed (LoadCredential=nats-creds:PATH).
FILE_CREDENTIALS: Final = {"nats-creds": ("sync", "nats_creds")}
SYNC_TRANSPORTS: Final = ("http", "nats")
_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ED25519_KEY_BYTES: Final = 32
_INT64_MAX: Final = 2**63 - 1
_MAX_SECONDS: Final = 10 * 365 * 24 * 3600.0  # no duration in the config means more


@dataclass(frozen=True)
class AgentSection:
    store_id: str = ""
    data_dir: str = "/var/lib/edge-agent"
    # Input waiting this long with no commit (or the writer stuck on one job) is a stall:
    # /healthz answers 503 and the systemd watchdog is no longer fed.
    stall_after_s: float = 60.0


@dataclass(frozen=True)
class MqttSection:
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "edge"
    client_id: str = ""  # default: edge-agent-<store_id>; must be stable for a persistent session
    qos: int = 1
    keepalive: int = 30
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # MQTT 5 flow control: how many QoS 1 messages the broker may send before our PUBACKs.
    # PUBACK waits for the commit (an fsync), so a wide window is what keeps throughput up.
    protocol: str = "auto"  # auto: MQTT 5 for QoS 1, 3.1.1 if the broker lacks 5 (and for QoS 0)
    receive_maximum: int = 1000
    session_expiry_s: int = 7 * 24 * 3600  # how long the broker keeps our queue while we're down
    # auto: awscrt (C MQTT 5 client, sources/mqtt_crt.py) when installed and the protocol is
    # not 3.1.1; paho otherwise (and for brokers without MQTT 5).
    client: str = "auto"


@dataclass(frozen=True)
class HttpSection:
    host: str = "127.0.0.1"
    port: int = 8787


@dataclass(frozen=True)
class InputSection:
    max_payload_bytes: int = 256 * 1024
    max_depth: int = 16
    max_events_per_message: int = 1000
    # A device time further ahead or older than this is not used as the event's ts (the
    # receive time is); many "ahead" at once raise the clock-skew alarm (device_time.py).
    max_future_skew_s: float = 24 * 3600.0
    max_event_age_s: float = 30 * 24 * 3600.0  # devices may hold events for weeks, not years
    clock_skew_min_events: int = 10  # "many": this many of the last 64 device times, and half
    poison_max_deaths: int = 3  # deaths while handling one message before it is dead-lettered


@dataclass(frozen=True)
class BufferSection:
    path: str = ""  # default: <data_dir>/buffer.db
    max_bytes: int = 1024**3
    synchronous: str = "full"  # full: an acknowledged event survives a power cut
    max_batch: int = 2000
    commit_linger_ms: float = 2.0
    quarantine_max_rows: int = 10_000
    quarantine_raw_bytes: int = 4096
    # Collect-only stores (no sync.url): customer events older than this are deleted, and
    # the oldest go first when the budget is full, so the buffer never wedges. 0: age alone
    # never deletes (the budget still does). Ignored when sync is on.
    retention_days: float = 30.0


@dataclass(frozen=True)
class ModelSection:
    path: str = ""  # a model directory; default: the bundled model
    top_k: int = 5
    # auto: the numpy runtime (models/numpy_runtime.py, ~30 MB less resident memory) when it
    # runs every op of the model's graph, else onnxruntime; or name one of them
    runtime: str = "auto"
    # The personalizer (edge_agent/personalize/README.md explains each key).
    enabled: bool = True  # false: no suggestions at all (a collect-only agent)
    session_cap: int = 10_000  # customers whose recent history is kept in memory (LRU)
    session_max_age_s: float = 86_400.0  # history older than this is forgotten
    epsilon: float = 0.05  # probability that the last slot shows an exploratory item
    implicit_accept_window_s: float = 300.0  # a pickup of a suggested item within this accepts
    suggestion_topic: str = "{prefix}/{store_id}/suggestions/{device_id}"
    suggestion_qos: int = 0  # a suggestion is stale in a second: no redelivery
    out_of_stock_file: str = ""  # one sku per line; default: <data_dir>/out_of_stock.txt
    blocked_skus_file: str = ""  # policy-blocked skus; default: <data_dir>/blocked_skus.txt
    popularity_window_s: float = 86_400.0  # store popularity counts the last day
    popularity_refresh_s: float = 60.0
    watch_interval_s: float = 2.0  # how often models/incoming and models/current are checked
    max_pending: int = 256  # suggestions waiting for the model; beyond this, triggers are shed
    # ed25519 public key(s), base64 of the 32 raw bytes, separated by spaces (two during a
    # key rotation): a model that arrives (sync or incoming/) must be signed by one of them.
    public_key: str = ""
    max_download_bytes: int = 256 * 1024 * 1024  # a model download larger than this is refused


@dataclass(frozen=True)
class SyncSection:
    url: str = ""  # empty: no sync
    token: str = ""
    interval_s: float = 5.0
    batch_size: int = 500
    timeout_s: float = 30.0  # every request to the store, connect to last byte
    backoff_max_s: float = 60.0  # retries after an outage wait at most this long
    backoff_initial_s: float = 0.5  # the first retry's wait; doubles up to backoff_max_s
    gzip: bool = True
    max_events_per_s: float = 0.0  # drain cap for metered links; 0: unlimited
    live_lane_size: int = 50  # newest customer events sent beside each backlog round
    concurrency: int = 1  # batches in flight at once (several store replicas)
    allow_insecure_http: bool = False  # http:// to a non-loopback store: only when true
    # How often the agent reports its health, versions, backlog and lag (the fleet view).
    heartbeat_interval_s: float = 60.0
    # "http": post batches to the store at ``url``. "nats": publish to JetStream at ``url``
    # (nats://HOST:PORT or tls://, several separated by commas; cloud_sync/sync_nats.py).
    transport: str = "http"
    nats_subject: str = "edge.events"  # events go to <nats_subject>.<store_id>
    nats_creds: str = ""  # a .creds file (JWT + nkey); or LoadCredential=nats-creds:PATH
    nats_user: str = ""
    nats_password: str = ""  # or LoadCredential=nats-password:PATH
    nats_tls_ca: str = ""  # CA bundle that signed the server's certificate
    nats_tls_cert: str = ""  # client certificate (mutual TLS), with nats_tls_key
    nats_tls_key: str = ""
    # The hub's JetStream domain, when the agent reaches it through a leaf node (docs/).
    nats_domain: str = ""
    # With transport "nats": the store's HTTP URL for erasures, models and heartbeats
    # (empty: none of the three; events still flow).
    downlink_url: str = ""
    # With transport "nats": erasures and model announcements arrive on the store's NATS
    # subjects (edge.downlink.<store_id>.>) instead of being polled from downlink_url, which
    # still serves the model bytes and the reports (cloud_sync/sync_nats_downlink.py).
    nats_downlink: bool = False

    @property
    def http_url(self) -> str:
        """The store's HTTP service: ``url`` over HTTP, ``downlink_url`` beside NATS."""
        return self.url if self.transport == "http" else self.downlink_url


@dataclass(frozen=True)
class ProfilesSection:
    """The customer's central profile (GET /v1/profiles/{id}), fetched in the background."""

    enabled: bool = True  # needs sync.url (and a model): the store that holds the profiles
    ttl_s: float = 300.0  # a cached profile older than this is fetched again when used
    max_customers: int = 10_000  # cached profiles (least recently used leave first)
    max_cache_bytes: int = 32 * 1024 * 1024  # their bodies' sizes together
    max_body_bytes: int = 1024 * 1024  # a larger answer is refused (counted)
    timeout_s: float = 2.0  # one fetch, connect to last byte
    concurrency: int = 4  # fetches in flight at once
    max_queue: int = 1000  # customers waiting for a fetch; beyond this, skipped (counted)
    backoff_max_s: float = 60.0  # after failures the store is left alone up to this long
    history_max_age_s: float = 180 * 86_400.0  # central interactions older than this: unused


@dataclass(frozen=True)
class SerialPort:
    url: str
    baud: int = 115200


@dataclass(frozen=True)
class SerialSection:
    ports: tuple[SerialPort, ...] = ()


@dataclass(frozen=True)
class GovernanceSection:
    require_consent: bool = True
    pseudonym_key: str = ""  # or EDGE_AGENT__GOVERNANCE__PSEUDONYM_KEY; empty: generated once


@dataclass(frozen=True)
class LogSection:
    format: str = "logfmt"  # logfmt or json (edge_agent/logs.py); journald priorities either way
    level: str = "info"  # debug, info, warning, error; `edge-agent --log-level` overrides


@dataclass(frozen=True)
class Config:
    agent: AgentSection
    mqtt: MqttSection = field(default_factory=MqttSection)
    http: HttpSection = field(default_factory=HttpSection)
    input: InputSection = field(default_factory=InputSection)
    buffer: BufferSection = field(default_factory=BufferSection)
    model: ModelSection = field(default_factory=ModelSection)
    sync: SyncSection = field(default_factory=SyncSection)
    profiles: ProfilesSection = field(default_factory=ProfilesSection)
    serial: SerialSection = field(default_factory=SerialSection)
    governance: GovernanceSection = field(default_factory=GovernanceSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.agent.data_dir)

    @property
    def buffer_path(self) -> Path:
        return Path(self.buffer.path) if self.buffer.path else self.data_dir / "buffer.db"

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"edge-agent-{self.agent.store_id}"


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any) and its ``conf.d/*.toml`` drop-ins, then systemd
    credentials, then environment overrides; validate; freeze.

    Drop-ins live beside the file (``/etc/edge-agent/conf.d/`` for
    ``/etc/edge-agent/agent.toml``) and are merged in name order, a later file winning key
    by key (an array such as ``[[serial.ports]]`` is replaced whole). Every problem is
    reported at once, each with where its value was set: the file and line, the
    credential file or the environment variable.
    """
    environ = os.environ if environ is None else environ
    document: dict[str, Any] = {}
    origins = Origins()
    if path is not None:
        for source in (path, *drop_ins(path)):
            text = _read_text(source)
            layer = _parse_toml(text, str(source))
            _merge(document, layer, origins, _FileOrigin(str(source), text), ())
    _apply_credentials(document, environ, origins)
    _apply_environment(document, environ, origins)
    return config_from_dict(document, origins)


def drop_ins(path: Path) -> list[Path]:
    """The ``conf.d/*.toml`` files beside ``path``, in the order they are merged."""
    directory = path.parent / CONF_D
    try:
        return sorted(p for p in directory.glob("*.toml") if not p.name.startswith("."))
    except OSError as exc:  # conf.d unreadable: a config problem, not a crash
        raise ConfigError(str(directory), f"cannot be read: {exc}") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "file not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8: {exc}") from exc
    except (OSError, ValueError) as exc:  # a directory, no permission, a NUL in the path
        raise ConfigError(str(path), f"cannot be read: {exc}") from exc


class _FileOrigin:
    """A TOML file and the line of each key in it (indexed on first use: only errors ask)."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self._text = text
        self._lines: dict[KeyPath, int] | None = None

    def where(self, path: KeyPath) -> str:
        from edge_agent.config_positions import key_lines, line_of

        if self._lines is None:
            self._lines = key_lines(self._text)
        line = line_of(self._lines, path)
        return self.name if line is None else f"{self.name}:{line}"


class Origins:
    """Where each key's value came from: the layer that set it last."""

    def __init__(self) -> None:
        self._set: dict[KeyPath, _FileOrigin | str] = {}
        self.problems: dict[str, str] = {}  # found while layering (a malformed variable name)

    def note(self, path: KeyPath, origin: _FileOrigin | str) -> None:
        """Where a table was first written (its keys may come from several layers)."""
        self._set.setdefault(path, origin)

    def record(self, path: KeyPath, origin: _FileOrigin | str) -> None:
        for known in [p for p in self._set if p[: len(path)] == path and p != path]:
            del self._set[known]  # a later layer replaced the whole value
        self._set[path] = origin

    def where(self, path: KeyPath) -> str:
        for end in range(len(path), 0, -1):
            origin = self._set.get(path[:end])
            if origin is not None:
                return origin if isinstance(origin, str) else origin.where(path)
        return ""


def _merge(
    into: dict[str, Any],
    layer: Mapping[str, Any],
    origins: Origins,
    origin: _FileOrigin | str,
    at: KeyPath,
) -> None:
    for key, value in layer.items():
        path = (*at, key)
        current = into.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            origins.note(path, origin)
            _merge(current, value, origins, origin, path)
        else:
            into[key] = value
            origins.record(path, origin)


def _apply_credentials(
    document: dict[str, Any], environ: Mapping[str, str], origins: Origins
) -> None:
    """Secrets handed over by systemd ``LoadCredential=``: one file per secret in
    ``$CREDENTIALS_DIRECTORY``; an absent or empty file leaves the key as it is."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return
    for name, (section, key) in CREDENTIALS.items():
        credential = Path(directory) / name
        try:
            value = credential.read_text("utf-8").rstrip("\r\n")  # a password may end in a space
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:  # unreadable or not UTF-8
            raise ConfigError(f"{section}.{key}", f"credential {credential}: {exc}") from exc
        if value and isinstance(document.setdefault(section, {}), dict):
            _merge(document, {section: {key: value}}, origins, f"credential {credential}", ())
    for name, (section, key) in FILE_CREDENTIALS.items():
        credential = Path(directory) / name
        table = document.setdefault(section, {})
        if credential.is_file() and isinstance(table, dict) and not table.get(key):
            _merge(
                document, {section: {key: str(credential)}}, origins, f"credential {credential}", ()
            )


def config_from_toml(text: str, environ: Mapping[str, str], origin: str = "config") -> Config:
    """The config from TOML text and the environment; raises only ``ConfigError``."""
    document: dict[str, Any] = {}
    origins = Origins()
    _merge(document, _parse_toml(text, origin), origins, _FileOrigin(origin, text), ())
    _apply_environment(document, environ, origins)
    return config_from_dict(document, origins)


def _parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(origin, f"not valid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(origin, "not valid TOML: nested too deeply") from exc


def config_from_dict(document: Mapping[str, Any], origins: Origins | None = None) -> Config:
    """Validate a parsed document (TOML types) and freeze it; every problem at once.

    Types are strict (msgspec, ``strict=True``): a string is not a port, ``"no"`` is not
    a boolean, an integer is accepted where a number is. Values are then checked against
    each other and their ranges (``_validate``). Raises ``ConfigProblemsError`` listing
    them all, each with where its value was set when ``origins`` knows.
    """
    # dotted key -> problem; the first problem of a key wins
    problems: dict[str, str] = dict(origins.problems) if origins else {}
    sections: dict[str, Any] = {}
    for name, value in document.items():
        if name not in _SECTIONS:
            problems[name] = f"unknown section (valid sections: {', '.join(_SECTIONS)})"
        elif not isinstance(value, Mapping):
            problems[name] = f"must be a table ([{name}]), got {_described(value)}"
        elif name == "serial":
            sections[name] = _serial_section(value, problems)
        else:
            sections[name] = _build_section(name, _SECTIONS[name], value, problems)
    sections.setdefault("agent", AgentSection())
    config = Config(**sections)  # keys with a problem keep their default: the rest is checked
    for key, problem in _validate(config):
        problems.setdefault(key, problem)
    if problems:
        located = [
            ConfigProblem(key, problem, origins.where(_key_path(key)) if origins else "")
            for key, problem in problems.items()
        ]
        raise ConfigProblemsError(sorted(located, key=_reading_order))
    return config


_SECTIONS: Final[dict[str, type[Any]]] = typing.get_type_hints(Config)


@functools.cache
def _strict_types() -> dict[Any, Any]:
    """What each TOML value is checked as: bounded so nothing downstream overflows (SQLite
    and the store end at signed 64 bits; a NaN compares false with every limit), no NUL in
    a string. Built on first use: ``edge-agent --version`` does not load msgspec."""
    import msgspec

    return {
        int: Annotated[int, msgspec.Meta(ge=-_INT64_MAX, le=_INT64_MAX)],
        float: Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)],
        str: Annotated[str, msgspec.Meta(pattern="^[^\x00]*$")],
        bool: bool,
    }


_WANTED: Final = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_OUT_OF_BOUNDS: Final = {
    int: "is out of range (at most 64-bit integers)",
    float: "must be a finite number",
    str: "must not contain a NUL character",
}


def _build_section(
    section: str, cls: type[Any], values: Mapping[str, Any], problems: dict[str, str]
) -> Any:
    """The section with the values that passed; the others keep their defaults."""
    return cls(**_section_values(section, cls, values, problems))


def _section_values(
    section: str, cls: type[Any], values: Mapping[str, Any], problems: dict[str, str]
) -> dict[str, Any]:
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in hints:
            problems[dotted] = f"unknown key (valid keys of [{section}]: {', '.join(hints)})"
            continue
        checked = _checked(hints[key], value)
        if isinstance(checked, _Bad):
            problems[dotted] = checked.problem
        else:
            kwargs[key] = checked
    return kwargs


@dataclass(frozen=True)
class _Bad:
    problem: str


def _checked(expected: Any, value: Any) -> Any:
    """``value`` as ``expected`` (strictly), or a ``_Bad`` saying why not."""
    import msgspec

    try:
        checked = msgspec.convert(value, _strict_types()[expected], strict=True)
    except msgspec.ValidationError as exc:
        if "got `" in str(exc) or type(value) not in (expected, int):
            return _Bad(f"must be {_WANTED[expected]}, got {_described(value)}")
        return _Bad(f"{_OUT_OF_BOUNDS[expected]}, got {_short(value)}")
    if isinstance(checked, str):
        try:
            checked.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in an environment variable
            return _Bad("must be valid UTF-8")
    return checked


def _field_types(cls: type[Any]) -> dict[str, type[Any]]:
    return _FIELD_TYPES[cls]


_FIELD_TYPES: Final[dict[type[Any], dict[str, type[Any]]]] = {
    cls: typing.get_type_hints(cls) for cls in (*_SECTIONS.values(), SerialPort)
}


def _described(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(type(value))
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if kind is None:
        return f"a {type(value).__name__}"  # TOML dates and times
    return f"{_short(value)} ({kind})"


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as TOML writes it
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 64 else text[:60] + "..."


def _serial_section(values: Mapping[str, Any], problems: dict[str, str]) -> SerialSection:
    for key in values:
        if key != "ports":
            problems[f"serial.{key}"] = "unknown key (valid keys of [serial]: ports)"
    ports = values.get("ports", [])
    if not isinstance(ports, list):
        problems["serial.ports"] = "must be an array of tables ([[serial.ports]])"
        return SerialSection()
    built = []
    for index, port in enumerate(ports):
        name = f"serial.ports[{index}]"
        if not isinstance(port, Mapping):
            problems[name] = f"must be a table ([[serial.ports]]), got {_described(port)}"
        elif "url" not in port:
            problems[f"{name}.url"] = "is required"
        else:
            before = len(problems)
            values = _section_values(name, SerialPort, port, problems)
            if len(problems) == before:  # url has no default: a port with a problem is left out
                built.append(SerialPort(**values))
    return SerialSection(tuple(built))


def _apply_environment(
    document: dict[str, Any], environ: Mapping[str, str], origins: Origins
) -> None:
    """``EDGE_AGENT__SECTION__KEY=value``: the text is read as the key's type (an integer,
    a number, ``true``/``false``/``1``/``0``); what does not read stays text, and the
    strict check then names the variable."""
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            origins.problems[name] = "overrides look like EDGE_AGENT__SECTION__KEY"
            origins.record((name,), "environment")
            continue
        section, key = parts
        expected = _field_types(_SECTIONS[section]).get(key) if section in _SECTIONS else None
        typed = _from_text(value, expected) if expected is not None else value
        if isinstance(document.setdefault(section, {}), dict):  # else: "must be a table"
            _merge(document, {section: {key: typed}}, origins, f"environment {name}", ())


def _from_text(text: str, expected: Any) -> Any:
    if expected is bool and text.strip().lower() in ("true", "1", "false", "0"):
        return text.strip().lower() in ("true", "1")
    if expected is int and _INTEGER_TEXT.fullmatch(text.strip()):
        return int(text.strip())
    if expected is float and len(text) <= 64:
        try:
            return float(text)
        except ValueError:
            return text
    return text


_INTEGER_TEXT: Final = re.compile(r"[+-]?[0-9]{1,19}")


def _key_path(dotted: str) -> KeyPath:
    """``serial.ports[0].url`` -> ``("serial", "ports", 0, "url")``."""
    path: list[str | int] = []
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        path.append(name)
        if index.endswith("]") and index[:-1].isdigit():
            path.append(int(index[:-1]))
    return tuple(path)


def _reading_order(problem: ConfigProblem) -> tuple[str, int]:
    """By file and line; the sort is stable, so otherwise in the order found."""
    name, _, line = problem.origin.rpartition(":")
    if line.isdigit():
        return (name, int(line))
    return (problem.origin, 0)


def public_keys(model: ModelSection) -> tuple[bytes, ...]:
    """The raw 32-byte ed25519 public keys of ``model.public_key`` (ValueError when bad)."""
    keys = []
    for text in model.public_key.replace(",", " ").split():
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{text[:12]}... is not base64") from exc
        if len(raw) != _ED25519_KEY_BYTES:
            raise ValueError(f"{text[:12]}... is not a 32-byte ed25519 public key")
        keys.append(raw)
    return tuple(keys)


_URL_SCHEMES: Final = {"http": ("http://", "https://"), "nats": ("nats://", "tls://")}


def _subject_token(store_id: str) -> bool:
    """A store id that is one NATS subject token and part of a consumer name."""
    return re.fullmatch(r"[A-Za-z0-9_-]{1,64}", store_id) is not None


def _nats_secure(sync: SyncSection) -> bool:
    """Every NATS server of ``sync.url`` is reached over TLS, on loopback, or allowed plain."""
    if sync.allow_insecure_http or sync.nats_tls_ca:
        return True
    servers = [part.strip() for part in sync.url.split(",") if part.strip()]
    return all(s.startswith("tls://") or _is_loopback_url(s) for s in servers)


def _is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _suggestion_topic_ok(template: str) -> bool:
    # Only plain {prefix} {store_id} {device_id}: no attributes, indexes, conversions or
    # format specs ("{prefix:99999999}" would build a 99 MB string on every suggestion).
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        return False
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in ("prefix", "store_id", "device_id") or spec or conversion:
            return False
    filled = template.format(prefix="p", store_id="s", device_id="d")
    return "{device_id}" in template and not any(c in filled for c in "+#")


def _durations_ok(config: Config) -> list[str]:
    """Keys holding seconds that are negative or beyond ten years (absurd, or overflowing
    a datetime when added to now)."""
    bad = []
    for section in ("mqtt", "input", "buffer", "model", "sync"):
        values = getattr(config, section)
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            ends_in_seconds = item.name.endswith(("_s", "_ms"))
            if (
                ends_in_seconds
                and isinstance(value, int | float)
                and not 0 <= value <= _MAX_SECONDS
            ):
                bad.append(f"{section}.{item.name}")
    return bad


def _validate(config: Config) -> list[tuple[str, str]]:
    """Ranges and relations between values: (key, problem) for each that fails."""
    checks: list[tuple[bool, str, str]] = [
        (bool(config.agent.store_id), "agent.store_id", "is required"),
        (
            not config.agent.store_id or bool(_ID_PATTERN.match(config.agent.store_id)),
            "agent.store_id",
            "letters, digits, '.', '_' and '-' only, at most 64 characters",
        ),
        (bool(config.agent.data_dir), "agent.data_dir", "must not be empty"),
        (0 < config.mqtt.port < 65536, "mqtt.port", "must be 1..65535"),
        (config.mqtt.qos in (0, 1), "mqtt.qos", "must be 0 or 1"),
        (config.mqtt.keepalive >= 5, "mqtt.keepalive", "must be at least 5 seconds"),
        (bool(config.mqtt.topic_prefix.strip("/")), "mqtt.topic_prefix", "must not be empty"),
        (
            not any(c in config.mqtt.topic_prefix for c in "+#"),
            "mqtt.topic_prefix",
            "must not contain wildcards",
        ),
        (
            0 < config.mqtt.reconnect_min_s <= config.mqtt.reconnect_max_s,
            "mqtt.reconnect_min_s",
            "must be positive and at most mqtt.reconnect_max_s",
        ),
        (
            config.mqtt.protocol in ("auto", "5", "3.1.1"),
            "mqtt.protocol",
            "must be auto, 5 or 3.1.1",
        ),
        (
            config.mqtt.client in ("auto", "awscrt", "paho"),
            "mqtt.client",
            "must be auto, awscrt or paho",
        ),
        (
            not (config.mqtt.client == "awscrt" and config.mqtt.protocol == "3.1.1"),
            "mqtt.client",
            "awscrt speaks MQTT 5 only: use client = paho for protocol 3.1.1",
        ),
        (1 <= config.mqtt.receive_maximum <= 65535, "mqtt.receive_maximum", "must be 1..65535"),
        (config.mqtt.session_expiry_s >= 60, "mqtt.session_expiry_s", "must be at least 60"),
        (0 <= config.http.port < 65536, "http.port", "must be 0..65535 (0: any free port)"),
        (config.agent.stall_after_s > 0, "agent.stall_after_s", "must be positive"),
        (config.input.max_payload_bytes >= 256, "input.max_payload_bytes", "must be >= 256"),
        (config.input.max_depth >= 2, "input.max_depth", "must be >= 2"),
        (config.input.max_events_per_message >= 1, "input.max_events_per_message", "must be >= 1"),
        (
            config.input.max_future_skew_s > 0 and config.input.max_event_age_s > 0,
            "input.max_future_skew_s"
            if config.input.max_future_skew_s <= 0
            else "input.max_event_age_s",
            "must be positive",
        ),
        (
            1 <= config.input.clock_skew_min_events <= 64,
            "input.clock_skew_min_events",
            "must be 1..64 (of the last 64 device times)",
        ),
        (1 <= config.input.poison_max_deaths <= 100, "input.poison_max_deaths", "must be 1..100"),
        (config.buffer.max_bytes >= 1024 * 1024, "buffer.max_bytes", "must be at least 1 MiB"),
        (
            config.buffer.synchronous in ("full", "normal", "extra"),
            "buffer.synchronous",
            "must be full, normal or extra",
        ),
        (config.buffer.max_batch >= 1, "buffer.max_batch", "must be >= 1"),
        (0 <= config.buffer.commit_linger_ms <= 100, "buffer.commit_linger_ms", "must be 0..100"),
        (config.buffer.quarantine_max_rows >= 10, "buffer.quarantine_max_rows", "must be >= 10"),
        (config.buffer.quarantine_raw_bytes >= 64, "buffer.quarantine_raw_bytes", "must be >= 64"),
        (config.buffer.retention_days >= 0, "buffer.retention_days", "must be >= 0"),
        (1 <= config.model.top_k <= 50, "model.top_k", "must be 1..50"),
        (
            config.model.runtime in ("auto", "numpy", "onnxruntime"),
            "model.runtime",
            "must be auto, numpy or onnxruntime",
        ),
        (config.model.session_cap >= 1, "model.session_cap", "must be >= 1"),
        (config.model.session_max_age_s > 0, "model.session_max_age_s", "must be positive"),
        (config.profiles.ttl_s > 0, "profiles.ttl_s", "must be positive"),
        (config.profiles.max_customers >= 1, "profiles.max_customers", "must be >= 1"),
        (config.profiles.max_cache_bytes >= 1024, "profiles.max_cache_bytes", "must be >= 1024"),
        (config.profiles.max_body_bytes >= 1024, "profiles.max_body_bytes", "must be >= 1024"),
        (config.profiles.timeout_s > 0, "profiles.timeout_s", "must be positive"),
        (1 <= config.profiles.concurrency <= 64, "profiles.concurrency", "must be 1..64"),
        (config.profiles.max_queue >= 1, "profiles.max_queue", "must be >= 1"),
        (config.profiles.backoff_max_s > 0, "profiles.backoff_max_s", "must be positive"),
        (config.profiles.history_max_age_s > 0, "profiles.history_max_age_s", "must be positive"),
        (0.0 <= config.model.epsilon <= 1.0, "model.epsilon", "must be 0..1"),
        (
            config.model.implicit_accept_window_s >= 0,
            "model.implicit_accept_window_s",
            "must be >= 0 (0: no implicit acceptance)",
        ),
        (
            _suggestion_topic_ok(config.model.suggestion_topic),
            "model.suggestion_topic",
            "must contain {device_id}, only {prefix} {store_id} {device_id}, no wildcards",
        ),
        (config.model.suggestion_qos in (0, 1), "model.suggestion_qos", "must be 0 or 1"),
        (config.model.popularity_window_s > 0, "model.popularity_window_s", "must be positive"),
        (config.model.popularity_refresh_s > 0, "model.popularity_refresh_s", "must be positive"),
        (config.model.watch_interval_s > 0, "model.watch_interval_s", "must be positive"),
        (config.model.max_pending >= 1, "model.max_pending", "must be >= 1"),
        (config.sync.transport in SYNC_TRANSPORTS, "sync.transport", "must be http or nats"),
        (
            not config.sync.url
            or config.sync.url.startswith(_URL_SCHEMES.get(config.sync.transport, ())),
            "sync.url",
            "must be an http:// or https:// URL (transport nats: nats:// or tls://,"
            " comma-separated), or empty",
        ),
        (
            config.sync.transport != "nats" or _nats_secure(config.sync),
            "sync.url",
            "must be tls:// or have sync.nats_tls_ca (customer data crosses the network);"
            " plain nats:// is allowed only to a loopback host or with"
            " sync.allow_insecure_http = true",
        ),
        (
            not config.sync.nats_downlink
            or (config.sync.transport == "nats" and bool(config.sync.downlink_url)),
            "sync.nats_downlink",
            'needs sync.transport = "nats" and sync.downlink_url (model bytes and erasure'
            " reports stay on HTTP)",
        ),
        (
            # The subject's last token names the store (the hub's shard mapping and the
            # ingest workers read it there): a dotted id would never be acknowledged.
            config.sync.transport != "nats" or _subject_token(config.agent.store_id),
            "agent.store_id",
            'must be letters, digits, - and _ (at most 64) with sync.transport = "nats"'
            " (one NATS subject token)",
        ),
        (
            not config.sync.downlink_url
            or config.sync.downlink_url.startswith(("http://", "https://")),
            "sync.downlink_url",
            "must be an http:// or https:// URL, or empty",
        ),
        (
            not config.sync.http_url.startswith("http://")
            or config.sync.allow_insecure_http
            or _is_loopback_url(config.sync.http_url),
            "sync.url",
            "must be https:// (tokens and customer data cross the network); plain http:// is"
            " allowed only to a loopback host or with sync.allow_insecure_http = true",
        ),
        (
            config.model.max_download_bytes >= 1024 * 1024,
            "model.max_download_bytes",
            "must be at least 1 MiB",
        ),
        (config.sync.interval_s > 0, "sync.interval_s", "must be positive"),
        (config.sync.batch_size >= 1, "sync.batch_size", "must be >= 1"),
        (config.sync.timeout_s > 0, "sync.timeout_s", "must be positive"),
        (config.sync.backoff_max_s >= 0.1, "sync.backoff_max_s", "must be at least 0.1"),
        (config.sync.backoff_initial_s > 0, "sync.backoff_initial_s", "must be positive"),
        (config.sync.max_events_per_s >= 0, "sync.max_events_per_s", "must be >= 0 (0: no cap)"),
        (config.sync.live_lane_size >= 0, "sync.live_lane_size", "must be >= 0 (0: off)"),
        (1 <= config.sync.concurrency <= 32, "sync.concurrency", "must be 1..32"),
        (
            not config.sync.http_url or bool(config.sync.token),
            "sync.token",
            "is required when sync.url (or, with NATS, sync.downlink_url) is set"
            " (or EDGE_AGENT__SYNC__TOKEN)",
        ),
    ]
    checks += [
        (config.log.format in ("logfmt", "json"), "log.format", "must be logfmt or json"),
        (
            config.log.level.lower() in ("debug", "info", "warning", "error"),
            "log.level",
            "must be debug, info, warning or error",
        ),
        (
            config.sync.heartbeat_interval_s >= 1,
            "sync.heartbeat_interval_s",
            "must be at least 1 second",
        ),
    ]
    problems = [(key, problem) for ok, key, problem in checks if not ok]
    if config.model.public_key:
        try:
            public_keys(config.model)
        except ValueError as exc:
            problems.append(("model.public_key", str(exc)))
    problems += [(key, "must be 0 .. 10 years in seconds") for key in _durations_ok(config)]
    for index, port in enumerate(config.serial.ports):
        if not port.url:
            problems.append((f"serial.ports[{index}].url", "must not be empty"))
        if port.baud <= 0:
            problems.append((f"serial.ports[{index}].baud", "must be positive"))
    if config.mqtt.tls:
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(config.mqtt, key)
            if value and not _is_file(value):
                problems.append((f"mqtt.{key}", f"file not found: {value}"))
    return problems


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # too long a name, no permission to look
        return False
