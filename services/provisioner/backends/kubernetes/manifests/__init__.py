"""The Kubernetes objects of one customer's instance, as plain dicts, in the order they apply.

Namespace ``customer-<id>`` with a ResourceQuota (4 CPU / 4Gi) and LimitRange; NetworkPolicies
that isolate it (in: its own pods, and the shared Gateway's Envoy proxies to the instance's
HTTP port and the broker's WebSockets port only; out: its own pods and the cluster DNS), and
one that lets the instance pods, and only them, out to the control plane's HTTP targets
(signup, billing, licensing: their HTTP port only, never NATS or Postgres) and to public HTTPS
(alert webhooks), never to private, loopback, link-local, shared or reserved addresses nor the
cluster's own networks; Secrets for the license, the database, the broker and monitoring;
Postgres as a StatefulSet whose data volume is sized by the plan (``kubernetes.storage``), a
"backups" volume and the daily backup CronJob with its scripts (``kubernetes.backups``);
Mosquitto on 1883 and 9001, with the platform's message size and queue limits; the instance
Deployment and Service; an Envoy Gateway BackendTrafficPolicy (a request rate per client
address, connections sized by the licensed devices) and an HTTPRoute ``<id>.<BASE_DOMAIN>`` on
the chart's shared Gateway (Gateway API; one wildcard certificate there, none per customer),
which also carries MQTT over WebSockets at ``wss://<id>.<BASE_DOMAIN>/mqtt`` to the broker: the
way devices outside the cluster reach it. ``render`` is pure: the same customer, license and
password give the same objects, so applying them again (a retried job, an update) converges. A
new license changes the instance pod template's annotation, which rolls the Deployment.

Hardening: the namespace enforces Pod Security "restricted" and is labelled a tenant; every
container runs non-root with a read-only root, no capabilities and RuntimeDefault seccomp, no
pod gets a service-account token; Postgres and Mosquitto images are pinned by digest. The
instance connects to Postgres as a role of its own (owner of its database, no other power);
the superuser's password is in a Secret only the Postgres pod mounts. Passwords rotate by the
customer's credentials generation (recorded on the Namespace); a hash of them on each pod
template rolls the pods that use them. The instance Deployment recreates its one pod rather
than rolling, because two pods would share one MQTT client id.

One module per concern: ``render`` puts the whole set together in apply order (and writes it
as YAML); ``settings`` holds the cluster's choices; ``metadata`` the names, labels and
annotations every object carries; ``namespace`` the Namespace, its quota, limits and the
worker's reads; ``network`` the NetworkPolicies; ``gateway`` the HTTPRoute and its traffic
policy; ``secrets`` the Secrets; ``pods`` what every workload shares (security contexts,
volume claims, Services); ``postgres`` (and the scripts it runs, ``postgres_scripts``),
``mosquitto`` and ``instance`` the three workloads.
"""
