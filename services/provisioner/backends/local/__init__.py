"""The ``local`` backend: each customer's instance as supervised processes on this machine.

Per customer: a database and a role of its own in the shared Postgres (the role may connect to
no other database), a role and a client of its own on the shared Mosquitto (dynamic security,
bound to a client id of its own), a folder with its license file and log, and an instance
process (``python -m services.instance``, which is ``iotistic run --target instance`` without
the rest of the command) on a port of its own, restarted if it dies. The passwords, the broker
client id and the instance's monitoring token are derived from ``PROVISIONER_SECRET`` (HMAC), so
a retried job converges on the same ones and nothing secret is stored. An instance ends with
the provisioner that started it (its parent-death signal), so nothing outlives ``iotistic up``.
Should one still be running when the provisioner starts (it outlived a provisioner of an earlier
version, say), it is found by the marker in its environment and kept only if it runs with
exactly the settings it would be given now; else it is stopped and started again with them, so
instances follow the platform's addresses.

One module per concern: ``backend`` is the backend (deploy, update, delete, status, health,
capacity); ``database`` and ``broker`` the instance's database and broker client;
``environment`` what its process is started with; ``ports`` where it listens; ``processes``
the processes kept running, found again and stopped; ``readiness`` whether one answers ready;
``capacity`` how many this machine holds.
"""
