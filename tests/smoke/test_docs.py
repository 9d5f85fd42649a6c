"""The docs cannot go stale: generated files match the code, every schema key is documented, links
resolve, named console scripts exist, and docs/scaling.md's step-time table agrees with the analytic
FLOPs and the measured MFU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
GEN = ROOT / "scripts" / "gen_config_docs.py"
NOT_SCRIPTS = {"motif-video"}  # the W&B project name (logger.project), not a console script


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", GEN)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def _strip_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


# ---- (a) the generated docs are up to date -----------------------------------------------------


def test_generated_docs_are_current(gen, capsys):
    rc = gen.main(["--check"])
    assert rc == 0, "docs are stale; run `.venv/bin/python scripts/gen_config_docs.py`\n" + capsys.readouterr().out


# ---- (b) every key of every schema section is in docs/configs.md -------------------------------


def _schema_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        yield key
        t = hints[f.name]
        args = [t, *typing.get_args(t)]
        for a in args:
            inner = typing.get_args(a)[0] if typing.get_origin(a) is list and typing.get_args(a) else None
            if isinstance(a, type) and dataclasses.is_dataclass(a):
                yield from _schema_keys(a, key + ".")
                break
            if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                yield from _schema_keys(inner, key + "[].")
                break


def test_every_schema_key_is_documented():
    from motif_train.config import TrainConfig

    text = (ROOT / "docs" / "configs.md").read_text()
    keys = list(_schema_keys(TrainConfig))
    assert len(keys) > 100
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"docs/configs.md lacks {missing}; run scripts/gen_config_docs.py"


def test_every_group_option_and_data_key_is_documented():
    import yaml

    text = (ROOT / "docs" / "configs.md").read_text()
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        group, option = path.parent.name, path.stem
        needle = f"`experiment={option}`" if group == "experiment" else f"`{group}={option}`"
        if group == "curriculum":
            needle = f"`curriculum={option}`"
        assert needle in text, f"{group}/{option} missing from docs/configs.md"
        if group == "data":
            for key in (yaml.safe_load(path.read_text()) or {}):
                assert f"`data.{key}`" in text, f"data/{option}: key {key} missing from docs/configs.md"


# ---- (c) relative links resolve -----------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(md: Path) -> set[str]:
    out = set()
    for line in _strip_code(md.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            title = re.sub(r"[`*_]", "", m.group(1)).strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    bad = []
    for target in LINK.findall(_strip_code(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = doc if not path else (doc.parent / path).resolve()
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor})")
    assert not bad, f"{doc.relative_to(ROOT)}: broken links {bad}"


# ---- (d) console scripts named in the docs exist ------------------------------------------------


def test_named_console_scripts_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    named = {}
    for doc in DOCS:
        for name in re.findall(r"(?<![\w/.-])motif-[a-z][a-z0-9]*(?:-[a-z0-9]+)*\b(?!:)", doc.read_text()):
            named.setdefault(name, doc.relative_to(ROOT).as_posix())
    named = {k: v for k, v in named.items() if k not in NOT_SCRIPTS}
    assert {"motif-train", "motif-preprocess", "motif-plan"} <= set(named)
    missing = {k: v for k, v in named.items() if k not in scripts}
    assert not missing, f"console scripts named in the docs but not in [project.scripts]: {missing}"


# ---- (e) scaling.md's step-time table matches the code and the measured MFU ---------------------


def _table(md: str, block: str) -> list[dict[str, str]]:
    m = re.search(rf"<!-- BEGIN GENERATED: {block} -->\n(.*?)<!-- END GENERATED: {block} -->", md, re.S)
    assert m, f"docs/scaling.md has no generated block {block!r}"
    lines = [ln for ln in m.group(1).splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


def test_scaling_step_times_follow_flops_and_measured_mfu():
    import yaml

    from motif_train.data.plan import bucket_batch_size
    from motif_train.models.config import RoutingConfig, load_model_config
    from motif_train.models.flops import latent_shape, model_flops, num_video_tokens

    bench = json.loads((ROOT / "docs" / "bench" / "train_gpu.json").read_text())
    assert bench["device"] == "NVIDIA H200"
    mfu = bench["TREAD 2..23 r=0.5"]["mfu"]
    assert 0.3 < mfu < 0.45
    exp = yaml.safe_load((ROOT / "configs" / "experiment" / "motif_video_2b_64xh200.yaml").read_text())
    i2v_prob, image_len = exp["objective"]["conditioning"]["i2v_prob"], (896 // 14) ** 2  # SigLIP so400m
    stages = yaml.safe_load((ROOT / "configs" / "curriculum" / "motif_4stage.yaml").read_text())["stages"]
    cfg = load_model_config("motif_video_2b")
    rows = _table((ROOT / "docs" / "scaling.md").read_text(), "step-time")
    assert len(rows) == sum(len(s["buckets"]) for s in stages)
    rows = iter(rows)
    for i, st in enumerate(stages):
        route = RoutingConfig(**st["routing"])
        lats = [latent_shape(*b) for b in st["buckets"]]
        ref = max(num_video_tokens(cfg, lat) for lat in lats)
        for b, lat in zip(st["buckets"], lats, strict=True):
            row = next(rows)
            n = num_video_tokens(cfg, lat)
            assert row["bucket F×H×W"] == "x".join(map(str, b)) and row["stage"].startswith(str(i))
            assert int(row["tokens N"].replace(",", "")) == n
            batch = bucket_batch_size(n, st["token_budget"], attention_aware=st.get("attention_aware", False),
                                      ref_tokens=ref)
            assert int(row["per-rank batch"]) == batch and int(row["global batch"]) == 64 * batch
            t2v = model_flops(cfg, lat, text_len=512, routing=route, repa=st["repa"]).total
            i2v = model_flops(cfg, lat, text_len=512, image_len=image_len, routing=route, repa=st["repa"]).total
            p = i2v_prob if lat[0] > 1 else 0.0
            assert float(row["T2V PFLOP / sample"]) == pytest.approx(t2v / 1e15, abs=6e-5)
            if lat[0] > 1:
                assert float(row["I2V PFLOP / sample"]) == pytest.approx(i2v / 1e15, abs=6e-5)
            # selective AC executes 1.054x (480p-like) / 1.017x (720p) its counted FLOPs, the MFU run 1.293x
            rec = 1.017 if n > (32760 + 114080) / 2 else 1.054
            step = batch * ((1 - p) * t2v + p * i2v) * rec / 1.293 / (989e12 * mfu)
            assert float(row["step time s"]) == pytest.approx(step, abs=0.006)
            assert float(row["samples/s (64 GPUs)"]) == pytest.approx(64 * batch / step, rel=2e-3, abs=0.06)


def test_scaling_720p_memory_verdict():
    """The doc must say 720p x 121 does not fit without AC and fits with it (the reason the recipe sets ac=full)."""
    rows = _table((ROOT / "docs" / "scaling.md").read_text(), "memory")
    last = rows[-1]
    assert "720p" in last["stage"]
    assert last["no AC GiB"].endswith("❌") and last["AC full GiB"].endswith("✅")
