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

from tests.bench import events, instance, provision, signup

BENCHES: dict[str, Callable[[str, str], Awaitable[None]]] = {
    "events": events.run,
    "signup": signup.run,
    "provision": provision.run,
    "ingest": instance.run_ingest,
    "query": instance.run_query,
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
    parser.add_argument("what", nargs="*", help=f"any of {', '.join(BENCHES)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.what) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {list(BENCHES)}")
    args.what = args.what or list(BENCHES)
    print(f"machine: {machine()}")
    from libs.embedded import EmbeddedNats, EmbeddedPostgres
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
                asyncio.run(BENCHES[name](pg_url, nats_url))
        finally:
            for server in reversed(servers):
                server.stop()


if __name__ == "__main__":
    main()
