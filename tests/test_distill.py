"""The distillation trainer: loss goes down, teacher untouched, exact resume, the loss formula, data."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffslim.methods.depth_skip import depth_skip
from diffslim.train.data import ConditionPairs, ImageFolder, ZooDigits, collate, make_dataset
from diffslim.train.distill import DistillConfig, distill, feature_loss, select_features


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _cfg(out, **kw):
    base = dict(steps=6, batch_size=8, lr=1e-3, out=out, checkpoint_every=100, log_every=2, progress=False, warmup=0)
    return DistillConfig(**{**base, **kw})


def test_loss_falls_and_teacher_is_unchanged(tiny_digits_pipe, tmp_path):
    teacher = tiny_digits_pipe.denoiser
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    student = depth_skip(teacher, 7)
    res = distill(tiny_digits_pipe, student, ZooDigits(), _cfg(tmp_path / "run", steps=30, batch_size=16, log_every=5))

    rows = _rows(res.log_path)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    assert float(rows[-1]["loss"]) < 0.7 * float(rows[0]["loss"])
    assert res.steps == 30 and set(res.final_losses) == {"loss", "task", "out", "feat"}
    assert res.final_losses["loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)

    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in teacher.parameters()] == flags
    # the taps are gone: the teacher's blocks run their own forward again
    for name in ("down_blocks.0", "up_blocks.3"):
        reg = getattr(teacher.get_submodule(name), "_diffusers_hook", None)
        assert reg is None or not reg.hooks
    # the export reloads as an ordinary (depth-skipped) diffusers model
    from diffslim.methods.depth_skip import DepthSkipUNet2DConditionModel

    exported = DepthSkipUNet2DConditionModel.from_pretrained(str(res.out_dir / "student"))
    assert exported.config.depth_skip == 7
    assert (res.out_dir / "checkpoints" / "step_30" / "complete.json").is_file()


def test_resume_is_exact(tiny_digits_pipe, tmp_path):
    ds = ZooDigits()
    teacher = tiny_digits_pipe.denoiser
    straight = depth_skip(teacher, 7)
    a = distill(tiny_digits_pipe, straight, ds, _cfg(tmp_path / "a"))

    cfg = _cfg(tmp_path / "b")
    first = distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, replace(cfg, stop_at=3))
    assert first.steps == 3 and not (tmp_path / "b" / "student").exists()
    with open(first.log_path, "a") as f:  # a row logged after the checkpoint, before a crash: dropped on resume
        f.write("4,9,9,9,9,0\n")
    resumed = depth_skip(teacher, 7)  # a fresh process would build the student again
    b = distill(tiny_digits_pipe, resumed, ds, cfg)

    assert b.steps == 6 and b.final_losses == a.final_losses
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = tmp_path / "a" / "checkpoints" / "step_6", tmp_path / "b" / "checkpoints" / "step_6"
    ema_a = torch.load(ca / "custom_checkpoint_2.pkl", weights_only=False)
    ema_b = torch.load(cb / "custom_checkpoint_2.pkl", weights_only=False)
    assert ema_a["updates"] == ema_b["updates"] == 6
    assert all(torch.equal(ema_a["shadow"][k], ema_b["shadow"][k]) for k in ema_a["shadow"])
    ea, eb = (load_file(str(p / "student" / "diffusion_pytorch_model.safetensors")) for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert _rows(a.log_path) == _rows(b.log_path)


class _Tripped(Exception):
    pass


def _trip(*_):
    raise _Tripped("a signal reached the handler the test installed: the trainer did not take it over")


def _signal_at(model, call, signum):
    """A forward hook that sends this process ``signum`` during ``model``'s ``call``-th training forward."""
    calls = []

    def hook(module, args, output):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signum)

    return model.register_forward_hook(hook)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tiny_digits_pipe, tmp_path):
    """SIGINT during step 4 of 6: the step ends, a checkpoint is written at step 4 (none was due: every 100),
    Interrupted says where, the process's own handler is back, and running again ends where a run never stopped
    ends, to the bit."""
    from diffslim.errors import Interrupted

    ds, teacher = ZooDigits(), tiny_digits_pipe.denoiser
    straight = depth_skip(teacher, 7)
    a = distill(tiny_digits_pipe, straight, ds, _cfg(tmp_path / "a"))

    previous = signal.signal(signal.SIGINT, _trip)  # a signal the trainer does not take over fails the test
    try:
        student = depth_skip(teacher, 7)
        handle = _signal_at(student, 4, signal.SIGINT)
        with pytest.raises(Interrupted) as e:
            distill(tiny_digits_pipe, student, ds, _cfg(tmp_path / "b"), label="finetune")
        handle.remove()
        assert signal.getsignal(signal.SIGINT) is _trip
    finally:
        signal.signal(signal.SIGINT, previous)
    ckpts = tmp_path / "b" / "checkpoints"
    assert e.value.step == 4 and e.value.total == 6 and e.value.signum == signal.SIGINT
    assert e.value.checkpoint == ckpts / "step_4" and e.value.exit_code == 130
    assert "SIGINT after step 4 of 6" in str(e.value) and "run the same command again" in str(e.value)
    assert str(e.value).startswith("finetune stopped by")  # the run's own name (it said distill for finetune)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_4"] and (ckpts / "step_4" / "complete.json").is_file()
    assert not (tmp_path / "b" / "student").exists()

    resumed = depth_skip(teacher, 7)
    b = distill(tiny_digits_pipe, resumed, ds, _cfg(tmp_path / "b"))
    assert b.steps == 6 and b.final_losses == a.final_losses and _rows(a.log_path) == _rows(b.log_path)
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_feature_loss_formula():
    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(2, 3, 4, 4, generator=g), "b": 5 * torch.randn(2, 7, generator=g)}
    s = {k: (v + 0.3 * torch.randn(v.shape, generator=g)).requires_grad_(True) for k, v in t.items()}
    eps = 1e-6
    want_norm = sum(((t[k] - s[k]) ** 2).sum() / ((t[k] ** 2).sum() + eps * t[k].numel()) for k in t)
    want_plain = sum(((t[k] - s[k]) ** 2).mean() for k in t)
    torch.testing.assert_close(feature_loss(t, s, normalized=True, eps=eps), want_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(feature_loss(t, s, normalized=False), want_plain, rtol=1e-6, atol=0)
    # the normalizer makes layers of very different scales weigh alike
    scaled = feature_loss({k: 10 * v for k, v in t.items()}, {k: 10 * v for k, v in s.items()}, eps=0.0)
    torch.testing.assert_close(scaled, feature_loss(t, s, eps=0.0), rtol=1e-5, atol=0)
    assert float(feature_loss({}, {})) == 0.0


def test_feature_loss_per_sample():
    """``per_sample``: each sample's error over its own teacher norm, averaged over the batch; a sample of
    small features weighs as much as one of large features, which the batch norm does not give."""
    g = torch.Generator().manual_seed(1)
    t = {"a": torch.randn(3, 2, 4, 4, generator=g) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1, 1),
         "b": torch.randn(3, 5, 8, generator=g)}
    s = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in t.items()}
    eps = 1e-6
    want = 0.0
    for k in t:
        per = [((t[k][i] - s[k][i]) ** 2).mean() / ((t[k][i] ** 2).mean() + eps) for i in range(3)]
        want = want + sum(per) / 3
    got = feature_loss(t, s, normalized=True, eps=eps, per_sample=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # the same error on a sample of 100x smaller features counts 10^4 times more than under the batch norm
    assert float(got) > 2 * float(feature_loss(t, s, normalized=True, eps=eps))
    # equal to the batch form when every sample has the same teacher norm and error
    one = {k: v[:1].repeat(4, *([1] * (v.dim() - 1))) for k, v in t.items()}
    one_s = {k: v[:1].repeat(4, *([1] * (v.dim() - 1))) for k, v in s.items()}
    torch.testing.assert_close(feature_loss(one, one_s, eps=eps, per_sample=True), feature_loss(one, one_s, eps=eps),
                               rtol=1e-6, atol=0)
    # the plain sum has no norm to take per sample
    assert float(feature_loss(t, s, normalized=False, per_sample=True)) == float(feature_loss(t, s, normalized=False))


def test_feat_norm_sample_trains_differently_and_is_checked(tiny_digits_pipe, tmp_path):
    teacher = tiny_digits_pipe.denoiser
    ds = ZooDigits()
    batch = distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, _cfg(tmp_path / "b", steps=2, log_every=1))
    sample = distill(tiny_digits_pipe, depth_skip(teacher, 7), ds,
                     _cfg(tmp_path / "s", steps=2, log_every=1, feat_norm="sample"))
    fb, fs = (float(_rows(r.log_path)[0]["feat"]) for r in (batch, sample))
    assert fb > 0 and fs > 0 and fb != fs  # the first batch, untrained student: the two terms differ
    assert json.loads((tmp_path / "s" / "distill.json").read_text())["config"]["feat_norm"] == "sample"
    with pytest.raises(ValueError, match=r"feat_norm \(--feat-norm\) 'layer': accepted 'batch' or 'sample'"):
        distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, _cfg(tmp_path / "x", feat_norm="layer"))
    with pytest.raises(ValueError, match=r"feat_norm \(--feat-norm\) 'sample' .* normalized=True"):
        distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, _cfg(tmp_path / "y", feat_norm="sample",
                                                                   normalized=False))


