"""Devices' API keys (the ``deviceApiKey`` a fleet device proves at its key exchange), kept as
argon2id hashes made off the event loop."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError


class ApiKeys:
    """argon2id hashes of devices' API keys, made off the event loop in a pool no wider than
    the cores (a modest cost: the key is the device's own random secret)."""

    def __init__(self) -> None:
        self._hasher = PasswordHasher(memory_cost=19456, time_cost=2, parallelism=1, type=Type.ID)
        self._pool = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 1, thread_name_prefix="device-api-key"
        )
        # Checked for an unknown uuid, so that answer takes as long as a wrong key.
        self._decoy = self._hasher.hash("decoy device api key, never valid")

    async def hash(self, api_key: str) -> str:
        """The argon2id hash of ``api_key``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._hasher.hash, api_key)

    async def verify(self, api_key_hash: str | None, api_key: str) -> bool:
        """Whether ``api_key`` matches; with no hash, spends the same time and says False."""
        loop = asyncio.get_running_loop()
        matches = await loop.run_in_executor(
            self._pool, self._verify, api_key_hash or self._decoy, api_key
        )
        return matches and api_key_hash is not None

    def _verify(self, api_key_hash: str, api_key: str) -> bool:
        try:
            return self._hasher.verify(api_key_hash, api_key)
        except (VerificationError, InvalidHashError):
            return False
