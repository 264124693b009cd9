"""The Envoy side: the ext_proc gRPC service and the exchanges that translate its messages."""
