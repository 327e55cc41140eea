"""One onnxruntime distribution per environment: aioov names a second one, and a broken
``onnxruntime`` module, at import, with the fix (#43.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aioov._install import installed

from .helpers import ROOT


def _fake_distribution(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _import_aioov(*first_on_path: Path) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([*map(str, first_on_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-W", "always", "-c", "import aioov"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": path})


def test_the_distributions_installed_are_found(tmp_path: Path) -> None:
    _fake_distribution(tmp_path, "onnxruntime", "1.32.0")
    _fake_distribution(tmp_path, "onnxruntime-gpu", "1.31.1")
    _fake_distribution(tmp_path, "onnx", "1.17.0")  # not one of them
    assert installed([str(tmp_path)]) == {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}


def test_one_distribution_imports_silently() -> None:
    proc = _import_aioov()
    assert proc.returncode == 0 and "onnxruntime" not in proc.stderr, proc.stderr


def test_a_second_distribution_is_named_with_the_fix(tmp_path: Path) -> None:
    ours = installed()
    other = "onnxruntime" if "onnxruntime-gpu" in ours else "onnxruntime-gpu"
    _fake_distribution(tmp_path, other, "1.32.0")  # what `pip install onnxruntime` beside aioov leaves
    proc = _import_aioov(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "several onnxruntime distributions are installed" in proc.stderr
    assert f"{other} 1.32.0" in proc.stderr and "pip uninstall -y" in proc.stderr


def test_a_broken_onnxruntime_module_says_how_to_repair_it(tmp_path: Path) -> None:
    """What ``pip uninstall onnxruntime`` leaves when onnxruntime-gpu was installed beside it:
    the package without its compiled extension."""
    (tmp_path / "onnxruntime" / "capi").mkdir(parents=True)
    (tmp_path / "onnxruntime" / "__init__.py").write_text("")
    (tmp_path / "onnxruntime" / "capi" / "__init__.py").write_text("")
    proc = _import_aioov(tmp_path)
    assert proc.returncode == 1
    assert "ImportError: onnxruntime cannot be imported" in proc.stderr and "Reinstall one distribution" in proc.stderr


@pytest.mark.parametrize("platform", [("linux", "x86_64"), ("win32", "AMD64"), ("linux", "aarch64"),
                                      ("darwin", "arm64"), ("darwin", "x86_64"), ("win32", "ARM64")])
def test_every_platform_gets_exactly_one_onnxruntime_with_or_without_the_cuda_extra(platform: tuple[str, str]) -> None:
    """pyproject.toml's markers: one distribution per platform (onnxruntime-gpu where its wheels
    have CUDA: Linux and Windows on x86-64, which Windows calls AMD64), and the ``cuda`` extra
    adds only that one's CUDA libraries."""
    import tomllib
    from packaging.markers import Marker
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = {"sys_platform": platform[0], "platform_machine": platform[1]}

    def chosen(requirements: list[str]) -> set[str]:
        reqs = [Requirement(r) for r in requirements]
        return {r.name for r in reqs if r.name.startswith("onnxruntime") and r.name != "onnxruntime-extensions"
                and (r.marker is None or Marker(str(r.marker)).evaluate(env))}

    base = chosen(project["dependencies"])
    assert len(base) == 1
    assert chosen(project["optional-dependencies"]["cuda"]) <= base
    assert (base == {"onnxruntime-gpu"}) == (platform in {("linux", "x86_64"), ("win32", "AMD64")})