def test_auto_features_exclude_stand_ins(tiny_digits_pipe):
    teacher = tiny_digits_pipe.denoiser
    blocks = [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]
    assert list(select_features(teacher, depth_skip(teacher, 13))) == blocks
    # depth 7 removes down_blocks.2-3, the mid block and up_blocks.0 and the first two layers of up_blocks.1
    assert list(select_features(teacher, depth_skip(teacher, 7))) == [
        "down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2", "up_blocks.3"]
    # depth 8 keeps down_blocks.2.resnets.0 but its last layer and downsampler are stand-ins: its output is zeros
    assert "down_blocks.2" not in select_features(teacher, depth_skip(teacher, 8))
    assert list(select_features(teacher, depth_skip(teacher, 10))) == [
        "down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"]
    with pytest.raises(ValueError, match="stand-in"):
        select_features(teacher, depth_skip(teacher, 7), ["mid_block"])
    with pytest.raises(ValueError, match="not a module"):
        select_features(teacher, depth_skip(teacher, 7), ["down_blocks.9"])


def test_transformer_features_are_matched_where_they_enter_the_residual_stream():
    """A DiT with blocks removed: each kept block's output feeds what the teacher's last removed block after it
    fed, so that is its teacher feature; U-Net blocks keep their own names."""
    from diffslim.methods.layer_prune import prune_layers
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    teacher = build_pipeline("digits-dit").denoiser
    student = prune_layers(teacher, [f"transformer_blocks.{i}" for i in (1, 3, 4, 5)])
    assert select_features(teacher, student) == {"transformer_blocks.0": "transformer_blocks.1",
                                                 "transformer_blocks.2": "transformer_blocks.5"}
    student = prune_layers(teacher, ["transformer_blocks.0", "transformer_blocks.2"])
    assert select_features(teacher, student) == {"transformer_blocks.1": "transformer_blocks.2",
                                                 **{f"transformer_blocks.{i}": f"transformer_blocks.{i}" for i in (3, 4, 5)}}


