"""Where the shipped Hydra configs are, in a checkout and in an installed wheel.

`configs/` stays at the top of the repository; the wheel carries the same files as the package
`motif_train.configs` (pyproject.toml's `package-dir`). Every entry point and script asks
`config_dir()` instead of building a path from its own location, which points nowhere once the
package is installed outside the repository. Users add their own config folders on top with
`hydra.searchpath=[file:///their/configs]` (or `pkg://their_package.configs`).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

PACKAGE = "motif_train.configs"
CONFIG_NAME = "train"  # configs/train.yaml, the root config


@lru_cache(maxsize=1)
def config_dir() -> Path:
    """The folder holding `train.yaml` and the config groups (model/, experiment/, …).

    The installed package first (a wheel, or an editable install made since configs became package
    data: its finder maps `motif_train.configs` onto the checkout's `configs/`), then the checkout
    beside this file (an older editable install, or `PYTHONPATH=<repo>`)."""
    candidates = []
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        candidates += [Path(p) for p in (spec.submodule_search_locations or [])]
    candidates.append(Path(__file__).resolve().parents[1] / "configs")
    for d in candidates:
        if (d / f"{CONFIG_NAME}.yaml").is_file():
            return d.resolve()
    raise FileNotFoundError(f"the motif_train configs are not installed (looked in {[str(d) for d in candidates]}): "
                            "reinstall the package (pip install motif_train-*.whl, or `make install` in a checkout)")

