"""The installed distribution stands alone: a plain (non-editable) wheel carries the server,
the local stack and the simulator with their data files, and claims no generic top-level name
such as ``tools``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_plain_wheel_has_what_extproc_dev_runs_and_no_tools(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("extproc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name}
    assert tops == {"extproc", "strategies"}
    for needed in (
        "extproc/devstack/stack.py",
        "extproc/vllm_sim/server.py",
        "extproc/envoy_config/__init__.py",
        "extproc/users/users.lua",
        "extproc/debug/v1/debug_pb2.py",
    ):
        assert needed in names, needed
    target = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    # From outside the checkout, with only the wheel's files first on the path.
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import extproc, extproc.devstack.stack, extproc.vllm_sim, extproc.envoy_config; "
        "assert extproc.__file__.startswith(sys.argv[1]), extproc.__file__; "
        "import importlib.util; assert importlib.util.find_spec('tools') is None"
    )
    subprocess.run(
        [sys.executable, "-c", check, str(target)], check=True, cwd=tmp_path, capture_output=True
    )