def _png(path, color, size=(12, 10)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _png(tmp_path / f"img{i}.png", c)
    (tmp_path / "img1.txt").write_text("a green square\n")
    (tmp_path / "img1b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds = ImageFolder(tmp_path, size=8)
    assert len(ds) == 4
    with caplog.at_level(logging.WARNING):
        samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1
    assert any("img1b.png" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert samples[2]["image"][2, 0, 0] == 1.0  # the corrupt index 2 yields the next image (blue)
    assert samples[1]["text"] == "a green square" and samples[0]["text"] == ""
    assert all(s["image"].shape == (3, 8, 8) and 0 <= s["image"].min() <= s["image"].max() <= 1 for s in samples)
    ds[2]
    assert ds.skipped == 1  # counted once, not per visit
    b = collate(samples)
    assert b["image"].shape == (4, 3, 8, 8) and len(b["text"]) == 4


def test_jsonl_captions_pairs_and_make_dataset(tmp_path, tiny_digits_pipe, tiny_sd_pipe):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", (10, 20, 30), size=(40, 20))
    _png(folder / "b.jpg", (1, 2, 3))
    (folder / "captions.jsonl").write_text(json.dumps({"file": "b.jpg", "text": "dark"}) + "\n")
    ds = make_dataset(str(folder), tiny_sd_pipe)
    assert isinstance(ds, ImageFolder) and ds[0]["image"].shape == (3, 16, 16)
    assert [ds[i]["text"] for i in range(2)] == ["", "dark"]
    # another resolution: a multiple of the VAE factor (2; a U-Net takes any latent size)
    assert make_dataset(str(folder), tiny_sd_pipe, size=10)[0]["image"].shape == (3, 10, 10)
    with pytest.raises(ValueError, match="positive multiples of 2 px"):
        make_dataset(str(folder), tiny_sd_pipe, size=9)
    with pytest.raises(ValueError, match="resolution applies to image folders"):
        make_dataset("zoo", tiny_digits_pipe, size=16)

    pairs = tmp_path / "pairs"
    (pairs / "input").mkdir(parents=True)
    (pairs / "target").mkdir()
    _png(pairs / "input" / "x.png", (0, 0, 0), size=(8, 8))
    _png(pairs / "target" / "x.jpg", (255, 255, 255), size=(16, 16))
    _png(pairs / "target" / "lonely.png", (255, 255, 255))
    ds = make_dataset(str(pairs), tiny_sd_pipe)
    assert isinstance(ds, ConditionPairs) and len(ds) == 1
    assert ds[0]["image"].shape == (3, 16, 16) and ds[0]["cond"].shape == (3, 16, 16)

    assert isinstance(make_dataset("zoo", tiny_digits_pipe), ZooDigits)
    with pytest.raises(ValueError, match="zoo"):
        make_dataset("zoo", tiny_sd_pipe)
    with pytest.raises(ValueError, match="neither"):
        make_dataset(str(tmp_path / "missing"), tiny_sd_pipe)
    with pytest.raises(ValueError, match="labelled"):
        make_dataset(str(folder), tiny_digits_pipe)


def test_sd_pipeline_with_captions(tiny_sd_pipe, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"{i}.png", (40 * i, 100, 200 - 40 * i), size=(20, 16))
        (folder / f"{i}.txt").write_text("a cat")
    teacher = tiny_sd_pipe.unet
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = depth_skip(teacher, 3)
    res = distill(tiny_sd_pipe, student, make_dataset(str(folder), tiny_sd_pipe),
                  _cfg(tmp_path / "run", steps=2, batch_size=2, lambda_feat=0.5, normalized=False))
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(v)) for v in res.final_losses.values())
    assert json.loads((res.out_dir / "distill.json").read_text())["features"]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("name", ["sr", "digits-dit"])
def test_other_zoo_tasks_run(name, tmp_path):
    from diffslim.train.data import ZooSRPatches
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(name)
    ds = ZooSRPatches(16, patch=16) if name == "sr" else ZooDigits()
    res = distill(pipe, pipe.denoiser, ds, _cfg(tmp_path / "run", steps=2, batch_size=2, ema_decay=None, log_every=1))
    assert res.steps == 2 and (res.out_dir / "student" / "config.json").is_file()
    feats = json.loads((res.out_dir / "distill.json").read_text())["features"]
    assert feats and (name == "sr" or all(k.startswith("transformer_blocks.") for k in feats))
    # the student starts as a copy of its teacher: zero output and feature terms at the first step
    first = _rows(res.log_path)[0]
    assert float(first["out"]) == 0.0 and float(first["feat"]) == 0.0 and float(first["task"]) > 0


@pytest.mark.xdist_group("accelerate-launch")  # one at a time: they share accelerate's port
def test_two_processes_agree(tmp_path):
    script = Path(__file__).parent / "scripts" / "distill_mp.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "mp.json").read_text())
    assert got["num_processes"] == 2 and got["steps"] == 4
    digests = {d for _, d in got["digests"]}
    assert len(got["digests"]) == 2 and len(digests) == 1
    # the feature scale is measured on both processes' batches: one value, not one per process
    assert len(got["feat_scales"]) == 2 and got["feat_scales"][0] == got["feat_scales"][1] != 1.0
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step_4" / "complete.json").is_file() and (ckpts / "step_3").is_dir()
    assert {p.name for p in (ckpts / "step_4").glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                  "random_states_1.pkl"}
    assert (tmp_path / "run" / "student" / "diffusion_pytorch_model.safetensors").is_file()
    # SIGTERM to process 1 alone during step 2: both stop after step 2, with one complete checkpoint there, and
    # running again resumes to the weights of the uninterrupted run on both processes
    stops = dict((rank, stop) for rank, stop in got["stops"])
    assert stops[0]["step"] == stops[1]["step"] == 2
    assert stops[1]["signum"] == signal.SIGTERM and stops[0]["signum"] is None
    assert stops[0]["checkpoint"] == str(tmp_path / "stopped" / "checkpoints" / "step_2")
    left = {Path(p).parts[2:] for p in got["left"]}  # (step_N, file) of what the stopped run left
    assert {step for step, _ in left} == {"step_2"}
    assert {f for _, f in left} >= {"complete.json", "random_states_0.pkl", "random_states_1.pkl"}
    assert {d for _, d in got["resumed"]} == digests


def test_match_plain_weight_scales_the_normalized_term_to_the_plain_sum(tiny_digits_pipe, tmp_path):
    """The scale is the plain-to-normalized ratio of the untrained student's feature terms; it is
    checkpointed, so a resumed run keeps it rather than measuring the half-trained student."""
    teacher = tiny_digits_pipe.denoiser
    ds = ZooDigits()
    # one step logged at step 1: its feat column is the term of the untrained student on batch 0
    plain = distill(tiny_digits_pipe, depth_skip(teacher, 7), ds,
                    _cfg(tmp_path / "plain", steps=1, log_every=1, normalized=False))
    norm = distill(tiny_digits_pipe, depth_skip(teacher, 7), ds,
                   _cfg(tmp_path / "norm", steps=1, log_every=1, match_plain_weight=True, weight_batches=1))
    p, n = float(_rows(plain.log_path)[0]["feat"]), float(_rows(norm.log_path)[0]["feat"])
    assert p > 0 and n > 0 and abs(p / n - 1) > 0.05  # the two sums differ, so the scale matters
    assert norm.feat_scale == pytest.approx(p / n, rel=1e-4)
    assert json.loads((tmp_path / "norm" / "distill.json").read_text())["feat_scale"] == norm.feat_scale
    assert plain.feat_scale == 1.0

    # the scale changes training: a normalized run without it ends elsewhere
    cfg = _cfg(tmp_path / "a", match_plain_weight=True)
    a = distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, cfg)
    unscaled = distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, _cfg(tmp_path / "u"))
    assert a.final_losses["loss"] != unscaled.final_losses["loss"]
    # exact resume: measured again after 3 steps the scale would differ
    b_cfg = replace(cfg, out=tmp_path / "b")
    distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, replace(b_cfg, stop_at=3))
    b = distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, b_cfg)
    assert b.feat_scale == a.feat_scale and b.final_losses == a.final_losses

    with pytest.raises(ValueError, match="match_plain_weight .* normalized=True"):
        distill(tiny_digits_pipe, depth_skip(teacher, 7), ds, _cfg(tmp_path / "bad", normalized=False,
                                                                   match_plain_weight=True))


