"""The SkyPilot task YAMLs (sky/*.yaml) and the SLURM example (launch/slurm_train.sbatch).

(a) Where `.venv-sky` exists (`make sky`), SkyPilot's own parser `sky.Task.from_yaml` loads every
    YAML in a subprocess (SkyPilot pins an older `click` than wandb: it is never imported here).
(b) Always: every `launch/…`, `scripts/…`, `configs/…` and `-m motif_train.…` the setup / run blocks
    name exists (launch/*.sh executable), every `--flag` given to a script is one it defines, and the
    blocks are valid bash.
(c) Always: the Hydra overrides the launchers pass to launch/train.sh, with the YAML's env defaults
    substituted, compose and validate for 8 nodes x 8 GPUs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SKY_DIR = ROOT / "sky"
LAUNCH_DIR = ROOT / "launch"
SBATCH = LAUNCH_DIR / "slurm_train.sbatch"
SKY_PYTHON = ROOT / ".venv-sky" / "bin" / "python"
YAMLS = sorted(SKY_DIR.glob("*.yaml"))
SHELL_SCRIPTS = sorted([*LAUNCH_DIR.glob("*.sh"), *LAUNCH_DIR.glob("*.sbatch")])

# What each task must ask for; `accelerators` lists the alternatives (any one of them is fine).
EXPECTED = {
    "train.yaml": {"num_nodes": 8, "accelerators": [{"H200": 8}],
                   "envs": {"EXPERIMENT": "motif_video_2b_64xh200", "OVERRIDES": ""},
                   "env_keys": {"MOTIF_RUN_ROOT", "MOTIF_DATA", "MOTIF_ENCODERS", "MOTIF_BUCKET"}},
    "preprocess.yaml": {"num_nodes": None, "accelerators": [{"H100": 8}, {"H200": 8}],
                        "envs": {"CURRICULUM": "configs/curriculum/motif_4stage.yaml"},
                        "env_keys": {"RAW", "MOTIF_DATA", "MOTIF_ENCODERS", "MOTIF_BUCKET"}},
    "dev.yaml": {"num_nodes": 1, "accelerators": [{"H100": 1}], "envs": {}, "env_keys": set()},
    "eval.yaml": {"num_nodes": 1, "accelerators": [{"H100": 1}],
                  "envs": {"EXPERIMENT": "motif_video_2b_64xh200", "EVAL_ARGS": ""},
                  "env_keys": {"MOTIF_RUN_ROOT", "MOTIF_DATA", "MOTIF_ENCODERS", "MOTIF_BUCKET"}},
}
SKYPILOT_VARS = ("SKYPILOT_NUM_NODES", "SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE")

_SKY_PROBE = r"""
import json, sys
try:
    import sky
    import yaml
except ImportError as e:
    print(json.dumps({"skip": f"cannot import sky in .venv-sky: {e}"}))
    sys.exit(0)

def plain(v):
    return v.get_secret_value() if hasattr(v, "get_secret_value") else v

def load(path, **kw):
    return sky.Task.from_yaml(path) if not kw else sky.Task.from_yaml_config(yaml.safe_load(open(path)), **kw)

out = {"version": sky.__version__, "tasks": {}}
for path in sys.argv[1:]:
    t = load(path)
    res = sorted(t.resources, key=lambda r: json.dumps(r.accelerators or {}, sort_keys=True))
    info = {
        "name": t.name, "num_nodes": t.num_nodes, "workdir": t.workdir,
        "accelerators": [dict(r.accelerators or {}) for r in res],
        "use_spot": sorted({bool(r.use_spot) for r in res}),
        "job_recovery": [r.job_recovery for r in res],
        "envs": dict(t.envs), "secrets": sorted(t.secrets),
        "storage": {dst: {"source": s.source, "name": s.name, "mode": s.mode.value}
                    for dst, s in (t.storage_mounts or {}).items()},
        # a W&B key given on the command line must reach the run (no YAML placeholder shadowing it)
        "wandb_via_env": plain(load(path, env_overrides=[("WANDB_API_KEY", "k-env")]).envs_and_secrets
                               .get("WANDB_API_KEY")),
        "wandb_via_secret": plain(load(path, secrets_overrides=[("WANDB_API_KEY", "k-secret")]).envs_and_secrets
                                  .get("WANDB_API_KEY")),
    }
    if "MOTIF_BUCKET" in t.envs:  # the bucket comes from --env MOTIF_BUCKET=...
        o = load(path, env_overrides=[("MOTIF_BUCKET", "s3://some-other-bucket")])
        info["bucket_override"] = {dst: s.source for dst, s in o.storage_mounts.items()}
    out["tasks"][path.rsplit("/", 1)[-1]] = info
