"""The customer instance: the data plane each customer gets (built by the instance issue)."""
