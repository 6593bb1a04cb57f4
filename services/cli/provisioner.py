"""``iotistic provisioner``: the provisioner's tools for the kubernetes backend: a customer's
manifests as YAML, backup restores and drills, the purge of deleted customers' namespaces,
credential rotation, and (``rollout``) every customer brought to today's manifests."""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from libs.config import load_settings
from services.cli import rollout
from services.cli.arguments import count
from services.cli.environment import console, environment

if TYPE_CHECKING:
    from services.provisioner.backends.base import InstanceSpec
    from services.provisioner.settings import ProvisionerSettings


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``provisioner``'s commands and their arguments."""
    provisioner = subparsers.add_parser("provisioner", help="the provisioner's tools")
    pv = provisioner.add_subparsers(dest="provisioner_command", required=True)
    _add_render(pv)
    _add_restores(pv)
    purge = pv.add_parser(
        "purge", help="delete the namespaces of deleted customers whose grace period is over"
    )
    purge.set_defaults(func=cmd_provisioner_purge)
    rotate = pv.add_parser(
        "rotate-credentials",
        help="give a customer's instance new database and broker passwords (kubernetes)",
    )
    rotate.add_argument("customer_id", help="the customer whose credentials to rotate")
    rotate.set_defaults(func=cmd_provisioner_rotate_credentials)
    rollout.add_parser(pv)


def _add_render(pv: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    render = pv.add_parser(
        "render", help="print a customer's Kubernetes manifests as YAML (for GitOps)"
    )
    render.add_argument("customer_id", help="the customer whose manifests to print")
    render.add_argument(
        "--license-file", help="the license JWT to put in (default: the customer's current one)"
    )
    render.add_argument("--plan", default="starter", help="plan, with --license-file")
    render.add_argument(
        "--include-secrets",
        action="store_true",
        help="also print the Secrets (license, passwords, tokens: values in clear text)",
    )
    render.add_argument(
        "--credentials-generation",
        type=count,
        default=0,
        help="the customer's credentials generation (its namespace's "
        "iotistic.io/credentials-generation; 0 until rotated)",
    )
    render.set_defaults(func=cmd_provisioner_render)


def _add_restores(pv: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    drill = pv.add_parser(
        "restore-drill",
        help="restore a customer's newest backup into a scratch database, count it, report",
    )
    drill.add_argument("customer_id", help="the customer whose newest backup to restore")
    drill.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait for the drill's Job"
    )
    drill.set_defaults(func=cmd_provisioner_restore_drill)
    restore = pv.add_parser(
        "restore",
        help="put a customer's backup back over their database (the instance stopped meanwhile)",
    )
    restore.add_argument("customer_id", help="the customer whose data to put back")
    restore.add_argument("--dump", help="the dump's file name (default: the newest intact one)")
    restore.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds to wait for the restore's Job (default: %(default)s)",
    )
    restore.add_argument(
        "--yes", action="store_true", help="yes, replace the customer's data with the dump's"
    )
    restore.set_defaults(func=cmd_provisioner_restore)


def cmd_provisioner_render(args: argparse.Namespace) -> int:
    """``iotistic provisioner render <customer_id>``: the manifests the kubernetes backend
    applies, as YAML, made by the same backend the provisioner runs (so the same passwords,
    keys and tokens); Secrets only with ``--include-secrets``."""
    from services.provisioner.app import kubernetes_backend
    from services.provisioner.backends.base import BackendError, InstanceSpec
    from services.provisioner.backends.kubernetes.manifests.metadata import CREDENTIALS_GENERATION
    from services.provisioner.backends.kubernetes.manifests.render import render_yaml
    from services.provisioner.settings import ProvisionerSettings

    settings = load_settings(ProvisionerSettings, environment(args))
    if not settings.provisioner_secret:
        console.print("[red]PROVISIONER_SECRET is needed: the passwords derive from it[/red]")
        return 1
    if args.license_file:
        spec = InstanceSpec(
            customer_id=args.customer_id,
            plan=args.plan,
            license_jwt=Path(args.license_file).read_text().strip(),
            license_id="given",
            jwks_url=settings.license_jwks_url,
        )
    else:
        try:
            spec = asyncio.run(_current_spec(settings, args.customer_id))
        except BackendError as exc:
            raise SystemExit(str(exc)) from None
    objects = kubernetes_backend(settings).objects(spec, args.credentials_generation)
    if not args.include_secrets:
        objects = [o for o in objects if o["kind"] != "Secret"]
    for obj in objects:
        if obj["kind"] == "Namespace":
            # The generation is the provisioner's record of the customer's last rotation: this
            # output applied (GitOps, kubectl) must never set it back, or the next job applies
            # the old passwords, which the broker's admin has left behind.
            obj["metadata"].get("annotations", {}).pop(CREDENTIALS_GENERATION, None)
    sys.stdout.write(render_yaml(objects))
    return 0


