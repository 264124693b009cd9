"""What an autoscaler needs from the gateway: per-model load signals on ``/metrics`` and KEDA's
external scaler on the gRPC port. The scaling itself stays with Kubernetes (HPA, KEDA)."""
