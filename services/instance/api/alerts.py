"""``/api/alerts``: alert rules (made, listed, changed, muted, deleted) and their history.

A rule is changed with ``PATCH`` or ``PUT`` alike: only the fields given change (a rule's
``params`` too: the parameters not given keep their values), so a client that sends the whole
rule back and one that sends one field get the same result.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, delete, get, patch, post, put
from litestar.params import FromPath, JSONBody

from libs.http.errors import Forbidden, NotFound
from services.instance.alerts.history import recent_alert_history
from services.instance.alerts.rules import (
    WebhooksNotLicensed,
    asks_anew,
    create_rule,
    delete_rule,
    parse_rule,
    parse_rule_change,
    rules_with_states,
    stored_rule,
    update_rule,
)
from services.instance.api.access import (
    INSTANCE,
    Instance,
    alerting_licensed,
    customer_session,
    read_write,
)

BODY_LIMIT = 4096


class AlertsController(Controller):
    """The customer's alert rules and what they did."""

    path = "/api/alerts"
    guards = (customer_session,)
    dependencies = INSTANCE

    @post(
        "/rules",
        status_code=201,
        request_max_body_size=BODY_LIMIT,
        tags=["alerts"],
        guards=[read_write, alerting_licensed],
    )
    async def create_alert_rule(self, data: JSONBody[Any], instance: Instance) -> dict[str, Any]:
        """A rule; with ``webhook_url`` its signing secret is in this answer only."""
        webhooks = instance.licensed().features.webhooks
        try:
            rule = await parse_rule(data, webhooks, instance.webhook_targets)
        except WebhooksNotLicensed as exc:
            raise Forbidden(str(exc)) from None
        async with instance.pool().acquire() as conn:
            return await create_rule(conn, rule)

    @get("/rules", tags=["alerts"])
    async def list_alert_rules(self, instance: Instance) -> dict[str, Any]:
        """The rules (without their secrets) and each device's state under them."""
        async with instance.pool().acquire() as conn:
            return {"rules": await rules_with_states(conn)}

    @patch(
        "/rules/{rule_id:str}",
        request_max_body_size=BODY_LIMIT,
        tags=["alerts"],
        guards=[read_write, alerting_licensed],
    )
    async def change_alert_rule(
        self, rule_id: FromPath[str], data: JSONBody[Any], instance: Instance
    ) -> dict[str, Any]:
        """Change any of a rule's fields, ``muted`` included (a muted rule neither fires nor
        notifies); a new ``webhook_url`` gets a new signing secret, in this answer only."""
        return await _change_rule(rule_id, data, instance)

    @put(
        "/rules/{rule_id:str}",
        request_max_body_size=BODY_LIMIT,
        tags=["alerts"],
        guards=[read_write, alerting_licensed],
    )
    async def tune_alert_rule(
        self, rule_id: FromPath[str], data: JSONBody[Any], instance: Instance
    ) -> dict[str, Any]:
        """The same change as ``PATCH``: tune a rule's ``params``, mute it, rename it..."""
        return await _change_rule(rule_id, data, instance)

    @delete("/rules/{rule_id:str}", status_code=204, tags=["alerts"], guards=[read_write])
    async def delete_alert_rule(self, rule_id: FromPath[str], instance: Instance) -> None:
        """Stop evaluating a rule (its history stays); a default rule deleted stays deleted."""
        async with instance.pool().acquire() as conn:
            deleted = await delete_rule(conn, rule_id)
        if not deleted:
            raise NotFound(f"no rule {rule_id}")

    @get("/history", tags=["alerts"])
    async def alert_history(self, instance: Instance) -> dict[str, Any]:
        """Firings and resolutions, newest first, each with why (``explanation``, and the
        values and window behind it in ``evidence``)."""
        async with instance.pool().acquire() as conn:
            return {"history": await recent_alert_history(conn)}


async def _change_rule(rule_id: str, data: Any, instance: Instance) -> dict[str, Any]:
    """A rule's change, checked as a new rule is (a 404 for a rule not in force)."""
    async with instance.pool().acquire() as conn:
        stored = await stored_rule(conn, rule_id)
    if stored is None:
        raise NotFound(f"no rule {rule_id}")
    webhooks = instance.licensed().features.webhooks
    try:
        rule, new_webhook = await parse_rule_change(
            data, stored, webhooks, instance.webhook_targets
        )
    except WebhooksNotLicensed as exc:
        raise Forbidden(str(exc)) from None
    async with instance.pool().acquire() as conn:
        if await stored_rule(conn, rule_id) is None:  # deleted while the URL was checked
            raise NotFound(f"no rule {rule_id}")
        return await update_rule(conn, rule_id, rule, new_webhook, asks_anew(rule, stored))
