"""`motif-export`: a DCP training checkpoint -> a diffusers `MotifVideoTransformer3DModel` folder.

    motif-export checkpoint=runs/x/checkpoints/step_00012000 out=export/transformer [weights=ema|raw]

Runs in one process without a process group (DCP reads the shards of any world size). The model
config comes from the run's resolved `config.yaml` (next to `checkpoints/`, or `config=<path>`).
The output loads with `MotifVideoTransformer3DModel.from_pretrained(out)` (strict) and drops into a
`MotifVideoPipeline` / `MotifVideoImage2VideoPipeline` folder as its `transformer/`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from motif_train.ema import clean_name
from motif_train.models import MotifDiT, RoutingConfig, to_diffusers
from motif_train.models.convert import drop_tied_duplicates
from motif_train.models.lora import merged_model


def parse_kv(argv: list[str], allowed: dict[str, str], usage: str) -> dict[str, str]:
    """`key=value` arguments (Hydra style); unknown keys and missing required ones exit 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        raise SystemExit(0)
    out = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in allowed:
            print(f"error: {a!r}: expected one of {', '.join(f'{k}=' for k in allowed)}\n{usage}", file=sys.stderr)
            raise SystemExit(2)
        out[key] = value
    missing = [k for k, v in allowed.items() if v == "required" and k not in out]
    if missing:
        print(f"error: missing {', '.join(f'{k}=' for k in missing)}\n{usage}", file=sys.stderr)
        raise SystemExit(2)
    return out


def run_config(checkpoint: Path, config: str | None = None):
    """The training run's resolved config (OmegaConf) for a checkpoint folder."""
    from omegaconf import OmegaConf

    path = Path(config) if config else checkpoint.parent.parent / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass config=<the run's config.yaml>")
    return OmegaConf.load(path)


def load_checkpoint_model(checkpoint: str | Path, *, weights: str = "ema", config: str | None = None) -> MotifDiT:
    """Our DiT (fp32, CPU, eval, no routing) with the raw or EMA weights of a DCP checkpoint."""
    from motif_train.config import ModelSpec

    checkpoint = Path(checkpoint)
    if not (checkpoint / "COMPLETE").exists():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no COMPLETE marker)")
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: use ema or raw")
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(run_config(checkpoint, config).model, resolve=True)
    names = set(ModelSpec.__dataclass_fields__)
    spec = ModelSpec(**{k: v for k, v in model_cfg.items() if k in names})
    if spec.lora.enabled:  # a LoRA run: the adapters merged into the base (motif-export --merge)
        return merged_model(load_lora_checkpoint(checkpoint, spec, weights=weights))
    dit = spec.dit_config()
    dit.routing = RoutingConfig(ratio=0.0)
    with torch.device("meta"):
        model = MotifDiT(dit)
    model.to_empty(device="cpu")
    if weights == "raw":
        state = drop_tied_duplicates(model.state_dict(), dit)  # tied tensors are filled through their alias
        dcp.load({"model": state}, checkpoint_id=str(checkpoint), no_dist=True)
    else:
        params = {clean_name(n): p for n, p in model.named_parameters()}
        # A run that used no REPA froze its REPA head (models.apply_repa_freeze): no EMA copy, the raw one is it.
        saved = set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
        frozen = {n for n in params if n.startswith("repa_projector.") and f"ema.{n}" not in saved}
        shadow = {n: torch.empty_like(p) for n, p in params.items()}
        try:
            dcp.load({"ema": {n: t for n, t in shadow.items() if n not in frozen}}, checkpoint_id=str(checkpoint),
                     no_dist=True)
        except Exception as e:  # noqa: BLE001 - name the likely cause
            raise RuntimeError(f"{checkpoint}: no EMA weights ({type(e).__name__}: {e}); the run had "
                               "ema.enabled=false: export weights=raw") from None
        if frozen:
            dcp.load({"model": {n: shadow[n] for n in frozen}}, checkpoint_id=str(checkpoint), no_dist=True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(shadow[n])
    return model.eval()


USAGE = ("usage: motif-export checkpoint=<DCP step dir> out=<dir> [weights=ema|raw] [config=<run config.yaml>]\n"
         "       LoRA runs: --lora (the adapter: pytorch_lora_weights.safetensors) or --merge (full weights, the\n"
         "       default); [base=<transformer folder>] replaces the run's model.init_from")


# ---- LoRA runs (model.lora.rank > 0): the checkpoint holds the adapters; the base is model.init_from --------


def load_lora_checkpoint(checkpoint: str | Path, spec, *, weights: str = "ema", base: str | None = None,
                         with_base: bool = True) -> MotifDiT:
    """Our DiT with the run's adapters (fp32, CPU, eval): the base from `base` (default the run's
    `model.init_from`), the adapters (raw or EMA) from the DCP checkpoint. `with_base=False` leaves the
    base uninitialised (enough to write the adapter alone)."""
    from motif_train.models.convert import check_tied_copies, load_diffusers_folder
    from motif_train.models.lora import apply_lora, base_state_keys, trainable_names

    checkpoint = Path(checkpoint)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: use ema or raw")
    dit = spec.dit_config()
    dit.routing = RoutingConfig(ratio=0.0)
    with torch.device("meta"):
        model = MotifDiT(dit)
    apply_lora(model, dataclasses.replace(spec.lora, base_dtype="float32"))  # merge in fp32
    model.to_empty(device="cpu")
    model.init_weights()
    if with_base:
        folder = base or spec.init_from
        if not folder:
            raise ValueError("the run's model.init_from is null: pass base=<the transformer folder it adapted>")
        _, state = load_diffusers_folder(folder)
        if dit.shared_kv:
            check_tied_copies(state, dit)
        missing, unexpected = model.load_state_dict(base_state_keys(model, state), strict=False)
        missing = [k for k in missing if ".lora_" not in k and not k.startswith("repa_projector.")]
        if missing or unexpected:
            raise ValueError(f"base={folder}: weights do not fit the run's model.* (missing {missing[:6]}, "
                             f"unexpected {sorted(unexpected)[:6]})")
    params = dict(zip(trainable_names(model), (p for p in model.parameters() if p.requires_grad), strict=True))
    # the REPA head is never exported, and a run that used no REPA has it frozen: not in the checkpoint
    params = {k: v for k, v in params.items() if not k.startswith("repa_projector.")}
    key = "ema" if weights == "ema" else "model"
    try:
        dcp.load({key: params}, checkpoint_id=str(checkpoint), no_dist=True)
    except Exception as e:  # noqa: BLE001 - name the likely cause
        hint = "the run had ema.enabled=false: export weights=raw" if key == "ema" else "is it this run's checkpoint?"
        raise RuntimeError(f"{checkpoint}: no {key} adapter weights ({type(e).__name__}: {e}); {hint}") from None
    return model.eval()


def export_lora(checkpoint: str | Path, out: str | Path, *, weights: str = "ema", config: str | None = None,
                merge: bool = False, base: str | None = None) -> Path:
    """`--lora`: the adapter (`MotifVideoTransformer3DModel.load_lora_adapter(out, weight_name=
    "pytorch_lora_weights.safetensors")`); `--merge`: a full diffusers folder with the adapter merged."""
    from motif_train.config import ModelSpec
    from motif_train.models.lora import save_adapter

    checkpoint = Path(checkpoint)
    if not (checkpoint / "COMPLETE").exists():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no COMPLETE marker)")
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(run_config(checkpoint, config).model, resolve=True)
    spec = ModelSpec(**{k: v for k, v in model_cfg.items() if k in ModelSpec.__dataclass_fields__})
    if not spec.lora.enabled:
        raise ValueError(f"{checkpoint}: not a LoRA run (model.lora.rank=0); export it without --lora / --merge")
    model = load_lora_checkpoint(checkpoint, spec, weights=weights, base=base, with_base=merge)
    if merge:
        to_diffusers(merged_model(model)).save_pretrained(out)
    else:
        save_adapter(out, model)
    return Path(out)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, weights: str = "ema",
                      config: str | None = None) -> Path:
    model = load_checkpoint_model(checkpoint, weights=weights, config=config)
    warn_release_mismatch(model, run_config(Path(checkpoint), config))
    to_diffusers(model).save_pretrained(out)  # config.json: the config the model was built (and trained) with
    return Path(out)