def test_mixed_precision_trains_on_float32_data(tmp_path, monkeypatch):
    """Under bf16 mixed precision the student and teacher run under autocast, but the data (zoo:sr's residual target,
    a VAE's latents) is made in float32: in bfloat16 zoo:sr's target was wrong by 13 % of its spread. Also inside the
    weight-matching batches, which run under an autocast of their own. It follows a run without mixed precision in
    the same process, as in a Python session (Accelerate refused a second precision: "restart your runtime"), and a
    DiP-GO-style Accelerator after it trains without autocast again."""
    from accelerate import Accelerator

    from diffslim import launch
    from diffslim.train import distill as trainer

    Accelerator(cpu=True)  # what an earlier run in this process left: Accelerate's state, without mixed precision
    from diffslim.train.data import ZooSRPatches
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("sr")
    encoded, real_encode = [], trainer._ZooSRTask.encode

    def encode(self, batch, g, device):
        x0, cond = real_encode(self, batch, g, device)
        encoded.append((torch.is_autocast_enabled("cpu"), x0.dtype))
        return x0, cond

    monkeypatch.setattr(trainer._ZooSRTask, "encode", encode)
    student = depth_skip(pipe.denoiser, 2)
    autocast_in_student = []
    student.register_forward_pre_hook(lambda m, a: autocast_in_student.append(torch.is_autocast_enabled("cpu")))
    res = distill(pipe, student, ZooSRPatches(8, patch=16),
                  _cfg(tmp_path / "run", steps=2, batch_size=2, ema_decay=None, log_every=1, mixed_precision="bf16",
                       normalized=True, match_plain_weight=True, weight_batches=2))
    assert res.steps == 2
    assert len(encoded) == 4 and set(encoded) == {(False, torch.float32)}  # 2 weight batches, 2 training steps
    assert autocast_in_student and all(autocast_in_student)
    assert launch.accelerator().mixed_precision == "no"  # the next run does not inherit bf16


