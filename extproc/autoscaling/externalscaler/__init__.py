"""Generated from protos/extproc/autoscaling/externalscaler/externalscaler.proto (KEDA's
external scaler interface) by ``python -m tools.gen_protos``."""
