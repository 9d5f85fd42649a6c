"""The wheel works outside the repository: built from the source, installed with `--no-deps` into a
fresh venv made from the locked set, its entry points find the configs it ships (package data
`motif_train.configs`) from any directory, and a user's own config folder joins through
`hydra.searchpath`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).with_name("uv")
WHEELS = os.environ.get("TORCH_WHEELS", "/opt/wheels")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_every_package_is_listed_for_the_wheel():
    """pyproject.toml lists the packages (configs/ needs a mapping `packages.find` cannot do): a new
    package folder that is not listed would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the locks
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "motif_train").rglob("__init__.py")}
    assert found - listed == set(), f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == {"motif_train.configs"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv outside the repo: exactly the locked set (uv's cache makes this a second), plus the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy so the build's build/ and egg-info never land in the shared checkout.
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("motif_train", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("motif_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"motif_train/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped <= names, f"configs missing from the wheel: {sorted(shipped - names)}"
    assert not any(n.startswith(("configs/", "tests/")) for n in names)

    env = tmp / "venv"
    run([UV, "venv", "-q", "--python", sys.executable, env])
    run([UV, "pip", "sync", "-q", "--python", env / "bin" / "python", "--require-hashes", "--find-links", WHEELS,
         ROOT / "locks" / "cpu.txt"])
    run([UV, "pip", "install", "-q", "--python", env / "bin" / "python", "--no-deps", wheel])
    return env


def outside(venv: Path, tmp_path: Path, *cmd) -> subprocess.CompletedProcess:
    """A console script of the venv, from a directory that is not the repo, without the repo on the path."""
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return run([venv / "bin" / cmd[0], *cmd[1:]], cwd=tmp_path, env=env)


def test_installed_package_is_the_wheel(venv, tmp_path):
    p = outside(venv, tmp_path, "python", "-c",
                "import motif_train, motif_train.paths as p; print(motif_train.__file__); print(p.config_dir())")
    module, configs = p.stdout.split()
    site = str(venv / "lib")
    assert module.startswith(site) and configs.startswith(site) and configs.endswith("motif_train/configs")


def test_motif_train_composes_from_another_directory(venv, tmp_path):
    p = outside(venv, tmp_path, "motif-train", "experiment=tiny_cpu", "--cfg", "job")
    assert "name: tiny_cpu" in p.stdout and "num_attention_heads: 2" in p.stdout  # experiment + model/tiny.yaml


def test_user_config_dir_joins_through_searchpath(venv, tmp_path):
    user = tmp_path / "my_configs" / "experiment"
    user.mkdir(parents=True)
    (user / "my_finetune.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: tiny\n\n"
                                           "name: my_finetune\noptim:\n  lr: 3.0e-5\n")
    p = outside(venv, tmp_path, "motif-train", f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]",
                "experiment=my_finetune", "--cfg", "job")
    assert "name: my_finetune" in p.stdout and "lr: 3.0e-05" in p.stdout


def test_motif_flops_from_another_directory(venv, tmp_path):
    p = outside(venv, tmp_path, "motif-flops")
    assert "training FLOPs per sample" in p.stdout and "121x736x1280" in p.stdout
