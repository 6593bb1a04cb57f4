"""The provisioner's least privilege on Kubernetes: its worker, its ClusterRole and the
ValidatingAdmissionPolicy that confines it to customer namespaces.

The chart is rendered by Helm's own library (helm-python-sdk) and the objects are checked
against the Kubernetes schemas (kubernetes-validate). No API server runs here, so the policy's
CEL is evaluated by a real CEL implementation (cel-python, ``celpy``) against admission requests
shaped as the API server builds them (``request``, ``object``, ``oldObject``,
``namespaceObject``, ``variables`` composed in order): what the provisioner applies for a
customer is admitted, anything else it might try is refused, and other users' requests are not
matched. celpy is not the API server's cel-go: it shows what the expressions mean, not that a
given Kubernetes version accepts them (the schema check and ``helm lint`` do what they can there).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import helm_python
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.k8s import REPLACED, WORKLOADS, customer_objects
from services.provisioner.backends.k8s_manifests import KubernetesSettings

CHART = Path(__file__).resolve().parents[2] / "charts" / "iotistic"
RELEASE, NAMESPACE = "rel", "iot"
WORKER = "rel-iotistic-provisioner-worker"
WORKER_USER = f"system:serviceaccount:{NAMESPACE}:{WORKER}"
K8S_VERSION = "1.30.0"
CUSTOMER = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
TENANT = f"customer-{CUSTOMER}"
TENANT_LABELS = {"iotistic.io/tenant": "true", "pod-security.kubernetes.io/enforce": "restricted"}
DOMAIN = "example.com"
# Group and plural of every kind the tenant manifests hold (and the backend applies).
KINDS = {
    "Namespace": ("", "namespaces"),
    "ResourceQuota": ("", "resourcequotas"),
    "LimitRange": ("", "limitranges"),
    "Secret": ("", "secrets"),
    "Service": ("", "services"),
    "ConfigMap": ("", "configmaps"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
    "Deployment": ("apps", "deployments"),
    "StatefulSet": ("apps", "statefulsets"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "Ingress": ("networking.k8s.io", "ingresses"),
    "CronJob": ("batch", "cronjobs"),
    "Job": ("batch", "jobs"),
    "HTTPRoute": ("gateway.networking.k8s.io", "httproutes"),
    "BackendTrafficPolicy": ("gateway.envoyproxy.io", "backendtrafficpolicies"),
    "Pod": ("", "pods"),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io", "clusterrolebindings"),
}


@cache
def signing_key() -> str:
    """A 2048-bit license key made once, so that renders need not make a 4096-bit one each."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def chart_values(provisioner: dict[str, Any] | None) -> dict[str, Any]:
    values: dict[str, Any] = {"baseDomain": DOMAIN, "secrets": {"licensePrivateKey": signing_key()}}
    if provisioner is not None:
        values["targets"] = {"provisioner": provisioner}
    return values


