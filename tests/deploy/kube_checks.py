"""What the deploy tests check rendered Kubernetes objects with, and how they render them.

Rendering: the chart with real Helm (helm-python-sdk: Helm 4's own library, offline, no cluster),
and one customer's objects with the provisioner's own ``customer_objects``, for a license really
signed for the plan.

Schemas: built-in kinds against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail); every other kind against the validators of the npm packages pinned in
tests/deploy/kube-schemas (``validate.mjs``, one node run per rendered set; unknown fields fail
there too, see its README for what is not checked); every name and label as the API server
checks them. A kind with neither schema fails: nothing passes unchecked.

checkov: over a folder of rendered objects, from its own virtualenv (.venv-checkov, made by
``./dev test`` or ``./dev checkov``), with the repository's .checkov.yaml, offline.

``python -m tests.deploy.kube_checks [folder]`` (``./dev checkov``) writes the chart's render for
every values file and one customer per plan into a folder and prints checkov's findings on each.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "iotistic"
# Values files the chart is rendered, linted and scanned with, one per shape of release: whoever
# changes values.yaml keeps them in step. Here, not in the chart's ci/ folder, because they
# carry dummy secrets, which the chart's folder must never hold (test_deploy_files.py).
CHART_VALUES = Path(__file__).resolve().parent / "chart-values"
# The custom resources' validators: npm packages installed by `./dev test` from the lock file.
KUBE_SCHEMAS = Path(__file__).resolve().parent / "kube-schemas"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
CHECKOV_CONFIG = ROOT / ".checkov.yaml"
CHECKOV_REQUIREMENTS = Path(__file__).resolve().parent / "checkov-requirements.txt"
RELEASE = "iot"
NAMESPACE = "iotistic"
PLANS = ("trial", "starter", "professional", "enterprise")
# The newest Kubernetes whose schemas kubernetes-validate carries (pinned in constraints.txt).
NEWEST_KUBERNETES = kubernetes_validate.latest_version()

# Built-in kinds that are not namespaced (what Helm leaves without a namespace).
CLUSTER_SCOPED = {
    "APIService",
    "ClusterRole",
    "ClusterRoleBinding",
    "CSIDriver",
    "CustomResourceDefinition",
    "IngressClass",
    "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding",
    "MutatingWebhookConfiguration",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PriorityClass",
    "RuntimeClass",
    "StorageClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingWebhookConfiguration",
    "VolumeAttachment",
}
# Custom kinds that are not namespaced, by (API group, kind): the validators do not say which
# are (their CRDs' scope), so it is written here for the kinds of tests/deploy/kube-schemas.
CUSTOM_CLUSTER_SCOPED = {
    ("gateway.networking.k8s.io", "GatewayClass"),
    ("cert-manager.io", "ClusterIssuer"),
}

# The API server's own checks of names and labels (apimachinery's validation), which the
# OpenAPI schemas cannot express.
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# Kinds whose names must be DNS-1123 labels (they become DNS names or label values).
LABEL_NAMED = {"Namespace", "Service", "StatefulSet"}


class ManifestError(AssertionError):
    """A rendered object the API server would refuse, or one nothing here can check."""


# --- rendering ------------------------------------------------------------------------------


def values_files() -> list[Path]:
    """The chart-values/*-values.yaml files, in name order."""
    return sorted(CHART_VALUES.glob("*-values.yaml"))


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``text``."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_chart(values: dict[str, Any], namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The chart's objects rendered by Helm with ``values`` (hooks included, NOTES left out),
    each namespaced object put in the release's namespace as `helm install -n` does."""
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=namespace)
    objects: list[dict[str, Any]] = []
    for name in sorted(files):
        if not name.endswith((".yaml", ".yml", ".json")):
            continue  # NOTES.txt: shown to the person installing, never applied
        for obj in load_documents(files[name]):
            if not cluster_scoped(obj):
                obj.setdefault("metadata", {}).setdefault("namespace", namespace)
            objects.append(obj)
    return objects


def render_chart_file(values_file: Path, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """``render_chart`` with the values of ``values_file``."""
    return render_chart(yaml.safe_load(values_file.read_text()) or {}, namespace)


@functools.cache
def _license_signer() -> Any:
    """A license signer with a key made for this process (as licensing signs, RS256)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from services.licensing.issuing import LicenseSigner
    from services.licensing.keys import load_keyring

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return LicenseSigner(load_keyring(private_key_pem=pem))


# The secrets the chart's worker gets from Secrets (dummies here); everything else comes from
# the chart as rendered with chart-values/kubernetes-backend-values.yaml.
PROVISIONER_SECRETS = {
    "PROVISIONER_SECRET": "provisioner-secret-for-the-deploy-tests",
    "USAGE_SECRET": "usage-secret-for-the-deploy-tests-000",
    "LOGIN_RELAY_SECRET": "login-relay-secret-for-the-deploy-tests",
}


@functools.cache
def provisioner_environment() -> dict[str, str]:
    """The provisioner worker's environment exactly as the chart renders it (its plain values:
    the instance image pinned by the release's digest, the control plane's Services, the
    Gateway, the namespace prefix), with dummy values for what it takes from Secrets."""
    chart = render_chart_file(CHART_VALUES / "kubernetes-backend-values.yaml")
    [worker] = [
        o
        for o in chart
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-provisioner-worker")
    ]
    [container] = worker["spec"]["template"]["spec"]["containers"]
    plain = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return {**plain, **PROVISIONER_SECRETS}


def provisioner_settings() -> Any:
    """The provisioner's settings from the chart's environment, as it reads them at start."""
    from libs.config import load_settings
    from services.provisioner.settings import ProvisionerSettings

    return load_settings(ProvisionerSettings, provisioner_environment())


def render_tenant(plan: str, customer_id: str | None = None) -> list[dict[str, Any]]:
    """One customer's objects on ``plan``, as the kubernetes backend applies them with the
    chart's provisioner settings, for a license signed for that plan (its claims carry the
    plan's limits)."""
    from services.licensing.issuing import signed_license
    from services.provisioner.app import kubernetes_settings
    from services.provisioner.backends.base import InstanceSpec
    from services.provisioner.backends.kubernetes.credentials import customer_objects

    customer_id = customer_id or str(uuid.uuid4())
    now = datetime.now(UTC)
    issued = signed_license(
        _license_signer(),
        customer_id=customer_id,
        license_id=str(uuid.uuid4()),
        plan_name=plan,
        license_type="trial_signup" if plan == "trial" else "subscription",
        issued_at=now,
        expires_at=now + timedelta(days=14 if plan == "trial" else 31),
        grace_until=None,
        reason="deploy test",
    )
    settings = provisioner_settings()
    spec = InstanceSpec(
        customer_id=customer_id,
        plan=issued.plan,
        license_jwt=issued.jwt,
        license_id=issued.license_id,
        jwks_url=settings.license_jwks_url,
        max_devices=issued.features.maxDevices,
    )
    return customer_objects(
        spec,
        kubernetes_settings(settings),
        settings.provisioner_secret.encode(),
        login_relay_secret=settings.login_relay_secret,
    )


def write_objects(objects: Iterable[dict[str, Any]], path: Path) -> int:
    """``objects`` into one multi-document YAML file at ``path``; returns how many."""
    objects = list(objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return len(objects)


def describe(obj: dict[str, Any]) -> str:
    """``Kind namespace/name``, to name an object in a message."""
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"


# --- schemas --------------------------------------------------------------------------------


def cluster_scoped(obj: dict[str, Any]) -> bool:
    """Whether ``obj``'s kind lives outside namespaces."""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return obj.get("kind") in CLUSTER_SCOPED or (group, obj.get("kind")) in CUSTOM_CLUSTER_SCOPED


@dataclass(frozen=True)
class CustomResourceResult:
    """What validate.mjs said of one object: ``source`` is the package (name@version) whose
    schema it was checked against, None when no package has its kind."""

    source: str | None
    errors: list[str]


def kube_schemas_stamp() -> Path:
    """The file `./dev test` leaves in kube-schemas/node_modules once it has installed exactly
    what package-lock.json lists (named for the lock's hash, as .venv-checkov's stamp is)."""
    digest = hashlib.sha256((KUBE_SCHEMAS / "package-lock.json").read_bytes()).hexdigest()
    return KUBE_SCHEMAS / "node_modules" / f".installed-{digest[:16]}"


def check_custom_resources(objects: list[dict[str, Any]]) -> list[CustomResourceResult]:
    """Each of ``objects`` checked by kube-schemas/validate.mjs, in one node run."""
    node = shutil.which("node")
    if node is None:
        raise ManifestError("node is missing: the custom resources' validators run on Node.js")
    if not kube_schemas_stamp().is_file():
        raise ManifestError(
            f"{KUBE_SCHEMAS / 'node_modules'} is missing or not what package-lock.json lists: "
            "`./dev test` installs it"
        )
    proc = subprocess.run(
        [node, str(KUBE_SCHEMAS / "validate.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=KUBE_SCHEMAS,
    )
    if proc.returncode != 0:
        raise ManifestError(f"validate.mjs exited {proc.returncode}: {proc.stderr[-2000:]}")
    results = json.loads(proc.stdout)
    if len(results) != len(objects):
        raise ManifestError(f"validate.mjs answered {len(results)} of {len(objects)} objects")
    return [
        CustomResourceResult(
            source=result.get("source"),
            errors=[f"{e['path'] or '/'}: {e['message']}" for e in result.get("errors", [])],
        )
        for result in results
    ]


def kubernetes_version_floor(chart: Path = CHART) -> str:
    """The oldest Kubernetes the chart says it runs on (Chart.yaml's ``kubeVersion``)."""
    constraint = str(yaml.safe_load((chart / "Chart.yaml").read_text()).get("kubeVersion", ""))
    match = re.search(r">=?\s*v?(\d+)\.(\d+)", constraint)
    if not match:
        raise ManifestError(f"Chart.yaml's kubeVersion {constraint!r} names no lower bound")
    return f"{match.group(1)}.{match.group(2)}.0"


def kubernetes_versions() -> list[str]:
    """The Kubernetes versions objects are checked against: the chart's floor and the newest."""
    return sorted({kubernetes_version_floor(), NEWEST_KUBERNETES}, key=_minor)


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def _object_meta_validator(version: str) -> jsonschema.protocols.Validator:
    """ObjectMeta's strict schema from kubernetes-validate, for custom resources' metadata."""
    package = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folder = package / f"v{version}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
    ref = {"$ref": f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(ref, registry=registry)


def _schema_version(version: str) -> str:
    """kubernetes-validate's schemas for ``version``: the newest it has at or below it."""
    wanted = _minor(version)
    return max(
        (v for v in kubernetes_validate.utils.all_versions() if _minor(v) <= wanted), key=_minor
    )


def validate(obj: dict[str, Any], version: str) -> None:
    """Raise ``ManifestError`` unless Kubernetes ``version`` (with the custom resources' kinds
    installed) would accept ``obj`` under strict field validation."""
    problems = validate_all([obj], [version])
    if problems:
        raise ManifestError("; ".join(problems))


def _validate_built_in(obj: dict[str, Any], version: str) -> bool:
    """Check ``obj``'s names and, when Kubernetes ``version`` has its kind, the object itself;
    False when it has not (a custom resource, for ``check_custom_resources``)."""
    _check_names(obj, describe(obj))
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError as exc:
        raise ManifestError(f"{describe(obj)} (Kubernetes {version}): {exc.message}") from None
    return True


def _custom_problems(
    obj: dict[str, Any], result: CustomResourceResult, versions: list[str]
) -> list[str]:
    name = describe(obj)
    if result.source is None:
        return [
            f"{name}: Kubernetes {', '.join(versions)} has no {obj.get('apiVersion')} "
            f"{obj.get('kind')}, and tests/deploy/kube-schemas has no schema for "
            f"{obj.get('apiVersion')}/{obj.get('kind')} (see its README)"
        ]
    problems = []
    if result.errors:
        problems.append(f"{name} ({result.source}): " + "; ".join(result.errors[:10]))
    # ObjectMeta as each Kubernetes version has it, too: the package's may be older or newer.
    for version in versions:
        validator = _object_meta_validator(_schema_version(version))
        for error in validator.iter_errors(obj.get("metadata")):
            path = ".".join(map(str, error.absolute_path)) or "."
            problems.append(f"{name} (Kubernetes {version} ObjectMeta): {path}: {error.message}")
    return problems


def _check_names(obj: dict[str, Any], name: str) -> None:
    meta = obj.get("metadata") or {}
    object_name = str(meta.get("name") or "")
    if not object_name:
        raise ManifestError(f"{name}: metadata.name is missing")
    pattern, limit = (
        (DNS1123_LABEL, 63) if obj.get("kind") in LABEL_NAMED else (DNS1123_SUBDOMAIN, 253)
    )
    if len(object_name) > limit or not pattern.match(object_name):
        raise ManifestError(f"{name}: name is not a DNS-1123 name of at most {limit}")
    namespace = meta.get("namespace")
    if namespace is not None and (len(namespace) > 63 or not DNS1123_LABEL.match(namespace)):
        raise ManifestError(f"{name}: namespace {namespace!r} is not a DNS-1123 label")
    for where, labels in _label_sets(obj):
        for key, value in labels.items():
            prefix, _, label = str(key).rpartition("/")
            if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
                raise ManifestError(f"{name}: {where} key {key!r} has a bad prefix")
            if len(label) > 63 or not LABEL_NAME.match(label):
                raise ManifestError(f"{name}: {where} key {key!r} is not a label name")
            text = "" if value is None else str(value)
            if len(text) > 63 or (text and not LABEL_NAME.match(text)):
                raise ManifestError(f"{name}: {where} {key}={text!r} is not a label value")


def _label_sets(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The labels of the object and of its pod template, and its selector's matchLabels."""
    yield "metadata.labels", (obj.get("metadata") or {}).get("labels") or {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    for path in (("template", "metadata", "labels"), ("selector", "matchLabels")):
        found: Any = spec
        for key in path:
            found = found.get(key) if isinstance(found, dict) else None
        if isinstance(found, dict):
            yield "spec." + ".".join(path), found
    if obj.get("kind") == "CronJob":
        template = (spec.get("jobTemplate") or {}).get("spec", {}).get("template", {})
        yield "pod template labels", (template.get("metadata") or {}).get("labels") or {}


def validate_all(objects: Iterable[dict[str, Any]], versions: Iterable[str]) -> list[str]:
    """Every problem in ``objects`` for each of ``versions``: built-in kinds checked once per
    version, and every object no version knows checked by validate.mjs, all in one node run
    (the custom resources' schemas are the same whatever the Kubernetes version)."""
    objects, versions = list(objects), list(versions)
    problems: list[str] = []
    custom: dict[int, list[str]] = {}  # object index: the versions that do not know its kind
    for version in versions:
        for index, obj in enumerate(objects):
            try:
                if not _validate_built_in(obj, version):
                    custom.setdefault(index, []).append(version)
            except ManifestError as exc:
                problems.append(str(exc))
    if custom:
        results = check_custom_resources([objects[index] for index in custom])
        for (index, unknown_to), result in zip(custom.items(), results, strict=True):
            problems += _custom_problems(objects[index], result, unknown_to)
    return problems


# --- checkov --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One check checkov failed on one object."""

    check_id: str
    check_name: str
    resource: str
    file: str

    def __str__(self) -> str:
        return f"{self.check_id} {self.check_name}: {self.resource} ({self.file})"


@dataclass(frozen=True)
class CheckovReport:
    """What checkov said about a folder."""

    failed: list[Finding]
    skipped: list[Finding]
    passed: int
    parsing_errors: int
    resource_count: int


def checkov_skips(config: Path = CHECKOV_CONFIG) -> dict[str, str]:
    """The checks .checkov.yaml skips, each with the reason written in the comments above it
    or on its line ("" when it has none)."""
    skips: dict[str, str] = {}
    reason: list[str] = []
    in_skips = False
    for line in config.read_text().splitlines():
        stripped = line.strip()
        if re.match(r"^skip-check\s*:", line):
            in_skips, reason = True, []
            continue
        if in_skips and re.match(r"^\S", line) and not stripped.startswith("#"):
            in_skips = False
        if not in_skips:
            continue
        if stripped.startswith("#"):
            reason.append(stripped.lstrip("#").strip())
            continue
        entry = re.match(r"^-\s*([A-Z0-9_]+)\s*(?:#\s*(.*))?$", stripped)
        if entry:
            inline = entry.group(2) or ""
            skips[entry.group(1)] = " ".join([*reason, inline]).strip()
            reason = []
    return skips


def checkov_version_pinned() -> str:
    """The checkov version checkov-requirements.txt pins."""
    match = re.search(r"^checkov==(\S+)$", CHECKOV_REQUIREMENTS.read_text(), re.MULTILINE)
    if not match:
        raise ManifestError(f"{CHECKOV_REQUIREMENTS} pins no checkov")
    return match.group(1)


def run_checkov(folder: Path, *, compact: bool = True) -> CheckovReport:
    """checkov's kubernetes checks over every file under ``folder``, with .checkov.yaml."""
    if not CHECKOV.is_file():
        raise ManifestError(
            f"{CHECKOV} is missing: `./dev test` (or `./dev checkov`) makes .venv-checkov from "
            "tests/deploy/checkov-requirements.txt"
        )
    command = [
        str(CHECKOV),
        "--directory",
        str(folder),
        "--framework",
        "kubernetes",
        "--config-file",
        str(CHECKOV_CONFIG),
        "--output",
        "json",
        # Offline: no guidelines or policies from Prisma Cloud.
        "--skip-download",
    ]
    if compact:
        command.append("--compact")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=folder)
    # 0: nothing failed; 1: something failed. Anything else: checkov itself broke.
    if proc.returncode not in (0, 1):
        raise ManifestError(f"checkov exited {proc.returncode}: {proc.stderr[-2000:]}")
    return _parse_report(json.loads(proc.stdout), folder)


def _parse_report(output: Any, folder: Path) -> CheckovReport:
    reports = output if isinstance(output, list) else [output]
    report = next((r for r in reports if r.get("check_type") == "kubernetes"), None)
    if report is None:
        # checkov found nothing to check: its summary alone.
        raise ManifestError(f"checkov checked no Kubernetes object under {folder}: {output}")
    results, summary = report["results"], report["summary"]

    def findings(key: str) -> list[Finding]:
        return [
            Finding(
                check_id=f["check_id"],
                check_name=f["check_name"],
                # Kind.namespace.name (a workload's pod is named with its labels after that)
                resource=".".join(f["resource"].split(".")[:3]),
                file=str(Path(f["file_abs_path"]).relative_to(folder)),
            )
            for f in results.get(key, [])
        ]

    return CheckovReport(
        failed=findings("failed_checks"),
        skipped=findings("skipped_checks"),
        passed=int(summary["passed"]),
        parsing_errors=int(summary["parsing_errors"]),
        resource_count=int(summary["resource_count"]),
    )


# --- ./dev checkov --------------------------------------------------------------------------


def rendered_sets() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(name, objects): the chart for every values file, and one customer per plan."""
    for values in values_files():
        yield f"chart-{values.name.removesuffix('-values.yaml')}", render_chart_file(values)
    for plan in PLANS:
        yield f"tenant-{plan}", render_tenant(plan)


def main(argv: list[str]) -> int:
    """Render everything and print checkov's findings; exit 1 when any check fails."""
    folder = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="iotistic-checkov-"))
    print(f"rendered into {folder}; not run (.checkov.yaml): {', '.join(checkov_skips())}")
    found = False
    for name, objects in rendered_sets():
        # A run of its own each: checkov matches NetworkPolicies to pods across namespaces and
        # files, so one set's policy would seem to cover another's pods.
        write_objects(objects, folder / name / f"{name}.yaml")
        report = run_checkov(folder / name)
        print(
            f"{name}: {len(objects)} objects, {report.passed} passed, {len(report.failed)} failed"
        )
        for finding in sorted(report.failed, key=lambda f: (f.resource, f.check_id)):
            print(f"  {finding}")
        for finding in report.skipped:
            print(f"  skipped by an annotation, not by .checkov.yaml: {finding}")
        found = found or bool(report.failed or report.skipped)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
