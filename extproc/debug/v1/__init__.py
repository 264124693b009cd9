"""Generated from protos/extproc/debug/v1/debug.proto by ``python -m tools.gen_protos``."""
