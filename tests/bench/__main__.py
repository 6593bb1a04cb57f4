"""`just bench <what>`: measure speed on this machine against real servers, print figures.

Benchmarks start their own embedded Postgres and NATS (``sync_interval: always``) unless
TEST_DATABASE_URL / TEST_NATS_URL are set, and print one line per figure. Nothing here asserts
a time: the figures go in the README and the closing notes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.bench import (
    backup,
    density,
    events,
    export,
    fleet,
    instance,
    integrations,
    provision,
    signup,
)

# Each takes the servers' URLs (Postgres, NATS), and its own options by keyword (OPTIONS).
BENCHES: dict[str, Callable[..., Awaitable[None]]] = {
    "events": events.run,
    "signup": signup.run,
    "provision": provision.run,
    "ingest": instance.run_ingest,
    "query": instance.run_query,
    "density": density.run,
    "backup": backup.run,
    "fleet": fleet.run_fleet,
    "integrations": integrations.run,
    "export": export.run,
}


def machine() -> str:
    """One line describing the machine the figures come from."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="just bench")
    parser.add_argument(
        "what",
        nargs="*",
        help=f"any of {', '.join(BENCHES)} (default: all but density, which starts hundreds of "
        "processes, backup, which loads a million readings, and export, which loads ten million)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=density.COUNT,
        help="density: idle instances to start (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=3,
        help="density: instances deployed at once, as the provisioner's QUEUE_CONCURRENCY "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=density.SETTLE_SECONDS,
        help="density: seconds the instances idle before they are measured (default %(default)s)",
    )
    args = parser.parse_args()
    options: dict[str, dict[str, Any]] = {
        "density": {"count": args.count, "concurrency": args.concurrency, "settle": args.settle}
    }
    unknown = set(args.what) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {list(BENCHES)}")
    args.what = args.what or [
        name for name in BENCHES if name not in ("density", "backup", "export")
    ]
    print(f"machine: {machine()}")
    from libs.servers.nats import EmbeddedNats
    from libs.servers.postgres import EmbeddedPostgres
    from tests.support import start_harness_nats

    with tempfile.TemporaryDirectory(prefix="iotistic-bench-") as tmp:
        pg_url = os.environ.get("TEST_DATABASE_URL")
        nats_url = os.environ.get("TEST_NATS_URL")
        servers: list[EmbeddedPostgres | EmbeddedNats] = []
        if not pg_url:
            pg = EmbeddedPostgres(Path(tmp) / "pg")
            pg.start()
            servers.append(pg)
            pg_url = pg.url
        if not nats_url:
            nats_server = start_harness_nats(Path(tmp) / "nats")
            servers.append(nats_server)
            nats_url = nats_server.url
        try:
            for name in args.what:
                asyncio.run(BENCHES[name](pg_url, nats_url, **options.get(name, {})))
        finally:
            for server in reversed(servers):
                server.stop()


if __name__ == "__main__":
    main()
