"""Wiring of the signup service: accounts, credentials and the public signup API."""

from __future__ import annotations

from libs.runtime import ServiceDefinition
from services.signup.projections import ACCOUNTS

SIGNUP = ServiceDefinition(
    name="signup",
    migrations_package="services.signup.migrations",
    projections=(ACCOUNTS,),
)
