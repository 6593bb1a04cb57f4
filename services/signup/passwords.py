"""Passwords: argon2id hashes made off the event loop, and a check against common passwords."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError


@cache
def _common_passwords() -> frozenset[str]:
    # zxcvbn ships the 30,000 most common passwords from leaked sets, ranked.
    from zxcvbn.matching import RANKED_DICTIONARIES

    return frozenset(RANKED_DICTIONARIES["passwords"])


def is_common(password: str) -> bool:
    """True for a password among the most common ones, or one character repeated."""
    lowered = password.lower()
    return lowered in _common_passwords() or len(set(lowered)) <= 2


class Passwords:
    """Hashes and checks passwords with argon2id in a pool of threads no wider than the cores."""

    def __init__(
        self, *, memory_kib: int, time_cost: int, parallelism: int, workers: int | None
    ) -> None:
        self._hasher = PasswordHasher(
            memory_cost=memory_kib, time_cost=time_cost, parallelism=parallelism, type=Type.ID
        )
        self._pool = ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 1, thread_name_prefix="argon2"
        )
        # Checked when an email is unknown, so that answer takes as long as a wrong password.
        self._decoy = self._hasher.hash("decoy password, never valid")

    async def hash(self, password: str) -> str:
        """The argon2id hash of ``password``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """True if ``password`` matches; with no hash, spends the same time and says False."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool,
            self._verify,
            password_hash or self._decoy,
            password,
            password_hash is not None,
        )

    def _verify(self, password_hash: str, password: str, real: bool) -> bool:
        try:
            return self._hasher.verify(password_hash, password) and real
        except (VerificationError, InvalidHashError):
            return False
