"""What the docs generator reads and measures, apart from how it writes (scripts/gen_config_docs.py).

The typed config schema walked key by key (types, schema defaults, docs from field comments and
class docstrings), the config group options and who sets what, the data sources' keyword
arguments, and the scaling.md figures: per-stage step time from the analytic FLOPs and the H200
MFU, and the memory model from measured peaks. Imported by path (scripts/ is not a package).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "configs"
BENCH = ROOT / "docs" / "bench"


def fmt(v, *, inner: bool = False) -> str:
    """A value as compact YAML-ish text (deterministic)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        if v == "" or (inner and re.search(r"[\s,:\[\]{}#\"']", v)):
            return json.dumps(v, ensure_ascii=False)
        return v
    if isinstance(v, list | tuple):
        return "[" + ", ".join(fmt(x, inner=True) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x, inner=True)}" for k, x in v.items()) + "}"
    if dataclasses.is_dataclass(v):
        return fmt(dataclasses.asdict(v), inner=inner)
    return str(v)


def docstring_entries(doc: str, names: list[str]) -> dict[str, str]:
    """`name: text` / `a, b: text` / `a / b: text` entries of a class docstring, for the given field names.

    An entry runs to the next entry or the end of its paragraph."""
    if not doc or not names:
        return {}
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    head = re.compile(rf"(?<![\w.`=])((?:{alt})(?:\s*(?:,|/)\s*(?:{alt}))*):\s")
    out: dict[str, str] = {}
    for para in re.split(r"\n\s*\n", doc):
        para = " ".join(para.split())
        hits = list(head.finditer(para))
        for i, m in enumerate(hits):
            end = hits[i + 1].start() if i + 1 < len(hits) else len(para)
            text = para[m.end():end].strip().rstrip(";").strip()
            for name in re.split(r"\s*(?:,|/)\s*", m.group(1)):
                if text and name not in out:
                    out[name] = text
    return out


