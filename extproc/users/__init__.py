"""Users, their limits, and the users API."""
