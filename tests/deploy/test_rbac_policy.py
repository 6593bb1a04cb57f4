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
from k8s_standin import KubeStandIn
from kubernetes_asyncio import client as k8s

from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.api import tenant_api
from services.provisioner.backends.kubernetes.backend import REPLACED, WORKLOADS, KubernetesBackend
from services.provisioner.backends.kubernetes.credentials import customer_objects
from services.provisioner.backends.kubernetes.grace import BACKUP_JOB
from services.provisioner.backends.kubernetes.grace import ROUTES as GRACE_ROUTES
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backups import run_restore, run_restore_drill
from services.provisioner.settings import parse_tenant_reader
from support import serving
from tests.deploy.test_chart_control_plane import signing_key

CHART = Path(__file__).resolve().parents[2] / "charts" / "iotistic"
RELEASE, NAMESPACE = "rel", "iot"
WORKER = "rel-iotistic-provisioner-worker"
WORKER_USER = f"system:serviceaccount:{NAMESPACE}:{WORKER}"
# The ClusterRole of the worker's reads inside tenant namespaces, bound in each by a RoleBinding.
READER = f"{WORKER}-tenant-reader"
RBAC = "rbac.authorization.k8s.io"
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
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "Role": ("rbac.authorization.k8s.io", "roles"),
    "ClusterRole": ("rbac.authorization.k8s.io", "clusterroles"),
}


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


# As the chart's provisioner env sets them (checked in test_the_worker_is_told_its_reader_role).
TENANT_SETTINGS = KubernetesSettings(base_domain=DOMAIN, tenant_reader=(READER, NAMESPACE, WORKER))


TENANT_SPEC = InstanceSpec(
    customer_id=CUSTOMER,
    plan="starter",
    license_jwt="header.claims.signature",
    license_id="lic-1",
    jwks_url="http://licensing/.well-known/jwks.json",
)


def tenant_objects() -> list[dict[str, Any]]:
    return customer_objects(TENANT_SPEC, TENANT_SETTINGS, b"k" * 40, "r" * 40)


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
    role = one(chart, "ClusterRole", WORKER)
    rights = granted(role)
    # Every kind of the tenant manifests is applied (a server-side apply that creates the
    # object is also authorised as `create`), the reader RoleBinding included.
    objects = tenant_objects()
    assert "RoleBinding" in {o["kind"] for o in objects}
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        plural = KINDS[obj["kind"]][1]
        assert {"create", "patch"} <= rights.get((group, plural), set()), obj["kind"]
    # Nothing beyond: no watch, no wildcard; delete only on namespaces, what backend.py removes as
    # replaced and the routes a grace-period deletion takes down. The admission policy sees no
    # reads, so a get or list here is cluster-wide: only of namespaces (cluster-scoped anyway;
    # the purge lists them). Every read inside a namespace is the reader role's (below).
    verbs = set().union(*rights.values())
    assert verbs == {"get", "list", "create", "patch", "delete", "bind"}
    deleted = {key for key, v in rights.items() if "delete" in v}
    assert deleted == {
        KINDS["Namespace"],
        *(KINDS[kind] for _, kind, _ in REPLACED),
        *(KINDS[kind] for _, kind, _ in GRACE_ROUTES),
    }
    assert {key for key, v in rights.items() if v & {"get", "list", "watch"}} == {
        KINDS["Namespace"]
    }
    assert not any("*" in group or "*" in resource for group, resource in rights)
    # RBAC: its tenants' RoleBindings, and `bind` on the reader role alone (by name).
    assert {key: v for key, v in rights.items() if key[0] == RBAC} == {
        (RBAC, "rolebindings"): {"create", "patch"},
        (RBAC, "clusterroles"): {"bind"},
    }
    [bind] = [r for r in role["rules"] if "bind" in r["verbs"]]
    assert bind == {
        "apiGroups": [RBAC],
        "resources": ["clusterroles"],
        "verbs": ["bind"],
        "resourceNames": [READER],
    }
    assert all("resourceNames" not in r for r in role["rules"] if r is not bind)
    assert "serviceaccounts" not in {resource for _, resource in rights}
    binding = one(chart, "ClusterRoleBinding", WORKER)
    assert binding["roleRef"]["name"] == WORKER
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": WORKER, "namespace": NAMESPACE}
    ]


