"""Sending one notification: the body each receiver type takes, and the senders.

- `json` webhooks get the notification as stored (event and alert), signed
  (cloud_api/alerts/signature.py).
- `slack` webhooks get `{"text": ...}`, which Slack's incoming webhooks accept.
- `teams` webhooks get a message with one Adaptive Card, which Microsoft Teams' incoming
  webhooks (Workflows, and the older connectors) accept.
- `email` receivers get a plain-text message through the configured SMTP server.

Every failure (connection refused, timeout, a status other than 2xx, an SMTP refusal, a
missing secret) becomes DeliveryFailed with a short reason; the caller retries with backoff.
Each request has its own timeout, so a silent receiver costs its own worker thread at most
that long and never holds up another receiver.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from email.message import EmailMessage
from typing import Any

import httpx

from cloud_api.alerts import signature
from cloud_api.alerts.settings import (
    AlertsSettings,
    EmailReceiver,
    SecretError,
    SmtpSettings,
    WebhookReceiver,
)
from cloud_api.alerts.store import Delivery, DeliveryFailed
from sync.version import VERSION

USER_AGENT = f"factory-edge-gateway-alerts/{VERSION}"


def _title(payload: dict[str, Any]) -> str:
    alert = payload.get("alert", {})
    verb = "RESOLVED" if payload.get("event") == "resolved" else "ALERT"
    return f"[{verb}] {alert.get('rule', '')}: {alert.get('subject', '')}"


def _text(payload: dict[str, Any]) -> str:
    alert = payload.get("alert", {})
    lines = [str(alert.get("summary", ""))]
    if payload.get("event") == "resolved":
        lines.append(f"resolved at {alert.get('resolved_at')} ({alert.get('resolution')})")
    else:
        lines.append(f"since {alert.get('since') or alert.get('opened_at')}")
    return "\n".join(lines)


def webhook_body(delivery: Delivery, fmt: str) -> dict[str, Any]:
    payload = {"delivery_id": delivery.delivery_id, **delivery.payload}
    if fmt == "slack":
        return {"text": f"*{_title(payload)}*\n{_text(payload)}"}
    if fmt == "teams":
        resolved = payload.get("event") == "resolved"
        return {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "content": {
                        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                        "type": "AdaptiveCard",
                        "version": "1.4",
                        "body": [
                            {
                                "type": "TextBlock",
                                "text": _title(payload),
                                "weight": "Bolder",
                                "size": "Medium",
                                "color": "Good" if resolved else "Attention",
                                "wrap": True,
                            },
                            {"type": "TextBlock", "text": _text(payload), "wrap": True},
                        ],
                    },
                }
            ],
        }
    return payload


class Sender:
    """Sends notifications to the receivers of `settings` (one httpx client, shared)."""

    def __init__(self, settings: AlertsSettings) -> None:
        self.settings = settings
        self.http = httpx.Client(headers={"User-Agent": USER_AGENT}, follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def __call__(self, delivery: Delivery) -> None:
        receiver = self.settings.receivers.get(delivery.receiver)
        if receiver is None:
            raise DeliveryFailed(f"no receiver {delivery.receiver!r} in the alerts settings")
        if isinstance(receiver, WebhookReceiver):
            self._webhook(receiver, delivery)
        else:
            self._email(receiver, delivery)

    def _webhook(self, receiver: WebhookReceiver, delivery: Delivery) -> None:
        body = json.dumps(webhook_body(delivery, receiver.format), separators=(",", ":")).encode()
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            signature.TIMESTAMP_HEADER: str(stamp),
            signature.DELIVERY_HEADER: str(delivery.delivery_id),
            signature.EVENT_HEADER: delivery.event,
        }
        try:
            secret = receiver.secret()
        except SecretError as exc:
            raise DeliveryFailed(f"signing secret unavailable: {exc}") from None
        if secret is not None:
            headers[signature.SIGNATURE_HEADER] = signature.sign(secret, body, stamp)
        try:
            response = self.http.post(
                receiver.url, content=body, headers=headers, timeout=receiver.timeout
            )
        except httpx.TimeoutException:
            raise DeliveryFailed(f"no answer within {receiver.timeout:g} s") from None
        except httpx.HTTPError as exc:
            # The type only: Slack's and Teams' URLs carry their secret, and messages of some
            # errors quote the URL.
            raise DeliveryFailed(f"the request failed ({type(exc).__name__})") from None
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"the receiver answered {response.status_code}")

    def _email(self, receiver: EmailReceiver, delivery: Delivery) -> None:
        payload = {"delivery_id": delivery.delivery_id, **delivery.payload}
        message = EmailMessage()
        message["Subject"] = _title(payload)
        message["From"] = self.settings.smtp.sender
        message["To"] = ", ".join(receiver.to)
        message["X-Alert-Delivery"] = str(delivery.delivery_id)
        message["X-Alert-Event"] = delivery.event
        message.set_content(
            _text(payload) + "\n\n" + json.dumps(payload, indent=2, sort_keys=True) + "\n"
        )
        try:
            send_mail(self.settings.smtp, message)
        except SecretError as exc:
            raise DeliveryFailed(f"SMTP password unavailable: {exc}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(f"SMTP: {type(exc).__name__}: {str(exc)[:200]}") from None


def send_mail(smtp: SmtpSettings, message: EmailMessage) -> None:
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if smtp.ssl:
        client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
    with client:
        if smtp.starttls and not smtp.ssl:
            client.starttls(context=context)
        password = smtp.password()
        if smtp.username and password is not None:
            client.login(smtp.username, password)
        client.send_message(message)
