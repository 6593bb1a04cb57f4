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
passwords (the customer's own). Run it while no job of the customer's is running: a job that
read the old generation before the rotation and applies after it puts the old passwords back
(rotating again mends it).
"""

from __future__ import annotations

import asyncpg

from services.provisioner.backends.base import BackendError, InstanceSpec, Progress
from services.provisioner.backends.k8s import KubernetesBackend
from services.provisioner.settings import ProvisionerSettings


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
    conn = await asyncpg.connect(settings.database_url)
    try:
        spec = await instance_spec(conn, customer_id, settings.license_jwks_url)
    finally:
        await conn.close()
    if backend is None:
        from services.provisioner.app import kubernetes_backend

        backend = kubernetes_backend(settings)
    await backend.start()
    try:
        return await backend.rotate_credentials(spec, progress)
    finally:
        await backend.stop()
