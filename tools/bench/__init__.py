"""``python -m tools.bench``: measurements of routing quality and overhead, side by side."""
