"""Alerts: a Slack incoming webhook when FLYWHEEL_SLACK_WEBHOOK is set, else the log.

An alert never raises: a pipeline that finished must not be reported as failed because Slack was
unreachable. Delivery failures are logged with the alert's text so nothing is lost silently.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from flywheel.core.secrets import env_secret, redact

log = logging.getLogger("flywheel.alerts")
WEBHOOK_ENV = "FLYWHEEL_SLACK_WEBHOOK"


@dataclass(frozen=True)
class Alert:
    title: str
    text: str
    level: str = "info"  # info | warning | error

    def slack_payload(self) -> dict[str, object]:
        icon = {"info": ":white_check_mark:", "warning": ":warning:", "error": ":x:"}.get(self.level, "")
        return {
            "text": f"{icon} {self.title}",
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": f"*{icon} {self.title}*"}},
                {"type": "section", "text": {"type": "mrkdwn", "text": self.text[:2900]}},
            ],
        }


def send_alert(alert: Alert, webhook: str | None = None, attempts: int = 3) -> str:
    """Deliver an alert; return where it went ('slack', 'log', or 'log (slack failed)')."""
    webhook = webhook if webhook is not None else env_secret(WEBHOOK_ENV)
    alert = Alert(redact(alert.title), redact(alert.text), alert.level)  # error texts may hold URLs
    record = {"event": "alert", "level": alert.level, "title": alert.title, "text": alert.text}
    if not webhook:
        log.warning(json.dumps(record)) if alert.level != "info" else log.info(json.dumps(record))
        return "log"
    import httpx

    error = ""
    for attempt in range(attempts):
        try:
            response = httpx.post(webhook, json=alert.slack_payload(), timeout=5.0)
            if response.status_code < 300:
                return "slack"
            error = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code < 500 and response.status_code != 429:
                break
        except httpx.HTTPError as exc:
            error = str(exc)
        time.sleep(0.5 * (attempt + 1))
    log.error(json.dumps({**record, "delivery_error": error}))
    return "log (slack failed)"
