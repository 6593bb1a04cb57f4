"""Rotating one customer's credentials on the kubernetes backend
(``iotistic provisioner rotate-credentials <customer_id>``).

A customer's passwords derive from ``PROVISIONER_SECRET`` and their credentials generation,
which their Namespace records (``iotistic.io/credentials-generation``) and every apply reads
back. Rotating takes the next generation and re-applies every object of the customer's: the
Secrets get the new passwords, and the pods, whose templates carry a hash of them, roll.
Postgres's start sets its roles' new passwords, the broker's moves its admin from the previous
password to the new one, the instance's start sets its ingest client's.

Not rotated: the broker client id (it names the instance's session and its queued readings),
the login relay key and the usage token (derived for every customer from signup's and
billing's secrets, which check them: they rotate with those secrets), and the devices'
passwords (the customer's own). It applies holding the queue's lock, and only when no job of
the customer's is running: a job that read the old generation before the rotation and applied
after it would put the old passwords back over the rotated ones (and leave the broker's admin,
already moved to the new password, on none the Secret holds). Jobs claimed after it read the
new generation.
"""

from __future__ import annotations

import asyncio

import asyncpg

from services.provisioner.backends.base import BackendError, InstanceSpec, Progress
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.queue import lock_queue
from services.provisioner.settings import ProvisionerSettings

# The longest the rotation's applies may hold the queue's lock.
APPLY_SECONDS = 120.0


async def instance_spec(conn: asyncpg.Connection, customer_id: str, jwks_url: str) -> InstanceSpec:
    """The customer's instance as the queue's jobs deploy it: their current license and plan
    (from the provisioner's ``customer_licenses``). Raises ``BackendError`` when the customer
    has no license or is closed."""
    row = await conn.fetchrow(
        "SELECT license_id, plan, jwt, max_devices, closed "
        "FROM provisioner.customer_licenses WHERE customer_id = $1",
        customer_id,
    )
    if row is None or row["jwt"] is None:
        # No row, or only the mark of an account closed before any license arrived.
        raise BackendError(f"no license has been issued to customer {customer_id}")
    if row["closed"]:
        raise BackendError(f"customer {customer_id}'s account is closed")
    return InstanceSpec(
        customer_id=customer_id,
        plan=row["plan"],
        license_jwt=row["jwt"],
        license_id=row["license_id"],
        jwks_url=jwks_url,
        max_devices=row["max_devices"],
    )


async def rotate_credentials(
    settings: ProvisionerSettings,
    customer_id: str,
    progress: Progress,
    backend: KubernetesBackend | None = None,
) -> int:
    """Rotate the customer's credentials and wait until their pods are ready again; returns
    the new generation. ``backend`` defaults to the one the settings make (the cluster of the
    in-cluster or kubeconfig configuration)."""
    if settings.provisioner_backend != "kubernetes" and backend is None:
        raise BackendError("rotate-credentials works with PROVISIONER_BACKEND=kubernetes only")
    if backend is None:
        from services.provisioner.app import kubernetes_backend

        backend = kubernetes_backend(settings)
    conn = await asyncpg.connect(settings.database_url)
    try:
        spec = await instance_spec(conn, customer_id, settings.license_jwks_url)
        await backend.start()
        try:
            # No job may start meanwhile (claiming waits for the lock), and none may be
            # running: its apply, with the generation it read before, would follow ours.
            async with conn.transaction():
                await lock_queue(conn)
                running = await conn.fetchval(
                    "SELECT job_id FROM provisioner.queue_jobs "
                    "WHERE customer_id = $1 AND state = 'active' LIMIT 1",
                    customer_id,
                )
                if running is not None:
                    raise BackendError(
                        f"job {running} of customer {customer_id} is running: rotate when it "
                        "has finished, so that it cannot apply the old passwords after the new"
                    )
                # Claims and enqueues wait meanwhile: not for longer than this (a rotation cut
                # off here is safe to run again: the broker keeps every earlier password).
                async with asyncio.timeout(APPLY_SECONDS):
                    generation = await backend.apply_next_credentials(spec)
        except BaseException:
            await backend.stop()
            raise
    finally:
        await conn.close()
    try:
        await progress(40, f"credentials generation {generation} applied")
        await backend.wait_ready(spec.customer_id, progress, 40)
        return generation
    finally:
        await backend.stop()
