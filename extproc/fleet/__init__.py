"""The pods the server knows, by name and by model."""
