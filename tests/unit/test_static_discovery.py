"""The static file: validated with errors naming the entry, re-read on change, last good kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from extproc.discovery.static import PodFileError, StaticDiscovery, load_pods
from extproc.fleet.registry import PodRegistry
from extproc.telemetry import Telemetry

GOOD = """
pods:
  - name: vllm-0
    address: 127.0.0.1:8001
    model: llama-3-8b
    adapters: [sql-lora]
    metrics_url: http://127.0.0.1:9001/metrics
  - name: vllm-1
    address: 127.0.0.1:8002
    model: llama-3-8b
"""


def test_design_example_loads(tmp_path: Path) -> None:
    file = tmp_path / "pods.yaml"
    file.write_text(GOOD)
    specs, _ = load_pods(file)
    assert [s.name for s in specs] == ["vllm-0", "vllm-1"]
    assert specs[0].adapters == {"sql-lora"}
    assert specs[0].effective_metrics_url == "http://127.0.0.1:9001/metrics"
    assert specs[1].effective_metrics_url == "http://127.0.0.1:8002/metrics"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port: 1\n", "no 'pods' list"),
        ("pods: {}\n", "'pods' must be a list"),
        ("pods: [1]\n", "pods[0] must be a mapping"),
        ("pods: [{name: a, address: 1.2.3.4:80}]\n", "pods[0].model is required"),
        ("pods: [{name: a, address: nohost, model: m}]\n", "pods[0].address"),
        ("pods: [{name: a, address: 1.2.3.4:80, model: m, colour: red}]\n", "colour"),
        (
            "pods:\n- {name: a, address: 1.2.3.4:80, model: m}\n- {name: a, address: 1.2.3.5:80, "
            "model: m}\n",
            "listed twice",
        ),
        ("pods: [{name: a, address: 1.2.3.4:80, model: m, adapters: x}]\n", "adapters"),
        ("pods: [{name: a, address: 1.2.3.4:80, model: m, metrics_url: ftp://x}]\n", "metrics_url"),
        ("pods: [\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    file = tmp_path / "pods.yaml"
    file.write_text(text)
    with pytest.raises(PodFileError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_pods(file)


def test_reload_on_change_and_broken_file_keeps_last_good(tmp_path: Path) -> None:
    file = tmp_path / "pods.yaml"
    file.write_text(GOOD)
    registry = PodRegistry()
    telemetry = Telemetry()
    discovery = StaticDiscovery(file, registry, telemetry, interval=0.05)
    discovery.load_initial()
    assert len(registry.candidates("llama-3-8b")) == 2

    file.write_text("pods: [\n")
    os.utime(file, ns=(1, 1))
    assert discovery.check() is False
    assert len(registry.candidates("llama-3-8b")) == 2
    errors = telemetry.registry.get_sample_value(
        "extproc_discovery_errors_total", {"provider": "static"}
    )
    assert errors == 1

    file.write_text("pods:\n  - {name: vllm-9, address: 127.0.0.1:8009, model: other}\n")
    assert discovery.check() is True
    assert registry.candidates("llama-3-8b") == ()
    assert [p.name for p in registry.candidates("other")] == ["vllm-9"]
    assert discovery.check() is False
