"""Personal data sealed with a per-customer data key held outside the log (``vault``)."""
