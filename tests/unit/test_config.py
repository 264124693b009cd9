"""Settings come from flags, env and YAML in that precedence, grouped by component; bad values
name their key the way the user wrote it."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc import config
from extproc.config import ConfigError


def test_defaults() -> None:
    settings = config.load({}, {})
    assert settings.server.port == 50052
    assert settings.server.http_port == 8080
    assert settings.routing.default_strategy is None
    assert settings.routing.user_header == "user"
    assert settings.mode == "aibrix"


def test_precedence_flag_over_env_over_yaml(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("server: {port: 1111, http_port: 2222}\nscraping: {stale_after: 3}\npods: []\n")
    env = {"EXTPROC_PORT": "3333", "EXTPROC_CONFIG": str(file)}
    settings = config.load({"port": "4444"}, env)
    assert settings.server.port == 4444
    assert settings.server.http_port == 2222
    assert settings.scraping.stale_after == 3.0
    assert config.load({}, env).server.port == 3333


def test_routing_algorithm_env_sets_the_default_strategy() -> None:
    routing = config.load({}, {"ROUTING_ALGORITHM": "least-request"}).routing
    assert routing.default_strategy == "least-request"
    weighted = config.load({"routing_strategy": "random:1,least-request:3"}, {})
    assert weighted.routing.default_strategy == "random:1,least-request:3"


def test_durations_and_sizes() -> None:
    settings = config.load({"metrics_stale_after": "500ms", "max_body_bytes": "2Mi"}, {})
    assert settings.scraping.stale_after == 0.5
    assert settings.server.max_body_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("flags", "env", "key"),
    [
        ({"port": "70000"}, {}, "--port"),
        ({"port": "abc"}, {}, "--port"),
        ({}, {"EXTPROC_HTTP_PORT": "x"}, "EXTPROC_HTTP_PORT"),
        ({}, {"EXTPROC_PORT": "0"}, "EXTPROC_PORT"),
        ({"routing_strategy": "nope"}, {}, "--routing-strategy"),
        ({"routing_strategy": "random:0"}, {}, "--routing-strategy"),
        ({"log_format": "xml"}, {}, "--log-format"),
        ({"host": "not a host"}, {}, "--host"),
        ({"metrics_stale_after": "-1"}, {}, "--metrics-stale-after"),
        ({"user_header": "User Name"}, {}, "--user-header"),
        ({"destination_endpoint_header": "maybe"}, {}, "--destination-endpoint-header"),
        ({"mode": "sidecar"}, {}, "--mode"),
    ],
)
def test_bad_values_name_their_key(flags: dict[str, str], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(flags, env)
    assert caught.value.key == key
    assert key in str(caught.value)


def test_a_bad_yaml_value_names_its_section_key_and_file(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("scraping:\n  interval: 0\n")
    with pytest.raises(ConfigError) as caught:
        config.load({"config": str(file)}, {})
    assert caught.value.key == f"scraping.interval (in {file})"


@pytest.mark.parametrize(
    ("text", "named"),
    [("prot: 1\n", "prot"), ("scraping: {intervall: 1}\n", "scraping.intervall")],
)
def test_unknown_yaml_key_is_named(tmp_path: Path, text: str, named: str) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=named):
        config.load({"config": str(file)}, {})


def test_broken_yaml_file(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("port: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load({"config": str(file)}, {})
    with pytest.raises(ConfigError, match="cannot read"):
        config.load({"config": str(tmp_path / "missing.yaml")}, {})


def test_strategy_instances_from_yaml_and_flags(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("routing:\n  strategies:\n    least-request: {smoothing: 2}\n")
    settings = config.load({"config": str(file)}, {})
    assert settings.routing.strategies == {"least-request": {"smoothing": 2}}
    settings = config.load(
        {"config": str(file)},
        {},
        strategy_option_flags=["least-request.smoothing=5", "calm.algorithm=least-request"],
    )
    assert settings.routing.strategies["least-request"]["smoothing"] == 5
    assert settings.routing.strategies["calm"] == {"algorithm": "least-request"}
    assert (
        config.load(
            {"routing_strategy": "calm"}, {}, strategy_option_flags=["calm.algorithm=least-request"]
        ).routing.default_strategy
        == "calm"
    )


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("least-request.nope=1", "--strategy-option least-request.nope"),
        ("bogus.x=1", "--strategy-option bogus"),
        ("least-request.smoothing=-1", "--strategy-option least-request"),
        ("no-dot=1", "--strategy-option"),
    ],
)
def test_bad_strategy_options_name_their_key(option: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load({}, {}, strategy_option_flags=[option])
    assert caught.value.key == key


def test_the_users_api_stays_on_loopback_without_a_token() -> None:
    assert config.load({"host": "0.0.0.0"}, {}).users.host == "127.0.0.1"
    guarded = config.load({"host": "0.0.0.0"}, {"EXTPROC_USERS_ADMIN_TOKEN": "t"})
    assert guarded.users.host == "0.0.0.0"
    assert config.load({"users_host": "0.0.0.0"}, {}).users.host == "0.0.0.0"


def test_the_generated_docs_are_current() -> None:
    from tools import docgen

    document = docgen.CONFIGURATION.read_text()
    assert docgen.render(document) == document, "run `python -m tools.docgen` to refresh it"
    for name, *_ in config.describe():
        assert f"`{name}`" in document
    strategies = docgen.STRATEGIES.read_text()
    assert docgen.render_strategies(strategies) == strategies, "run `python -m tools.docgen`"
