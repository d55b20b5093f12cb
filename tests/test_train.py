"""Training recipe (`train/`): data sampling, losses, every stage under Lightning, gradient routing, resume.

Micro setting: the `tiny` preset with 1 transformer layer and 6 latent frames per shot (2 chunks), random
VAE / text encoder, and a synthetic dataset of 2 two-shot stories written as reference-format CSV/JSON/mp4.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from safetensors.torch import load_file, save_file

from shotstream.context_sampling import plan_context
from shotstream.presets import TINY
from shotstream.sampling import ShotConditioning
from shotstream.scheduler import FlowMatchTable
from shotstream.text import TextEncoder, build_text_encoder, build_word_tokenizer
from shotstream.transformer import ShotStreamTransformer
from shotstream.vae import VideoVAE, build_vae
from shotstream.video_io import read_video, write_mp4
from train.callbacks import PeriodicCheckpoint
from train.conditioning import FrozenEncoders
from train.config import DecoderStageConfig, OptimizerConfig, from_dict, load_config
from train.data import (
    ClipDataset,
    EncodedClipDataset,
    MultiShotDataModule,
    read_rows,
    sample_clip_frames,
    shot_labels,
    to_pixels,
    truncate_4k1,
)
from train.dmd import DMDDistillation
from train.dmd_inter_shot import InterShotDMD, merge_student_lora
from train.factory import build_strategy, build_trainer
from train.latent_cache import write_latent_cache
from train.losses import critic_flow_loss, dmd_generator_loss, flow_matching_loss, ode_regression_loss
from train.ode import ODERegression
from train.ode_pairs import (
    ODEPair,
    ODEPairDataModule,
    ODEPairWriter,
    TeacherSampling,
    pair_path,
    recorded_steps,
    rows_to_sample,
)
from train.recipe import STAGES, Recipe
from train.self_forcing import self_forcing_rollout
from train.teacher import TeacherTuning
from train.toy_encoders import (
    DecoderTuning,
    ShotFrames,
    VAETraining,
    VideoWindows,
    new_toy_vae,
    start_video_as_images,
    window_loader,
)

MICRO = dataclasses.replace(TINY, frames_per_shot=6, transformer=dataclasses.replace(TINY.transformer, num_layers=1))
CONFIGS = Path(__file__).parents[1] / "train" / "configs"
CONFIG = load_config(CONFIGS / "tiny.yaml")
STORIES = [
    {"global_caption": "A red circle in the meadow.", "shot1": "Close-up of the circle bounces.",
     "shot2": "Wide shot of the circle moves left."},
    {"global_caption": "A blue square in the desert.", "shot1": "Medium shot of the square grows.",
     "shot2": "Close-up of the square stays still."},
]  # fmt: skip
SHOTS = [(0, 10), (10, 23)]  # pixel frames: 23 read -> 21 (4k+1) -> context from shot 0, target 11 -> 9 frames


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models: intra-op threads only add overhead (and contend on a busy 2-core runner).

    `OMP_NUM_THREADS` also stops Lightning's DDP strategy from raising the thread count again.
    """
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    """Two stories in the reference training format (§7): CSV + JSON + mp4 of flat-coloured shots."""
    root = tmp_path_factory.mktemp("data")
    rows = ["shot_num_from_caption,json_path,video_path,frame_number"]
    rng = np.random.default_rng(0)
    for i, story in enumerate(STORIES):
        (root / f"{i:04d}.json").write_text(json.dumps(story))
        frames = []
        for start, end in SHOTS:
            colour = rng.integers(0, 256, size=3)
            ramp = np.linspace(0, 40, 64)[None, :, None]
            frames += [np.clip(colour + ramp + 3 * t, 0, 255).astype(np.uint8) for t in range(end - start)]
        write_mp4(np.stack([np.broadcast_to(f, (64, 64, 3)) for f in frames]), root / f"{i:04d}.mp4")
        rows.append(f'2,{i:04d}.json,{i:04d}.mp4,"{[list(s) for s in SHOTS]}"')
    path = root / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def make_encoders() -> FrozenEncoders:
    torch.manual_seed(0)
    words = re.findall(r"\w+|[^\w\s]", " ".join(v for s in STORIES for v in s.values()))
    tokenizer = build_word_tokenizer(words, MICRO.text_encoder.max_length)
    text = TextEncoder(tokenizer, build_text_encoder(MICRO.text_encoder, len(tokenizer)), MICRO.text_encoder.max_length)
    return FrozenEncoders(VideoVAE(build_vae(MICRO.vae)), text, "low quality")


