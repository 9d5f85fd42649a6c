"""Random TINY instances of the real frozen-encoder classes, saved like a Motif checkpoint.

Tests and the CPU demo need every encoder path (VAE, T5Gemma2 text + SigLIP vision tower,
tokenizer, V-JEPA 2 teacher) to run end to end with no model hub. These builders use the
same classes and the same `save_pretrained` layout as the released weights, only with a
few thousand random parameters each, so `load_encoders` cannot tell them apart from the
real thing.

Layout written by `build_tiny_encoders(out_dir)` (names of `MotifVideoPipeline` components
where the pipeline has them)::

    out_dir/vae/                AutoencoderKLWan (z_dim 16, 8x spatial, 4x temporal)
    out_dir/text_encoder/       T5Gemma2Encoder (text model + SigLIP vision_tower)
    out_dir/tokenizer/          PreTrainedTokenizerFast (WordPiece, right padding)
    out_dir/feature_extractor/  SiglipImageProcessor config (resize/normalise for SigLIP)
    out_dir/image_encoder/      SiglipVisionModel: the same weights as text_encoder.vision_tower
    out_dir/teacher/            VJEPA2Model (REPA teacher)

and, only with `build_tiny_encoders(out_dir, metric_encoder=True)`::

    out_dir/clip/               CLIPModel + tokenizer + CLIPImageProcessor config: the
                                image-text encoder of the evaluation metrics (video_metrics.py)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Component -> subfolder. The first five follow `MotifVideoPipeline`'s component names
# (vae, text_encoder, tokenizer, feature_extractor); the pipeline has no separate image
# encoder (it uses `text_encoder.vision_tower`) and no teacher, so those two are ours.
SUBFOLDERS = {
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "feature_extractor": "feature_extractor",
    "image_encoder": "image_encoder",
    "teacher": "teacher",
}

# The evaluation metrics' image-text encoder (CLIP or SigLIP, `motif_train.evaluation.video_metrics`): not a
# training component, so not in SUBFOLDERS (whose keys `build_tiny_encoders` returns by default).
METRIC_SUBFOLDER = "clip"

# Tiny dims, exported so tests and demos can assert shapes without reading configs.
TINY_DIMS = {
    "vae_z_dim": 16,
    "text_hidden_size": 32,
    "image_size": 32,
    "image_patch_size": 8,
    "image_hidden_size": 24,
    "image_tokens": (32 // 8) ** 2,
    "teacher_hidden_size": 32,
    "teacher_patch_size": 8,
    "teacher_tubelet_size": 2,
    "teacher_crop_size": 32,
    "tokenizer_max_length": 512,
}

# Gemma's special-token ids (pad 0, eos 1, bos 2, unk 3), so the tiny text config can keep
# T5Gemma2TextConfig's default pad/eos/bos ids.
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]

_WORD_TEXT = """
a an the and or of in on at to with from by for over under into onto through behind near
is are was were be being its it this that these those his her their our my your one two
three man woman person people child children boy girl dog cat bird horse car boat train
city street road river lake sea ocean beach mountain forest tree trees sky cloud clouds sun
moon night day light dark rain snow water fire smoke wind grass flower flowers field house
room table chair window door wall floor camera shot close up wide angle slow motion fast
walks walking runs running sits sitting stands standing looks looking smiles smiling talks
talking holds holding moves moving flies flying drives driving dances dancing plays playing
red green blue yellow white black gray brown orange pink purple golden bright soft warm
cold small large big tall long short old young beautiful quiet busy empty full background
foreground scene video footage cinematic realistic style lighting sunset sunrise glow hair
face eyes hand hands jacket dress shirt hat long brown blonde smile frame view top side
front back left right center moving still zoom pan tilt tracking aerial drone sharp blurry
"""
_WORDS = _WORD_TEXT.split()

_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()")


def _build_tokenizer(max_length: int):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    # WordPiece with every single character (initial and "##" continuation) in the vocab
    # never maps a lowercase ASCII word to <unk>, so token counts stay meaningful in tests.
    for tok in _SPECIALS + list(dict.fromkeys(_WORDS)) + _CHARS + ["##" + c for c in _CHARS]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    bos, eos = vocab["<bos>"], vocab["<eos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", bos), ("<eos>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=max_length, padding_side="right",
    )


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(seed + 1)
    # Non-trivial statistics so a swapped (x-m)/s vs x*s+m convention fails the tests.
    mean = (torch.randn(16, generator=g) * 0.5).tolist()
    std = (0.5 + torch.rand(16, generator=g) * 2.0).tolist()
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std,
    )


def _tiny_text_encoder(seed: int, vocab_size: int):
    from transformers import SiglipVisionConfig, T5Gemma2Encoder, T5Gemma2EncoderConfig, T5Gemma2TextConfig

    d = TINY_DIMS
    text = T5Gemma2TextConfig(
        vocab_size=vocab_size, hidden_size=d["text_hidden_size"], intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        query_pre_attn_scalar=16, max_position_embeddings=d["tokenizer_max_length"],
        # Built directly (not via T5Gemma2Config) the text config lacks these: the encoder
        # reads dropout_rate, and layer_types must list one type per layer.
        dropout_rate=0.0, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
    )
    vision = SiglipVisionConfig(
        hidden_size=d["image_hidden_size"], intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, image_size=d["image_size"], patch_size=d["image_patch_size"],
        vision_use_head=False,
    )
    # mm_tokens_per_image must be a square dividing the patch grid (the projector avg-pools);
    # the projector is unused by Motif, which takes the tower's last_hidden_state directly.
    cfg = T5Gemma2EncoderConfig(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(seed + 2)
    return T5Gemma2Encoder(cfg)


def _tiny_teacher(seed: int):
    from transformers import VJEPA2Config, VJEPA2Model

    d = TINY_DIMS
    cfg = VJEPA2Config(
        crop_size=d["teacher_crop_size"], patch_size=d["teacher_patch_size"],
        tubelet_size=d["teacher_tubelet_size"], frames_per_clip=4, hidden_size=d["teacher_hidden_size"],
        num_attention_heads=2, num_hidden_layers=2, mlp_ratio=2.0, num_pooler_layers=1,
        pred_hidden_size=16, pred_num_attention_heads=2, pred_num_hidden_layers=1,
    )
    torch.manual_seed(seed + 3)
    return VJEPA2Model(cfg)


def _tiny_clip(seed: int, vocab_size: int, max_length: int):
    from transformers import CLIPConfig, CLIPModel

    # The tiny tokenizer's ids: pad 0, eos 1, bos 2. CLIP pools the text at the first eos_token_id
    # (any id but the legacy 2, which would mean "argmax of the ids").
    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": max_length, "pad_token_id": 0,
            "bos_token_id": 2, "eos_token_id": 1}
    vision = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(seed + 4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _save_clip_processor(path: Path, size: int) -> None:
    # The keys and values of openai/clip-vit-base-patch32's preprocessor_config.json at a tiny size
    # (shortest edge resized bicubic, centre crop, OpenAI CLIP mean / std); read back with
    # AutoImageProcessor(backend="pil") as CLIPImageProcessorPil, which needs no torchvision.
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _save_image_processor(path: Path) -> None:
    # Written as JSON rather than through SiglipImageProcessor: its default backend needs
    # torchvision (not installed here); the file is what SiglipImageProcessor.save_pretrained
    # writes, and ImageEncoder reads exactly these keys.
    d = TINY_DIMS
    cfg = {
        "image_processor_type": "SiglipImageProcessor",
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": d["image_size"], "width": d["image_size"]},
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def build_tiny_encoders(out_dir: str | Path, *, seed: int = 0, metric_encoder: bool = False) -> dict[str, Path]:
    """Build random tiny encoders of the real classes and save them under `out_dir`.

    Deterministic in `seed`; runs in about a second on CPU. Weights are safetensors only.

    Args:
        metric_encoder: also write `out_dir/clip` (`METRIC_SUBFOLDER`): a tiny `CLIPModel`
            (32x32 px, patch 8, projection 16, text max length 77) with the tiny tokenizer and a
            CLIPImageProcessor config, for the evaluation metrics. Off by default, so the
            training layout and the returned keys are unchanged.
    Returns:
        `{component: folder}` for the keys of `SUBFOLDERS` (vae, text_encoder, tokenizer,
        feature_extractor, image_encoder, teacher), plus "clip" with `metric_encoder`. Tiny
        dims are in `TINY_DIMS`: VAE z_dim 16; text hidden 32; SigLIP 32x32 px, patch 8 -> 16
        tokens of width 24; V-JEPA 2 crop 32, patch 8, tubelet 2, hidden 32.
    """
    # transformers >= 5 always writes safetensors (no safe_serialization switch); diffusers
    # still has the switch, so it is set explicitly for the VAE.
    out = Path(out_dir)
    paths = {k: out / v for k, v in SUBFOLDERS.items()}

    tokenizer = _build_tokenizer(TINY_DIMS["tokenizer_max_length"])
    tokenizer.save_pretrained(paths["tokenizer"])

    _tiny_vae(seed).save_pretrained(paths["vae"], safe_serialization=True)

    text_encoder = _tiny_text_encoder(seed, vocab_size=len(tokenizer))
    text_encoder.save_pretrained(paths["text_encoder"])
    # Same tensors as text_encoder.vision_tower, saved standalone: loading SigLIP alone must
    # not require instantiating the (in the real model, 34-layer) text encoder.
    text_encoder.vision_tower.save_pretrained(paths["image_encoder"])
    _save_image_processor(paths["feature_extractor"])

    _tiny_teacher(seed).save_pretrained(paths["teacher"])

    if metric_encoder:
        clip = paths["clip"] = out / METRIC_SUBFOLDER
        clip_tokenizer = _build_tokenizer(77)  # CLIP's text context
        _tiny_clip(seed, len(clip_tokenizer), 77).save_pretrained(clip)
        clip_tokenizer.save_pretrained(clip)
        _save_clip_processor(clip, 32)
    return paths
