"""Wiring of the licensing service: plans, signed licenses, keys and license history."""

from __future__ import annotations

from libs.runtime import ServiceDefinition
from services.licensing.projections import LICENSES

LICENSING = ServiceDefinition(
    name="licensing",
    migrations_package="services.licensing.migrations",
    projections=(LICENSES,),
)
