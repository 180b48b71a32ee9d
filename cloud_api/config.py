"""The cloud side's settings: one YAML file (optional) overridden by CLOUD_* environment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cloud_api.alerts.settings import AlertsSettings
from common.mqtt import BrokerChoice

# How often a process reads the credential stamp by default (cloud_api/access/revocations.py).
REVOCATION_REFRESH_S = 1.0


class ConfigError(Exception):
    """The cloud configuration cannot be used; the message names the key and the reason."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Model):
    # No default: a command run without CLOUD_DATABASE_URL must not quietly use some database.
    url: str | None = Field(default=None, repr=False)
    pool_min: int = Field(default=1, ge=0, le=100)
    pool_max: int = Field(default=10, ge=1, le=500)
    # The API and ingest prepare a query on the server after this many runs of it on a
    # connection, which saves planning on the hot read paths and on every batch stored (null:
    # nothing is prepared). PgBouncer in transaction mode supports that from 1.21 on
    # (max_prepared_statements > 0); null for an older one (ingest connects directly).
    prepare_threshold: int | None = Field(default=2, ge=0)
    # The API's data-change listener (LISTEN) needs a session of its own, which a
    # transaction-mode pooler does not keep (it would listen on a server connection it hands
    # back at once and never hear a notification): behind PgBouncer, the direct PostgreSQL
    # URL. Unset: `url`.
    listen_url: str | None = Field(default=None, repr=False)
    # How long an API request waits for a pooled connection before it is answered 503 with
    # Retry-After (the database is down, refuses connections or every connection is busy).
    checkout_timeout_seconds: float = Field(default=1.5, gt=0, le=60)

    def require_url(self) -> str:
        """The URL, or a ConfigError that says how to give one."""
        if not self.url:
            raise ConfigError(
                "no database given: set CLOUD_DATABASE_URL (e.g. "
                "postgresql://USER@HOST:5432/DBNAME) or database.url in the file of --config"
            )
        return self.url

    def describe(self) -> str:
        """Which database, for messages: name, host and port, never the password."""
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(self.require_url())
        name = info.get("dbname") or info.get("user") or ""
        return f"database {name} on {info.get('host') or 'localhost'}:{info.get('port') or 5432}"


