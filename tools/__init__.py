"""Developer tools: vLLM simulator, local stack, benchmark harness, code generation."""
