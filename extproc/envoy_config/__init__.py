"""Envoy bootstraps the project generates: the AIBrix convention (``aibrix``: what ``extproc dev``,
the tests and ``extproc envoy-config`` run) and the endpoint-picker shapes of Envoy AI Gateway and
Istio (``epp``), built from shared ``parts`` and with Envoy's own errors as JSON
(``local_replies``)."""

from typing import Any

import yaml

from extproc.envoy_config.aibrix import ORIGINAL_DST_CLUSTER, GatewayLayout, bootstrap
from extproc.envoy_config.epp import PickerLayout
from extproc.envoy_config.parts import ExtprocTls, UpstreamTls

__all__ = [
    "ORIGINAL_DST_CLUSTER",
    "ExtprocTls",
    "GatewayLayout",
    "PickerLayout",
    "UpstreamTls",
    "bootstrap",
    "to_yaml",
]


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(config: dict[str, Any]) -> str:
    """A bootstrap as YAML for people to read: no anchors (a fragment used twice is written
    twice), keys in the order they were built."""
    return yaml.dump(config, Dumper=_PlainDumper, sort_keys=False)
