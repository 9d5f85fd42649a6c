"""`motif-export`: a DCP training checkpoint -> a diffusers `MotifVideoTransformer3DModel` folder.

    motif-export checkpoint=runs/x/checkpoints/step_00012000 out=export/transformer [weights=ema|raw]

Runs in one process without a process group (DCP reads the shards of any world size). The model
config comes from the run's resolved `config.yaml` (next to `checkpoints/`, or `config=<path>`).
The output loads with `MotifVideoTransformer3DModel.from_pretrained(out)` (strict) and drops into a
`MotifVideoPipeline` / `MotifVideoImage2VideoPipeline` folder as its `transformer/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from motif_train.ema import clean_name
from motif_train.models import MotifDiT, RoutingConfig, to_diffusers
from motif_train.models.convert import drop_tied_duplicates


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
        shadow = {n: torch.empty_like(p) for n, p in params.items()}
        try:
            dcp.load({"ema": shadow}, checkpoint_id=str(checkpoint), no_dist=True)
        except Exception as e:  # noqa: BLE001 - name the likely cause
            raise RuntimeError(f"{checkpoint}: no EMA weights ({type(e).__name__}: {e}); the run had "
                               "ema.enabled=false: export weights=raw") from None
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(shadow[n])
    return model.eval()


USAGE = "usage: motif-export checkpoint=<DCP step dir> out=<dir> [weights=ema|raw] [config=<run config.yaml>]"


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, weights: str = "ema",
                      config: str | None = None) -> Path:
    model = load_checkpoint_model(checkpoint, weights=weights, config=config)
    to_diffusers(model).save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_kv(sys.argv[1:] if argv is None else argv,
                    {"checkpoint": "required", "out": "required", "weights": "ema", "config": ""}, USAGE)
    out = export_checkpoint(args["checkpoint"], args["out"], weights=args.get("weights", "ema"),
                            config=args.get("config"))
    print(f"wrote {out} ({args.get('weights', 'ema')} weights of {args['checkpoint']}): "
          f"MotifVideoTransformer3DModel.from_pretrained('{out}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
