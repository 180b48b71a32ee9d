"""The cloud side's settings: one YAML file (optional) overridden by CLOUD_* environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(Exception):
    """The cloud configuration cannot be used; the message names the key and the reason."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Model):
    url: str = Field(default="postgresql://postgres@127.0.0.1:5432/postgres", repr=False)
    pool_min: int = Field(default=1, ge=0, le=100)
    pool_max: int = Field(default=10, ge=1, le=500)


class MqttSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    topic_prefix: str = ""
    share_group: str = "ingest"


class HttpSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)


class CloudSettings(_Model):
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    keys_dir: Path = Path("/etc/cloud-api/keys")
    max_envelope_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)


_ENV = {
    "CLOUD_DATABASE_URL": ("database", "url"),
    "CLOUD_MQTT_HOST": ("mqtt", "host"),
    "CLOUD_MQTT_PORT": ("mqtt", "port"),
    "CLOUD_MQTT_USERNAME": ("mqtt", "username"),
    "CLOUD_MQTT_PASSWORD": ("mqtt", "password"),
    "CLOUD_TOPIC_PREFIX": ("mqtt", "topic_prefix"),
    "CLOUD_KEYS_DIR": ("keys_dir",),
    "CLOUD_HTTP_PORT": ("http", "port"),
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
    for name, keys in _ENV.items():
        value = (os.environ if env is None else env).get(name)
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
