"""A faithful-enough vLLM simulator: stands in for vLLM pods so routing can be measured
without GPUs. See docs/simulator.md."""

from .config import PodSpec, SimParams, homogeneous_specs, load_fleet_config
from .fleet import SimulatorFleet
from .server import POD_HEADER, SimPod

__all__ = [
    "POD_HEADER",
    "PodSpec",
    "SimParams",
    "SimPod",
    "SimulatorFleet",
    "homogeneous_specs",
    "load_fleet_config",
]
