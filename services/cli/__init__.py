"""The ``iotistic`` command, one module per command group.

``main.py`` holds the entry point and assembles the parser from each group's
``add_parser(subparsers)``: ``run``, ``up``, ``replay``, ``events``, ``bus``, ``parked``,
``provisioner`` (with ``rollout``), ``simulate`` and ``contracts``. Each group declares its
arguments next to its handler. ``environment`` and ``event_log`` are how the operator's
commands find the platform; ``data_folder`` and ``up_platform`` are what ``up`` runs.
"""
