"""The one typed settings object, grouped by component, and how it is loaded."""

from extproc.config.knobs import ConfigError
from extproc.config.loader import describe, knobs, load, read_yaml
from extproc.config.settings import (
    AutoscalingSettings,
    DiscoverySettings,
    HealthSettings,
    KubernetesSettings,
    KvEventsSettings,
    LoggingSettings,
    PrefixSettings,
    RoutingSettings,
    ScrapingSettings,
    ServerSettings,
    Settings,
    UsersSettings,
)

__all__ = [
    "AutoscalingSettings",
    "ConfigError",
    "DiscoverySettings",
    "HealthSettings",
    "KubernetesSettings",
    "KvEventsSettings",
    "LoggingSettings",
    "PrefixSettings",
    "RoutingSettings",
    "ScrapingSettings",
    "ServerSettings",
    "Settings",
    "UsersSettings",
    "describe",
    "knobs",
    "load",
    "read_yaml",
]
