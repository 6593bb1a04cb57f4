"""The platform's master key as signup holds it: to seal personal data and name emails' subjects."""

from __future__ import annotations

from libs.runtime.service import ServiceUnavailable
from libs.sealing.vault import MasterKey, master_key
from services.signup.settings import SignupSettings


def sealing_key(settings: SignupSettings) -> MasterKey:
    """The master key signup seals with; 503 when none is configured (nothing personal may go
    on the log in the clear)."""
    if not settings.data_keys_master_key:
        raise ServiceUnavailable(
            "personal data cannot be sealed: DATA_KEYS_MASTER_KEY is not set on this platform"
        )
    return master_key(settings.data_keys_master_key)
