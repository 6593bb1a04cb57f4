"""Secrets kept in files, made at first use: the embedded default's generated keys and passwords."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def secret_file(path: Path, nbytes: int = 24) -> str:
    """The secret kept in ``path``, made at first use: random, owner-only (0600), in a folder
    of the owner's (0700) when the folder is new."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(nbytes))
    return path.read_text().strip()
