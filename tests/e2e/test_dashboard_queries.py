"""The operators' dashboards (deploy/grafana) show data, and the alert rules they link to load.

A real Prometheus (Debian's ``prometheus``) scrapes a real platform (the control plane with the
local backend) and a customer's instance every second; after a signup, some readings over MQTT
and a few Stripe webhooks, every panel's query, evaluated through Prometheus's HTTP API, returns
at least one series. Each alert links (annotation ``dashboard``) to a panel that plots what it
compares with its threshold.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import httpx
import pytest
import yaml

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from services.targets import build_app
from stripe_signing import SECRET, sign
from support import eventually, local_platform, serving

ROOT = Path(__file__).parents[2]
DASHBOARDS = ROOT / "deploy" / "grafana"
RULES = ROOT / "deploy" / "prometheus"
RULE_FILES = ("alerts.yml", "tenant_storage.yml")
# Panels of the Kubernetes tenants' volumes plot the kubelet's volume stats: no kubelet runs
# here, so Prometheus is only asked whether it accepts those queries.
KUBELET_ONLY = re.compile(r"\bkubelet_volume_stats_|\btenant:volume_used:ratio\b")
PASSWORD = "a long passphrase"


@dataclass(frozen=True)
class Panel:
    dashboard: str
    id: int
    title: str
    exprs: tuple[str, ...]


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON, by its uid."""
    found = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        found[board["uid"]] = board
    return found


