"""The tenant disk alerts load and fire as intended (promtool), on the kubelet's volume stats
and the claims the provisioner renders."""

from __future__ import annotations

import re

import yaml

from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.manifests.metadata import namespace_of
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from tests.deploy.test_prometheus_rules import RULES, promtool


def test_the_tenant_storage_rules_are_valid_and_fire_when_they_should() -> None:
    checked = promtool("check", "rules", "tenant_storage.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "4 rules found" in checked.stdout
    tested = promtool("test", "rules", "tenant_storage_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_rules_select_the_namespaces_and_claims_the_provisioner_makes() -> None:
    spec = InstanceSpec(
        customer_id="c-1", plan="starter", license_jwt="a.b.c", license_id="l", jwks_url="x"
    )
    settings = KubernetesSettings()
    claims = {
        o["metadata"]["name"]
        for o in render(spec, settings, "p")
        if o["kind"] == "PersistentVolumeClaim"
    }
    assert claims == {"data-postgres-0", "backups"}
    rules = yaml.safe_load((RULES / "tenant_storage.yml").read_text())["groups"][0]["rules"]
    selectors = set()
    for rule in rules:
        selectors.update(re.findall(r'namespace=~"([^"]+)"', rule["expr"]))
    assert selectors == {"customer-.+"}
    assert re.fullmatch("customer-.+", namespace_of("c-1", settings))
