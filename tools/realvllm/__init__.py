"""The real-vLLM test tier: vLLM's CPU build serving a tiny random model on loopback.

setup.sh installs it (cached), server.py starts servers, the other scripts capture and check the
fixtures in tests/fixtures/vllm/.
"""
