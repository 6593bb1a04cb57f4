"""Integrations: the customer's own systems, sent what happens to their data as it happens
(readings stored, and the events of ``integration_events``), and, on request, the past.

``store`` checks and keeps what a customer asks for (``{name, url, kinds}``, a signing secret
shown once); ``sender`` is the loop that POSTs, live and backfills alike, each integration from
its own position (``positions``), retried with backoff; ``backfills`` replays a range of stored
readings to an integration at a bounded rate from a persisted cursor.
"""
