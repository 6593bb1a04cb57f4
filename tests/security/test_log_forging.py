"""No client can write a line of its own into a log (issue 11, item 8): the forged request against
a real instance, and the logging every ``iotistic`` process sets up, uvicorn's handlers included.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.servers.mosquitto import EmbeddedMosquitto
from tests.security.tenant_platform import World, running_world

pytestmark = pytest.mark.slow

FORGED = "2026-12-01 00:00:00,000 CRITICAL forged.logger: the admin token is hunter2"
FORGED_PATH = "/api/devices/\x00\n" + FORGED
FORGED_ERROR = "bad value\r\n" + FORGED


@pytest.fixture(scope="module")
async def world(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[World]:
    async with running_world(settings, broker, port, tmp_path_factory.mktemp("world")) as found:
        yield found


def forged_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(FORGED[:30])]


async def test_a_forged_line_in_a_device_path_does_not_reach_the_instance_log(world) -> None:
    log = world.tenant.log_path
    start = log.stat().st_size
    answers = [
        await world.instance.get("/api/devices/" + quote(prefix + FORGED, safe=""))
        for prefix in ("\x00\n", "\n", "\r\n", "\x00\u2028")
    ]
    written = log.read_bytes()[start:].decode(errors="replace")
    assert not forged_lines(written), written
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["fields"][0]["field"] == "path"


async def test_a_forged_line_in_a_control_plane_path_is_refused(world, caplog) -> None:
    answer = await world.control.get(
        "/api/queue/jobs/" + quote("\x00\n" + FORGED, safe=""), headers=world.admin
    )
    assert not forged_lines(caplog.text), caplog.text
    assert answer.status_code == 400, answer.text


def test_every_record_of_an_iotistic_process_is_one_escaped_line() -> None:
    # What `iotistic run` does: main's logging, then uvicorn configured (which installs its own
    # handlers and formatters), then records with client text in the message, the arguments
    # and an exception's message, through our loggers and uvicorn's.
    script = textwrap.dedent(
        f"""
        import logging
        import uvicorn
        from services.cli.main import setup_logging
        setup_logging("run")
        uvicorn.Config(app=None, log_level="info", access_log=False)
        forged = {FORGED_PATH!r}
        logging.getLogger("libs.http.app").error("unhandled error on GET %s", forged)
        logging.getLogger("libs.http.app").warning(forged)
        try:
            raise ValueError({FORGED_ERROR!r})
        except ValueError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
            logging.getLogger("services.instance").exception("on %r", forged)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    assert not forged_lines(output), output
    assert "unhandled error on GET /api/devices/\\x00\\n" + FORGED in output
    assert "ValueError: bad value\\r\\n" + FORGED in output
    assert output.count("Traceback (most recent call last):") == 2