@functools.cache
def class_docs(cls: type) -> dict[str, str]:
    """Field name -> doc for the fields *declared* in `cls` (not inherited)."""
    lines, _ = inspect.getsourcelines(cls)
    src = textwrap.dedent("".join(lines))
    node = ast.parse(src).body[0]
    src_lines = src.splitlines()
    comments: dict[int, tuple[int, str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    fields = [n for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    entries = docstring_entries(ast.get_docstring(node) or "", [f.target.id for f in fields])
    out = {}
    for f in fields:
        trailing = next((comments[ln][1] for ln in range(f.lineno, f.end_lineno + 1)
                         if ln in comments and src_lines[ln - 1][:comments[ln][0]].strip()), "")
        above, ln = [], f.lineno - 1
        while ln >= 1 and src_lines[ln - 1].strip().startswith("#"):
            above.insert(0, src_lines[ln - 1].strip().lstrip("#").strip())
            ln -= 1
        out[f.target.id] = trailing or entries.get(f.target.id, "") or " ".join(above)
    return out


def class_summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    if cls.__doc__ is None or doc.startswith(cls.__name__ + "("):  # dataclass auto-docstring
        return ""
    return " ".join(doc.split())


def owner_of(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in c.__dict__.get("__annotations__", {}))


def type_name(t) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    return str(t).replace("typing.", "")


def nested_dataclass(t) -> tuple[type | None, bool]:
    """(dataclass, is_list) for `X`, `X | None`, `list[X]`; (None, False) otherwise."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            found = nested_dataclass(a)
            if found[0] is not None:
                return found
        return None, False
    if origin is list and args:
        inner, _ = nested_dataclass(args[0])
        return inner, inner is not None
    if isinstance(t, type) and dataclasses.is_dataclass(t):
        return t, False
    return None, False


@dataclasses.dataclass
class Key:
    key: str
    type: str
    default: str
    doc: str
    section: bool  # a nested dataclass (its keys follow as `key.x`)


def schema_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def walk(cls: type, prefix: str = "") -> list[Key]:
    """Every key of dataclass `cls`, nested sections flattened to dotted keys (`a.b`, lists as `a[].b`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        owner = owner_of(cls, f.name)
        key = prefix + f.name
        sub, is_list = nested_dataclass(hints[f.name])
        default = schema_default(f)
        if default is dataclasses.MISSING:
            shown = "required"
        elif sub is not None and not is_list and default is not None:
            shown = "(section)"
        elif is_list and isinstance(default, list):
            shown = f"{len(default)} × {sub.__name__}()" if default else "[]"
        else:
            shown = fmt(default)
        doc = class_docs(owner).get(f.name, "") or (class_summary(sub) if sub is not None else "")
        out.append(Key(key, type_name(f.type), shown, doc, sub is not None))
        if sub is not None:
            out += walk(sub, key + ("[]." if is_list else "."))
    return out


def yaml_description(text: str) -> str:
    """The comment lines at the top of a YAML file (minus `# @package`)."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith("#"):
            break
        if not s.startswith("# @package"):
            out.append(s.lstrip("#").strip())
    return " ".join(out)


def yaml_comments(text: str) -> dict[str, str]:
    """Trailing comments of top-level `key: value  # comment` lines."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):[^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


@dataclasses.dataclass
class Option:
    group: str
    name: str
    description: str
    values: dict  # merged with the option's same-group defaults
    own: dict  # the file's own keys
    overrides: list[str]  # `override /group: option` entries of the defaults list
    extends: list[str]
    comments: dict[str, str]
    global_package: bool


@functools.cache
def load_option(group: str, name: str) -> Option:
    text = (CONFIGS / group / f"{name}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    defaults = data.pop("defaults", []) or []
    merged, overrides, extends, self_done = {}, [], [], False
    for d in defaults:
        if d == "_self_":
            merged, self_done = deep_merge(merged, data), True
        elif isinstance(d, str):
            merged = deep_merge(merged, load_option(group, d).values)
            extends.append(d)
        elif isinstance(d, dict):
            overrides += [f"{k}: {fmt(v)}" for k, v in d.items()]
    if not self_done:
        merged = deep_merge(merged, data)
    return Option(group, name, yaml_description(text), merged, data, overrides, extends, yaml_comments(text),
                  "@package _global_" in text)


def groups() -> dict[str, list[str]]:
    return {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in sorted(CONFIGS.iterdir()) if g.is_dir()}


def root_defaults() -> dict[str, str | None]:
    data = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    out = {}
    for d in data.get("defaults", []):
        if isinstance(d, dict):
            for k, v in d.items():
                if not k.startswith("override "):
                    out[k] = v
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_by(group_names: dict[str, list[str]]) -> dict[str, list[str]]:
    """dotted key -> ['`group/option`: value', ...] over every non-experiment group option."""
    out: dict[str, list[str]] = {}
    root = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    for k, v in flatten({k: v for k, v in root.items() if k not in ("defaults", "hydra")}).items():
        out.setdefault(k, []).append(f"`train.yaml`: {fmt(v)}")
    for group, options in group_names.items():
        if group == "experiment":
            continue
        for name in options:
            opt = load_option(group, name)
            for k, v in flatten(opt.values, "" if opt.global_package else f"{group}.").items():
                if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                    shown = f"{len(v)} stage(s), see below" if k == "curriculum.stages" else f"{len(v)} item(s)"
                else:
                    shown = fmt(v)
                out.setdefault(k, []).append(f"`{group}/{name}`: {shown}")
    return out


@functools.cache
def trainer_data_kwargs() -> tuple[str, ...]:
    """Keyword arguments the trainer passes to `instantiate(cfg.data, ...)` (read from motif_train/trainer.py)."""
    tree = ast.parse((ROOT / "motif_train" / "trainer.py").read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "instantiate"
                and node.args and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "data"):
            return tuple(k.arg for k in node.keywords if k.arg)
    raise SystemExit("motif_train/trainer.py: no `instantiate(cfg.data, ...)` call found")


def data_source_keys(target: str) -> tuple[list[tuple[str, object, str]], list[str]]:
    """(key, signature default, doc) of the config kwargs of a data source class, and the kwargs the trainer
    supplies. Docs come from a dataclass in the source's module whose `_target_` default names the class
    (the group YAML's trailing comments are the fallback, added by the caller)."""
    import importlib

    mod_name, cls_name = target.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    cls = getattr(mod, cls_name)
    docs: dict[str, str] = {}
    for obj in vars(mod).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and getattr(obj, "_target_", None) == target:
            docs = class_docs(obj)
    keys, supplied = [], []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.name in trainer_data_kwargs():
            supplied.append(p.name)
        else:
            default = dataclasses.MISSING if p.default is inspect.Parameter.empty else p.default
            keys.append((p.name, default, docs.get(p.name, "")))
    return keys, supplied


EXPERIMENT = "motif_video_2b_64xh200"


NODES, GPUS_PER_NODE = 8, 8


SIGLIP_TOKENS = (896 // 14) ** 2  # SigLIP so400m tokens of one I2V first frame


TEXT_LEN = 512  # text tokens per sample assumed (captions are trimmed to their length, so real runs use fewer)


MFU_RUN = "TREAD 2..23 r=0.5"  # the train_gpu.json row whose MFU predicts the (routed, AC, compiled) stages


# Measured on one H200 (torch 2.11.0+cu130) with `scripts/bench_model.py --device cuda --preset motif_video_2b
# --shape <shape> --dtype bf16 --text-len 512 --reps 1 --warmup 0 --ac --skip-diffusers`: model-only peak memory
# (bf16 weights, no optimizer) of one sample with activation checkpointing on every block, GiB.
AC_PEAK_GIB = {"81x480x832": {"ours": 12.9, "routed": 12.0}, "121x736x1280": {"ours": 35.4, "routed": 32.3}}


TEACHER_PARAMS = 0.33e9  # V-JEPA 2 ViT-L teacher (fp32, resident on every rank when a stage has REPA)


HBM_GIB = 140.4  # H200: 143,771 MiB (nvidia-smi)


FIT_FRACTION = 0.9  # fits: estimate <= 90 % of HBM (CUDA context, NCCL buffers, fragmentation)


GIB = 2**30


@functools.cache
def scaling_inputs() -> dict:
    import torch
    from diffusers import MotifVideoTransformer3DModel

    from motif_train.distributed.mesh import ParallelConfig
    from motif_train.metrics import match_device_name
    from motif_train.models.config import load_model_config
    from motif_train.models.dit import MotifDiT

    exp = load_option("experiment", EXPERIMENT)
    ov = dict(line.split(": ", 1) for line in exp.overrides)
    model_name, curriculum_name = ov["override /model"], ov["override /curriculum"]
    parallel = deep_merge(load_option("parallel", ov.get("override /parallel", "fsdp")).values,
                          exp.own.get("parallel", {}))
    pcfg = ParallelConfig(**{k: v for k, v in parallel.items() if k in {f.name for f in dataclasses.fields(
        ParallelConfig)}})
    rep, shard = pcfg.degrees(NODES * GPUS_PER_NODE, GPUS_PER_NODE)
    cfg = load_model_config(model_name)
    with torch.device("meta"):
        ours = MotifDiT(cfg)
        ref = MotifVideoTransformer3DModel(**cfg.diffusers_config())
    blocks = [b for blocks in (ours.transformer_blocks, ours.single_transformer_blocks) for b in blocks]
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    params = sum(p.numel() for p in ours.parameters())
    root_params = params - sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    train_gpu = json.loads((BENCH / "train_gpu.json").read_text())
    model_gpu = json.loads((BENCH / "gpu_2b_81x480x832.json").read_text())
    cond = exp.own.get("objective", {}).get("conditioning", {})
    repa = exp.own.get("objective", {}).get("repa", {})
    return dict(
        model_name=model_name, curriculum_name=curriculum_name, cfg=cfg, rep=rep, shard=shard, ac=pcfg.ac,
        ac_every=pcfg.ac_every, stages=load_option("curriculum", curriculum_name).values["stages"],
        i2v_prob=float(cond.get("i2v_prob", 0.0)), image_tokens=SIGLIP_TOKENS,
        repa_weight=float(repa.get("weight", 0.5)), repa_until=repa.get("until_step"),
        params=params, ref_params=sum(p.numel() for p in ref.parameters()), block_params=block_params,
        root_params=root_params, mfu=float(train_gpu[MFU_RUN]["mfu"]), mfu_device=train_gpu["device"],
        mfu_setup=train_gpu.get("setup", ""), peak=match_device_name(train_gpu["device"]),
        model_gpu=model_gpu,
    )


def stage_rows() -> list[dict]:
    """One row per (stage, bucket) of the recipe, with the numbers of the step-time table."""
    from motif_train.data.plan import bucket_batch_size
    from motif_train.distributed.cost import predicted_step_s, recompute_factor
    from motif_train.models.config import RoutingConfig
    from motif_train.models.flops import latent_shape, model_flops, num_video_tokens

    s = scaling_inputs()
    cfg, dp = s["cfg"], s["rep"] * s["shard"]
    rows = []
    first_step = 1
    for i, st in enumerate(s["stages"]):
        route = RoutingConfig(**st["routing"]) if st.get("routing") else None
        lats = [latent_shape(*b) for b in st["buckets"]]
        tokens = [num_video_tokens(cfg, lat) for lat in lats]
        ref = max(tokens)  # build_plan: attention-aware batches are relative to the stage's largest bucket
        last_step = first_step + st["steps"] - 1
        repa_on = bool(st.get("repa")) and s["repa_weight"] > 0 and (
            s["repa_until"] is None or first_step <= s["repa_until"])
        p_i2v = st.get("i2v_prob")
        p_i2v = s["i2v_prob"] if p_i2v is None else float(p_i2v)
        for b, lat, n in zip(st["buckets"], lats, tokens, strict=True):
            batch = bucket_batch_size(n, st["token_budget"], attention_aware=bool(st.get("attention_aware")),
                                      ref_tokens=ref)
            t2v = model_flops(cfg, lat, text_len=TEXT_LEN, routing=route, repa=repa_on).total
            video = lat[0] >= 2  # images (one latent frame) always train as T2V
            i2v = model_flops(cfg, lat, text_len=TEXT_LEN, image_len=s["image_tokens"], routing=route,
                              repa=repa_on).total if video else t2v
            p = p_i2v if video else 0.0
            mean = (1 - p) * t2v + p * i2v
            step_s = predicted_step_s(batch * mean, peak_tflops=s["peak"], mfu=s["mfu"],
                                      recompute=recompute_factor(s["ac"], n, s["ac_every"]))
            rows.append(dict(stage=i, name=st["name"], steps=st["steps"], first=first_step, last=last_step,
                             bucket="x".join(map(str, b)), tokens=n, batch=batch, global_batch=batch * dp,
                             t2v_pflop=t2v / 1e15, i2v_pflop=i2v / 1e15, p_i2v=p, step_s=step_s,
                             samples_s=batch * dp / step_s, repa=repa_on,
                             act_tokens=batch * (n + TEXT_LEN + (s["image_tokens"] if video and p > 0 else 0))))
        first_step = last_step + 1
    return rows


def stage_summary(rows: list[dict]) -> list[dict]:
    """Per stage, assuming every bucket holds the same number of samples (so a bucket's share of the steps is
    proportional to 1 / its per-rank batch)."""
    out = []
    for i in sorted({r["stage"] for r in rows}):
        rs = [r for r in rows if r["stage"] == i]
        w = [1.0 / r["batch"] for r in rs]
        step_s = sum(wi * r["step_s"] for wi, r in zip(w, rs, strict=True)) / sum(w)
        samples_per_step = len(rs) / sum(w) * (rs[0]["global_batch"] / rs[0]["batch"])
        out.append(dict(stage=i, name=rs[0]["name"], steps=rs[0]["steps"], first=rs[0]["first"], last=rs[0]["last"],
                        step_s=step_s, samples_s=samples_per_step / step_s, days=rs[0]["steps"] * step_s / 86400,
                        samples=rs[0]["steps"] * samples_per_step))
    return out


def memory_model() -> dict:
    """Per-token activation slopes (GiB / token, routed) and the per-rank constant terms, from measured peaks."""
    s = scaling_inputs()
    mg = s["model_gpu"]
    n_meas = int(mg["tokens"]) + TEXT_LEN
    weights_noac = 2 * (s["params"] + s["ref_params"]) / GIB  # the no-AC bench held ours + diffusers, bf16
    weights_ac = 2 * s["params"] / GIB  # the AC bench held ours only
    act_noac = (mg["peak_mem_gib"]["routed"] - weights_noac) / n_meas
    act_ac = (AC_PEAK_GIB["81x480x832"]["routed"] - weights_ac) / n_meas
    states = 20 * s["params"] / s["shard"] / GIB  # fp32 params + fp32 grads + Adam m, v + fp32 EMA, sharded
    transient = (2 * 2 * s["block_params"] + 4 * s["block_params"] + 2 * s["root_params"]) / GIB
    teacher = 4 * TEACHER_PARAMS / GIB if any(st.get("repa") for st in s["stages"]) else 0.0
    k = s["ac_every"]
    return dict(n_meas=n_meas, weights_noac=weights_noac, weights_ac=weights_ac, act_noac=act_noac, act_ac=act_ac,
                act_every_k=(1 - 1 / k) * act_noac + act_ac / k, k=k, states=states, transient=transient,
                teacher=teacher, fixed=states + transient + teacher, limit=FIT_FRACTION * HBM_GIB)
