"""The committed debug API modules are exactly what ``python -m tools.gen_protos`` produces."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tools import gen_protos


def test_generated_modules_are_up_to_date() -> None:
    differences = gen_protos.stale()
    assert not differences, "out of date; run python -m tools.gen_protos\n" + "\n".join(
        differences.values()
    )


def test_a_changed_proto_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(gen_protos.PROTO_ROOT, protos)
    proto = protos / "extproc" / "debug" / "v1" / "debug.proto"
    proto.write_text(proto.read_text() + "\nmessage Added { string field = 1; }\n")
    monkeypatch.setattr(gen_protos, "PROTO_ROOT", protos)
    stale = gen_protos.stale()
    assert set(stale) == {
        Path("extproc/debug/v1/debug_pb2.py"),
        Path("extproc/debug/v1/debug_pb2.pyi"),
    }
    assert "Added" in stale[Path("extproc/debug/v1/debug_pb2.pyi")]
