"""Alerts: rules a customer sets on a metric (or on silence), evaluated every few seconds per
device, and webhooks that tell the customer's systems.

``rules`` checks and stores what a customer asks for; ``engine`` is the loop that evaluates
them and keeps the history; ``webhooks`` queues, signs and delivers the POSTs; ``targets``
decides where a webhook may go (public addresses only, unless an operator allows a network).
"""