@dataclass(kw_only=True)
class MqttSettings(BrokerChoice):
    """The broker: one (`host`, `port`) or the nodes of a cluster (`brokers`); ingest moves to
    the next node when the one it is on is lost, as the agents do."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    topic_prefix: str = ""
    share_group: str = "ingest"


class HttpSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # Worker processes of `cloud-api serve` (one per core is a good start).
    workers: int = Field(default=1, ge=1, le=64)
    # asyncio serves connections in turn when the API is saturated; uvloop is faster per
    # request but let some of 1,000 keep-alive clients wait seconds in our measurements
    # (python -m bench.api), so it is opt-in.
    loop: Literal["asyncio", "uvloop"] = "asyncio"
    backlog: int = Field(default=2048, ge=64, le=65535)
    # Threads per worker process that run the read routes' database work (at most
    # `database.pool_max`). They share one GIL with the event loop: each holds it while it
    # turns rows into an answer, so beyond a few, more threads only wait longer for it. With
    # PostgreSQL on the same host, 2 gave the highest rate and the shortest tail (python -m
    # bench.api: p99 30-49 ms at 32 clients against 98-137 ms with 10); with the database
    # across a network, where a thread mostly waits on round trips, 4-8 cover the wait.
    db_threads: int = Field(default=2, ge=1, le=500)


JwksAlgorithm = Literal["RS256", "ES256", "EdDSA"]
_JWKS_DEFAULT_ALGORITHMS: tuple[JwksAlgorithm, ...] = ("RS256", "ES256")


class JwksSettings(_Model):
    """An external identity provider whose tokens the API accepts, verified by its JWKS."""

    url: str
    issuer: str
    audience: str
    algorithms: list[JwksAlgorithm] = Field(
        default_factory=lambda: list(_JWKS_DEFAULT_ALGORITHMS), min_length=1
    )
    role_claim: str = "role"
    sites_claim: str = "sites"
    cache_seconds: int = Field(default=300, ge=0)
    timeout_seconds: float = Field(default=5.0, gt=0)
    # A token naming a key id missing from the cached set fetches the set again at most this
    # often (a provider's new key is accepted within it; made-up key ids cost nothing more).
    unknown_kid_refresh_seconds: float = Field(default=30.0, ge=0)


class RateTier(_Model):
    """A token bucket: `per_hour` refill, `burst` capacity (dashboards fire panels at once)."""

    per_hour: int = Field(ge=1_000, le=100_000)
    burst: int = Field(ge=1, le=10_000)


class FailureLimit(_Model):
    """Failed authentications per client address: a token bucket of `burst` failures that
    refills by `per_minute`; an address with an empty bucket gets 429 before its credential is
    read (no key lookup, no signature check)."""

    per_minute: int = Field(default=10, ge=1, le=100_000)
    burst: int = Field(default=30, ge=1, le=100_000)
    # Refusals are logged once per address and period (its first one at once, the count at
    # the end of the period).
    log_every_seconds: float = Field(default=60.0, gt=0)

    @property
    def per_hour(self) -> int:
        return self.per_minute * 60


Role = Literal["viewer", "engineer", "admin", "service"]


def _default_tiers() -> dict[Role, RateTier]:
    return {
        "viewer": RateTier(per_hour=1_000, burst=60),
        "engineer": RateTier(per_hour=5_000, burst=120),
        "admin": RateTier(per_hour=10_000, burst=200),
        "service": RateTier(per_hour=100_000, burst=1_000),
    }


class SecuritySettings(_Model):
    issuer: str = "factory-edge-gateway"
    audience: str = "factory-edge-gateway-api"
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    max_token_ttl_seconds: int = Field(default=90 * 86400, ge=60)
    # How often each process reads the credential stamp (cloud_api/access/revocations.py): a
    # revocation takes effect within this, at most twice this, on every API process.
    revocation_refresh_seconds: float = Field(default=REVOCATION_REFRESH_S, ge=0, le=60)
    auth_failures: FailureLimit = Field(default_factory=FailureLimit)
    jwks: JwksSettings | None = None
    rate_limits: dict[Role, RateTier] = Field(default_factory=_default_tiers)
    redis_url: str | None = Field(default=None, repr=False)
    redis_prefix: str = "fgw:ratelimit:"
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    hsts_seconds: int = Field(default=63_072_000, ge=0)
    api_db_role: str = "gateway_api"
    ingest_db_role: str | None = "gateway_ingest"


class TracingSettings(_Model):
    otlp_endpoint: str | None = None
    service_name: str = "cloud-api"
    # Share of new traces recorded and exported (a caller's sampled traceparent always is).
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


class CloudSettings(_Model):
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    keys_dir: Path = Path("/etc/cloud-api/keys")
    max_envelope_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Whole months of raw facts (events, OEE buckets) kept by `cloud-api retention`; rollups
    # are kept. None keeps everything.
    retention_months: int | None = Field(default=None, ge=1, le=1200)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)
    # Reasons that say no more than "no reason" (a PLC's "unknown" code): stops with one of
    # them, or with none, are listed by /v1/downtime/unexplained.
    unknown_reasons: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100
    )


class CloudEnvironment(BaseSettings):
    """The CLOUD_* environment variables that override the file; each names one setting.

    Read as text: the settings model validates the values, so an invalid one is reported by
    the setting it names (`mqtt.port: ...`), as a value from the file would be.
    """

    model_config = SettingsConfigDict(env_prefix="CLOUD_", case_sensitive=True, extra="ignore")

    DATABASE_URL: str | None = None
    DATABASE_LISTEN_URL: str | None = None
    MQTT_HOST: str | None = None
    MQTT_PORT: str | None = None
    MQTT_USERNAME: str | None = None
    MQTT_PASSWORD: str | None = None
    TOPIC_PREFIX: str | None = None
    KEYS_DIR: str | None = None
    HTTP_PORT: str | None = None
    REDIS_URL: str | None = None
    OTLP_ENDPOINT: str | None = None


# Where each variable goes in the settings.
_ENV = {
    "DATABASE_URL": ("database", "url"),
    "DATABASE_LISTEN_URL": ("database", "listen_url"),
    "MQTT_HOST": ("mqtt", "host"),
    "MQTT_PORT": ("mqtt", "port"),
    "MQTT_USERNAME": ("mqtt", "username"),
    "MQTT_PASSWORD": ("mqtt", "password"),
    "TOPIC_PREFIX": ("mqtt", "topic_prefix"),
    "KEYS_DIR": ("keys_dir",),
    "HTTP_PORT": ("http", "port"),
    "REDIS_URL": ("security", "redis_url"),
    "OTLP_ENDPOINT": ("tracing", "otlp_endpoint"),
}


def load_settings(
    path: Path | str | None = None, env: dict[str, str] | None = None
) -> CloudSettings:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the configuration: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top")
        data = loaded or {}
    environment = (
        CloudEnvironment()
        if env is None
        else CloudEnvironment.model_validate(
            {k.removeprefix("CLOUD_"): v for k, v in env.items() if k.startswith("CLOUD_")}
        )
    )
    for name, keys in _ENV.items():
        value = getattr(environment, name)
        if value is None:
            continue
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    try:
        return CloudSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path or 'environment'}: invalid configuration: {problems}") from None
