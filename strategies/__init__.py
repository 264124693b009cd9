"""Pure routing algorithms: plain data in, scores out. No I/O, no gRPC."""