async def _current_spec(settings: ProvisionerSettings, customer_id: str) -> InstanceSpec:
    from services.provisioner.rotation import instance_spec

    conn = await asyncpg.connect(settings.database_url)
    try:
        return await instance_spec(conn, customer_id, settings.license_jwks_url)
    finally:
        await conn.close()


def cmd_provisioner_restore_drill(args: argparse.Namespace) -> int:
    """``iotistic provisioner restore-drill <customer_id>``: a Job in the customer's namespace
    restores their newest dump into a scratch database and counts it; waits and prints how it
    went. 0 when the drill passed."""
    from services.provisioner.backups import run_restore_drill

    return _backup_job(args, "restore drill", run_restore_drill)


def cmd_provisioner_restore(args: argparse.Namespace) -> int:
    """``iotistic provisioner restore <customer_id> --yes``: a Job puts the newest intact dump
    (or ``--dump``) back over the customer's database, the instance stopped meanwhile."""
    from services.provisioner.backups import run_restore

    if not args.yes:
        console.print("this replaces the customer's data with the dump's: add --yes to go on")
        return 2
    return _backup_job(args, "restore", functools.partial(run_restore, dump=args.dump))


def _on_cluster(what: str, use: Callable[[Any], Awaitable[Any]]) -> tuple[bool, Any]:
    """``use`` with a client of the cluster (in-cluster, else the kubeconfig), closed after;
    (False, None) when the cluster refused or is away, said in one line."""
    from services.provisioner.backends.base import BackendError
    from services.provisioner.backends.kubernetes.api import cluster_client

    async def go() -> Any:
        client = await cluster_client()
        try:
            return await use(client)
        finally:
            await client.close()

    try:
        return True, asyncio.run(go())
    except BackendError as exc:
        console.print(f"[red]{what} failed:[/red] {exc}", highlight=False)
        return False, None


def _backup_job(args: argparse.Namespace, what: str, run: Callable[..., Awaitable[Any]]) -> int:
    from services.provisioner.app import kubernetes_settings
    from services.provisioner.backends.kubernetes.api import tenant_api
    from services.provisioner.settings import ProvisionerSettings

    settings = load_settings(ProvisionerSettings, environment(args))
    kube = kubernetes_settings(settings)
    ok, result = _on_cluster(
        what,
        lambda client: run(
            tenant_api(client, kube), args.customer_id, kube, timeout=args.timeout, poll=2.0
        ),
    )
    if not ok:
        return 1
    verdict = "[green]passed[/green]" if result.succeeded else "[red]FAILED[/red]"
    console.print(f"{what} {result.namespace}/{result.job}: {verdict}", soft_wrap=True)
    summary = result.summary or "(no summary: see `kubectl logs` of the Job)"
    console.print(summary, markup=False, soft_wrap=True)
    return 0 if result.succeeded else 1


def cmd_provisioner_purge(args: argparse.Namespace) -> int:
    """``iotistic provisioner purge``: delete deleted customers' namespaces past their grace
    period (the provisioner also does it every hour); idempotent."""
    from services.provisioner.backends.kubernetes.api import KubeApi
    from services.provisioner.backends.kubernetes.grace import purge_expired

    ok, purged = _on_cluster("purge", lambda client: purge_expired(KubeApi(client)))
    if not ok:
        return 1
    for name in purged:
        console.print(f"purged namespace {name}", markup=False, soft_wrap=True)
    console.print(f"{len(purged)} namespace(s) purged")
    return 0


def cmd_provisioner_rotate_credentials(args: argparse.Namespace) -> int:
    """``iotistic provisioner rotate-credentials <customer_id>``: the customer's next
    credentials generation, applied, and their pods ready again with it."""
    from services.provisioner.backends.base import BackendError
    from services.provisioner.rotation import rotate_credentials
    from services.provisioner.settings import ProvisionerSettings

    settings = load_settings(ProvisionerSettings, environment(args))
    if not settings.provisioner_secret:
        console.print("[red]PROVISIONER_SECRET is needed: the passwords derive from it[/red]")
        return 1

    async def progress(percent: int, step: str) -> None:
        console.print(f"{percent:3d}% {step}")

    try:
        generation = asyncio.run(rotate_credentials(settings, args.customer_id, progress))
    except BackendError as exc:
        console.print(f"[red]rotate-credentials:[/red] {exc}")
        return 1
    console.print(f"customer {args.customer_id}: credentials generation {generation}, pods ready")
    return 0