def make_transformer(seed: int = 0) -> ShotStreamTransformer:
    torch.manual_seed(seed)
    return ShotStreamTransformer.from_preset(MICRO.transformer)


def trainer(**kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


def clip_data(csv_path, stories_only: bool = False) -> MultiShotDataModule:
    return MultiShotDataModule(str(csv_path), MICRO, stories_only, seed=0, num_workers=0)


def dmd_config(stage: str, **changes):
    return dataclasses.replace(getattr(CONFIG, stage), **changes)


class Snapshots(Callback):
    """State dicts before the first and after every training batch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def _take(self, module: L.LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.states:
            self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._take(pl_module)


def changed(before: dict, after: dict, prefix: str = "") -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


# ----------------------------------------------------------------------------- config and data


def test_configs_load_strictly(tmp_path):
    wan = load_config(CONFIGS / "wan2.1-1.3b.yaml")
    assert wan.system.fsdp is not None and wan.system.round_timesteps_to_bf16
    assert isinstance(build_strategy(wan.system), FSDPStrategy)
    assert isinstance(build_strategy(CONFIG.system), DDPStrategy)
    assert wan.teacher.trainable == "self_attn" and wan.dmd_stage2.lora.rank == 256
    assert CONFIG.system.ddp.find_unused_parameters and CONFIG.dmd_stage1.lora is None
    good = {"lr": 1.0e-5, "betas": [0.0, 0.999], "weight_decay": 0.01, "max_grad_norm": 1.0}
    assert from_dict(OptimizerConfig, good, "opt").betas == (0.0, 0.999)
    for bad, message in [
        ({k: v for k, v in good.items() if k != "lr"}, "missing"),
        ({**good, "momentum": 0.9}, "unknown"),
        ({**good, "lr": "1e-5"}, "expected float"),
    ]:
        with pytest.raises(ValueError, match=message):
            from_dict(OptimizerConfig, bad, "opt")


def test_reference_clip_sampling_on_the_demo_row():
    """§7 / quirk 20: `sample.csv` with a gap; labels from lengths, the tail labelled shot 0 again."""
    shots = [(0, 56), (56, 114), (114, 130), (130, 155), (170, 250)]
    labels = shot_labels(shots)[: truncate_4k1(min(250, shots[-1][1]))]  # 249 frames read
    context, flags, target = sample_clip_frames(labels, max_target=81, budget=6)
    assert context == [0, 56, 114, 129, 130, 154]  # shot 0 spans 0..248 because of the padding copy
    assert flags == [0, 1, 2, 2, 3, 3]
    assert target == list(range(155, 232))  # 80 frames -> 77 = 4k + 1 (20 latents)
    _, _, strided = sample_clip_frames([0] * 10 + [1] * 200, max_target=81, budget=6)
    assert strided == list(range(10, 210, 2))[:81]  # stride 200 // 81 = 2, then the first 81


def test_clip_dataset_reads_the_reference_format(csv_path):
    clip = ClipDataset(csv_path, MICRO)[1]
    assert clip.context_pixels.shape == (6, 3, 64, 64) and clip.target_pixels.shape == (3, 9, 64, 64)
    assert clip.context_flags.tolist() == [0] * 6 and clip.shot_flag == 1
    assert clip.captions == [
        "A blue square in the desert.shot0:Medium shot of the square grows.",
        "A blue square in the desert.shot1:Close-up of the square stays still.",
    ]
    assert clip.target_pixels.min() >= -1 and clip.target_pixels.max() <= 1


def test_latent_cache_gives_the_clips_the_encoders_give(csv_path, tmp_path):
    """Cached clips == on-the-fly encoding (same conditioning, same target), and a stale cache is refused."""
    encoders, cache = make_encoders(), tmp_path / "latents.safetensors"
    write_latent_cache(csv_path, MICRO, encoders, cache, batch_size=2, num_workers=0)
    raw_clips, encoded_clips = ClipDataset(csv_path, MICRO), EncodedClipDataset(csv_path, cache)
    for raw, encoded in ((raw_clips[i], encoded_clips[i]) for i in range(len(raw_clips))):
        assert encoded.context_pixels is None and encoded.target_pixels is None
        expected, cached = encoders.clip_conditioning(raw), encoders.clip_conditioning(encoded)
        torch.testing.assert_close(cached.context_latents, expected.context_latents, atol=1e-5, rtol=1e-4)
        assert cached.context_flags.tolist() == expected.context_flags.tolist()
        assert cached.shot_flag == expected.shot_flag and encoded.captions == raw.captions
        torch.testing.assert_close(encoders.clip_target(encoded), encoders.clip_target(raw), atol=1e-5, rtol=1e-4)
    shorter = tmp_path / "one_row.csv"  # a CSV that no longer matches the cache (only its row count matters)
    shorter.write_text("".join(Path(csv_path).read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ValueError, match="delete the cache"):
        EncodedClipDataset(shorter, cache)


# ----------------------------------------------------------------------------- losses


def test_dmd_generator_loss_matches_a_hand_computed_gradient():
    """real = c + 3 (c - u) = [-1, 1]; normaliser mean|x - real| = 1.5; grad = (fake - real) / 1.5."""
    x = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 1, 2).requires_grad_(True)
    cond, uncond, fake = (torch.tensor(v).reshape(1, 1, 1, 1, 2) for v in ([0.5, 1.0], [1.0, 1.0], [0.0, 0.0]))
    loss = dmd_generator_loss(x, cond, uncond, fake, guidance=3.0)
    loss.backward()
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(2 / 9)  # 0.5 * mean(grad^2)
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([1 / 3, -1 / 3]))  # grad / numel
    # per-sample normaliser, and 0/0 -> 0 (nan_to_num) for a sample already on the real prediction
    x2 = torch.tensor([[1.0, 2.0], [5.0, 5.0]]).reshape(2, 1, 1, 1, 2).requires_grad_(True)
    real = torch.tensor([[-1.0, 1.0], [5.0, 5.0]]).reshape(2, 1, 1, 1, 2)
    dmd_generator_loss(x2, real, real, torch.tensor([[0.0, 0.0], [5.0, 5.0]]).reshape(2, 1, 1, 1, 2), 3.0).backward()
    torch.testing.assert_close(x2.grad.flatten(), torch.tensor([1 / 6, -1 / 6, 0.0, 0.0]))


def test_flow_ode_and_critic_losses():
    x0, noise = torch.zeros(2, 1, 3, 1, 1), torch.ones(2, 1, 3, 1, 1)
    flow = torch.zeros(2, 1, 3, 1, 1)  # error 1 everywhere
    assert flow_matching_loss(flow, noise, x0, torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)
    assert critic_flow_loss(flow, noise, x0).item() == pytest.approx(1.0)
    pred, target = torch.zeros(1, 1, 3, 1, 1), torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1, 1)
    t = torch.tensor([[0.0, 500.0, 0.0]])
    assert ode_regression_loss(pred, target, t).item() == pytest.approx(4.0)  # only the t > 0 frame
    assert ode_regression_loss(pred, target, torch.zeros(1, 3)).item() == 0.0


# ----------------------------------------------------------------------------- self-forcing rollout


def test_self_forcing_rollout_keeps_only_the_exit_step_in_the_graph():
    model, grad_modes = make_transformer(), []
    model.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    table = FlowMatchTable(MICRO.timestep_shift)
    cond = ShotConditioning(torch.randn(1, 16, 6, 8, 8), torch.zeros(6, dtype=torch.int32), 1, torch.randn(1, 48, 64))
    rollout = self_forcing_rollout(
        model, table, table.warp(MICRO.denoising_steps), cond, num_frames=6, frames_per_chunk=3, exit_step=2,
        generator=torch.Generator().manual_seed(0), with_grad=True,
    )  # fmt: skip
    # context insert; then per chunk: steps 0 and 1 without grad, the exit step with grad, the cache re-run without
    assert grad_modes == [False] + [False, False, True, False] * 2
    assert rollout.latents.shape == (1, 16, 6, 8, 8) and rollout.latents.requires_grad
    rollout.latents.square().mean().backward()
    assert model.proj_out.weight.grad is not None and model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- stages


def test_teacher_trains_only_self_attention(csv_path):
    config = dataclasses.replace(CONFIG.teacher, trainable="self_attn")
    module = TeacherTuning(make_transformer(), make_encoders(), MICRO, config, seed=0, round_timesteps_to_bf16=False)
    snapshots = Snapshots()
    trainer(fast_dev_run=True, callbacks=[snapshots]).fit(module, datamodule=clip_data(csv_path))
    updated = changed(*snapshots.states)
    assert updated and all(".attn1." in k for k in updated)
    assert any(".attn1.to_q." in k for k in updated)


@pytest.mark.parametrize("to", ["zeros", "negative_prompt"])
def test_teacher_text_dropout_feeds_the_configured_uncondition(csv_path, to):
    """Dropped captions become zeros (reference) or the negative prompt: the branch CFG later guides against."""
    config = dataclasses.replace(CONFIG.teacher, text_dropout=1.0, text_dropout_to=to)
    encoders = make_encoders()
    module = TeacherTuning(make_transformer(), encoders, MICRO, config, seed=0, round_timesteps_to_bf16=False)
    seen = []
    module.teacher.register_forward_pre_hook(lambda _, args: seen.append(args[2].clone()))
    trainer(fast_dev_run=True).fit(module, datamodule=clip_data(csv_path))
    (embeds,) = seen  # (N, L, D), N = captions of the clip's story
    expected = torch.zeros_like(embeds) if to == "zeros" else encoders.negative().expand_as(embeds)
    assert (embeds.abs().sum() > 0) == (to == "negative_prompt")
    torch.testing.assert_close(embeds, expected)


def test_teacher_ema_exports_the_averaged_weights(csv_path, tmp_path):
    """EMA (decay 0.5) runs before the export: teacher.safetensors = 0.25 w1 + 0.25 w2 + 0.5 w3, not w3."""
    module = TeacherTuning(make_transformer(), make_encoders(), MICRO, CONFIG.teacher, 0, round_timesteps_to_bf16=False)
    snapshots = Snapshots()
    steps = dataclasses.replace(CONFIG.teacher.steps, max_steps=3, checkpoint_every=3)
    fit = build_trainer(CONFIG.system, steps, tmp_path, [EMAWeightAveraging(decay=0.5), snapshots])
    fit.fit(module, datamodule=clip_data(csv_path))
    exported = load_file(str(tmp_path / "teacher.safetensors"))
    w1, w2, w3 = ({k.removeprefix("teacher."): v for k, v in s.items()} for s in snapshots.states[1:])
    assert any(not torch.equal(exported[k], w3[k]) for k in exported)
    for key, value in exported.items():
        torch.testing.assert_close(value, 0.25 * w1[key] + 0.25 * w2[key] + 0.5 * w3[key], msg=key)


def test_vae_decoder_steps_leave_the_encoder_untouched(csv_path):
    """The last `decoder_steps` train the decoder alone, so latents encoded before them stay valid."""
    stage = CONFIG.encoders_stage
    module = VAETraining(new_toy_vae(MICRO, seed=0), stage.optimizer, stage.kl_weight, decoder_from=1, seed=0)
    snapshots = Snapshots()
    windows = window_loader(VideoWindows(csv_path, MICRO, clip_frames=5), batch_size=1, seed=0, num_workers=0)
    trainer(max_steps=2, callbacks=[snapshots]).fit(module, train_dataloaders=windows)
    before, joint, decoder_only = snapshots.states
    assert changed(before, joint, "vae.encoder.") != set()
    decoder = changed(joint, decoder_only, "vae.decoder.") | changed(joint, decoder_only, "vae.post_quant_conv.")
    assert decoder != set() and changed(joint, decoder_only) == decoder


def test_video_path_starts_as_the_image_path(csv_path):
    """After `start_video_as_images`, latent frame k of a clip encodes frame 4k alone and decodes to 4 copies of it.

    The image path (what the image fit trained) is unchanged by it.
    """
    vae = new_toy_vae(MICRO, seed=0).eval()
    clip = VideoWindows(csv_path, MICRO, clip_frames=9)[0][None]  # (1, 3, 9, H, W)
    with torch.no_grad():
        image_latent = vae.encode(clip[:, :, 4:5]).latent_dist.mean
        video_latents = vae.encode(clip).latent_dist.mean
        assert not torch.allclose(video_latents[:, :, 1:2], image_latent, atol=1e-3)  # random taps mix frames
        start_video_as_images(vae)
        torch.testing.assert_close(vae.encode(clip[:, :, 4:5]).latent_dist.mean, image_latent)
        latents = vae.encode(clip).latent_dist.mean  # (1, 16, 3, h, w)
        video = vae.decode(latents).sample  # (1, 3, 9, H, W)
        for k in range(3):
            frame = clip[:, :, 4 * k : 4 * k + 1]
            torch.testing.assert_close(latents[:, :, k : k + 1], vae.encode(frame).latent_dist.mean, atol=1e-5, rtol=0)
            image = vae.decode(latents[:, :, k : k + 1]).sample  # (1, 3, 1, H, W)
            first = max(4 * k - 3, 0)
            torch.testing.assert_close(video[:, :, first : 4 * k + 1], image.expand(-1, -1, 4 * k + 1 - first, -1, -1),
                                       atol=1e-5, rtol=0)  # fmt: skip


def test_shot_frames_are_every_4th_frame_as_images(csv_path):
    frames = ShotFrames(csv_path, MICRO)
    videos = [read_video(row.video_path) for row in read_rows(csv_path)]
    assert len(frames) == sum(len(v[::4]) for v in videos)
    second = len(videos[0][::4]) + 1  # frame 4 of the second video
    torch.testing.assert_close(frames[second], to_pixels(videos[1][4:5], MICRO.height, MICRO.width).permute(1, 0, 2, 3))


def test_decoder_tuning_trains_the_decoder_alone(csv_path):
    """Stage `vae_decoder` starts from a frozen VAE (as loaded) and moves only the decoder: latents stay the same."""
    vae = new_toy_vae(MICRO, seed=0).requires_grad_(False)
    clip = VideoWindows(csv_path, MICRO, clip_frames=5)[0][None]  # (1, 3, 5, H, W)
    latents_before = vae.encode(clip).latent_dist.mean
    steps = dataclasses.replace(CONFIG.encoders_stage.steps, max_steps=2)
    config = DecoderStageConfig(5, batch_size=1, image_steps=1, optimizer=CONFIG.encoders_stage.optimizer, steps=steps)
    module, snapshots = DecoderTuning(vae, config, seed=0), Snapshots()
    windows = window_loader(VideoWindows(csv_path, MICRO, clip_frames=5), batch_size=1, seed=0, num_workers=0)
    trainer(max_steps=2, callbacks=[snapshots]).fit(module, train_dataloaders=windows)
    before, images, video = snapshots.states
    for a, b in [(before, images), (images, video)]:
        decoder = changed(a, b, "vae.decoder.") | changed(a, b, "vae.post_quant_conv.")
        assert decoder != set() and changed(a, b) == decoder
    torch.testing.assert_close(vae.encode(clip).latent_dist.mean, latents_before, rtol=0, atol=0)


def test_ode_pairs_then_ode_regression(csv_path, tmp_path):
    sampling = TeacherSampling(make_transformer(), make_encoders(), MICRO, seed=0, first_shot_fraction=0.0)
    assert recorded_steps(sampling.sampler, sampling.student_timesteps) == (0, 13, 25, 37)
    trainer(limit_predict_batches=1, callbacks=[ODEPairWriter(tmp_path)]).predict(
        sampling, datamodule=clip_data(csv_path), return_predictions=False
    )
    (path,) = tmp_path.glob("*.safetensors")
    pair = ODEPair.load(path)
    assert pair.trajectory.shape == (1, 5, 16, 3, 8, 8) and pair.shot_flag == 1 and len(pair.captions) == 2
    torch.testing.assert_close(pair.timesteps[-1], torch.tensor(0.0))
    module = ODERegression(make_transformer(), make_encoders(), MICRO, CONFIG.ode, seed=0)
    snapshots = Snapshots()
    trainer(fast_dev_run=True, callbacks=[snapshots]).fit(module, datamodule=ODEPairDataModule(tmp_path, 0, 0))
    assert changed(*snapshots.states, "student.")


def test_first_shot_ode_pairs_condition_like_the_first_shot_at_inference(csv_path, tmp_path):
    """`first_shot_fraction`: no context and the first caption alone, as `plan_context` plans shot 1."""
    sampling = TeacherSampling(make_transformer(), make_encoders(), MICRO, seed=0, first_shot_fraction=1.0)
    trainer(limit_predict_batches=1, callbacks=[ODEPairWriter(tmp_path)]).predict(
        sampling, datamodule=clip_data(csv_path), return_predictions=False
    )
    (path,) = tmp_path.glob("*.safetensors")
    pair, first = ODEPair.load(path), plan_context([], MICRO.context_frames)
    assert pair.captions == read_rows(csv_path)[pair.index].captions()[:1]
    assert tuple(pair.context_flags.tolist()) == first.flags and pair.shot_flag == first.shot_flag
    assert not pair.context_latents.any()
    module = ODERegression(make_transformer(), make_encoders(), MICRO, CONFIG.ode, seed=0)
    snapshots = Snapshots()
    trainer(fast_dev_run=True, callbacks=[snapshots]).fit(module, datamodule=ODEPairDataModule(tmp_path, 0, 0))
    assert changed(*snapshots.states, "student.")


def test_ode_pairs_resume_from_the_written_pairs(csv_path, tmp_path):
    """A killed ODE-pair run resumes with the rows that have no file and makes the same pairs as one run."""
    sampling = TeacherSampling(make_transformer(), make_encoders(), MICRO, seed=0, first_shot_fraction=0.0)

    def predict(folder: Path, rows: list[int]) -> None:
        data = MultiShotDataModule(str(csv_path), MICRO, False, seed=0, num_workers=0, predict_rows=rows)
        trainer(callbacks=[ODEPairWriter(folder)]).predict(sampling, datamodule=data, return_predictions=False)

    predict(tmp_path / "once", rows_to_sample(tmp_path / "once", max_pairs=5, num_rows=2))
    assert rows_to_sample(tmp_path / "once", max_pairs=5, num_rows=2) == []
    predict(tmp_path / "killed", [0])  # the run that was killed after row 0
    assert rows_to_sample(tmp_path / "killed", max_pairs=5, num_rows=2) == [1]
    predict(tmp_path / "killed", [1])
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["000000.safetensors", "000001.safetensors"]
    pairs = [ODEPair.load(pair_path(tmp_path / "once", row)) for row in (0, 1)]
    for row, once in enumerate(pairs):
        resumed = ODEPair.load(pair_path(tmp_path / "killed", row))
        assert once.index == resumed.index == row
        torch.testing.assert_close(resumed.trajectory, once.trajectory, rtol=0, atol=0)
        torch.testing.assert_close(resumed.context_latents, once.context_latents, rtol=0, atol=0)
    assert not torch.equal(pairs[0].trajectory[:, 0], pairs[1].trajectory[:, 0])  # noise is seeded per row


def make_dmd(stage: str, **changes) -> DMDDistillation:
    module_class = InterShotDMD if stage == "dmd_stage2" else DMDDistillation
    teacher = make_transformer(1)
    return module_class(
        make_transformer(0), teacher, make_transformer(1), make_encoders(), MICRO, dmd_config(stage, **changes),
        seed=0, round_timesteps_to_bf16=False,
    )  # fmt: skip


def test_dmd_generator_and_critic_steps_touch_only_their_model(csv_path):
    module = make_dmd("dmd_stage1")
    snapshots = Snapshots()
    trainer(fast_dev_run=2, callbacks=[snapshots]).fit(module, datamodule=clip_data(csv_path))
    before, after_generator, after_critic = snapshots.states
    assert changed(before, after_generator) == changed(before, after_generator, "generator.") != set()
    assert changed(after_generator, after_critic) == changed(after_generator, after_critic, "critic.") != set()
    assert module.trainer.global_step == 2


def test_inter_shot_dmd_trains_only_lora_and_merges(csv_path, tmp_path):
    module = make_dmd("dmd_stage2")
    snapshots = Snapshots()
    run = trainer(fast_dev_run=True, callbacks=[snapshots, ExportTo(tmp_path)])
    run.fit(module, datamodule=clip_data(csv_path, stories_only=True))
    assert run.global_step == 2  # one story of two shots: a generator step, then a critic step
    updated = changed(*snapshots.states)
    assert updated and all(".lora_" in k for k in updated)
    assert any(k.startswith("generator.") for k in updated) and any(k.startswith("critic.") for k in updated)
    # the merged student equals the student with its adapters
    lora = load_file(str(tmp_path / "generator_lora.safetensors"))
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    base = make_transformer(0)
    merge_student_lora(base, str(tmp_path / "generator_lora.safetensors"), CONFIG.dmd_stage2.lora)
    latents, text = torch.randn(1, 16, 3, 8, 8), torch.randn(1, MICRO.text_encoder.max_length, 64)
    args = (latents, torch.full((1,), 500.0), text, torch.zeros(3, dtype=torch.int32), torch.arange(3))
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(*args), module.generator.eval()(*args), atol=1e-5, rtol=1e-4)


class ExportTo(Callback):
    """Writes `pl_module.exports(state_dict)` like `SafetensorsExport`, into a test folder."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        for name, tensors in pl_module.exports(pl_module.state_dict()).items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.folder / name))


def test_resume_from_last_checkpoint_matches_an_uninterrupted_run(csv_path, tmp_path):
    """DMD (manual optimisation): 4 steps in one go == 2 steps, stop, resume from last.ckpt, 2 more."""

    def run(max_steps: int, folder, ckpt_path=None) -> tuple[L.LightningModule, int]:
        module, snapshots = make_dmd("dmd_stage1", generator_every=2), Snapshots()
        fit = trainer(max_steps=max_steps, callbacks=[PeriodicCheckpoint(folder, every_n_steps=1), snapshots],
                      enable_checkpointing=True)  # fmt: skip
        fit.fit(module, datamodule=clip_data(csv_path), ckpt_path=ckpt_path)
        assert fit.global_step == max_steps
        return module, len(snapshots.states) - 1  # batches run by this fit

    straight, _ = run(4, tmp_path / "straight")
    run(2, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "last.ckpt").is_file()
    resumed, batches = run(4, tmp_path / "resumed", ckpt_path="last")
    assert batches == 2
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_recipe_runs_every_training_stage_in_order(tmp_path):
    """From nothing: toy stories, stage 0 encoders, then every stage, each export feeding the next.

    A second run skips every finished stage. (The final `export` stage needs `VideoVAE.save_pretrained`.)
    """
    steps = dataclasses.replace(CONFIG.teacher.steps, max_steps=1, checkpoint_every=1)
    config = dataclasses.replace(
        CONFIG,
        encoders=str(tmp_path / "encoders"),
        data=dataclasses.replace(CONFIG.data, csv_path=str(tmp_path / "data" / "data.csv"), num_workers=0),
        toy_data=dataclasses.replace(CONFIG.toy_data, stories=2, max_shots=2),
        encoders_stage=dataclasses.replace(
            CONFIG.encoders_stage, image_batch_size=2, image_steps=1, clip_frames=5, decoder_steps=0, steps=steps
        ),
        vae_decoder=DecoderStageConfig(
            5, batch_size=1, image_steps=0, optimizer=CONFIG.encoders_stage.optimizer, steps=steps
        ),
        teacher=dataclasses.replace(CONFIG.teacher, steps=steps),
        ode_pairs=dataclasses.replace(CONFIG.ode_pairs, max_pairs=1),
        ode=dataclasses.replace(CONFIG.ode, steps=steps),
        dmd_stage1=dataclasses.replace(CONFIG.dmd_stage1, steps=steps),
        dmd_stage2=dataclasses.replace(CONFIG.dmd_stage2, steps=steps),
    )
    two_steps = dataclasses.replace(MICRO, denoising_steps=(1000, 500), teacher_steps=2)  # ODE pairs: 2 teacher steps
    recipe = Recipe(config, two_steps, tmp_path / "run")
    stages = list(STAGES[:-1])  # every stage but the final export
    recipe.run(stages)
    vae_config = json.loads((tmp_path / "encoders" / "vae" / "config.json").read_text())
    assert len(vae_config["latents_mean"]) == 16 and vae_config["latents_mean"] != list(TINY.vae.latents_mean)
    assert recipe.path("latents", "latents.safetensors").is_file()
    assert recipe.encoders_folder == tmp_path / "run" / "vae_decoder"  # the later stages decode with the new decoder
    given, tuned = (
        load_file(str(f / "vae" / "diffusion_pytorch_model.safetensors"))
        for f in (tmp_path / "encoders", recipe.encoders_folder)
    )
    assert (
        changed(given, tuned) == changed(given, tuned, "decoder.") | changed(given, tuned, "post_quant_conv.") != set()
    )
    assert {p.name for p in (tmp_path / "run" / "samples").iterdir()} == {"teacher.mp4", "ode.mp4", "dmd_stage1.mp4"}
    for stage, filename in [
        ("teacher", "teacher.safetensors"),
        ("ode", "student.safetensors"),
        ("dmd_stage1", "generator.safetensors"),
        ("dmd_stage2", "generator_lora.safetensors"),
    ]:
        assert recipe.path(stage, filename).is_file() and recipe.path(stage, "checkpoints/last.ckpt").is_file()
    make_transformer().load_state_dict(load_file(str(recipe.path("dmd_stage1", "generator.safetensors"))))
    stamp = recipe.path("teacher", "teacher.safetensors").stat().st_mtime_ns
    recipe.run(stages)  # everything is done: nothing re-runs
    assert recipe.path("teacher", "teacher.safetensors").stat().st_mtime_ns == stamp
