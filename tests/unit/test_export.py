"""motif-export -> a diffusers folder that MotifVideoPipeline / MotifVideoImage2VideoPipeline run;
motif-sample offline; validation outputs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, MotifVideoTransformer3DModel
from diffusers.guiders import ClassifierFreeGuidance

from motif_train.cli.export import export_checkpoint, load_checkpoint_model
from motif_train.models import build_model
from motif_train.models.convert import from_diffusers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real (1-process) training run: 3 steps, validation at the end, a checkpoint."""
    run = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "-m", "motif_train.cli.train", "experiment=tiny_cpu", "data=synthetic",
                    f"run_dir={run}", "logger.wandb=false", "curriculum.stages.0.steps=2",
                    "curriculum.stages.1.steps=1", "eval.every=0", "eval.steps=2"],
                   check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return run


def test_validation_wrote_videos_and_grid(run):
    out = run / "samples" / "step_00000003"
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "t2v_00.mp4", "t2v_01.mp4"]
    import decord

    vr = decord.VideoReader(str(out / "t2v_00.mp4"))
    assert len(vr) == 9 and vr[0].shape == (64, 96, 3)


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_export_loads_strictly_and_matches(run, tmp_path, weights):
    ckpt = run / "checkpoints" / "step_00000003"
    out = export_checkpoint(ckpt, tmp_path / "transformer", weights=weights)
    ref = MotifVideoTransformer3DModel.from_pretrained(out).eval()
    ours = load_checkpoint_model(ckpt, weights=weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 33, 3, 8, 12, generator=g)
    kw = dict(timestep=torch.tensor([400.0]), encoder_hidden_states=torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        assert (ref(x, **kw).sample - ours(x, **kw).sample).abs().max() <= 1e-5
    back = from_diffusers(out)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values(),
                                                  strict=False))


def test_ema_and_raw_exports_differ(run):
    ckpt = run / "checkpoints" / "step_00000003"
    ema, raw = load_checkpoint_model(ckpt, weights="ema"), load_checkpoint_model(ckpt, weights="raw")
    diffs = [(a - b).abs().max().item() for a, b in zip(ema.parameters(), raw.parameters(), strict=True)]
    assert max(diffs) > 0


def test_exported_folder_runs_in_the_motif_pipelines(run, tmp_path):
    from diffusers import MotifVideoImage2VideoPipeline, MotifVideoPipeline
    from transformers import AutoTokenizer, T5Gemma2Encoder

    enc = run / "encoders"
    transformer = MotifVideoTransformer3DModel.from_pretrained(
        export_checkpoint(run / "checkpoints" / "step_00000003", tmp_path / "transformer"))
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                 vae=AutoencoderKLWan.from_pretrained(enc / "vae"),
                 text_encoder=T5Gemma2Encoder.from_pretrained(enc / "text_encoder"),
                 tokenizer=AutoTokenizer.from_pretrained(enc / "tokenizer"), transformer=transformer,
                 guider=ClassifierFreeGuidance(guidance_scale=3.0))
    pipe = MotifVideoPipeline(**parts)
    video = pipe(prompt="a red square slides", height=64, width=96, num_frames=5, num_inference_steps=2,
                 output_type="np", generator=torch.Generator().manual_seed(0), max_sequence_length=16).frames
    assert np.asarray(video).shape == (1, 5, 64, 96, 3) and np.isfinite(np.asarray(video)).all()
    # The whole pipeline as a folder, the way a release ships it.
    pipe.save_pretrained(tmp_path / "pipeline")
    again = MotifVideoPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(again.transformer, MotifVideoTransformer3DModel)
    from transformers import SiglipImageProcessor

    i2v = MotifVideoImage2VideoPipeline(**parts, feature_extractor=SiglipImageProcessor.from_pretrained(
        enc / "feature_extractor"))
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    video = i2v(image=image, prompt="the square moves", height=64, width=96, num_frames=5, num_inference_steps=2,
                output_type="np", generator=torch.Generator().manual_seed(0), max_sequence_length=16).frames
    assert np.asarray(video).shape == (1, 5, 64, 96, 3)


def test_motif_sample_cli(run, tmp_path):
    ckpt = run / "checkpoints" / "step_00000003"
    p = subprocess.run([sys.executable, "-m", "motif_train.cli.sample", f"checkpoint={ckpt}",
                        "prompt=a blue circle", "steps=2", f"out={tmp_path / 's'}"], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.name for x in (tmp_path / "s").iterdir()) == ["grid.png", "t2v_00.mp4"]
    import av

    with av.open(str(tmp_path / "s" / "t2v_00.mp4")) as c:  # fps= defaults to 24, not validation's 8
        assert c.streams.video[0].average_rate == 24
    bad = subprocess.run([sys.executable, "-m", "motif_train.cli.export", "checkpoint=x"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "out=" in bad.stderr


def test_grid_rows_say_task_seed_prompt_and_frames():
    from motif_train.sampling import EvalConfig, frame_grid, request_labels

    cfg = EvalConfig(prompts=["a red ball", "two cubes"], i2v_prompt="it rolls", seed=3)
    labels = request_labels(cfg, ["t2v_00", "t2v_01", "i2v_00"])
    assert labels == ["t2v_00 | seed 3000 | a red ball", "t2v_01 | seed 3001 | two cubes",
                      "i2v_00 | seed 3002 | it rolls"]
    videos = [torch.zeros(9, 32, 48, 3, dtype=torch.uint8) for _ in labels]
    plain, captioned = frame_grid(videos), frame_grid(videos, labels=labels)
    assert plain.shape == (3 * 32, 8 * 48, 3) and captioned.shape == (14 + 3 * (32 + 14), 8 * 48, 3)
    index, strips = captioned[:14], [captioned[14 + k * 46:14 + k * 46 + 14] for k in range(3)]
    assert all((s > 100).any() for s in strips)  # text drawn in every caption strip
    assert not np.array_equal(strips[0], strips[1])  # each row its own caption
    def yellow(a):
        return (a[..., 0] > 200) & (a[..., 2] < 120)

    # frame indices: in the top strip, one per column (tiles 48 px wide), and in no caption
    assert all(yellow(index[:, j * 48:(j + 1) * 48]).any() for j in range(8))
    assert not any(yellow(s).any() for s in strips)


@pytest.mark.parametrize("training", [True, False])
def test_to_diffusers_keeps_the_callers_mode(tiny_cfg, training):
    from motif_train.models.convert import to_diffusers

    m = build_model(tiny_cfg).train(training)
    assert to_diffusers(m).training is training
