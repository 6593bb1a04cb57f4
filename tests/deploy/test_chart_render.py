"""The chart, rendered by real Helm: accepted by Kubernetes, clean under checkov and `helm lint
--strict`.

Helm here is helm-python-sdk, Helm 4's own library through its C API: the chart is rendered
(``helm template``) and linted (``helm lint --strict``) offline, with no cluster and no helm
binary, for its defaults and for every values file in tests/deploy/chart-values. Every object
rendered is checked against the Kubernetes OpenAPI schemas of the oldest version the chart
claims (Chart.yaml's kubeVersion) and the newest kubernetes-validate knows, and every custom
resource against the validators of the npm packages pinned in tests/deploy/kube-schemas (made
strict: a field the schema does not declare fails; CEL rules and the CRDs' scope are not
checked, see its README); an object of a kind neither knows fails.
checkov (from .venv-checkov, made by ``./dev test``) must fail no check beyond those
.checkov.yaml skips, each with its reason. Helpers: tests/deploy/kube_checks.py.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from kube_checks import (
    CHART,
    CHECKOV,
    CHECKOV_CONFIG,
    NAMESPACE,
    CheckovReport,
    ManifestError,
    checkov_skips,
    checkov_version_pinned,
    describe,
    kubernetes_versions,
    render_chart_file,
    run_checkov,
    validate,
    validate_all,
    values_files,
    write_objects,
)

VALUES = values_files()
# Helm's lint severities (helm.sh/helm/v4/pkg/chart/v2/lint/support).
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def case(values_file: Path) -> str:
    return values_file.name.removesuffix("-values.yaml")


def test_the_chart_has_values_files_for_its_main_shapes() -> None:
    # The tests below are only as good as these files: at least the defaults (with the values
    # the chart requires) and a release whose every secret the operator manages.
    assert {"defaults", "existing-secrets"} <= {case(v) for v in VALUES}, VALUES


# --- helm lint --strict ---------------------------------------------------------------------


def lint_report(values: dict[str, Any] | None) -> list[str]:
    """Every message `helm lint --strict` prints for the chart with ``values``, and its errors."""
    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE)
    messages = [
        f"[{SEVERITY.get(m['severity'], m['severity'])}] {m['path']}: {m['error']}"
        for m in report["messages"]
    ]
    return messages + [f"error: {e}" for e in report["errors"]]


def test_helm_lint_strict_is_clean_with_the_defaults() -> None:
    # Clean means nothing at all: no error, no warning (--strict fails on those) and no
    # recommendation left unheeded either.
    assert lint_report(None) == []


@pytest.mark.parametrize("values_file", VALUES, ids=case)
def test_helm_lint_strict_is_clean_with_each_values_file(values_file: Path) -> None:
    assert lint_report(yaml.safe_load(values_file.read_text())) == []


def test_helm_lint_strict_reports_a_broken_chart(tmp_path: Path) -> None:
    # The lint above can fail: a chart whose Chart.yaml lacks its version is an error.
    broken = tmp_path / "iotistic"
    subprocess.run(["cp", "-r", str(CHART), str(broken)], check=True)
    chart_yaml = yaml.safe_load((broken / "Chart.yaml").read_text())
    del chart_yaml["version"]
    (broken / "Chart.yaml").write_text(yaml.safe_dump(chart_yaml))
    report = helm_python.lint(broken, strict=True)
    assert report["errors"], report


# --- schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES, ids=case)
def test_every_object_is_accepted_by_kubernetes(values_file: Path) -> None:
    objects = render_chart_file(values_file)
    assert objects, f"{values_file.name} renders nothing"
    assert validate_all(objects, kubernetes_versions()) == []
    # Two objects of one kind and name in one namespace: the second would replace the first.
    keys = [
        (o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        for o in objects
    ]
    assert len(keys) == len(set(keys)), sorted(keys)


def gateway() -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "public", "namespace": NAMESPACE},
        "spec": {
            "gatewayClassName": "eg",
            "listeners": [
                {
                    "name": "https",
                    "protocol": "HTTPS",
                    "port": 443,
                    "hostname": "*.example.io",
                    "tls": {"certificateRefs": [{"name": "wildcard"}]},
                },
            ],
        },
    }


def custom(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": "instance", "namespace": NAMESPACE, "labels": {"app": "iotistic"}}
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec}


GATEWAY_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"}
# One ordinary object of each custom kind the chart and tenants are to use: the validators,
# with their unknown-field check, accept what is valid.
VALID_CUSTOM = [
    gateway(),
    custom(
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        {
            "parentRefs": [{"name": "public", "namespace": NAMESPACE, "sectionName": "https"}],
            "hostnames": ["c1.example.io"],
            "rules": [
                {
                    "name": "instance",
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"name": "instance", "port": 8080}],
                    "timeouts": {"request": "30s"},
                }
            ],
        },
    ),
    custom(
        "cert-manager.io/v1",
        "Certificate",
        {
            "secretName": "wildcard-tls",
            "dnsNames": ["*.example.io"],
            "issuerRef": {"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "dns01"},
        },
    ),
    custom(
        "gateway.envoyproxy.io/v1alpha1",
        "BackendTrafficPolicy",
        {
            "targetRefs": [{**GATEWAY_REF, "kind": "HTTPRoute", "name": "instance"}],
            "rateLimit": {
                "type": "Local",
                "local": {"rules": [{"limit": {"requests": 100, "unit": "Second"}}]},
            },
        },
    ),
    custom(
        "gateway.envoyproxy.io/v1alpha1",
        "ClientTrafficPolicy",
        {"targetRefs": [GATEWAY_REF], "connection": {"connectionLimit": {"value": 10000}}},
    ),
]


@pytest.mark.parametrize("obj", VALID_CUSTOM, ids=lambda o: o["kind"])
def test_the_schema_check_accepts_valid_custom_resources(obj: dict[str, Any]) -> None:
    for version in kubernetes_versions():
        validate(obj, version)


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        (lambda o: o["spec"]["listeners"][0].update(port="443"), "port: must be integer"),
        (
            lambda o: o["spec"]["listeners"][0].update(
                allowedRoutes={"namespaces": {"from": "Any"}}
            ),
            "from: must be equal to one of the allowed values: All, Selector, Same",
        ),
        (lambda o: o["spec"]["listeners"][0].update(protocol="HTTP S"), "protocol: must match"),
        (lambda o: o["spec"].pop("listeners"), "/spec: must have required property listeners"),
        (
            lambda o: o["spec"]["listeners"][0]["tls"].update(mode="Passthru"),
            "tls/mode: must be equal to one of the allowed values: Terminate, Passthrough",
        ),
        (lambda o: o["spec"].update(listners=[]), "/spec/listners: is not a field"),
        (
            lambda o: o["spec"]["listeners"][0]["tls"].update(certficateRefs=[]),
            "/spec/listeners/0/tls/certficateRefs: is not a field",
        ),
        (
            lambda o: o.update(apiVersion="gateway.networking.k8s.io/v9"),
            "no schema for gateway.networking.k8s.io/v9/Gateway",
        ),
        (
            lambda o: o.update(kind="Frobnicator"),
            "no schema for gateway.networking.k8s.io/v1/Frobnicator",
        ),
        # A part of a kind is no kind.
        (
            lambda o: o.update(kind="Listener"),
            "no schema for gateway.networking.k8s.io/v1/Listener",
        ),
        (lambda o: o["metadata"].update(name="Public_Gateway"), "DNS-1123"),
        (lambda o: o["metadata"].update(lables={}), "/metadata/lables: is not a field"),
        (lambda o: o["metadata"].update(labels={"app": "x" * 64}), "not a label value"),
    ],
    ids=[
        "wrong-type",
        "bad-enum",
        "bad-pattern",
        "missing-required",
        "bad-nested-enum",
        "unknown-field",
        "unknown-nested-field",
        "unknown-version",
        "unknown-kind",
        "part-of-a-kind",
        "bad-name",
        "bad-metadata",
        "long-label",
    ],
)
def test_the_schema_check_refuses_what_the_api_server_would(broken: Any, why: str) -> None:
    obj = gateway()
    broken(obj)
    with pytest.raises(ManifestError, match=why):
        validate(obj, kubernetes_versions()[-1])


@pytest.mark.parametrize("obj", VALID_CUSTOM, ids=lambda o: o["kind"])
def test_the_schema_check_refuses_an_unknown_field_in_every_custom_kind(
    obj: dict[str, Any],
) -> None:
    # The unknown-field check is ours (the packages' validators let unknown fields through):
    # it must reach each kind, at the top of its spec and in the first object below it.
    spec = copy.deepcopy(obj)
    spec["spec"]["shedule"] = "daily"
    nested = copy.deepcopy(obj)
    below = [v[0] if isinstance(v, list) and v else v for v in nested["spec"].values()]
    next(v for v in below if isinstance(v, dict))["shedule"] = "daily"
    for broken in (spec, nested):
        with pytest.raises(ManifestError, match="shedule: is not a field the schema declares"):
            validate(broken, kubernetes_versions()[-1])


def test_the_schema_check_leaves_free_form_values_open() -> None:
    # Where the schema says nothing of the keys (a JSON patch's value, Envoy's own), any key
    # passes: the unknown-field check only faults keys of objects whose fields it knows.
    patch = custom(
        "gateway.envoyproxy.io/v1alpha1",
        "EnvoyPatchPolicy",
        {
            "targetRef": GATEWAY_REF,
            "type": "JSONPatch",
            "jsonPatches": [
                {
                    "type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                    "name": "iotistic/public/https",
                    "operation": {
                        "op": "add",
                        "path": "/per_connection_buffer_limit_bytes",
                        "value": {"anything": {"envoy": "reads"}},
                    },
                }
            ],
        },
    )
    validate(patch, kubernetes_versions()[-1])
    patch["spec"]["jsonPatches"][0]["operation"]["valu"] = 1
    with pytest.raises(ManifestError, match="operation/valu: is not a field"):
        validate(patch, kubernetes_versions()[-1])


def test_the_schema_check_refuses_a_built_in_kind_with_an_unknown_field() -> None:
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": NAMESPACE},
        "data": {},
        "dta": {},
    }
    for version in kubernetes_versions():
        with pytest.raises(ManifestError, match="dta"):
            validate(config, version)


# --- checkov --------------------------------------------------------------------------------

# A pod checkov must fault (privileged, root, no limits): proves the run can fail.
CANARY = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "canary", "namespace": "canary"},
    "spec": {
        "containers": [
            {"name": "c", "image": "busybox:latest", "securityContext": {"privileged": True}}
        ]
    },
}


Reports = dict[str, tuple[CheckovReport, int]]


@pytest.fixture(scope="module")
def checkov_reports(tmp_path_factory: pytest.TempPathFactory) -> Reports:
    """checkov's report on the chart rendered with each values file, and on the canary, with
    how many objects each had. A run of its own each: checkov matches NetworkPolicies to pods
    across namespaces and files, so one render's policy would seem to cover another's pods."""
    reports: Reports = {}
    for values_file in VALUES:
        folder = tmp_path_factory.mktemp(case(values_file))
        written = write_objects(render_chart_file(values_file), folder / "chart.yaml")
        reports[case(values_file)] = (run_checkov(folder), written)
    folder = tmp_path_factory.mktemp("canary")
    written = write_objects([CANARY], folder / "canary.yaml")
    reports["canary"] = (run_checkov(folder), written)
    return reports


def test_checkov_is_installed_as_pinned() -> None:
    # Fails, never skips, when .venv-checkov is missing: `./dev test` makes it.
    assert CHECKOV.is_file(), f"{CHECKOV} is missing: run `./dev test` or `./dev checkov`"
    version = subprocess.run(
        [str(CHECKOV), "--version"], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    assert version == checkov_version_pinned()


def test_checkov_reads_every_object_and_faults_the_canary(checkov_reports: Reports) -> None:
    for name, (report, written) in checkov_reports.items():
        assert report.parsing_errors == 0, name
        # checkov counts each object, and the pod of each workload once more.
        assert report.resource_count >= written, name
        assert report.passed > 0, name
    canary = {f.check_id for f in checkov_reports["canary"][0].failed}
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_43"} <= canary, canary


@pytest.mark.parametrize("values_file", VALUES, ids=case)
def test_checkov_fails_no_check_on_the_chart_beyond_its_configuration(
    values_file: Path, checkov_reports: Reports
) -> None:
    report, _ = checkov_reports[case(values_file)]
    failed = sorted(str(f) for f in report.failed)
    assert failed == [], "\n" + "\n".join(failed)


def test_every_check_the_configuration_skips_says_why() -> None:
    skips = checkov_skips()
    assert skips, f"{CHECKOV_CONFIG} skips nothing: then delete skip-check"
    unexplained = [check for check, reason in skips.items() if len(reason) < 40]
    assert unexplained == [], f"give each a reason in a comment above it: {unexplained}"
    # Every entry is a check id, and the file says nothing checkov would read as a soft fail.
    config = yaml.safe_load(CHECKOV_CONFIG.read_text())
    assert sorted(config["skip-check"]) == sorted(skips)
    assert set(config) == {"skip-check"}, "only skip-check, each with its reason"


def test_every_check_the_configuration_skips_is_one_checkov_has() -> None:
    # A mistyped id would skip nothing, and read as if it did.
    listed = subprocess.run(
        [str(CHECKOV), "--list", "--framework", "kubernetes", "--skip-download"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    known = set(re.findall(r"\|\s*(CKV2?_K8S_\d+)\s*\|", listed))
    assert known, "checkov --list printed no kubernetes check"
    assert set(checkov_skips()) <= known, set(checkov_skips()) - known


def test_no_object_skips_a_check_by_itself(checkov_reports: Reports) -> None:
    # checkov also honours `checkov.io/skip*` annotations on an object: every skip belongs in
    # .checkov.yaml, with its reason, where it is seen and reviewed.
    skipped = [f"{name}: {f}" for name, (r, _) in checkov_reports.items() for f in r.skipped]
    assert skipped == []


def test_the_release_namespace_is_given_to_namespaced_objects_only() -> None:
    objects = render_chart_file(VALUES[0])
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        assert namespace in (NAMESPACE, None), describe(obj)