def render(kubernetes: bool = True, **provisioner: Any) -> list[dict[str, Any]]:
    """Every object of the chart, as a first install, with the kubernetes backend (unless
    ``kubernetes`` is false) and ``provisioner`` values merged into targets.provisioner."""
    target: dict[str, Any] = {"kubernetesBackend": {"enabled": True}} if kubernetes else {}
    target.update(provisioner)
    files = helm_python.Chart.load(str(CHART)).render(
        chart_values(target), name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    return [
        doc
        for name, text in files.items()
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.fixture(scope="module")
def chart() -> list[dict[str, Any]]:
    return render()


# --- the admission policy, evaluated -----------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    matched: bool
    refusals: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.refusals


class Policy:
    """A ValidatingAdmissionPolicy's match conditions, variables and validations, compiled by
    celpy and evaluated as the API server does (failurePolicy Fail: an error refuses)."""

    def __init__(self, policy: dict[str, Any]) -> None:
        self.spec = policy["spec"]
        env = celpy.Environment()
        self._programs: dict[str, Any] = {}
        for item in (
            *self.spec["matchConditions"],
            *self.spec["variables"],
            *self.spec["validations"],
        ):
            self._compile(env, item["expression"])
            if "messageExpression" in item:
                self._compile(env, item["messageExpression"])

    def _compile(self, env: celpy.Environment, expression: str) -> None:
        self._programs[expression] = env.program(env.compile(expression))

    def _eval(self, expression: str, activation: Mapping[str, Any]) -> Any:
        try:
            return self._programs[expression].evaluate(dict(activation))
        except CELEvalError as exc:
            return exc

    def admit(
        self,
        request: dict[str, Any],
        obj: dict[str, Any] | None = None,
        old: dict[str, Any] | None = None,
        namespace: dict[str, Any] | None = None,
    ) -> Verdict:
        activation: dict[str, Any] = {
            "request": json_to_cel(request),
            "object": json_to_cel(obj),
            "oldObject": json_to_cel(old),
            "namespaceObject": json_to_cel(namespace),
        }
        for condition in self.spec["matchConditions"]:
            result = self._eval(condition["expression"], activation)
            assert isinstance(result, celtypes.BoolType), (condition["name"], result)
            if not result:
                return Verdict(matched=False)
        composed: dict[celtypes.StringType, Any] = {}
        for variable in self.spec["variables"]:
            activation["variables"] = celtypes.MapType(composed)
            value = self._eval(variable["expression"], activation)
            # The API server composes variables lazily; none of these may err when read.
            assert not isinstance(value, CELEvalError), (variable["name"], value)
            composed[celtypes.StringType(variable["name"])] = value
        activation["variables"] = celtypes.MapType(composed)
        refusals = []
        for validation in self.spec["validations"]:
            result = self._eval(validation["expression"], activation)
            if isinstance(result, celtypes.BoolType) and result:
                continue
            message = self._eval(validation["messageExpression"], activation)
            assert isinstance(message, str), (validation, message)
            # An error would refuse too (failurePolicy Fail), but these expressions are written
            # so that none of them errs on any request: one that does is a bug here.
            assert isinstance(result, celtypes.BoolType), (validation["expression"], result)
            refusals.append(message)
        return Verdict(matched=True, refusals=tuple(refusals))


@pytest.fixture(scope="module")
def policy(chart: list[dict[str, Any]]) -> Policy:
    return Policy(one(chart, "ValidatingAdmissionPolicy", f"{WORKER}-tenants-only"))


def request(
    operation: str,
    kind: str,
    name: str,
    namespace: str = "",
    user: str = WORKER_USER,
    sub_resource: str = "",
) -> dict[str, Any]:
    """An AdmissionRequest as the API server hands it to CEL."""
    group, resource = KINDS[kind]
    return {
        "uid": "0",
        "operation": operation,
        "userInfo": {"username": user, "groups": ["system:serviceaccounts"]},
        "kind": {"group": group, "version": "v1", "kind": kind},
        "resource": {"group": group, "version": "v1", "resource": resource},
        "subResource": sub_resource,
        "name": name,
        "namespace": namespace,
        "dryRun": False,
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Namespace as the API server holds it (no labels: no ``labels`` key)."""
    meta: dict[str, Any] = {"name": name, **({"labels": labels} if labels else {})}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


TENANT_NAMESPACE = namespace(TENANT, {**TENANT_LABELS, "iotistic.io/customer-id": CUSTOMER})


def write(policy: Policy, obj: dict[str, Any], operation: str = "CREATE") -> Verdict:
    """The provisioner's worker applying ``obj`` (CREATE, or UPDATE of the same object)."""
    meta = obj["metadata"]
    ns = meta.get("namespace", "")
    is_namespace = obj["kind"] == "Namespace"
    return policy.admit(
        request(operation, obj["kind"], meta["name"], "" if is_namespace else ns),
        obj=obj,
        old=obj if operation == "UPDATE" else None,
        namespace=None if is_namespace or not ns else TENANT_NAMESPACE,
    )


def tenant_objects() -> list[dict[str, Any]]:
    spec = InstanceSpec(
        customer_id=CUSTOMER,
        plan="starter",
        license_jwt="header.claims.signature",
        license_id="lic-1",
        jwks_url="http://licensing/.well-known/jwks.json",
    )
    return customer_objects(spec, KubernetesSettings(base_domain=DOMAIN), b"k" * 40, "r" * 40)


def test_the_worker_may_apply_everything_of_a_customer_inside_their_namespace(
    policy: Policy,
) -> None:
    objects = tenant_objects()
    assert all(o["metadata"].get("namespace", TENANT) == TENANT for o in objects)
    for obj in objects:
        if obj["kind"] == "Namespace":
            continue
        for operation in ("CREATE", "UPDATE"):
            verdict = write(policy, obj, operation)
            assert verdict.matched and verdict.allowed, (obj["kind"], operation, verdict)


def test_the_tenant_namespace_the_backend_renders_is_admitted(policy: Policy) -> None:
    [ns] = [o for o in tenant_objects() if o["kind"] == "Namespace"]
    labels = ns["metadata"].get("labels") or {}
    assert TENANT_LABELS.items() <= labels.items()
    assert write(policy, ns).allowed
    assert write(policy, ns, "UPDATE").allowed


def test_the_worker_may_remove_what_an_older_version_applied(policy: Policy) -> None:
    for api_version, kind, name in REPLACED:
        old = {
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": name, "namespace": TENANT},
        }
        verdict = policy.admit(
            request("DELETE", kind, name, TENANT), old=old, namespace=TENANT_NAMESPACE
        )
        assert verdict.matched and verdict.allowed, (kind, verdict)
        elsewhere = policy.admit(
            request("DELETE", kind, name, "default"), old=old, namespace=namespace("default")
        )
        assert not elsewhere.allowed, kind


def test_a_labelled_customer_namespace_may_be_made_changed_and_deleted(policy: Policy) -> None:
    assert write(policy, TENANT_NAMESPACE).allowed
    assert write(policy, TENANT_NAMESPACE, "UPDATE").allowed
    # DELETE: object is null, the namespace as it is comes in oldObject.
    deleted = policy.admit(request("DELETE", "Namespace", TENANT), old=TENANT_NAMESPACE)
    assert deleted.matched and deleted.allowed, deleted
    # One the provisioner made before the tenant label existed: its re-apply adds it.
    older = namespace(TENANT, {"app.kubernetes.io/managed-by": "iotistic-provisioner"})
    relabel = policy.admit(request("UPDATE", "Namespace", TENANT), obj=TENANT_NAMESPACE, old=older)
    assert relabel.allowed, relabel


@pytest.mark.parametrize(
    ("labels", "why"),
    [
        ({"iotistic.io/tenant": "true"}, "no Pod Security label"),
        ({"pod-security.kubernetes.io/enforce": "restricted"}, "no tenant label"),
        ({**TENANT_LABELS, "pod-security.kubernetes.io/enforce": "baseline"}, "baseline"),
        ({**TENANT_LABELS, "pod-security.kubernetes.io/enforce": "privileged"}, "privileged"),
        ({**TENANT_LABELS, "pod-security.kubernetes.io/enforce-version": "v1.24"}, "old rules"),
        ({**TENANT_LABELS, "iotistic.io/tenant": "yes"}, "tenant label not 'true'"),
        (None, "no labels at all"),
    ],
)
def test_a_customer_namespace_without_the_labels_is_refused(
    policy: Policy, labels: dict[str, str] | None, why: str
) -> None:
    unlabelled = namespace(TENANT, labels)
    created = write(policy, unlabelled)
    assert not created.allowed, why
    assert any("pod-security.kubernetes.io/enforce: restricted" in r for r in created.refusals)
    # Nor may a re-apply take the labels off a tenant namespace.
    stripped = policy.admit(
        request("UPDATE", "Namespace", TENANT), obj=unlabelled, old=TENANT_NAMESPACE
    )
    assert not stripped.allowed, why


@pytest.mark.parametrize("name", ["default", "kube-system", "iot", "customer-", "customers", "x"])
def test_other_namespaces_may_not_be_made_changed_or_deleted(policy: Policy, name: str) -> None:
    other = namespace(name, TENANT_LABELS)
    for verdict in (
        write(policy, other),
        write(policy, other, "UPDATE"),
        policy.admit(request("DELETE", "Namespace", name), old=namespace(name)),
        policy.admit(request("DELETE", "Namespace", name), old=other),
    ):
        assert verdict.matched and not verdict.allowed, (name, verdict)
        assert any("may change only namespaces named customer-<id>" in r for r in verdict.refusals)


def test_a_customer_namespace_someone_else_made_is_not_the_provisioners(policy: Policy) -> None:
    theirs = namespace("customer-portal", {"team": "web"})
    for verdict in (
        policy.admit(request("DELETE", "Namespace", "customer-portal"), old=theirs),
        policy.admit(
            request("UPDATE", "Namespace", "customer-portal"),
            obj=namespace("customer-portal", TENANT_LABELS),
            old=theirs,
        ),
    ):
        assert not verdict.allowed
        assert any("was not made by the provisioner" in r for r in verdict.refusals), verdict
    secret = {"kind": "Secret", "metadata": {"name": "s", "namespace": "customer-portal"}}
    inside = policy.admit(
        request("CREATE", "Secret", "s", "customer-portal"), obj=secret, namespace=theirs
    )
    assert not inside.allowed
    assert any("may not change what is in it" in r for r in inside.refusals)


@pytest.mark.parametrize("operation", ["CREATE", "UPDATE", "DELETE"])
@pytest.mark.parametrize("where", ["kube-system", "default", NAMESPACE, "customer-"])
def test_namespaced_objects_outside_customer_namespaces_are_refused(
    policy: Policy, operation: str, where: str
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": where}}
    verdict = policy.admit(
        request(operation, "Secret", "x", where),
        obj=None if operation == "DELETE" else secret,
        old=None if operation == "CREATE" else secret,
        namespace=namespace(where),
    )
    assert verdict.matched and not verdict.allowed, verdict
    assert f"secrets x in namespace {where}" in " ".join(verdict.refusals)


def test_cluster_scoped_objects_and_subresources_elsewhere_are_refused(policy: Policy) -> None:
    binding = {"kind": "ClusterRoleBinding", "metadata": {"name": "me-admin"}}
    verdict = policy.admit(request("CREATE", "ClusterRoleBinding", "me-admin"), obj=binding)
    assert not verdict.allowed and "(cluster-scoped)" in verdict.refusals[0]
    scale = policy.admit(
        request("UPDATE", "Deployment", "coredns", "kube-system", sub_resource="scale"),
        obj={"kind": "Scale", "spec": {"replicas": 0}},
        old={"kind": "Scale", "spec": {"replicas": 2}},
        namespace=namespace("kube-system"),
    )
    assert not scale.allowed
    execute = policy.admit(
        request("CONNECT", "Pod", "etcd-0", "kube-system", sub_resource="exec"),
        obj={"kind": "PodExecOptions", "command": ["sh"]},
        namespace=namespace("kube-system"),
    )
    assert not execute.allowed


def deployment(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "instance", "namespace": TENANT},
        "spec": {"template": {"spec": pod_spec}},
    }


def container(**security: Any) -> dict[str, Any]:
    return {"name": "c", "image": "x", "securityContext": security}


@pytest.mark.parametrize(
    "pod_spec",
    [
        {"containers": [container(privileged=True)]},
        {"containers": [container(allowPrivilegeEscalation=True)]},
        {"containers": [container(capabilities={"add": ["SYS_ADMIN"]})]},
        {"containers": [container()], "initContainers": [container(privileged=True)]},
        {"containers": [container()], "hostNetwork": True},
        {"containers": [container()], "hostPID": True},
        {"containers": [container()], "hostIPC": True},
        {"containers": [container()], "volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
    ],
)
def test_privileged_or_host_workloads_are_refused_even_in_a_customer_namespace(
    policy: Policy, pod_spec: dict[str, Any]
) -> None:
    verdict = write(policy, deployment(pod_spec))
    assert not verdict.allowed
    assert any("may not run privileged" in r for r in verdict.refusals), verdict
    cron = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "backup", "namespace": TENANT},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": pod_spec}}}},
    }
    assert not write(policy, cron).allowed
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": TENANT}, "spec": pod_spec}
    assert not write(policy, pod).allowed


def test_an_ordinary_hardened_workload_is_admitted(policy: Policy) -> None:
    hardened = container(
        allowPrivilegeEscalation=False,
        privileged=False,
        capabilities={"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
    )
    spec = {
        "containers": [hardened],
        "hostNetwork": False,
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
    }
    assert write(policy, deployment(spec)).allowed


def test_the_worker_may_not_mint_service_account_tokens(policy: Policy) -> None:
    token = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/service-account-token",
        "metadata": {
            "name": "t",
            "namespace": TENANT,
            "annotations": {"kubernetes.io/service-account.name": "default"},
        },
    }
    verdict = write(policy, token)
    assert not verdict.allowed and "service-account tokens" in verdict.refusals[0]


@pytest.mark.parametrize(
    "user",
    [
        "system:serviceaccount:kube-system:namespace-controller",
        f"system:serviceaccount:{NAMESPACE}:rel-iotistic-provisioner",  # the web pods' name
        f"system:serviceaccount:other:{WORKER}",
        "admin@example.com",
    ],
)
def test_other_users_are_not_matched(policy: Policy, user: str) -> None:
    verdict = policy.admit(
        request("DELETE", "Namespace", "default", user=user), old=namespace("default")
    )
    assert not verdict.matched


def test_the_policy_follows_the_prefix_and_the_release() -> None:
    objects = render(kubernetesBackend={"enabled": True, "namespacePrefix": "tenant-"})
    tenant_policy = Policy(one(objects, "ValidatingAdmissionPolicy", f"{WORKER}-tenants-only"))
    ns = namespace("tenant-a", TENANT_LABELS)
    assert write(tenant_policy, ns).allowed
    assert not write(tenant_policy, namespace(TENANT, TENANT_LABELS)).allowed
    # The worker makes the namespaces the policy admits: the same prefix reaches it.
    worker = one(objects, "Deployment", WORKER)
    assert env_of(worker)["KUBERNETES_NAMESPACE_PREFIX"] == "tenant-"
    with pytest.raises(Exception, match="namespacePrefix"):
        render(kubernetesBackend={"enabled": True, "namespacePrefix": 'x" || true || "'})


# --- the rendered objects ----------------------------------------------------------------------


def test_the_policy_is_bound_to_deny_and_fails_closed(chart: list[dict[str, Any]]) -> None:
    policy = one(chart, "ValidatingAdmissionPolicy", f"{WORKER}-tenants-only")
    assert policy["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert policy["spec"]["failurePolicy"] == "Fail"
    [rule] = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["operations"] == ["CREATE", "UPDATE", "DELETE", "CONNECT"]
    # "*/*": every resource and subresource (the API server takes it only alone).
    assert rule["resources"] == ["*/*"] and rule["apiGroups"] == ["*"]
    binding = one(chart, "ValidatingAdmissionPolicyBinding", f"{WORKER}-tenants-only")
    assert binding["spec"] == {
        "policyName": f"{WORKER}-tenants-only",
        "validationActions": ["Deny"],
    }
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_yaml["kubeVersion"] == ">=1.30.0-0"  # admissionregistration.k8s.io/v1 VAP


def granted(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_the_cluster_role_grants_only_what_the_backend_does(chart: list[dict[str, Any]]) -> None:
    rights = granted(one(chart, "ClusterRole", WORKER))
    # Every kind of the tenant manifests is applied (a server-side apply that creates the
    # object is also authorised as `create`).
    for obj in tenant_objects():
        group = obj["apiVersion"].rpartition("/")[0]
        plural = KINDS[obj["kind"]][1]
        assert {"create", "patch"} <= rights.get((group, plural), set()), obj["kind"]
    # Nothing beyond: no list/watch, no wildcard, delete only on namespaces and what k8s.py
    # removes as replaced, and get only on what the backend reads (the admission policy sees
    # no reads: a get is cluster-wide).
    verbs = set().union(*rights.values())
    assert verbs == {"get", "create", "patch", "delete"}
    deleted = {key for key, v in rights.items() if "delete" in v}
    assert deleted == {KINDS["Namespace"], *(KINDS[kind] for _, kind, _ in REPLACED)}
    read = {key for key, v in rights.items() if "get" in v}
    # What k8s.py reads: the namespace, and the workloads it waits for and watches.
    assert read == {KINDS["Namespace"], *(KINDS[kind] for kind, _ in WORKLOADS)}
    assert not any("*" in group or "*" in resource for group, resource in rights)
    forbidden = {"roles", "rolebindings", "clusterroles", "clusterrolebindings", "serviceaccounts"}
    assert not {resource for _, resource in rights} & forbidden
    binding = one(chart, "ClusterRoleBinding", WORKER)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": WORKER, "namespace": NAMESPACE}
    ]


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    [main] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in main.get("env", [])}


def test_only_the_worker_pods_hold_a_token_and_only_they_apply(chart: list[dict[str, Any]]) -> None:
    web = one(chart, "Deployment", "rel-iotistic-provisioner")
    worker = one(chart, "Deployment", WORKER)
    assert web["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in web["spec"]["template"]["spec"]
    assert env_of(web)["PROVISIONER_WORKER"] == "false"
    pod = worker["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == WORKER and pod["automountServiceAccountToken"] is True
    # checkov's "tokens only where necessary" is told why here, on the one workload with one.
    skip = worker["metadata"]["annotations"]["checkov.io/skip1"]
    assert skip.startswith("CKV_K8S_38=")
    assert env_of(worker)["PROVISIONER_WORKER"] == "true"
    assert env_of(worker)["PROVISIONER_BACKEND"] == "kubernetes"
    assert [e["name"] for e in pod["containers"][0]["env"]].count("PROVISIONER_WORKER") == 1
    assert pod["containers"][0]["args"] == ["run", "--target", "provisioner"]
    # No Service selects the worker; the provisioner's Service selects the web pods only.
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    for service in (o for o in chart if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert not selector.items() <= worker_labels.items(), service["metadata"]["name"]
    web_service = one(chart, "Service", "rel-iotistic-provisioner")
    assert web_service["spec"]["selector"].items() <= (
        web["spec"]["template"]["metadata"]["labels"].items()
    )
    # Its own bus password is the provisioner's.
    [bus] = [v for v in pod["volumes"] if v["name"] == "bus-credentials"]
    assert bus["secret"]["items"] == [{"key": "provisioner", "path": "provisioner"}]
    service_account = one(chart, "ServiceAccount", WORKER)
    assert service_account["automountServiceAccountToken"] is False  # pods ask for it


def test_the_workers_settings_follow_the_provisioners() -> None:
    objects = render(
        extraEnv=[
            {"name": "PROVISIONER_WORKER", "value": "false"},
            {"name": "MAX_INSTANCES", "value": "500"},
        ],
        worker={"replicas": 2, "extraEnv": [{"name": "QUEUE_CONCURRENCY", "value": "5"}]},
    )
    worker = one(objects, "Deployment", WORKER)
    assert worker["spec"]["replicas"] == 2
    env = env_of(worker)
    assert (env["MAX_INSTANCES"], env["QUEUE_CONCURRENCY"]) == ("500", "5")
    assert env["PROVISIONER_WORKER"] == "true"
    assert env_of(one(objects, "Deployment", "rel-iotistic-provisioner"))["MAX_INSTANCES"] == "500"


def test_the_chart_refuses_web_pods_that_would_apply() -> None:
    with pytest.raises(Exception, match="PROVISIONER_WORKER"):
        render(extraEnv=[{"name": "MAX_INSTANCES", "value": "500"}])


def test_without_the_kubernetes_backend_the_worker_runs_without_rights() -> None:
    objects = render(kubernetes=False)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy"}
    pod = one(objects, "Deployment", WORKER)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod


def test_the_objects_are_valid_kubernetes(chart: list[dict[str, Any]]) -> None:
    mine = {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    checked = 0
    for obj in chart:
        if obj["kind"] in mine or obj["metadata"]["name"] == WORKER:
            kubernetes_validate.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)
            checked += 1
    assert checked == 6


def test_helm_lint_strict_is_clean_with_the_kubernetes_backend() -> None:
    values = chart_values({"kubernetesBackend": {"enabled": True}})
    result = helm_python.lint(str(CHART), values, strict=True, quiet=True)
    assert list(result["errors"]) == [], result
    ours = [m for m in result["messages"] if m["severity"] > 1 and "dependencies" not in m["error"]]
    assert ours == [], result


# --- attacks (tests/security/test_issue14_attacks.py has the rest) ------------------------------


def _service(name: str, **spec: Any) -> dict[str, Any]:
    ports = [{"name": "http", "port": 80, "targetPort": 8080}]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {"selector": {"app.kubernetes.io/name": "instance"}, "ports": ports, **spec},
    }


@pytest.mark.parametrize(
    ("service", "why"),
    [
        # CVE-2020-8554: every node sends the cluster's traffic for 169.254.169.254 (or any
        # address: the control plane's Postgres, a cloud API) to this Service's pods instead.
        (_service("steal", externalIPs=["169.254.169.254"]), "externalIPs"),
        # Straight to the world, past the Gateway (its TLS, rate and connection limits): a
        # tenant's Postgres or broker on a public load balancer, or on every node's port.
        (_service("public", type="LoadBalancer"), "a load balancer"),
        (_service("nodes", type="NodePort"), "a port on every node"),
        # A name in the tenant's namespace for anything the cluster resolves (the control
        # plane's Postgres), which an HTTPRoute on the public Gateway may then point at.
        (
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "alias", "namespace": TENANT},
                "spec": {
                    "type": "ExternalName",
                    "externalName": f"rel-iotistic-postgresql.{NAMESPACE}.svc.cluster.local",
                },
            },
            "ExternalName",
        ),
    ],
)
def test_the_worker_may_not_make_services_that_reach_beyond_the_tenant(
    policy: Policy, service: dict[str, Any], why: str
) -> None:
    """The policy confines the worker to tenant namespaces, yet a Service there is not confined
    to them: these would let a worker that is taken over reach out of its confinement."""
    for operation in ("CREATE", "UPDATE"):
        verdict = write(policy, service, operation)
        assert verdict.matched and not verdict.allowed, (why, operation)


@pytest.mark.parametrize("kind", ["PersistentVolumeClaim", "StatefulSet", "Deployment"])
def test_the_worker_may_not_claim_a_volume_by_name(policy: Policy, kind: str) -> None:
    """A claim naming a PersistentVolume binds that volume, whoever's data it holds (one
    pre-provisioned for another namespace, say): the worker's claims are provisioned anew."""
    claim = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
        "volumeName": "pvc-of-the-control-planes-postgres",
    }
    if kind == "PersistentVolumeClaim":
        obj: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": kind,
            "metadata": {"name": "data", "namespace": TENANT},
            "spec": claim,
        }
    elif kind == "StatefulSet":
        [obj] = [
            copy.deepcopy(o)
            for o in tenant_objects()
            if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "postgres"
        ]
        obj["spec"]["volumeClaimTemplates"][0]["spec"]["volumeName"] = claim["volumeName"]
    else:  # a generic ephemeral volume: its claim is made by a controller, from the pod's
        [obj] = [copy.deepcopy(o) for o in tenant_objects() if o["kind"] == "Deployment"]
        obj["spec"]["template"]["spec"]["volumes"].append(
            {"name": "stolen", "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}
        )
    operations = ("CREATE",) if kind != "Deployment" else ("CREATE", "UPDATE")
    for operation in operations:
        verdict = write(policy, obj, operation)
        assert verdict.matched and not verdict.allowed, (kind, operation)


@pytest.mark.parametrize(
    "host",
    [
        f"api.{DOMAIN}",
        f"another-customer.{DOMAIN}",
        f"{CUSTOMER}.evil.{DOMAIN}",
        f"{CUSTOMER}x.{DOMAIN}",
        f"{CUSTOMER}.{DOMAIN}.evil.com",
        None,
    ],
)
def test_the_worker_may_not_route_another_host_from_a_tenant(
    policy: Policy, host: str | None
) -> None:
    """The tenants listener (*.<baseDomain>) takes routes from every tenant namespace. A
    worker taken over could give a tenant's route the host of another customer (a more
    specific path than theirs wins) or api.<baseDomain>, which browsers reach over an HTTP/2
    connection opened to a tenant's host (one certificate covers both, the address is the
    same): the control plane's sign-in page served from a pod of the worker's choosing."""
    [route] = [copy.deepcopy(o) for o in tenant_objects() if o["kind"] == "HTTPRoute"]
    assert route["spec"]["hostnames"] == [f"{CUSTOMER}.{DOMAIN}"]
    # None: no hostnames at all, which answers for every host of the listener.
    route["spec"]["hostnames"] = [host] if host else []
    route["spec"]["rules"][0]["matches"] = [
        {"path": {"type": "Exact", "value": "/api/customers/login"}}
    ]
    verdict = write(policy, route)
    assert verdict.matched and not verdict.allowed
