"""The system account Postgres runs as when we are root: Postgres refuses to run as root.

``postgres_account`` finds or creates ``PG_SYSTEM_USER`` and lets it reach the data folder and
the Postgres install (traverse and read, nothing more); ``own_tree`` gives it the data folder,
and ``as_account`` is what ``subprocess`` needs to run a program as it.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.servers.process import EmbeddedServerError

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "iotistic-pg"
"""The account Postgres runs as when we are root: postgres refuses to run as root."""


@dataclass(frozen=True)
class Account:
    """A system account child processes switch to."""

    name: str
    uid: int
    gid: int


def postgres_account(bin_dir: Path, data_dir: Path) -> Account:
    """The unprivileged account Postgres runs as when we are root, able to reach what it needs."""
    import pwd

    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        log.info(
            "creating system user %s to run Postgres (it refuses to run as root)", PG_SYSTEM_USER
        )
        nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", nologin, PG_SYSTEM_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"Postgres cannot run as root and creating the user {PG_SYSTEM_USER} failed: "
                f"{result.stderr.strip()}; create it or run as an ordinary user"
            ) from None
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    account = Account(PG_SYSTEM_USER, entry.pw_uid, entry.pw_gid)
    _allow_traverse(data_dir.parent)
    _allow_traverse(bin_dir)
    _allow_reading(bin_dir.parent)
    return account


def _allow_traverse(path: Path) -> None:
    """Let other users pass through ``path`` and every folder above it (o+x, not o+r)."""
    for folder in [path, *path.parents]:
        if not folder.exists():
            continue
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("allowing others to traverse %s so Postgres can reach its files", folder)
            folder.chmod(mode | stat.S_IXOTH)


def _allow_reading(install: Path) -> None:
    """Make the Postgres install readable (and its programs runnable) by the Postgres user."""
    postgres = install / "bin" / "postgres"
    if postgres.stat().st_mode & stat.S_IXOTH and (install / "share").stat().st_mode & stat.S_IROTH:
        return
    log.info("making %s readable by %s", install, PG_SYSTEM_USER)
    for dirpath, _dirnames, filenames in os.walk(install):
        folder = Path(dirpath)
        folder.chmod(folder.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for filename in filenames:
            file = folder / filename
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            extra = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            file.chmod(mode | extra)


def own_tree(root: Path, account: Account) -> None:
    """Give ``root`` and everything in it to ``account``, unless it already owns it."""
    if root.stat().st_uid == account.uid:
        return
    os.chown(root, account.uid, account.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), account.uid, account.gid, follow_symlinks=False)


def as_account(account: Account | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a program as ``account`` (none: as ourselves)."""
    if account is None:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}