def test_the_reader_role_holds_the_reads_inside_a_tenant_and_is_bound_nowhere(
    chart: list[dict[str, Any]],
) -> None:
    reader = granted(one(chart, "ClusterRole", READER))
    # What kubernetes/ (backend, grace, storage) and backups.py read inside a namespace: the
    # workloads a deploy waits for and the health watch reads (and a grace period scales to
    # 0), the volumes' sizes, the backup CronJob (suspended in a grace period), a drill's Job
    # and its pods (the summary); traced call by call in
    # test_the_reader_role_holds_exactly_the_reads_the_backend_makes.
    assert reader == {
        **{KINDS[kind]: {"get"} for kind, _ in WORKLOADS},
        KINDS["PersistentVolumeClaim"]: {"get"},
        KINDS[BACKUP_JOB[1]]: {"get"},
        KINDS["Job"]: {"get"},
        KINDS["Pod"]: {"list"},
    }
    # No ClusterRoleBinding (nor anything of the chart) binds it: only each tenant's RoleBinding.
    for obj in chart:
        if obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            assert obj["roleRef"]["name"] != READER, obj["metadata"]["name"]


def traced(
    requests: list[dict[str, Any]], method: str
) -> dict[str, dict[tuple[str, str], set[str]]]:
    """The (group, plural) -> verbs of the ``method`` requests the stand-in recorded, inside a
    namespace ("namespaced") or not ("cluster")."""
    out: dict[str, dict[tuple[str, str], set[str]]] = {"namespaced": {}, "cluster": {}}
    verbs = {"PATCH": "patch", "DELETE": "delete"}
    for r in requests:
        if r["method"] != method:
            continue
        parts = r["path"].strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        inside = rest[0] == "namespaces" and len(rest) > 2
        resource = rest[2:] if inside else rest
        verb = verbs.get(method) or ("get" if len(resource) > 1 else "list")
        where = out["namespaced" if inside else "cluster"]
        where.setdefault((group, resource[0]), set()).add(verb)
    return out


