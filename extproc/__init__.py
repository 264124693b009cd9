"""LLM routing ext_proc server for Envoy."""

__version__ = "0.1.0"