@pytest.mark.parametrize("ema_decay", [0.9, None])
def test_half_precision_student_exports_in_its_dtype_and_keeps_its_trained_weights(tiny_digits_pipe, tmp_path,
                                                                                   ema_decay):
    """A float16 student trains in float32 and is saved in float16 (the EMA's weights where there is an EMA); the
    student in memory keeps its trained float32 weights bit for bit, as the last checkpoint holds them. (The export
    used to convert the student to float16 and back, rounding the trained weights, where there was no EMA.)"""
    student = depth_skip(tiny_digits_pipe.denoiser, 7).to(torch.float16)
    res = distill(tiny_digits_pipe, student, ZooDigits(),
                  _cfg(tmp_path / "run", steps=3, batch_size=4, ema_decay=ema_decay, log_every=1))
    ckpt = res.out_dir / "checkpoints" / "step_3"
    trained = load_file(str(ckpt / "model.safetensors"))
    now = student.state_dict()
    assert set(trained) <= set(now) and all(now[k].dtype == torch.float32 for k in trained)
    assert all(torch.equal(now[k], trained[k]) for k in trained)
    saved = load_file(str(res.out_dir / "student" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in saved.values() if v.is_floating_point())
    expected = trained
    if ema_decay is not None:
        expected = torch.load(ckpt / "custom_checkpoint_2.pkl", weights_only=False)["shadow"]
        assert any(not torch.equal(expected[k], trained[k]) for k in expected)  # the EMA is not the trained weights
    assert set(expected) <= set(saved)
    assert all(torch.equal(saved[k], expected[k].half()) for k in expected)
