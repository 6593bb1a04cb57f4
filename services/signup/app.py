"""Wiring of the signup service: accounts, credentials and the public signup API."""

from __future__ import annotations

from libs.runtime import ServiceDefinition
from services.signup.projections import ACCOUNTS
from services.signup.routes import signup_routes
from services.signup.settings import SignupSettings

SIGNUP = ServiceDefinition(
    name="signup",
    migrations_package="services.signup.migrations",
    projections=(ACCOUNTS,),
    routes=signup_routes,
    settings_type=SignupSettings,
)
