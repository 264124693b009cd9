"""Settings come from flags, env and YAML in that precedence; bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc import config
from extproc.config import ConfigError


def test_defaults() -> None:
    settings = config.load({}, {})
    assert settings.port == 50052
    assert settings.http_port == 8080
    assert settings.routing_strategy is None
    assert settings.user_header == "user"


def test_precedence_flag_over_env_over_yaml(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("port: 1111\nhttp_port: 2222\nmetrics_stale_after: 3\npods: []\n")
    env = {"EXTPROC_PORT": "3333", "EXTPROC_CONFIG": str(file)}
    settings = config.load({"port": "4444"}, env)
    assert settings.port == 4444
    assert settings.http_port == 2222
    assert settings.metrics_stale_after == 3.0
    assert config.load({}, env).port == 3333


def test_routing_algorithm_env_sets_the_default_strategy() -> None:
    assert config.load({}, {"ROUTING_ALGORITHM": "least-request"}).routing_strategy == (
        "least-request"
    )
    weighted = config.load({"routing_strategy": "random:1,least-request:3"}, {})
    assert weighted.routing_strategy == "random:1,least-request:3"


def test_durations_and_sizes() -> None:
    settings = config.load({"metrics_stale_after": "500ms", "max_body_bytes": "2Mi"}, {})
    assert settings.metrics_stale_after == 0.5
    assert settings.max_body_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("flags", "env", "key"),
    [
        ({"port": "70000"}, {}, "port"),
        ({"port": "abc"}, {}, "--port"),
        ({}, {"EXTPROC_HTTP_PORT": "x"}, "EXTPROC_HTTP_PORT"),
        ({"routing_strategy": "nope"}, {}, "routing_strategy"),
        ({"routing_strategy": "random:0"}, {}, "routing_strategy"),
        ({"log_format": "xml"}, {}, "--log-format"),
        ({"host": "not a host"}, {}, "host"),
        ({"metrics_stale_after": "-1"}, {}, "--metrics-stale-after"),
        ({"user_header": "User Name"}, {}, "user_header"),
        ({"destination_endpoint_header": "maybe"}, {}, "--destination-endpoint-header"),
    ],
)
def test_bad_values_name_their_key(flags: dict[str, str], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(flags, env)
    assert caught.value.key == key
    assert key in str(caught.value)


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        config.load({"config": str(file)}, {})


def test_broken_yaml_file(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("port: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load({"config": str(file)}, {})
    with pytest.raises(ConfigError, match="cannot read"):
        config.load({"config": str(tmp_path / "missing.yaml")}, {})


def test_strategy_options_from_yaml_and_flags(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("strategy_options:\n  least-request: {smoothing: 2}\n")
    settings = config.load({"config": str(file)}, {})
    assert settings.strategy_options == {"least-request": {"smoothing": 2}}
    settings = config.load(
        {"config": str(file)}, {}, strategy_option_flags=["least-request.smoothing=5"]
    )
    assert settings.strategy_options["least-request"]["smoothing"] == 5


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("least-request.nope=1", "strategy_options.least-request.nope"),
        ("bogus.x=1", "strategy_options.bogus"),
        ("least-request.smoothing=-1", "strategy_options.least-request"),
        ("no-dot=1", "--strategy-option"),
    ],
)
def test_bad_strategy_options_name_their_key(option: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load({}, {}, strategy_option_flags=[option])
    assert caught.value.key == key


def test_the_readme_settings_table_is_current() -> None:
    from tools import docgen

    readme = docgen.README.read_text()
    assert docgen.render(readme) == readme, "run `python -m tools.docgen` to refresh README.md"
    for name, *_ in config.describe():
        assert f"`{name}`" in readme
