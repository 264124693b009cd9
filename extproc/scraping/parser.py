"""Reading the few metric families routing needs out of a Prometheus text page.

A vLLM ``/metrics`` page is tens of kilobytes, scraped ten times a second per pod, so the
parser never tokenises the whole page. It jumps to each wanted family's ``# TYPE`` line with
``bytes.find`` (C speed) and reads only that family's sample lines, summing across series
(several engines, several models). A pod's page keeps its layout from one scrape to the next,
so the caller may pass the offsets found last time (``hints``) and the searches start there.
Current vLLM names come first; older vLLM and SGLang names are fallbacks, so a mixed fleet works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from strategies.context import Histogram, PodMetrics

HINT_SLACK = 2048
"""How far before last time's offset a search starts (a page grows as label sets appear)."""


@dataclass(frozen=True, slots=True)
class _Name:
    """One spelling of a family: its ``# TYPE`` markers and sample-line prefixes."""

    markers: tuple[bytes, ...]
    samples: tuple[bytes, ...]


def _name(family: str, *suffixes: str) -> _Name:
    markers = [f"# TYPE {family} ".encode()]
    if family.endswith("_total"):
        # prometheus_client declares counters without the ``_total`` suffix: try that first.
        markers.insert(0, f"# TYPE {family[:-6]} ".encode())
    return _Name(tuple(markers), tuple(f"\n{family}{s}".encode() for s in suffixes or ("",)))


def _names(*families: str, suffixes: tuple[str, ...] = ()) -> tuple[_Name, ...]:
    return tuple(_name(family, *suffixes) for family in families)


