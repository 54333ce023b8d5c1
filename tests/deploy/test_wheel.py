"""The installed package, as a user gets it: the wheel built from this tree, installed into a fresh venv.

Only the `nmt` namespace goes in (nothing named `server`, `training`, `export` or `bench` lands in
site-packages), and the console scripts run from the venv's bin. The dependencies come from this
environment's site-packages on PYTHONPATH (no download): PYTHONPATH does not process .pth files,
so the editable install of this checkout is not active there, and the cwd is outside the repo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "engine", "server", "export", "training", "bench")
TOP_LEVEL = ("server", "training", "export", "bench", "engine")


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(fresh venv, environment to run it with, wheel); built from a copy, so the tree gets no build/."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__", "results")} if (ROOT / name).is_dir() else {}
        copy(ROOT / name, source / name, **kwargs)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source)
    (wheel,) = (root / "dist").glob("nmt_service-*.whl")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        wheel,
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NMT_", "PYTHON"))},
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
    }
    return venv, env, wheel


def test_the_wheel_holds_only_the_nmt_namespace(installed: tuple[Path, dict[str, str], Path]) -> None:
    names = zipfile.ZipFile(installed[2]).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"nmt", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert {f"nmt/{package}/__init__.py" for package in TOP_LEVEL} <= set(names)


def test_only_the_namespaced_package_imports(installed: tuple[Path, dict[str, str], Path], tmp_path: Path) -> None:
    venv, env, _ = installed
    check = (
        "import importlib.util, sys, nmt.server.main, nmt.engine.selfcheck\n"
        "print(nmt.server.main.__file__)\n"
        f"print([name for name in {TOP_LEVEL!r} if importlib.util.find_spec(name) is not None])\n"
    )
    out = run(venv / "bin" / "python", "-c", check, env=env, cwd=tmp_path).stdout.splitlines()
    assert Path(out[0]).resolve().is_relative_to(venv.resolve()), out[0]
    assert out[1] == "[]", f"top-level modules importable: {out[1]}"


@pytest.mark.parametrize("script", ["nmt-serve", "nmt-client"])
def test_console_scripts_run_from_the_venv(
    installed: tuple[Path, dict[str, str], Path], tmp_path: Path, script: str
) -> None:
    venv, env, _ = installed
    out = run(venv / "bin" / script, "--help", env=env, cwd=tmp_path).stdout
    assert out.startswith(f"usage: {script}")