print(json.dumps(out))
"""


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _envs(task: dict) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in (task.get("envs") or {}).items()}


def _shell_blocks(task: dict) -> str:
    return "\n".join(str(task.get(k) or "") for k in ("setup", "run"))


def _joined(text: str) -> str:
    """Shell text with line continuations joined and comments dropped."""
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


def _substitute(text: str, defaults: dict[str, str]) -> str:
    """Replace $VAR / ${VAR} with its default ("$@" -> nothing); an unknown variable is an error."""

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name == "@":
            return ""
        if name not in defaults:
            raise KeyError(f"${name} has no default in the launcher (known: {sorted(defaults)})")
        return defaults[name]

    return re.sub(r"\$\{?([A-Za-z_]\w*|@)\}?", repl, text)


def _args_after(text: str, marker: str, defaults: dict[str, str]) -> list[str]:
    """The arguments following the last `marker` on its (continuation-joined) command line."""
    lines = [ln for ln in _joined(text).splitlines() if marker in ln]
    assert lines, f"no command line with {marker!r}"
    tail = lines[-1].rsplit(marker, 1)[1]
    return [tok for tok in shlex.split(_substitute(tail, defaults)) if tok]


def _accelerators(task: dict) -> list[dict[str, int]]:
    acc = (task.get("resources") or {}).get("accelerators")
    if isinstance(acc, str):
        name, _, n = acc.partition(":")
        return [{name: int(n or 1)}]
    assert isinstance(acc, dict), acc
    return [{k: int(v)} for k, v in sorted(acc.items())]


def _compose(overrides: list[str], env: dict[str, str], monkeypatch):
    from hydra import compose, initialize_config_dir

    from motif_train.cli.train import CONFIG_DIR, to_train_config

    for k, v in env.items():  # the configs read MOTIF_* with oc.env when resolved
        if k.startswith("MOTIF_"):
            monkeypatch.setenv(k, v)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return to_train_config(cfg)


def test_every_yaml_has_expectations():
    assert YAMLS, "no sky/*.yaml"
    assert {p.name for p in YAMLS} == set(EXPECTED), "add the new sky/*.yaml to EXPECTED in this test"


# ---------------------------------------------------------------- (b) references and shell syntax
@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_references_exist(path):
    task = _load(path)
    text = _joined(_shell_blocks(task))
    assert task.get("workdir") == ".", "the repo is synced as the workdir; launch from the repo root"
    refs = set(re.findall(r"(?<![\w/.$-])((?:launch|scripts|configs)/[\w./-]*\w)", text))
    refs |= {v for v in _envs(task).values() if re.fullmatch(r"(?:launch|scripts|configs)/[\w./-]+", v)}
    mods = set(re.findall(r"-m\s+(motif_train(?:\.\w+)*)", text))
    assert refs or mods, f"{path.name}: run/setup reference nothing in the repo"
    for ref in sorted(refs):
        f = ROOT / ref
        assert f.is_file(), f"{path.name} references {ref}, which does not exist"
        if f.suffix == ".sh":
            assert os.access(f, os.X_OK), f"{ref} is not executable (chmod +x)"
    import importlib.util

    for mod in sorted(mods):
        assert importlib.util.find_spec(mod) is not None, f"{path.name}: -m {mod}: no such module"
    if "constraints.txt" in text:
        assert (ROOT / "constraints.txt").is_file()
    # every --flag given to a script is one its argparse defines
    for m in re.finditer(r"(scripts/[\w/.-]+\.py)([^\n;&|]*)", text):
        src = (ROOT / m.group(1)).read_text()
        for flag in re.findall(r"(?<![\w-])(--[\w-]+)", m.group(2)):
            assert re.search(rf"add_argument\(\s*[\"']{re.escape(flag)}[\"']", src), f"{m.group(1)} has no {flag}"
    # the declared WANDB key would shadow --env / --secret WANDB_API_KEY=... (secrets win over envs)
    assert "WANDB_API_KEY" not in _envs(task) and "WANDB_API_KEY" not in (task.get("secrets") or {})


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_shell_blocks_are_valid_bash(path):
    task = _load(path)
    for key in ("setup", "run"):
        if task.get(key):
            proc = subprocess.run(["bash", "-n"], input=task[key], capture_output=True, text=True)
            assert proc.returncode == 0, f"{path.name} {key}: {proc.stderr}"


@pytest.mark.parametrize("path", [p for p in YAMLS if EXPECTED.get(p.name, {}).get("num_nodes") != 1],
                         ids=lambda p: p.name)
def test_multi_node_yaml_maps_skypilot_env_to_the_launcher(path):
    run = _joined(str(_load(path)["run"]))
    for var in SKYPILOT_VARS:
        assert f"${var}" in run, f"{path.name}: run does not use ${var}"
    assert re.search(r'MASTER_ADDR=\$\(echo "\$SKYPILOT_NODE_IPS" \| head -n1\)|--master_addr=\$\(echo '
                     r'"\$SKYPILOT_NODE_IPS" \| head -n1\)', run)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_are_valid_bash_without_python_logic(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert not re.search(r"python[\d.]*\"?\s+(-c\b|-\s*<<|<<)", text), f"{script.name}: no Python logic in launch/"
    if script.suffix == ".sh":
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


# ---------------------------------------------------------------- (c) the overrides compose and validate
def test_train_yaml_overrides_compose_and_validate(monkeypatch):
    from motif_train.config import validate

    task = _load(SKY_DIR / "train.yaml")
    envs = _envs(task)
    overrides = _args_after(task["run"], "launch/train.sh", envs)
    print("overrides:", overrides)
    assert f"experiment={envs['EXPERIMENT']}" in overrides and "checkpoint.resume=auto" in overrides
    (acc,) = _accelerators(task)
    nodes, gpus = int(task["num_nodes"]), next(iter(acc.values()))
    cfg = _compose(overrides, envs, monkeypatch)
    validate(cfg, world_size=nodes * gpus, local_world_size=gpus)
    assert cfg.parallel.degrees(nodes * gpus, gpus) == (nodes, gpus)  # HSDP: shard in a node, replicate across
    assert cfg.run_dir == f"{envs['MOTIF_RUN_ROOT']}/{envs['EXPERIMENT']}"
    assert cfg.checkpoint.resume == "auto"
    assert cfg.data["root"] == envs["MOTIF_DATA"] and cfg.encoders.root == envs["MOTIF_ENCODERS"]
    mounts = [m.rstrip("/") + "/" for m in (task.get("file_mounts") or {})]
    for what, p in [("run_dir", cfg.run_dir), ("data.root", cfg.data["root"]), ("encoders.root", cfg.encoders.root)]:
        assert any(p.startswith(m) for m in mounts), f"{what}={p} is not on the bucket mount {mounts}"
    if envs.get("OVERRIDES", "") == "":  # extra overrides land on the command line too
        more = _args_after(task["run"], "launch/train.sh", {**envs, "OVERRIDES": "train.steps=10 optim.lr=5e-5"})
        assert _compose(more, envs, monkeypatch).train.steps == 10


def test_preprocess_yaml_arguments_parse():
    from motif_train.cli.preprocess import build_parser, read_curriculum

    task = _load(SKY_DIR / "preprocess.yaml")
    envs = _envs(task)
    args = build_parser().parse_args(_args_after(task["run"], "-m motif_train.cli.preprocess", envs))
    assert args.device == "cuda" and args.out == envs["MOTIF_DATA"] and args.encoders == envs["MOTIF_ENCODERS"]
    assert len(read_curriculum(ROOT / args.curriculum)) == 4
    train = _envs(_load(SKY_DIR / "train.yaml"))
    for k in ("MOTIF_BUCKET", "MOTIF_DATA", "MOTIF_ENCODERS"):  # the trainer reads what preprocessing writes
        assert envs[k] == train[k], k


def _sbatch_options(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", text, flags=re.M))


def _sbatch_defaults(text: str) -> dict[str, str]:
    """VAR="${VAR:-default}" lines of the batch script."""
    return dict(re.findall(r'^(?:export\s+)?(\w+)="\$\{\1:-([^}]*)\}"', text, flags=re.M))


def test_slurm_sbatch(monkeypatch):
    from motif_train.config import validate

    text = SBATCH.read_text()
    opts = _sbatch_options(text)
    assert opts["nodes"] == "8" and opts["ntasks-per-node"] == "1" and opts["gpus-per-node"] == "8"
    assert opts["signal"] == "USR1@120" and "requeue" in opts
    body = _joined(text)
    assert "launch/train.sh" in body and os.access(LAUNCH_DIR / "train.sh", os.X_OK)
    assert re.search(r"NODE_RANK=\"?\$SLURM_NODEID", body)
    assert re.search(r'MASTER_ADDR="?\$\(scontrol show hostnames "\$\{?SLURM_JOB_NODELIST', body)
    for var in ("NNODES", "MASTER_ADDR", "MASTER_PORT"):
        assert re.search(rf"^export {var}\b", body, flags=re.M), f"{var} is not exported"
    # torchrun forwards only the signals it handles: SIGUSR1 must be on the list or it kills torchrun
    (signals,) = re.findall(r'^export PET_SIGNALS_TO_HANDLE="([^"]+)"', body, flags=re.M)
    assert "SIGUSR1" in signals.split(",") and "SIGTERM" in signals.split(",")
    defaults = _sbatch_defaults(text)
    overrides = _args_after(text, "launch/train.sh", defaults)
    print("overrides:", overrides)
    assert "checkpoint.resume=auto" in overrides
    nodes, gpus = int(opts["nodes"]), int(opts["gpus-per-node"])
    cfg = _compose(overrides, defaults, monkeypatch)
    validate(cfg, world_size=nodes * gpus, local_world_size=gpus)
    assert cfg.run_dir == f"{defaults['MOTIF_RUN_ROOT']}/{defaults['EXPERIMENT']}"


# ---------------------------------------------------------------- (a) SkyPilot's own parser
@pytest.fixture(scope="module", autouse=True)
def _sky_probe(tmp_path_factory):
    """Starts SkyPilot's parser in the background at the first test of this module (its import takes
    seconds); the (a) tests, last in the file, collect the result."""
    if not SKY_PYTHON.exists():
        yield None
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(tmp_path_factory.mktemp("skyhome")), SKYPILOT_DISABLE_USAGE_COLLECTION="1")
    proc = subprocess.Popen([str(SKY_PYTHON), "-c", _SKY_PROBE, *map(str, YAMLS)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def sky_parsed(_sky_probe):
    if _sky_probe is None:
        pytest.skip(f"{SKY_PYTHON.relative_to(ROOT)} not found: run `make sky` to check sky/*.yaml with "
                    "SkyPilot's own parser (the PyYAML / Hydra checks in this file still run)")
    out, err = _sky_probe.communicate(timeout=180)
    assert _sky_probe.returncode == 0, f"sky.Task.from_yaml failed:\n{out}\n{err[-4000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_skypilot_parses(sky_parsed, name):
    got, want = sky_parsed["tasks"][name], EXPECTED[name]
    print(f"skypilot {sky_parsed['version']}: {name}: {json.dumps(got)}")
    if want["num_nodes"] is not None:
        assert got["num_nodes"] == want["num_nodes"]
    assert got["num_nodes"] >= 1
    assert got["accelerators"] == want["accelerators"]
    for k, v in want["envs"].items():
        assert got["envs"].get(k) == v, k
    assert want["env_keys"] <= set(got["envs"])
    assert got["workdir"] == "."
    assert got["wandb_via_env"] == "k-env" and got["wandb_via_secret"] == "k-secret"
    if "MOTIF_BUCKET" in got["envs"]:
        assert got["storage"] == {"/data": {"source": got["envs"]["MOTIF_BUCKET"], "name": None, "mode": "MOUNT"}}
        assert got["bucket_override"] == {"/data": "s3://some-other-bucket"}
    if name == "train.yaml":  # a managed job recovers: preemption always; user errors a few times; exit 75 always
        (rec,) = got["job_recovery"]
        assert rec["max_restarts_on_errors"] >= 1 and 75 in rec["recover_on_exit_codes"]
