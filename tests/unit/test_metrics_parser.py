"""The parser on real-format exposition text: current and old vLLM names, SGLang, odd pages."""

from __future__ import annotations

import pytest

from extproc.scraping.parser import MetricsParseError, parse

# The shape prometheus_client gives vLLM >= 0.10 (two engines, to check that series are summed).
CURRENT_VLLM = b"""# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 11520.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 600.0
# HELP vllm:prompt_tokens Number of prefill tokens processed.
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="llama"} 5000.0
# HELP vllm:generation_tokens Number of generation tokens processed.
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="llama"} 700.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="llama"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="llama"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="llama"} 1.5
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 10.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="llama"} 10.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="llama"} 20.0
# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="llama"} 10.0
vllm:request_queue_time_seconds_count{engine="0",model_name="llama"} 10.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="llama"} 0.5
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="8192"} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{running_lora_adapters="sql-lora,chat",waiting_lora_adapters="x"} 1.8e9
"""

OLD_VLLM = b"""# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="llama"} 0.5
# HELP vllm:gpu_prefix_cache_queries_total GPU prefix cache queries.
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{model_name="llama"} 40.0
"""

SGLANG = b"""# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen"} 7.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen"} 2.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen"} 0.42
"""


def test_current_vllm_names_summed_over_engines() -> None:
    m = parse(CURRENT_VLLM)
    assert (m.running, m.waiting, m.kv_cache_usage) == (5.0, 4.0, 0.25)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (1000.0, 600.0)
    assert (m.prompt_tokens, m.generation_tokens) == (5000.0, 700.0)
    assert m.ttft is not None and (m.ttft.sum, m.ttft.count) == (1.5, 10.0)
    assert m.e2e_latency is not None and m.e2e_latency.sum == 20.0
    assert m.queue_time is not None and m.queue_time.sum == 0.5
    assert (m.block_size, m.num_gpu_blocks) == (16, 8192)
    assert m.running_adapters == ("sql-lora", "chat")
    assert m.waiting_adapters == ("x",)


def test_old_vllm_names_are_the_fallback() -> None:
    m = parse(OLD_VLLM)
    assert m.kv_cache_usage == 0.5
    assert m.prefix_cache_queries == 40.0
    assert m.ttft is None and m.prompt_tokens is None


def test_sglang_names() -> None:
    m = parse(SGLANG)
    assert (m.running, m.waiting, m.kv_cache_usage) == (7.0, 2.0, 0.42)


def test_page_without_type_lines_and_with_timestamps() -> None:
    page = b'vllm:num_requests_running{a="}"} 2 1700000000000\nvllm:num_requests_waiting 1\n'
    m = parse(page)
    assert (m.running, m.waiting) == (2.0, 1.0)


def test_nan_and_longer_names_are_ignored() -> None:
    page = (
        b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running NaN\n"
        b"vllm:num_requests_running_extra 9\n# TYPE vllm:num_requests_waiting gauge\n"
        b"vllm:num_requests_waiting 3\n"
    )
    m = parse(page)
    assert m.running is None and m.waiting == 3.0


@pytest.mark.parametrize("page", [b"", b"<html>hello</html>", b"# TYPE up gauge\nup 1\n"])
def test_pages_without_known_families(page: bytes) -> None:
    with pytest.raises(MetricsParseError):
        parse(page)
