"""Notification channels shared by post-actions and alerts: webhook, Slack, e-mail.

A channel is a mapping (a post-action's ``config``): ``channel: webhook`` with ``url`` (and
optional ``headers``) POSTs ``{"message", "subject", "context"}`` as JSON; ``channel: slack``
POSTs Slack's incoming-webhook JSON (``{"text", "channel"}``) to ``webhook_url``;
``channel: email`` sends a plain-text mail through ``smtp_host``/``smtp_port`` (``smtp_username``,
``smtp_password``, ``smtp_starttls``) from ``from`` to ``recipient`` (one address or a list).
Deliveries are retried with backoff; the result says what happened, never the secrets.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from typing import Any

CHANNELS = ("webhook", "slack", "email")


@dataclass(frozen=True)
class Delivery:
    """The outcome of one notification."""

    channel: str
    ok: bool
    attempts: int
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The outcome as JSON."""
        return asdict(self)


def _post(url: str, body: Mapping[str, Any], headers: Mapping[str, str], timeout: float) -> None:
    import httpx

    r = httpx.post(url, json=body, headers=dict(headers), timeout=timeout)
    if r.status_code >= 300:
        msg = f"the endpoint answered HTTP {r.status_code}"
        raise RuntimeError(msg)


def _mail(config: Mapping[str, Any], subject: str, message: str, timeout: float) -> None:
    to = config.get("recipient") or config.get("to")
    if not to:
        msg = "an email notification needs 'recipient'"
        raise ValueError(msg)
    mail = EmailMessage()
    mail["Subject"] = subject
    mail["From"] = str(config.get("from", "dataflare@localhost"))
    mail["To"] = ", ".join(to) if isinstance(to, list) else str(to)
    mail.set_content(message)
    host = str(config.get("smtp_host", "localhost"))
    with smtplib.SMTP(host, int(config.get("smtp_port", 25)), timeout=timeout) as smtp:
        if config.get("smtp_starttls"):
            smtp.starttls()
        if config.get("smtp_username"):
            smtp.login(str(config["smtp_username"]), str(config.get("smtp_password", "")))
        smtp.send_message(mail)


def _deliver_once(config: Mapping[str, Any], subject: str, message: str,
                  context: Mapping[str, Any], timeout: float) -> None:
    channel = config.get("channel", "webhook")
    if channel == "webhook":
        if not config.get("url"):
            msg = "a webhook notification needs 'url'"
            raise ValueError(msg)
        _post(str(config["url"]), {"subject": subject, "message": message,
                                   "context": context}, config.get("headers") or {}, timeout)
    elif channel == "slack":
        if not config.get("webhook_url"):
            msg = "a slack notification needs 'webhook_url' (the incoming webhook)"
            raise ValueError(msg)
        body: dict[str, Any] = {"text": message}
        if config.get("recipient"):
            body["channel"] = config["recipient"]
        _post(str(config["webhook_url"]), body, {}, timeout)
    elif channel == "email":
        _mail(config, subject, message, timeout)
    else:
        msg = f"unknown notification channel {channel!r} (known: {', '.join(CHANNELS)})"
        raise ValueError(msg)


def send(config: Mapping[str, Any], subject: str, message: str,
         context: Mapping[str, Any] | None = None, *, attempts: int = 3,
         backoff: float = 1.0, timeout: float = 10.0) -> Delivery:
    """Deliver one notification, retrying transient failures; the outcome, never raised."""
    channel = str(config.get("channel", "webhook"))
    error = None
    for attempt in range(1, attempts + 1):
        try:
            _deliver_once(config, subject, message, context or {}, timeout)
            return Delivery(channel, True, attempt)
        except ValueError as exc:  # a configuration error: retrying cannot help
            return Delivery(channel, False, attempt, str(exc))
        except Exception as exc:  # noqa: BLE001 - network and server errors are retried
            error = f"{type(exc).__name__}: {exc}"
            if attempt < attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
    return Delivery(channel, False, attempts, error)