async def test_the_reader_role_holds_exactly_the_reads_the_backend_makes(
    chart: list[dict[str, Any]],
) -> None:
    """Every call of the backend (deploy, update, rotation, health and status, a grace-period
    deletion and its purge, taking a customer back, erasure) and of the restore drill and
    restore, traced on the STAND-IN API server (tests/k8s_standin.py) with its labelled
    authorizer on (a read inside a namespace needs the reader RoleBinding there): the reads
    inside a namespace are exactly the reader role's; outside, the worker's ClusterRole's,
    namespaces only; and every write is the worker's ClusterRole's."""
    standin = KubeStandIn(reader_role=READER)
    async with serving(standin.app()) as http:
        url = str(http.base_url)

        async def client() -> k8s.ApiClient:
            configuration = k8s.Configuration(host=url)
            configuration.api_key = {"BearerToken": standin.token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
            return k8s.ApiClient(configuration)

        async def noop(percent: int, step: str) -> None:
            return None

        backend = KubernetesBackend(
            TENANT_SETTINGS, b"k" * 40, client, ready_timeout=20, poll_seconds=0.05
        )
        await backend.start()
        try:
            await backend.deploy(TENANT_SPEC, noop)
            await backend.update(TENANT_SPEC, noop)
            await backend.rotate_credentials(TENANT_SPEC, noop)
            assert (await backend.health(CUSTOMER)).healthy
            assert (await backend.status(CUSTOMER))["release"] == "deployed"
            jobs = await client()
            try:
                api = tenant_api(jobs, TENANT_SETTINGS)
                drill = await run_restore_drill(api, CUSTOMER, TENANT_SETTINGS, 20, 0.05)
                restore = await run_restore(api, CUSTOMER, TENANT_SETTINGS, 20, 0.05)
                assert drill.succeeded and restore.succeeded
            finally:
                await jobs.close()
            await backend.delete(CUSTOMER, noop)
            assert (await backend.status(CUSTOMER))["release"] == "deleted"
            assert await backend.purge_expired() == []
            await backend.deploy(TENANT_SPEC, noop)
            await backend.delete(CUSTOMER, noop, erase=True)
        finally:
            await backend.stop()
    reads = traced(standin.requests, "GET")
    reader = granted(one(chart, "ClusterRole", READER))
    assert reads["namespaced"] == reader
    worker = granted(one(chart, "ClusterRole", WORKER))
    assert reads["cluster"] == {KINDS["Namespace"]: {"get", "list"}}
    assert all(verbs <= worker[key] for key, verbs in reads["cluster"].items())
    for method in ("PATCH", "DELETE"):
        for scope in traced(standin.requests, method).values():
            for key, verbs in scope.items():
                assert verbs <= worker.get(key, set()), (method, key)


def test_the_tenants_reader_binding_binds_the_reader_role_to_the_worker_there() -> None:
    objects = tenant_objects()
    assert [o["kind"] for o in objects[:2]] == ["Namespace", "RoleBinding"]
    binding = objects[1]
    assert binding["metadata"]["namespace"] == TENANT
    assert binding["roleRef"] == {"apiGroup": RBAC, "kind": "ClusterRole", "name": READER}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": WORKER, "namespace": NAMESPACE}
    ]
    kubernetes_validate.validate(copy.deepcopy(binding), K8S_VERSION, strict=True)


def test_the_worker_is_told_its_reader_role(chart: list[dict[str, Any]]) -> None:
    env = env_of(one(chart, "Deployment", WORKER))
    settings = parse_tenant_reader(
        env["KUBERNETES_TENANT_READER_ROLE"], env["KUBERNETES_WORKER_SERVICE_ACCOUNT"]
    )
    assert settings == TENANT_SETTINGS.tenant_reader
    # The web pods, which never apply, are told the same (one provisioner environment).
    web = env_of(one(chart, "Deployment", "rel-iotistic-provisioner"))
    assert web["KUBERNETES_TENANT_READER_ROLE"] == READER


def rolebinding(
    ns: str = TENANT,
    role: str = READER,
    role_kind: str = "ClusterRole",
    subjects: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": f"{RBAC}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "iotistic-provisioner-reads", "namespace": ns},
        "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role},
        "subjects": subjects
        if subjects is not None
        else [{"kind": "ServiceAccount", "name": WORKER, "namespace": NAMESPACE}],
    }


def test_the_policy_admits_the_tenants_own_reader_binding(policy: Policy) -> None:
    [binding] = [o for o in tenant_objects() if o["kind"] == "RoleBinding"]
    for operation in ("CREATE", "UPDATE"):
        verdict = write(policy, binding, operation)
        assert verdict.matched and verdict.allowed, (operation, verdict)
    # As the API server hands it over, defaulted: a ServiceAccount subject's apiGroup "".
    defaulted = rolebinding(
        subjects=[
            {"kind": "ServiceAccount", "apiGroup": "", "name": WORKER, "namespace": NAMESPACE}
        ]
    )
    assert write(policy, defaulted).allowed


