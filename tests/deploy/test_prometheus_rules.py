"""The queue's alert rules load and fire as intended (Debian's promtool), on our metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from libs.runtime.supervision import restart_counter
from services.provisioner.metrics import HealthMetrics, QueueMetrics

RULES = Path(__file__).parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: apt-get install prometheus (the CI script does)"
    return subprocess.run([binary, *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 rules found" in result.stdout


def test_the_rules_fire_when_they_should_and_only_then() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_name_only_metrics_the_provisioner_exports() -> None:
    registry = CollectorRegistry()
    QueueMetrics(registry)
    exported = set()
    for family in registry.collect():
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"QueueBacklogHigh", "HighFailureRate", "NoActiveWorkers"}
    used = set()
    for rule in rules:
        used.update(re.findall(r"\b(deployment_[a-z_]+)", rule["expr"]))
    assert used, "the rules use no queue metric"
    assert used <= exported | {f"{name}_count" for name in exported}, used - exported


def test_the_instance_health_rule_names_a_metric_the_health_watch_exports() -> None:
    registry = CollectorRegistry()
    HealthMetrics(registry)
    exported = {family.name for family in registry.collect()}
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    [rule] = next(g for g in groups if g["name"] == "iotistic-instance-health")["rules"]
    used = set(re.findall(r"\b(instances?_[a-z_]+)", rule["expr"]))
    assert used == {"instances_unhealthy"} and used <= exported, (used, exported)


def test_the_supervision_rule_names_the_metric_the_supervisors_export() -> None:
    registry = CollectorRegistry()
    restart_counter(registry)
    # A labelled counter has no samples until used: its family names it.
    exported = {f"{family.name}_total" for family in registry.collect() if family.type == "counter"}
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    [rule] = next(g for g in groups if g["name"] == "iotistic-supervision")["rules"]
    used = set(re.findall(r"\b(iotistic_[a-z_]+)", rule["expr"]))
    assert used == {"iotistic_task_restarts_total"} and used <= exported, (used, exported)


def test_the_capacity_rules_name_the_metrics_the_provisioner_exports() -> None:
    registry = CollectorRegistry()
    metrics = QueueMetrics(registry)
    metrics.show_capacity(running=3, capacity=None, waiting=0)
    samples = {s.name: s.value for f in registry.collect() for s in f.samples}
    # No limit is +Inf: running / capacity is 0, never "nearly full".
    assert samples["iotistic_instances_capacity"] == float("inf")
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    rules = next(g for g in groups if g["name"] == "iotistic-capacity")["rules"]
    assert {r["alert"] for r in rules} == {
        "InstanceCapacityNearlyFull",
        "DeploymentsWaitingForCapacity",
    }
    used = {name for r in rules for name in re.findall(r"\b(iotistic_[a-z_]+)", r["expr"])}
    assert used == {
        "iotistic_instances_running",
        "iotistic_instances_capacity",
        "iotistic_deployments_waiting_for_capacity",
    }
    assert used <= set(samples), used - set(samples)