def panels_of(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too; rows themselves are not panels."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def all_panels() -> list[Panel]:
    return [
        Panel(uid, p["id"], p["title"], tuple(t["expr"] for t in p["targets"]))
        for uid, board in dashboards().items()
        for p in panels_of(board)
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for name in RULE_FILES
        for group in yaml.safe_load((RULES / name).read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def as_query(expr: str) -> str:
    """A panel's expression as Prometheus evaluates it: Grafana's interval variables as one
    few minutes, the dashboard's template variables as anything."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def squeezed(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


# --- what the repository holds (no servers) ------------------------------------------------


def test_every_dashboard_takes_its_prometheus_from_a_variable() -> None:
    boards = dashboards()
    assert {"iotistic-control-plane", "iotistic-instances"} <= set(boards)
    for uid, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", uid
        assert variables["datasource"]["query"] == "prometheus", uid
        ids = [p["id"] for p in panels_of(board)]
        assert len(ids) == len(set(ids)), f"{uid}: panel ids repeat"
        for panel in panels_of(board):
            assert panel["datasource"]["uid"] == "${datasource}", (uid, panel["title"])
            assert panel["targets"], (uid, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", (uid, panel["title"])
                assert target["expr"].strip(), (uid, panel["title"])


def test_every_alert_links_to_a_panel_that_plots_what_it_compares() -> None:
    boards = dashboards()
    rules = alert_rules()
    assert rules
    for rule in rules:
        link = rule["annotations"].get("dashboard", "")
        found = re.fullmatch(r"/d/([\w-]+)\?viewPanel=(\d+)", link)
        assert found, f"{rule['alert']}: annotation dashboard is {link!r}"
        uid, panel_id = found[1], int(found[2])
        assert uid in boards, f"{rule['alert']}: no dashboard {uid}"
        linked = [p for p in panels_of(boards[uid]) if p["id"] == panel_id]
        assert len(linked) == 1, f"{rule['alert']}: {uid} has no panel {panel_id}"
        panel = linked[0]
        plotted = [squeezed(t["expr"]) for t in panel["targets"]]
        assert all(e in squeezed(rule["expr"]) for e in plotted), (rule["alert"], plotted)


# --- a real Prometheus over a real platform and instance ---------------------------------


class Prometheus:
    """Debian's Prometheus on a free port, scraping what its configuration says every second."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        assert Path(binary).exists(), "prometheus is missing: apt-get install prometheus"
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = folder / "prometheus.yml"
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None

    def configure(self, platform_port: int, instance: tuple[str, str] | None = None) -> None:
        """Scrape the platform, and ``instance`` (its host:port and a bearer token) if given."""
        jobs: list[dict[str, Any]] = [
            {
                "job_name": "platform",
                "static_configs": [{"targets": [f"127.0.0.1:{platform_port}"]}],
            }
        ]
        if instance is not None:
            (self.folder / "instance-token").write_text(instance[1])
            jobs.append(
                {
                    "job_name": "instance",
                    "authorization": {
                        "type": "Bearer",
                        "credentials_file": str(self.folder / "instance-token"),
                    },
                    "static_configs": [{"targets": [instance[0]]}],
                }
            )
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES / name) for name in RULE_FILES],
            "scrape_configs": jobs,
        }
        self.config.write_text(yaml.safe_dump(config))

    def start(self) -> None:
        with (self.folder / "prometheus.log").open("wb") as log:
            self._process = subprocess.Popen(
                [
                    self._binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, port: int) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    server.configure(port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def promql(prometheus: Prometheus) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=prometheus.url, timeout=10) as http:
        try:
            await eventually(
                lambda: http.get("/-/ready"), lambda r: r.status_code == 200, what="Prometheus"
            )
        except AssertionError as exc:
            log = (prometheus.folder / "prometheus.log").read_text()
            pytest.fail(f"{exc}\nits log:\n{log}")
        yield http


@pytest.fixture(scope="module")
async def client(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[httpx.AsyncClient]:
    platform = local_platform(
        settings,
        broker,
        port,
        tmp_path_factory.mktemp("instances"),
        stripe_webhook_secret=SECRET,
    )
    async with serving(build_app(platform, "all"), port) as http:
        await platform.wait_started()
        yield http


@dataclass(frozen=True)
class Customer:
    id: str
    token: str
    instance_url: str


async def sign_up(client: httpx.AsyncClient, email: str) -> Customer:
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Air Co"},
    )
    assert signed.status_code == 201, signed.text
    login = await client.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    token = login.json()["token"]
    me = await eventually(
        lambda: client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"}),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=60,
        what="the customer's instance",
    )
    return Customer(
        signed.json()["customer"]["customer_id"], token, me.json()["deployment"]["instance_url"]
    )


def reading(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "ts": datetime.now(UTC).isoformat(),
        "temperature": 21.5,
        "humidity": 45.2,
        "pressure": 1013.2,
        "gas_resistance": 125000.0,
        "iaq": 42.0,
        "iaq_accuracy": 3,
        "co2_equivalent": 612.0,
        "breath_voc_equivalent": 0.8,
    }
    body.update(overrides)
    return json.dumps(body).encode()


async def publish_readings(broker: EmbeddedMosquitto, customer: Customer) -> None:
    """A device registered on the instance publishes readings, and one it cannot parse."""
    async with httpx.AsyncClient(
        base_url=customer.instance_url,
        headers={"Authorization": f"Bearer {customer.token}"},
        timeout=10,
    ) as api:
        device = await api.post("/api/devices", json={"name": "kitchen"})
        assert device.status_code == 201, device.text
    mqtt = device.json()["mqtt"]
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=mqtt["username"],
        password=mqtt["password"],
        identifier=mqtt["client_id"],
    ) as client:
        for n in range(5):
            await client.publish(mqtt["topics"]["readings"], reading(temperature=20 + n), qos=1)
        await client.publish(mqtt["topics"]["readings"], b"not a reading", qos=1)


async def send_webhooks(client: httpx.AsyncClient) -> None:
    """One webhook signed as Stripe signs it, and one whose signature is wrong."""
    payload = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "api_version": "2024-06-20",
            "created": int(datetime.now(UTC).timestamp()),
            "livemode": False,
            "type": "radar.early_fraud_warning.created",
            "data": {"object": {"id": "issfr_1", "object": "radar.early_fraud_warning"}},
        }
    ).encode()
    headers = {"content-type": "application/json"}
    good = await client.post(
        "/webhooks/stripe", content=payload, headers={**headers, "Stripe-Signature": sign(payload)}
    )
    assert good.status_code == 200, good.text
    bad = await client.post(
        "/webhooks/stripe",
        content=payload,
        headers={**headers, "Stripe-Signature": sign(payload, "whsec_" + "x" * 32)},
    )
    assert bad.status_code == 400, bad.text


