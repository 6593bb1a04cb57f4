"""Each customer's objects, for every plan: accepted by Kubernetes and clean under checkov.

The objects are the kubernetes backend's own (``customer_objects``, what it applies), for a
license really signed for each plan, with the provisioner's settings as the chart gives them.
They are checked against the Kubernetes OpenAPI schemas of the oldest version the chart claims
and the newest kubernetes-validate knows, custom resources against the validators pinned in
tests/deploy/kube-schemas (an unknown kind or field fails), and checkov (from .venv-checkov, made by
``./dev test``) must fail no check beyond those .checkov.yaml skips, each with its reason.
Helpers: tests/deploy/kube_checks.py.
"""

from __future__ import annotations

import uuid

import pytest
from kube_checks import (
    PLANS,
    CheckovReport,
    describe,
    kubernetes_versions,
    render_tenant,
    run_checkov,
    validate_all,
    write_objects,
)

from services.licensing.plans import PLANS as PLAN_TABLE


def test_every_plan_is_rendered() -> None:
    assert set(PLANS) == set(PLAN_TABLE)


@pytest.mark.parametrize("plan", PLANS)
def test_every_object_is_accepted_by_kubernetes(plan: str) -> None:
    customer = str(uuid.uuid4())
    objects = render_tenant(plan, customer)
    assert objects
    assert validate_all(objects, kubernetes_versions()) == []
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    assert len(namespaces) == 1
    namespace = namespaces[0]["metadata"]["name"]
    assert customer in namespace
    # Everything else lives in the customer's namespace, and nothing is there twice.
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        namespace
    }, [describe(o) for o in objects]
    keys = [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), sorted(keys)


Reports = dict[str, tuple[CheckovReport, int]]


@pytest.fixture(scope="module")
def checkov_reports(tmp_path_factory: pytest.TempPathFactory) -> Reports:
    """checkov's report on one customer of each plan, with how many objects it had. A run of its
    own each: checkov matches NetworkPolicies to pods across namespaces and files, so one
    customer's policy would seem to cover another's pods."""
    reports: Reports = {}
    for plan in PLANS:
        folder = tmp_path_factory.mktemp(plan)
        written = write_objects(render_tenant(plan), folder / f"{plan}.yaml")
        reports[plan] = (run_checkov(folder), written)
    return reports


def test_checkov_reads_every_object(checkov_reports: Reports) -> None:
    for plan, (report, written) in checkov_reports.items():
        assert report.parsing_errors == 0, plan
        assert report.resource_count >= written, plan
        assert report.passed > 0, plan
        # Every skip belongs in .checkov.yaml, never in an object's checkov.io/skip annotation.
        assert [str(f) for f in report.skipped] == [], plan


@pytest.mark.parametrize("plan", PLANS)
def test_checkov_fails_no_check_beyond_its_configuration(
    plan: str, checkov_reports: Reports
) -> None:
    report, _ = checkov_reports[plan]
    failed = sorted(str(f) for f in report.failed)
    assert failed == [], "\n" + "\n".join(failed)
