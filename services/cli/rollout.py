"""``iotistic provisioner rollout``: every deployed customer brought to today's manifests (a
new ``INSTANCE_IMAGE``), through the queue, in batches each behind a health gate."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from rich.console import Console

from libs.config import load_settings
from services.cli.arguments import count, positive
from services.cli.environment import console, environment, settings_from

if TYPE_CHECKING:
    import asyncpg

    from services.provisioner.backends.kubernetes.backend import KubernetesBackend
    from services.provisioner.rollout import RolloutPlan, RolloutReport
    from services.provisioner.settings import ProvisionerSettings


def add_parser(pv: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``provisioner rollout``'s arguments (``pv``: the provisioner's commands)."""
    rollout = pv.add_parser(
        "rollout",
        help="bring every deployed customer to today's manifests (a new INSTANCE_IMAGE), "
        "through the queue, in batches each behind a health gate; stops on failure",
        description="Run where the provisioner runs, with its settings (INSTANCE_IMAGE, "
        "PROVISIONER_SECRET, DATABASE_URL, the cluster's credentials), once its workers run "
        "the new version: the workers apply, this command queues and gates. Customers already "
        "on today's manifests (their namespace's iotistic.io/manifest-sha256) are skipped, so "
        "a stopped rollout run again carries on. Exit 0: all updated; 1: stopped on a failure.",
    )
    rollout.add_argument("--batch-size", type=positive, default=10, help="default: %(default)s")
    rollout.add_argument(
        "--canary", type=count, default=1, help="customers in the first batch (default: 1)"
    )
    rollout.add_argument(
        "--max-failures",
        type=count,
        default=0,
        help="failed customers tolerated before stopping (default: 0)",
    )
    rollout.add_argument(
        "--only", nargs="+", metavar="CUSTOMER_ID", help="these customers only (still gated)"
    )
    rollout.add_argument(
        "--force", action="store_true", help="also those already on today's manifests"
    )
    rollout.add_argument(
        "--dry-run", action="store_true", help="list the customers and batches; queue nothing"
    )
    rollout.add_argument(
        "--batch-timeout",
        type=float,
        default=900.0,
        help="seconds a batch's jobs and health gate may take (default: %(default)s)",
    )
    rollout.add_argument(
        "--settle-seconds",
        type=float,
        default=10.0,
        help="healthy again this long after the batch was (default: %(default)s)",
    )
    rollout.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    rollout.set_defaults(func=cmd_provisioner_rollout)


def cmd_provisioner_rollout(args: argparse.Namespace) -> int:
    """``iotistic provisioner rollout``: update every deployed customer in gated batches."""
    from services.provisioner.backends.base import BackendError
    from services.provisioner.rollout import kubernetes_backend
    from services.provisioner.settings import ProvisionerSettings

    settings_from(args, needs=("DATABASE_URL",))  # says so when there is nothing to connect to
    settings = load_settings(ProvisionerSettings, environment(args))
    if settings.provisioner_backend != "kubernetes":
        console.print(
            "[red]rollout:[/red] works with PROVISIONER_BACKEND=kubernetes only: the local "
            "backend's instances are processes of this machine, not manifests to re-apply"
        )
        return 2
    if not settings.provisioner_secret:
        console.print("[red]rollout:[/red] PROVISIONER_SECRET is needed to render the manifests")
        return 2
    try:
        return asyncio.run(_rollout(args, settings, kubernetes_backend(settings)))
    except BackendError as exc:  # the cluster's API refused or is away: said in a line
        console.print(f"[red]rollout:[/red] {exc}")
        return 1


async def _rollout(
    args: argparse.Namespace, settings: ProvisionerSettings, backend: KubernetesBackend
) -> int:
    from libs.db.postgres import create_pool

    # One line per customer or batch, however long, for the operator's logs and scripts.
    out = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    pool = await create_pool(settings.database_url, "provisioner", max_size=4)
    await backend.start()
    try:
        outcome = await _plan_and_run(args, settings, backend, pool, out, err)
    finally:
        await backend.stop()
        await pool.close()
    if isinstance(outcome, int):
        return outcome
    return _print_report(outcome, out, err)


async def _plan_and_run(
    args: argparse.Namespace,
    settings: ProvisionerSettings,
    backend: KubernetesBackend,
    pool: asyncpg.Pool,
    out: Console,
    err: Console,
) -> int | RolloutReport:
    """The plan, printed, then its batches run: the report, or the exit code when there is
    nothing to run (a dry run, all up to date), a customer is not deployed, or a rollout
    already runs."""
    from services.provisioner.rollout import Rollout, RolloutBusy, plan_rollout

    plan = await plan_rollout(
        pool,
        backend,
        settings,
        only=args.only,
        force=args.force,
        batch_size=args.batch_size,
        canary=args.canary,
    )
    _print_plan(out, plan, settings.instance_image)
    if plan.not_deployed:
        err.print(
            "[red]rollout:[/red] not deployed here (unknown, closed or removed): "
            + ", ".join(plan.not_deployed)
        )
        return 1
    if args.dry_run or not plan.batches:
        return 0
    rollout = Rollout(
        pool,
        backend,
        settings,
        batch_timeout=args.batch_timeout,
        settle_seconds=args.settle_seconds,
        max_failures=args.max_failures,
        poll_seconds=args.poll_seconds,
        say=out.print,
    )
    out.print(f"rollout {rollout.rollout_id}: jobs requested by {rollout.requested_by}")
    try:
        return await rollout.run(plan)
    except RolloutBusy as exc:
        err.print(f"[red]rollout:[/red] {exc}")
        return 1


def _print_plan(out: Console, plan: RolloutPlan, image: str) -> None:
    out.print(
        f"instance image {image}: {len(plan.tenants)} to update in {len(plan.batches)} "
        f"batches, {len(plan.skipped)} already up to date"
    )
    for number, batch in enumerate(plan.batches, start=1):
        out.print(f"batch {number}: " + " ".join(f"{t.customer_id} ({t.plan})" for t in batch))
    for tenant in plan.skipped:
        out.print(f"up to date: {tenant.customer_id} ({tenant.plan})")


def _print_report(report: RolloutReport, out: Console, err: Console) -> int:
    """The rollout's outcome in a line, each failure in one: 1 when it stopped."""
    out.print(
        f"rollout {report.rollout_id}: {len(report.updated)} updated, "
        f"{len(report.failures)} failed, {len(report.left)} left (closed), "
        f"{len(report.untouched)} untouched"
    )
    if report.failures:
        for failure in report.failures:
            job = f" (job {failure.job_id})" if failure.job_id else ""
            err.print(f"[red]failed:[/red] {failure.customer_id}{job}: {failure.reason}")
    if report.stopped:
        err.print(
            "[red]rollout stopped.[/red] Fix the cause and run it again: customers already "
            "updated are skipped"
        )
        return 1
    return 0
