"""Ulysses context parallelism at the recipe's shapes: what one rank sends per joint attention
next to the attention FLOPs it runs (docs/scaling.md).

    python scripts/cp_volume.py
"""

from __future__ import annotations

from motif_train.distributed.context_parallel import ulysses_bytes
from motif_train.models.config import load_model_config
from motif_train.models.flops import latent_shape, num_video_tokens

# Stated assumptions for the time columns, not measurements: NVLink 4 on an H200 node moves
# 450 GB/s per direction per GPU; attention kernels sustain 60 % of the 989 TFLOP/s bf16 peak.
NVLINK_BPS = 450e9
ATTN_FLOPS = 0.6 * 989e12


def rows(text: int = 512, image: int = 729) -> list[dict]:
    cfg = load_model_config("motif_video_2b")
    d = cfg.inner_dim
    out = []
    for name, bucket in (("480p x 81", (81, 480, 832)), ("720p x 121", (121, 720, 1280))):
        n = num_video_tokens(cfg, latent_shape(*bucket))
        s = n + text + image
        for cp in (2, 4, 6):
            sent = ulysses_bytes(n, text + image, d, cp)
            flops = 4 * s * s * d / cp  # QK^T and PV for the whole sequence, H/cp heads, forward
            out.append({"clip": name, "video_tokens": n, "cp": cp, "mib_sent": sent / 2**20, "attn_tflop": flops / 1e12,
                        "comm_ms": sent / NVLINK_BPS * 1e3, "attn_ms": flops / ATTN_FLOPS * 1e3})
    return out


def main() -> None:
    print("| clip | video tokens | cp | MiB sent / rank / attention (fwd) | attention TFLOP / rank (fwd) "
          "| all-to-all ms at 450 GB/s | attention ms at 60 % of 989 TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows():
        print(f"| {r['clip']} | {r['video_tokens']:,} | {r['cp']} | {r['mib_sent']:.0f} | {r['attn_tflop']:.2f} "
              f"| {r['comm_ms']:.2f} | {r['attn_ms']:.1f} |")


if __name__ == "__main__":
    main()
