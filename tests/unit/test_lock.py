"""The locked install: every dependency pinned with hashes, the running environment is exactly the lock."""

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "locks"
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)")


def _pins(path: Path) -> dict[str, str]:
    """name -> version of a `uv pip compile --generate-hashes` file; asserts each pin has a hash."""
    pins, lines = {}, path.read_text().splitlines()
    for i, line in enumerate(lines):
        if m := _PIN.match(line):
            assert lines[i + 1].strip().startswith("--hash=sha256:"), f"{path.name}: {m[1]} has no hash"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


@pytest.mark.parametrize("lock", ["cpu.txt", "gpu.txt", "gpu-fa4.txt"])
def test_lock_pins_every_declared_dependency(lock):
    pins = _pins(LOCKS / lock)
    assert len(pins) > 50
    for req in _declared():
        if req.marker is not None and not req.marker.evaluate({"platform_machine": "x86_64"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"locks/{lock} has no {req.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"locks/{lock} pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: run `make lock`"
    assert "torchvision" not in pins and "timm" not in pins  # they would swap in a CUDA torch on CPU


def test_torch_builds_and_the_sky_lock():
    assert _pins(LOCKS / "cpu.txt")["torch"] == "2.13.0+cpu"
    gpu = _pins(LOCKS / "gpu.txt")
    assert gpu["torch"] == "2.13.0" and any(n.startswith("nvidia-") for n in gpu)  # the CUDA build's libraries
    fa4 = _pins(LOCKS / "gpu-fa4.txt")  # the GPU set exactly, plus the FlashAttention-4 kernels
    assert "flash-attn-4" in fa4 and all(fa4[n] == v for n, v in gpu.items())
    sky = _pins(LOCKS / "sky.txt")
    assert "skypilot" in sky and "wandb" not in sky  # its own venv: its click pin conflicts with wandb's
    boot = _pins(LOCKS / "bootstrap.txt")
    assert boot == {"uv": _pins(LOCKS / "cpu.txt")["uv"]}


@pytest.mark.skipif(not (Path(sys.prefix) / ".installed").exists(),
                    reason="runs inside a venv made by `make install` (its .installed stamp)")
def test_the_environment_is_exactly_the_cpu_lock():
    pins = _pins(LOCKS / "cpu.txt")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("motif-train")
    for seed in ("pip",):  # the venv's own installer, not a dependency
        installed.pop(seed, None)
    differ = {n: (installed.get(n), pins.get(n)) for n in set(installed) | set(pins) if installed.get(n) != pins.get(n)}
    assert not differ, f"installed vs locks/cpu.txt differ (run `make install`): {differ}"