def warn_release_mismatch(model: MotifDiT, run_cfg) -> None:
    """Runs from before the trainer checked `model.init_from`'s config.json may have trained another
    model than the release (e.g. its rope_theta): say so, since no weight shape shows it."""
    from motif_train.models.convert import open_release, release_mismatch

    init_from = run_cfg.model.get("init_from")
    try:
        diff = release_mismatch(open_release(init_from), model.config) if init_from else {}
    except (OSError, ValueError):
        return  # the release is gone or unreadable here: nothing to compare with
    if diff:
        keys = ", ".join(f"{k}={a!r} (release {b!r})" for k, (a, b) in diff.items())
        print(f"warning: this run was trained with {keys}, unlike its model.init_from={init_from}; the export "
              "writes the config it was trained with", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {f for f in ("--lora", "--merge") if f in argv}
    argv = [a for a in argv if a not in flags]
    if len(flags) == 2:
        print(f"error: --lora and --merge exclude each other\n{USAGE}", file=sys.stderr)
        return 2
    args = parse_kv(argv, {"checkpoint": "required", "out": "required", "weights": "ema", "config": "",
                           **({"base": ""} if flags else {})}, USAGE)
    if flags:
        out = export_lora(args["checkpoint"], args["out"], weights=args.get("weights", "ema"),
                          config=args.get("config"), merge="--merge" in flags, base=args.get("base"))
        what = ("MotifVideoTransformer3DModel.from_pretrained" if "--merge" in flags else
                "transformer.load_lora_adapter(..., weight_name='pytorch_lora_weights.safetensors') on")
        print(f"wrote {out} ({args.get('weights', 'ema')} LoRA of {args['checkpoint']}): {what} '{out}'")
        return 0
    out = export_checkpoint(args["checkpoint"], args["out"], weights=args.get("weights", "ema"),
                            config=args.get("config"))
    print(f"wrote {out} ({args.get('weights', 'ema')} weights of {args['checkpoint']}): "
          f"MotifVideoTransformer3DModel.from_pretrained('{out}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
