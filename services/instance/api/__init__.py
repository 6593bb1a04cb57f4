"""The instance's HTTP API, one controller per resource.

Every ``/api`` route takes the customer's own session (``access.customer_session``, a guard
that also counts the request against the license's ``apiRequestsPerDay``); routes that change
something are also refused while the instance is read-only (``access.read_write``). Handlers
get the instance's parts as the ``instance`` dependency (``services.instance.state``).
"""