async def series(promql: httpx.AsyncClient, query: str) -> list[dict[str, Any]]:
    answer = await promql.get("/api/v1/query", params={"query": query})
    body = answer.json()
    assert body["status"] == "success", (query, body)
    return list(body["data"]["result"])


def has_a_number(result: list[dict[str, Any]]) -> bool:
    """Whether a series has a value Grafana draws (NaN, as 0/0 gives, it does not)."""
    return any(s["value"][1] != "NaN" for s in result)


async def empty_panels(promql: httpx.AsyncClient) -> list[str]:
    """The panels (dashboard, id, title, query) one of whose queries returns no number, and
    the template variables whose ``label_values`` finds nothing."""
    empty = []
    for panel in all_panels():
        for expr in panel.exprs:
            found = await series(promql, as_query(expr))
            if not has_a_number(found) and not KUBELET_ONLY.search(expr):
                empty.append(f"{panel.dashboard}#{panel.id} {panel.title}: {as_query(expr)}")
    for uid, board in dashboards().items():
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            values = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert values, f"{uid} variable {variable['name']}: {variable['definition']}"
            metric, label = values.groups()
            if not await series(promql, f"group by ({label}) ({metric})"):
                empty.append(f"{uid} variable {variable['name']}: {variable['definition']}")
    return empty


@pytest.mark.slow
async def test_every_panel_returns_data_after_a_signup_and_readings(
    client: httpx.AsyncClient,
    prometheus: Prometheus,
    promql: httpx.AsyncClient,
    broker: EmbeddedMosquitto,
    port: int,
) -> None:
    await eventually(lambda: series(promql, 'up{job="platform"} == 1'), what="the platform scraped")
    customer = await sign_up(client, "dashboards@example.com")
    instance = urlsplit(customer.instance_url).netloc
    prometheus.configure(port, (instance, customer.token))
    reloaded = await promql.post("/-/reload")
    assert reloaded.status_code == 200, reloaded.text
    await eventually(lambda: series(promql, 'up{job="instance"} == 1'), what="the instance scraped")
    await publish_readings(broker, customer)
    await send_webhooks(client)
    try:
        await eventually(
            lambda: empty_panels(promql),
            lambda empty: not empty,
            timeout=90,
            interval=1.0,
            what="data in every panel",
        )
    except AssertionError:
        empty = "\n".join(await empty_panels(promql))
        pytest.fail(f"panels without data:\n{empty}")
    await eventually(lambda: counted(promql), lambda found: found == DONE, what="the counts")


# What the test did, as Prometheus counts it: the panels plot what happened, not only zeros.
DONE = {
    "sum(iotistic_signups_total)": 1.0,
    'sum(deployment_job_duration_seconds_count{outcome="completed"})': 1.0,
    'sum(iotistic_stripe_webhooks_total{outcome="received"})': 1.0,
    'sum(iotistic_stripe_webhooks_total{outcome="rejected"})': 1.0,
    "sum(iotistic_instance_readings_stored_total)": 5.0,
    "sum(iotistic_instance_readings_rejected_total)": 1.0,
}


async def counted(promql: httpx.AsyncClient) -> dict[str, float | None]:
    found = {}
    for query in DONE:
        result = await series(promql, query)
        found[query] = float(result[0]["value"][1]) if result else None
    return found


@pytest.mark.slow
async def test_every_alert_rule_is_loaded_and_healthy(promql: httpx.AsyncClient) -> None:
    expected = {rule["alert"] for rule in alert_rules()}

    async def loaded() -> dict[str, str]:
        answer = (await promql.get("/api/v1/rules", params={"type": "alert"})).json()
        return {
            rule["name"]: rule["health"]
            for group in answer["data"]["groups"]
            for rule in group["rules"]
        }

    # Health is "unknown" until a rule was first evaluated (every second here).
    health = await eventually(
        loaded,
        lambda found: set(found) == expected and "unknown" not in found.values(),
        what="every alert rule evaluated",
    )
    assert set(health.values()) == {"ok"}, health
