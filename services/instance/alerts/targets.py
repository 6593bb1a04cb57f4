"""Where alert webhooks may go: ``services.instance.webhook_targets``, which integrations share
(kept here under its old name for the alert modules that import it)."""

from services.instance.webhook_targets import (
    WebhookRefused,
    WebhookTarget,
    WebhookTargets,
)

__all__ = ["WebhookRefused", "WebhookTarget", "WebhookTargets"]