GAUGES: dict[str, tuple[_Name, ...]] = {
    "running": _names("vllm:num_requests_running", "sglang:num_running_reqs"),
    "waiting": _names("vllm:num_requests_waiting", "sglang:num_queue_reqs"),
    "kv_cache_usage": _names(
        "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"
    ),
}
COUNTERS: dict[str, tuple[_Name, ...]] = {
    "prefix_cache_queries": _names(
        "vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"
    ),
    "prefix_cache_hits": _names("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "prompt_tokens": _names("vllm:prompt_tokens_total", "sglang:prompt_tokens_total"),
    "generation_tokens": _names("vllm:generation_tokens_total", "sglang:generation_tokens_total"),
}
HISTOGRAMS: dict[str, tuple[_Name, ...]] = {
    "ttft": _names(
        "vllm:time_to_first_token_seconds",
        "sglang:time_to_first_token_seconds",
        suffixes=("_sum", "_count"),
    ),
    "e2e_latency": _names(
        "vllm:e2e_request_latency_seconds",
        "sglang:e2e_request_latency_seconds",
        suffixes=("_sum", "_count"),
    ),
    "queue_time": _names(
        "vllm:request_queue_time_seconds", "sglang:queue_time_seconds", suffixes=("_sum", "_count")
    ),
}
CACHE_CONFIG = _name("vllm:cache_config_info")
LORA_INFO = _name("vllm:lora_requests_info")

Hints = dict[bytes, int]


class MetricsParseError(ValueError):
    """The page has none of the families the router understands."""


def parse(page: bytes, hints: Hints | None = None, full: bool = True) -> PodMetrics:
    """The routing view of one ``/metrics`` page. Usage fractions are left as exported.

    ``hints`` (marker -> offset) is read and updated in place. With ``full=False`` only the
    gauges (running, waiting, KV usage) are read: they are what changes between two scrapes
    100 ms apart; counters, histograms and info labels feed one-second statistics. Raises
    ``MetricsParseError`` when no known family is present (not a vLLM or SGLang server).
    """
    if hints is None:
        hints = {}
    # A leading newline lets every sample line, the first included, be found as "\n<name>".
    data = b"\n" + page if not page.startswith(b"\n") else page
    values: dict[str, Any] = {}
    for field, names in GAUGES.items():
        sample = _first(data, names, hints)
        if sample is not None:
            values[field] = sample[0]
    if not full:
        if not values:
            raise MetricsParseError("no vLLM or SGLang gauges on the page")
        return PodMetrics(**values)
    for field, names in COUNTERS.items():
        sample = _first(data, names, hints)
        if sample is not None:
            values[field] = sample[0]
    for field, names in HISTOGRAMS.items():
        sample = _first(data, names, hints)
        if sample is not None:
            values[field] = Histogram(sample[0], sample[1])
    if not values:
        raise MetricsParseError("no vLLM or SGLang metric families on the page")
    config = _latest_labels(data, CACHE_CONFIG, hints)
    if config:
        values["block_size"] = _int(config.get("block_size"))
        values["num_gpu_blocks"] = _int(config.get("num_gpu_blocks"))
        values["hash_algo"] = config.get("prefix_caching_hash_algo") or None
    lora = _latest_labels(data, LORA_INFO, hints)
    if lora:
        values["running_adapters"] = _adapters(lora.get("running_lora_adapters", ""))
        values["waiting_adapters"] = _adapters(lora.get("waiting_lora_adapters", ""))
    return PodMetrics(**values)


def _first(data: bytes, names: Sequence[_Name], hints: Hints) -> list[float] | None:
    for name in names:
        span = _span(data, name, hints)
        if span is None:
            continue
        values = []
        for prefix in name.samples:
            value = _sum(data, prefix, span)
            if value is None:
                break
            values.append(value)
        else:
            return values
    return None


def _span(data: bytes, name: _Name, hints: Hints) -> tuple[int, int] | None:
    """Where a family's sample lines are: from its ``# TYPE`` line to the next comment line."""
    for marker in name.markers:
        hint = hints.get(marker)
        at = -1
        if hint is not None:
            at = data.find(marker, max(0, hint - HINT_SLACK))
        if at < 0:
            at = data.find(marker)
        if at >= 0:
            hints[marker] = at
            start = data.find(b"\n", at)
            end = data.find(b"\n#", start)
            return start, (len(data) if end < 0 else end + 1)
    # An exporter may omit TYPE lines: then the family is wherever its samples are.
    if data.find(name.samples[0]) >= 0:
        return 0, len(data)
    return None


def _sum(data: bytes, prefix: bytes, span: tuple[int, int]) -> float | None:
    """Sum of the values of every sample line starting with ``prefix`` inside ``span``."""
    start, end = span
    size = len(prefix)
    total = 0.0
    seen = False
    at = data.find(prefix, max(0, start - 1), end)
    while at >= 0:
        after = data[at + size : at + size + 1]
        line_end = data.find(b"\n", at + 1, end)
        if line_end < 0:
            line_end = end
        if after in (b"{", b" "):
            line = data[at + size : line_end]
            if after == b"{":
                line = line[line.rfind(b"}") + 1 :]
            fields = line.split()
            if fields:
                try:
                    value = float(fields[0])
                except ValueError:
                    value = float("nan")
                if value == value:  # NaN says nothing
                    total += value
                    seen = True
        at = data.find(prefix, line_end, end)
    return total if seen else None


def _latest_labels(data: bytes, name: _Name, hints: Hints) -> dict[str, str]:
    """Labels of the family's sample with the highest value (info gauges stamp the time)."""
    span = _span(data, name, hints)
    if span is None:
        return {}
    prefix = name.samples[0] + b"{"
    best = b""
    best_value = float("-inf")
    at = data.find(prefix, max(0, span[0] - 1), span[1])
    while at >= 0:
        line_end = data.find(b"\n", at + 1, span[1])
        if line_end < 0:
            line_end = span[1]
        line = data[at + len(prefix) : line_end]
        close = line.rfind(b"}")
        try:
            value = float(line[close + 1 :].split()[0])
        except (ValueError, IndexError):
            value = float("-inf")
        if value >= best_value:
            best_value, best = value, line[:close]
        at = data.find(prefix, line_end, span[1])
    return dict(_parse_labels(best)) if best else {}


@lru_cache(maxsize=1024)
def _parse_labels(raw: bytes) -> tuple[tuple[str, str], ...]:
    """``a="x",b="y"`` -> pairs; memoised because info gauges rarely change."""
    text = raw.decode("utf-8", "replace")
    labels: list[tuple[str, str]] = []
    index = 0
    while index < len(text):
        eq = text.find("=", index)
        if eq < 0 or eq + 1 >= len(text) or text[eq + 1] != '"':
            break
        key = text[index:eq].strip().lstrip(",").strip()
        chars: list[str] = []
        cursor = eq + 2
        while cursor < len(text):
            char = text[cursor]
            if char == "\\" and cursor + 1 < len(text):
                escaped = text[cursor + 1]
                chars.append("\n" if escaped == "n" else escaped)
                cursor += 2
                continue
            if char == '"':
                break
            chars.append(char)
            cursor += 1
        labels.append((key, "".join(chars)))
        index = cursor + 1
    return tuple(labels)


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


def _adapters(text: str) -> tuple[str, ...]:
    return tuple(name for name in (part.strip() for part in text.split(",")) if name)
