"""The registry: candidate lists ready per model, entries replaced on change, addresses checked."""

from __future__ import annotations

import pytest

from extproc.fleet.registry import PodRegistry, PodSpec, check_address


def spec(name: str, model: str = "m", ready: bool = True, **extra: object) -> PodSpec:
    return PodSpec(name=name, address=f"10.0.0.{name[-1]}:8000", model=model, ready=ready, **extra)  # type: ignore[arg-type]


def test_candidates_are_ready_pods_of_the_model_or_adapter() -> None:
    registry = PodRegistry()
    registry.replace_all(
        [
            spec("a1"),
            spec("a2", ready=False),
            spec("b3", model="other"),
            spec("a4", adapters=frozenset({"sql-lora"})),
        ]
    )
    assert [p.name for p in registry.candidates("m")] == ["a1", "a4"]
    assert [p.name for p in registry.candidates("sql-lora")] == ["a4"]
    assert registry.candidates("nope") == ()
    assert registry.knows_model("m") and registry.knows_model("sql-lora")
    models = {m.id: m.parent for m in registry.models()}
    assert models == {"m": None, "other": None, "sql-lora": "m"}


def test_an_update_replaces_the_entry_so_a_stale_reader_can_tell() -> None:
    registry = PodRegistry()
    registry.replace_all([spec("a1")])
    before = registry.candidates("m")[0]
    registry.replace_all([spec("a1")])
    assert registry.candidates("m")[0] is before  # nothing changed: the same entry
    registry.replace_all([spec("a1", adapters=frozenset({"x"}))])
    after = registry.candidates("m")[0]
    assert after is not before and after.spec.adapters == {"x"}
    assert after.ready_since == before.ready_since  # still the same process, still ready


def test_removal_notifies_listeners_and_version_moves() -> None:
    registry = PodRegistry()
    removed: list[str] = []
    registry.on_removed(removed.append)
    registry.replace_all([spec("a1"), spec("a2")])
    version = registry.version
    registry.replace_all([spec("a2")])
    assert removed == ["a1"]
    assert registry.version > version
    registry.remove("a2")
    assert removed == ["a1", "a2"]
    assert registry.candidates("m") == ()


def test_becoming_ready_stamps_ready_since() -> None:
    registry = PodRegistry()
    registry.upsert(spec("a1", ready=False))
    assert registry.candidates("m") == ()
    registry.upsert(spec("a1", ready=True))
    assert registry.candidates("m")[0].ready_since > 0


@pytest.mark.parametrize("address", ["10.1.2.3:80", "[fd00::1]:8000"])
def test_good_addresses(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize("address", ["10.1.2.3", "host:80", "10.1.2.3:0", "fd00::1:80", ":80"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        check_address(address)