@pytest.mark.parametrize(
    ("binding", "why"),
    [
        (rolebinding(role="cluster-admin"), "cluster-admin"),
        (rolebinding(role="admin"), "admin"),
        (rolebinding(role=WORKER), "the worker's own ClusterRole"),
        (rolebinding(role=READER, role_kind="Role"), "a Role of the same name"),
        (
            rolebinding(
                subjects=[{"kind": "ServiceAccount", "name": "default", "namespace": TENANT}]
            ),
            "the tenant's own pods",
        ),
        (
            rolebinding(
                subjects=[{"kind": "ServiceAccount", "name": WORKER, "namespace": "other"}]
            ),
            "a ServiceAccount of the same name elsewhere",
        ),
        (
            rolebinding(
                subjects=[
                    {"kind": "ServiceAccount", "name": WORKER, "namespace": NAMESPACE},
                    {"kind": "Group", "apiGroup": RBAC, "name": "system:authenticated"},
                ]
            ),
            "the worker and everyone",
        ),
        (
            rolebinding(subjects=[{"kind": "User", "apiGroup": RBAC, "name": WORKER_USER}]),
            "a User named like the worker",
        ),
        (rolebinding(subjects=[]), "no subject"),
    ],
)
def test_the_policy_refuses_any_other_binding_in_a_tenant(
    policy: Policy, binding: dict[str, Any], why: str
) -> None:
    for operation in ("CREATE", "UPDATE"):
        verdict = write(policy, binding, operation)
        assert verdict.matched and not verdict.allowed, (why, operation)
        assert any(f"may only bind {READER} to itself" in r for r in verdict.refusals), verdict


@pytest.mark.parametrize("where", ["kube-system", "default", NAMESPACE, "customer-"])
def test_the_policy_refuses_the_reader_binding_outside_tenant_namespaces(
    policy: Policy, where: str
) -> None:
    binding = rolebinding(ns=where)
    verdict = policy.admit(
        request("CREATE", "RoleBinding", binding["metadata"]["name"], where),
        obj=binding,
        namespace=namespace(where),
    )
    assert verdict.matched and not verdict.allowed, verdict
    assert f"rolebindings iotistic-provisioner-reads in namespace {where}" in " ".join(
        verdict.refusals
    )
    # Nor in a customer-* namespace the provisioner did not make.
    theirs = namespace("customer-portal", {"team": "web"})
    elsewhere = policy.admit(
        request("CREATE", "RoleBinding", "x", "customer-portal"),
        obj=rolebinding(ns="customer-portal"),
        namespace=theirs,
    )
    assert not elsewhere.allowed


@pytest.mark.parametrize(
    ("operation", "kind", "ns"),
    [
        ("DELETE", "RoleBinding", TENANT),
        ("CREATE", "Role", TENANT),
        ("CREATE", "ClusterRole", ""),
        ("UPDATE", "ClusterRole", ""),
        ("CREATE", "ClusterRoleBinding", ""),
    ],
)
def test_the_policy_refuses_every_other_rbac_write(
    policy: Policy, operation: str, kind: str, ns: str
) -> None:
    obj = {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": {"name": READER}}
    if ns:
        obj["metadata"]["namespace"] = ns
    verdict = policy.admit(
        request(operation, kind, READER, ns),
        obj=None if operation == "DELETE" else obj,
        old=None if operation == "CREATE" else obj,
        namespace=TENANT_NAMESPACE if ns else None,
    )
    assert verdict.matched and not verdict.allowed, verdict
    assert any("may only bind" in r for r in verdict.refusals), verdict


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
    # Its token is no automatic mount but a projected volume of its own: bound to the pod,
    # expiring within the hour, at the path the in-cluster client reads.
    assert pod["serviceAccountName"] == WORKER and pod["automountServiceAccountToken"] is False
    [access] = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
    [token] = [
        s["serviceAccountToken"]
        for s in access["projected"]["sources"]
        if "serviceAccountToken" in s
    ]
    assert token["path"] == "token" and token["expirationSeconds"] <= 3600
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kube-api-access"]
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert "kube-api-access" not in [v["name"] for v in web["spec"]["template"]["spec"]["volumes"]]
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
    assert checked == 7  # the two ClusterRoles


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
