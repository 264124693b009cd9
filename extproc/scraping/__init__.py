"""Pod metrics: fetching every pod's /metrics and reading the families routing needs."""
