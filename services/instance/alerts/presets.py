"""The indoor-air rules every instance has, on, from the start: installed once per preset.

``alert_presets`` remembers each preset installed (and the rule made from it), so a rule the
customer deleted stays deleted, a restart or a retry installs nothing twice, and a preset that a
later version adds is installed in instances that did not have it: new instances get them all
when their database is first opened, and existing ones at the upgrade that brings them.
"""

from __future__ import annotations

import asyncpg

from services.instance.alerts.kinds import PRESETS, defaults
from services.instance.alerts.rules import NewRule, create_rule


async def install_presets(conn: asyncpg.Connection) -> list[str]:
    """Make a rule of each preset never installed here; the presets installed now."""
    installed: list[str] = []
    async with conn.transaction():
        # Two starts at once (a restart overlapping the old process) install each preset once.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('iotistic alert presets'))")
        known = {r["preset"] for r in await conn.fetch("SELECT preset FROM alert_presets")}
        for preset, name, kind in PRESETS:
            if preset in known:
                continue
            rule = NewRule(
                name=name,
                metric=None,
                operator=None,
                threshold=None,
                for_seconds=0,
                devices=[],
                webhook_url=None,
                kind=kind,
                params=defaults(kind),
            )
            made = await create_rule(conn, rule, preset=preset)
            await conn.execute(
                "INSERT INTO alert_presets (preset, rule_id, installed_at) VALUES ($1, $2, now())",
                preset,
                made["rule_id"],
            )
            installed.append(preset)
    return installed
