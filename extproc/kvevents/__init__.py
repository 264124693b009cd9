"""vLLM KV-cache events: the block-hash recipe, shared by the simulator and the router."""
