"""The ``kubernetes`` backend: each customer's instance in a namespace of its own.

``backend`` is the backend (deploy, update, rotate, delete, status, health); ``api`` the few
Kubernetes API calls it makes; ``credentials`` the passwords it derives and records;
``readiness`` how it reads a workload's state; ``manifests`` the objects it applies, as plain
dicts; ``storage``, ``backups`` and ``grace`` the tenant's volumes, its daily dumps and its
deletion with a grace period. ``tenant_backup/`` holds the backup scripts the pods run.
"""
