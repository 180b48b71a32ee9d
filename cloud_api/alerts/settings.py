"""The `alerts:` section of the cloud YAML: receivers, the SMTP server, delivery bounds and
the rules kept in the file.

Secrets (a webhook's signing key, the SMTP password) are never written in the file: it names
an environment variable (`secret_env`, `password_env`) or a file (`secret_file`) holding them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud_api.alerts.rules import Name, RuleSpec
from common.duration import Duration

WebhookFormat = Literal["json", "slack", "teams"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecretError(Exception):
    """A receiver's secret cannot be read; the message names where it was looked for."""


class WebhookReceiver(_Model):
    type: Literal["webhook"] = "webhook"
    # Slack's and Teams' webhook URLs are secrets themselves: kept out of reprs and errors.
    url: Annotated[str, Field(pattern=r"^https?://", max_length=2000, repr=False)]
    # json: our payload, signed (see cloud_api/alerts/signature.py); slack and teams: the
    # shapes their incoming webhooks accept (signed as well, they ignore the headers).
    format: WebhookFormat = "json"
    secret_env: str | None = None
    secret_file: Path | None = None
    timeout: Duration = 5.0

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookReceiver:
        if self.secret_env and self.secret_file:
            raise ValueError("give secret_env or secret_file, not both")
        if self.format == "json" and not (self.secret_env or self.secret_file):
            raise ValueError("a json webhook is signed: give secret_env or secret_file")
        return self

    def secret(self) -> bytes | None:
        """The HMAC key, read when a delivery is made (so a rotated secret applies at once)."""
        if self.secret_env:
            value = os.environ.get(self.secret_env)
            if not value:
                raise SecretError(f"environment variable {self.secret_env} is not set")
            return value.encode()
        if self.secret_file:
            try:
                return self.secret_file.read_bytes().strip()
            except OSError as exc:
                raise SecretError(f"{self.secret_file}: {exc.strerror}") from None
        return None


class EmailReceiver(_Model):
    type: Literal["email"]
    to: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]] = Field(min_length=1)


Receiver = Annotated[WebhookReceiver | EmailReceiver, Field(discriminator="type")]


class SmtpSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    sender: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")] = "alerts@localhost"
    starttls: bool = False
    ssl: bool = False
    username: str | None = None
    password_env: str | None = None
    timeout: Duration = 10.0

    def password(self) -> str | None:
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise SecretError(f"environment variable {self.password_env} is not set")
        return value


class DeliverySettings(_Model):
    # Attempts per notification and receiver before it goes to the dead-letter list.
    max_attempts: int = Field(default=10, ge=1, le=1000)
    # Waits between attempts: first, doubled each time, at most max.
    backoff_first: Duration = 5.0
    backoff_max: Duration = 600.0
    # Receivers served at once by one worker (each one's notifications in order).
    concurrency: int = Field(default=8, ge=1, le=64)


class AlertsSettings(_Model):
    # Each rule is evaluated this often (by one worker at a time).
    evaluate_every: Duration = 15.0
    # How often a worker looks for due rules and due notifications.
    poll: Duration = 1.0
    receivers: dict[Name, Receiver] = Field(default_factory=dict)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    rules: list[RuleSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules_name_receivers(self) -> AlertsSettings:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(f"rules.{i}: the rule name {rule.name!r} is used twice")
            seen.add(rule.name)
            unknown = [r for r in rule.receivers if r not in self.receivers]
            if unknown:
                raise ValueError(
                    f"rules.{i} ({rule.name}): unknown receiver(s) {', '.join(unknown)}; "
                    f"configured: {', '.join(sorted(self.receivers)) or 'none'}"
                )
        return self
