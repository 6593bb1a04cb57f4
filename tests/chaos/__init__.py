"""`./dev chaos`: faults injected into the real platform, and what must hold after them.

Each experiment starts its own Postgres, NATS JetStream, Mosquitto and control plane as real
processes on free ports in a folder of its own, signs customers up over the public HTTP API
while it injects one fault (kill -9, SIGSTOP, a cut connection, a full disk), then checks,
with no operator action, that the platform converged: see ``checks.py`` for what is checked
and ``experiments.py`` for the faults. Everything it starts is stopped, and its folders
removed, on the way out, whatever happened.
"""
