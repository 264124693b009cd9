"""Compiles the project's own ``.proto`` files (``protos/``) into committed Python modules.

``python -m tools.gen_protos`` rewrites, next to each proto's path under ``protos/``, its
``_pb2.py``, ``_pb2.pyi`` and ``_pb2_grpc.py``: the debug API (``extproc/debug/v1``) and KEDA's
external scaler interface (``extproc/autoscaling/externalscaler``). ``--check`` regenerates
into a temporary directory and exits 1, listing the stale files, when the committed ones differ.
The generated code is committed so the server needs no compiler at run time: grpcio-tools is a
test dependency only.
"""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Every ``.proto`` under ``protos/``, relative to it (its import path)."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def outputs() -> list[Path]:
    """The generated modules, relative to the repository root."""
    return [proto.with_name(proto.stem + suffix) for proto in proto_files() for suffix in SUFFIXES]


def generate(out: Path) -> None:
    """Compile every proto into ``out`` (a tree mirroring the proto packages).

    protoc runs in a child process: in-process it would share the interpreter with the
    protobuf runtime of whatever imported this module (a test run, for one).
    """
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p) for p in proto_files()),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}\n{done.stderr}")


def stale() -> dict[Path, str]:
    """Generated files that differ from a fresh compilation: path -> a unified diff."""
    differences: dict[Path, str] = {}
    with tempfile.TemporaryDirectory(prefix="gen-protos-") as tmp:
        generate(Path(tmp))
        for relative in outputs():
            fresh = (Path(tmp) / relative).read_text()
            committed_path = ROOT / relative
            committed = committed_path.read_text() if committed_path.exists() else ""
            if fresh != committed:
                diff = difflib.unified_diff(
                    committed.splitlines(keepends=True),
                    fresh.splitlines(keepends=True),
                    f"{relative} (committed)",
                    f"{relative} (generated)",
                )
                differences[relative] = "".join(diff)
    return differences


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gen_protos", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the committed modules are out of date"
    )
    args = parser.parse_args(argv)
    if args.check:
        differences = stale()
        for relative, diff in differences.items():
            print(f"out of date: {relative}\n{diff}", file=sys.stderr)
        if differences:
            print("run: python -m tools.gen_protos", file=sys.stderr)
            return 1
        return 0
    generate(ROOT)
    for relative in outputs():
        print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
