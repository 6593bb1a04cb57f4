"""Wiring of the provisioner: the deployment queue and the backends that run instances."""

from __future__ import annotations

from libs.runtime import ServiceDefinition
from services.provisioner.projections import DEPLOYMENTS

PROVISIONER = ServiceDefinition(
    name="provisioner",
    migrations_package="services.provisioner.migrations",
    projections=(DEPLOYMENTS,),
)
