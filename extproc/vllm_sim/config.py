"""Typed simulator parameters, pod specs and the YAML fleet file.

Every knob lives in one dataclass so the CLI flags, the YAML file, ``POST /sim/params`` and the
Python API all validate values the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.kvevents.block_hash import ALGORITHMS

from .tokenizer import FIRST_PIECE_ID

#: Parameters that size or name the KV cache, or bind sockets; changing them needs a restart.
STATIC_PARAMS = frozenset(
    {
        "block_size",
        "num_gpu_blocks",
        "prefix_caching_hash_algo",
        "hash_seed",
        "kv_events",
        "kv_events_port",
        "kv_events_replay_port",
        "kv_events_topic",
        "kv_events_buffer_steps",
    }
)

#: Ports offset by the pod's index in a fleet (pod i of ``--pods N`` gets ``value + i``).
PER_POD_PORTS = ("kv_events_port", "kv_events_replay_port")

#: Older spellings accepted on input and mapped to the current field.
PARAM_ALIASES = {"per_token_delay": "decode_time_base"}


@dataclass(slots=True)
class SimParams:
    """Per-pod engine, timing, metrics and fault settings (see docs/simulator.md)."""

    # Engine shape (vLLM: --max-num-seqs, --num-gpu-blocks-override, --block-size, ...).
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int = 2048
    block_size: int = 16
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    hash_seed: str = ""
    max_loras: int = 4
    enable_lora: bool = False
    # KV-cache events (vLLM: --kv-events-config with the zmq publisher).
    kv_events: bool = False
    kv_events_port: int = 0
    kv_events_replay_port: int = -1
    kv_events_topic: str = "kv-events"
    kv_events_buffer_steps: int = 10000
    # Tokenizer and outputs.
    chars_per_token: int = 4
    vocab_size: int = 32000
    default_max_tokens: int = 16
    embedding_dim: int = 16
    prompt_tokens_details: bool = False
    stream_interval: int = 1
    # Step timing, seconds.
    prefill_time_per_token: float = 0.00002
    decode_time_base: float = 0.005
    decode_time_per_seq: float = 0.0002
    time_scale: float = 1.0
    # Metrics presentation.
    old_metric_names: bool = False
    percent_units: bool = False
    # Fault switches.
    metrics_delay: float = 0.0
    metrics_hang: bool = False
    metrics_error: bool = False
    error_rate: float = 0.0
    slow_factor: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, changes: Mapping[str, Any], *, runtime: bool = False) -> SimParams:
        """A validated copy with ``changes`` applied; raises ValueError on any bad entry.

        ``runtime`` forbids the parameters that size the KV cache, which a live pod cannot
        change without dropping its state.
        """
        values = self.to_dict()
        for raw_key, raw_value in changes.items():
            key = PARAM_ALIASES.get(raw_key, raw_key)
            if key not in _FIELD_TYPES:
                raise ValueError(f"unknown parameter {raw_key!r}")
            if runtime and key in STATIC_PARAMS and raw_value != values[key]:
                raise ValueError(f"parameter {key!r} sizes the KV cache; restart the pod to change")
            values[key] = _coerce(key, _FIELD_TYPES[key], raw_value)
        params = SimParams(**values)
        params.validate()
        return params

    def validate(self) -> None:
        positive_ints = (
            "max_num_seqs",
            "max_num_batched_tokens",
            "num_gpu_blocks",
            "block_size",
            "max_model_len",
            "max_loras",
            "chars_per_token",
            "default_max_tokens",
            "embedding_dim",
            "kv_events_buffer_steps",
            "stream_interval",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.vocab_size < 2 + FIRST_PIECE_ID:
            raise ValueError(f"vocab_size must be >= {2 + FIRST_PIECE_ID}")
        if self.prefix_caching_hash_algo not in ALGORITHMS:
            raise ValueError(f"prefix_caching_hash_algo must be one of {', '.join(ALGORITHMS)}")
        if not 0 <= self.kv_events_port <= 65535:
            raise ValueError("kv_events_port must be within 0..65535 (0 = any free port)")
        if not -1 <= self.kv_events_replay_port <= 65535:
            raise ValueError("kv_events_replay_port must be within -1..65535 (-1 = none)")
        non_negative = (
            "prefill_time_per_token",
            "decode_time_base",
            "decode_time_per_seq",
            "time_scale",
            "metrics_delay",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within 0..1")
        if self.slow_factor <= 0:
            raise ValueError("slow_factor must be > 0")

    @property
    def step_multiplier(self) -> float:
        """What every engine step duration is multiplied by."""
        return self.time_scale * self.slow_factor


def _param_types() -> dict[str, type]:
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: hints[str(f.type)] for f in dataclasses.fields(SimParams)}


_FIELD_TYPES = _param_types()


def param_types() -> dict[str, type]:
    """Name -> type of every parameter (for building CLI flags)."""
    return dict(_FIELD_TYPES)


def _coerce(name: str, kind: type, value: Any) -> Any:
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML reads `hash_seed: 0` as a number
        raise ValueError(f"{name} must be a string")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be a boolean")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError(f"{name} must be an integer")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{name} must be a number")


@dataclass(slots=True)
class PodSpec:
    """One simulated pod: its name, model, port (0 = any free port) and parameters."""

    name: str
    model: str
    port: int = 0
    params: SimParams = field(default_factory=SimParams)
    lora_modules: dict[str, str] = field(default_factory=dict)
    """LoRA adapters loaded at start, name -> path (like vLLM's ``--lora-modules``)."""


def homogeneous_specs(
    count: int,
    model: str,
    *,
    base_port: int = 0,
    name_prefix: str = "sim",
    params: SimParams | None = None,
    lora_modules: Mapping[str, str] | None = None,
) -> list[PodSpec]:
    """``count`` identical pods ``<prefix>-0..N-1``; ports ``base_port+i`` (all 0 = free ports)."""
    base = params or SimParams()
    return [
        PodSpec(
            name=f"{name_prefix}-{i}",
            model=model,
            port=base_port + i if base_port else 0,
            params=base.replace(port_offsets(base, i)),
            lora_modules=dict(lora_modules or {}),
        )
        for i in range(count)
    ]


def port_offsets(params: SimParams, index: int) -> dict[str, int]:
    """The per-pod ports of pod ``index``: set ports move up by the index, 0 and -1 stay."""
    return {
        name: getattr(params, name) + index
        for name in PER_POD_PORTS
        if getattr(params, name) > 0 and index
    }


def parse_lora_modules(items: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """Accept ``["name=path", ...]``, ``["name", ...]`` or a mapping."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return {str(k): str(v) for k, v in items.items()}
    result: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        result[name] = path if sep else f"/adapters/{name}"
    return result


def load_fleet_config(
    path: str | Path,
    *,
    base: SimParams | None = None,
    overrides: Mapping[str, Any] | None = None,
    default_model: str | None = None,
    base_port: int = 0,
) -> list[PodSpec]:
    """Read ``{defaults: {...}, pods: [{name, port, model, ...}]}`` into pod specs.

    Precedence, lowest first: built-in defaults (or ``base``), the file's ``defaults``,
    ``overrides`` (CLI flags), each pod's own entries.
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError("fleet config must be a mapping with 'defaults' and 'pods'")
    defaults = dict(data.get("defaults") or {})
    pods = data.get("pods") or []
    if not isinstance(pods, list) or not pods:
        raise ValueError("fleet config needs a non-empty 'pods' list")
    model_default = defaults.pop("model", None) or default_model
    loras_default = parse_lora_modules(defaults.pop("lora_modules", None))
    params = (base or SimParams()).replace(defaults).replace(dict(overrides or {}))
    specs: list[PodSpec] = []
    for index, raw in enumerate(pods):
        if not isinstance(raw, dict):
            raise ValueError(f"pods[{index}] must be a mapping")
        entry = dict(raw)
        name = str(entry.pop("name", f"sim-{index}"))
        model = entry.pop("model", None) or model_default
        if not model:
            raise ValueError(f"pod {name!r} has no model (set it per pod or in defaults)")
        port = int(entry.pop("port", base_port + index if base_port else 0))
        loras = dict(loras_default)
        loras.update(parse_lora_modules(entry.pop("lora_modules", None)))
        offsets = {k: v for k, v in port_offsets(params, index).items() if k not in entry}
        specs.append(
            PodSpec(
                name=name,
                model=str(model),
                port=port,
                params=params.replace({**offsets, **entry}),
                lora_modules=loras,
            )
        )
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("pod names must be unique")
    return specs
