"""DiP-GO: pruner, gates, post-processing, the differentiable trajectory, training resume, searches, recipe, CLI."""

import numpy as np
import pytest
import torch

from diffslim.errors import UserError
from diffslim.methods.dipgo import (
    DipgoConfig, Pruner, _Trajectory, plan_from_scores, search_plan, straight_through_gates, train_dipgo,
)
from diffslim.methods.skip_plan import (
    apply_skip_plan, effective_plan, full_plan, plan_macs_ratio, plan_units, random_plan, remove_skip_plan,
)

STEPS = 4


@pytest.fixture(scope="module")
def units(tiny_digits_pipe):
    return plan_units(tiny_digits_pipe.denoiser, "fine")


def test_pruner_starts_keeping_all_and_attention_mixes_units_of_a_step():
    torch.manual_seed(0)
    p = Pruner(5, 6, width=16, heads=2)
    g = straight_through_gates(p())
    assert torch.equal(g.detach(), torch.ones(5, 6))
    base = p().detach()
    with torch.no_grad():
        p.queries[2, 0] += 1.0
    moved = (p().detach() - base).abs().sum(-1)
    assert moved[2, 3] > 0  # another unit of the same step changed: self-attention takes part
    assert moved[[0, 1, 3, 4]].abs().sum() == 0  # other steps did not
    torch.manual_seed(0)
    q = Pruner(5, 6, width=16, heads=2, self_attention=False)
    base = q().detach()
    with torch.no_grad():
        q.queries[2, 0] += 1.0
    moved = (q().detach() - base).abs().sum(-1)
    assert moved[2, 3] == 0 and moved[2, 0] > 0


def test_straight_through_gates_are_hard_with_soft_gradient():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [2.0, 0.0]]], requires_grad=True)
    g = straight_through_gates(logits)
    assert g.tolist() == [[1.0, 1.0], [1.0, 0.0]]  # step 0 forced to keep
    g[1].sum().backward()
    assert logits.grad[1].abs().sum() > 0 and logits.grad[0].abs().sum() == 0


def test_plan_from_scores_meets_the_budget_as_closely_as_the_threshold_allows(units):
    rng = np.random.default_rng(0)
    scores = rng.random((10, len(units)))
    plan = plan_from_scores(scores, units, 0.6, fill=False)
    r = plan_macs_ratio(plan, units)
    assert r <= 0.4 + 1e-12 and plan[0].all()
    thr = scores[1:][plan[1:]].min()
    looser = scores >= scores[1:][scores[1:] < thr].max()  # the next lower threshold
    looser[0] = True
    assert plan_macs_ratio(looser, units) > 0.4
    with pytest.raises(UserError, match=r"\(0, 1\)"):
        plan_from_scores(scores, units, 1.0)
    with pytest.raises(UserError, match="out of reach"):
        plan_from_scores(scores[:1], units, 0.5)  # one step: step 0 alone is everything


def test_filled_plan_tops_the_threshold_plan_up_to_the_budget(units):
    """The fill keeps the threshold plan, stays within the budget, gets closer to it, and is maximal:
    no pair left out would both run and fit."""
    rng = np.random.default_rng(1)
    for ratio in (0.5, 0.6, 0.8):
        scores = rng.random((10, len(units)))
        thr, filled = plan_from_scores(scores, units, ratio, fill=False), plan_from_scores(scores, units, ratio)
        r_thr, r = plan_macs_ratio(thr, units), plan_macs_ratio(filled, units)
        assert (filled >= thr).all() and r_thr <= r <= 1 - ratio + 1e-12
        for k, u in zip(*np.nonzero(~filled[1:])):
            more = filled.copy()
            more[1 + k, u] = True
            m = plan_macs_ratio(more, units)
            assert m == r or m > 1 - ratio + 1e-12
    assert r > r_thr  # the threshold alone leaves budget unused here


def test_gated_trajectory_equals_pipeline_under_the_hard_plan(tiny_digits_pipe, units):
    pipe = tiny_digits_pipe
    plan = random_plan(units, STEPS, 0.5, seed=2)
    rt = apply_skip_plan(pipe.denoiser, plan, units)
    try:
        g = [torch.Generator().manual_seed(s) for s in (5, 6)]
        ref = pipe(class_labels=[1, 8], num_inference_steps=STEPS, generator=g, output_type="pt").images
        traj = _Trajectory(pipe, [{"class_label": 1}, {"class_label": 8}], [5, 6], STEPS, None)
        gates = torch.tensor(effective_plan(plan, units), dtype=torch.float32, requires_grad=True)
        out = traj.run(rt.state, gates=gates, checkpoint=True)
        assert torch.equal(out.detach(), ref)
        out.mean().backward()  # through the checkpointed steps to the gates
        assert gates.grad[1:].abs().sum() > 0
    finally:
        remove_skip_plan(pipe.denoiser)


def _cfg(tmp_path, iters, **kw):
    return DipgoConfig(**{**dict(ratio=0.5, num_inference_steps=STEPS, iters=iters, batch_size=1, width=16, heads=2,
                                 checkpoint_every=1, out=str(tmp_path), progress=False), **kw})


def test_training_is_deterministic_and_resumes_exactly(tiny_digits_pipe, units, tmp_path):
    a = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "a", 2), units)
    train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "b", 1), units)
    b = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "b", 2), units)  # resumes from step 1
    assert [r["step"] for r in b.log] == [1, 2]
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.plan, b.plan)
    assert a.macs_ratio <= 0.5 and a.plan[0].all()
    assert not hasattr(tiny_digits_pipe.denoiser, "_diffslim_skip_plan")  # runtime removed after training
    loc = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "c", 1, objective="local", loss="l1"), units)
    assert np.isfinite(loc.log[0]["consistency"])


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tiny_digits_pipe, units, tmp_path):
    """A scheduler's SIGTERM during step 2 of 4 (checkpoints every 10): a checkpoint at step 2, Interrupted, the
    process's handler back; running again gives the uninterrupted run's scores. Without a folder to checkpoint into,
    the trainer leaves the signals alone."""
    import os
    import signal
    from dataclasses import replace

    from diffslim.errors import Interrupted

    straight = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "a", 4, checkpoint_every=10), units)

    def trip(*_):
        raise AssertionError("the signal reached the handler the test installed")

    seen = []

    def preempt(step, rec):
        seen.append(signal.getsignal(signal.SIGTERM))
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, trip)
    try:
        with pytest.raises(Interrupted) as e:
            train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "b", 4, checkpoint_every=10), units, callback=preempt)
        assert signal.getsignal(signal.SIGTERM) is trip and seen[0] is not trip
        seen.clear()
        train_dipgo(tiny_digits_pipe, replace(_cfg(tmp_path / "c", 1), out=None), units,
                    callback=lambda step, rec: seen.append(signal.getsignal(signal.SIGTERM)))
        assert seen == [trip]
    finally:
        signal.signal(signal.SIGTERM, previous)
    ckpts = tmp_path / "b" / "checkpoints"
    assert (e.value.step, e.value.total, e.value.signum, e.value.exit_code) == (2, 4, signal.SIGTERM, 143)
    assert e.value.checkpoint == ckpts / "step_2.pt" and sorted(p.name for p in ckpts.iterdir()) == ["step_2.pt"]
    assert not hasattr(tiny_digits_pipe.denoiser, "_diffslim_skip_plan")  # the runtime is removed on the way out
    resumed = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "b", 4, checkpoint_every=10), units)
    assert [r["step"] for r in resumed.log] == [1, 2, 3, 4] and resumed.log == straight.log
    assert np.array_equal(straight.scores, resumed.scores) and np.array_equal(straight.plan, resumed.plan)


def test_local_objective_trains_the_gates(tiny_digits_pipe, units, tmp_path):
    """Learning-to-Cache's local objective alone (no sparsity loss) moves the pruner: each step is run from the
    full model's caches of the step before, so its loss depends on the gates."""
    frozen = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "a", 1, objective="local", alpha=0.0, lr=1e-30), units)
    moved = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "b", 1, objective="local", alpha=0.0), units)
    assert frozen.log[0]["consistency"] == moved.log[0]["consistency"] > 0
    assert not np.array_equal(frozen.scores, moved.scores)


def test_searches_respect_budget_and_ratio(units):
    calls = []

    def score(plan):
        calls.append(plan_macs_ratio(plan, units))
        return float(plan[:, :5].sum())  # a made-up objective: keep the first units

    for method in ("random", "ga"):
        calls.clear()
        r = search_plan(score, units, 6, 0.7, budget=12, method=method, seed=3, population=4)
        assert r.n_evals == 12 and len(calls) == 12 and max(calls) <= 0.3 + 1e-12
        again = search_plan(score, units, 6, 0.7, budget=12, method=method, seed=3, population=4)
        assert np.array_equal(r.plan, again.plan)
    ga = search_plan(score, units, 6, 0.7, budget=40, method="ga", seed=0, population=4)
    rnd = search_plan(score, units, 6, 0.7, budget=4, method="random", seed=0)
    assert ga.score >= rnd.score


def test_recipe_section_validates_and_applies(tiny_digits_pipe, units):
    from diffslim.apply import apply
    from diffslim.recipe import RecipeError, parse_recipe

    plan = random_plan(units, STEPS, 0.6, seed=4)
    data = {"skip_plan": {"granularity": "fine", "units": list(units.names), "plan": plan.tolist()}}
    with pytest.raises(RecipeError, match="row 1 has 2 entries"):
        parse_recipe({"skip_plan": {**data["skip_plan"], "plan": [[True] * len(units), [True, False]]}})
    with pytest.raises(RecipeError, match="row 0 must keep"):
        parse_recipe({"skip_plan": {**data["skip_plan"], "plan": [[False] * len(units)]}})
    with pytest.raises(RecipeError, match="another model"):
        apply(tiny_digits_pipe, {"skip_plan": {**data["skip_plan"], "units": ["x"], "plan": [[True]]}})
    import copy

    g = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    apply_skip_plan(tiny_digits_pipe.denoiser, plan, units)
    try:
        ref = tiny_digits_pipe(class_labels=[2], num_inference_steps=STEPS, generator=g(), output_type="pt").images
    finally:
        remove_skip_plan(tiny_digits_pipe.denoiser)
    pipe = copy.copy(tiny_digits_pipe)
    apply(pipe, data)
    try:
        # the step count is pinned to the plan's rows whatever the caller asks
        out = pipe(class_labels=[2], num_inference_steps=50, generator=g(), output_type="pt").images
    finally:
        remove_skip_plan(pipe.denoiser)
    assert torch.equal(out, ref)


def test_cli_rejects_bad_ratio_and_scheduler(tmp_path):
    from typer.testing import CliRunner

    from diffslim.cli import app

    r = CliRunner().invoke(app, ["dipgo", "zoo:digits-sd", "--ratio", "0", "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and "(0, 1)" in r.output
    r = CliRunner().invoke(app, ["dipgo", "zoo:digits-sd", "--ratio", "0.5", "--scheduler", "foo",
                                 "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and "unknown --scheduler" in r.output


def test_full_plan_shape():
    assert full_plan(3, 2).all() and full_plan(3, 2).shape == (3, 2)


@pytest.mark.xdist_group("accelerate-launch")  # one at a time: they share accelerate's port
def test_two_processes_train_the_same_pruner(tmp_path):
    """Data parallel under `accelerate launch` (2 CPU processes over gloo): each process trains on its share of
    every batch, gradients are averaged, and both end with the same scores and plan."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "dipgo_mp.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), str(tmp_path)]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "dipgo_mp.json").read_text())
    assert got["num_processes"] == 2 and got["steps"] == [1, 2]
    assert len(got["digests"]) == 2 and len({d for _, d in got["digests"]}) == 1
    # SIGTERM to process 1 alone during step 2 of 3: both stop after step 2, the main process's checkpoint is
    # there, and running again gives both the uninterrupted run's scores and plan
    import signal

    stops = dict((rank, stop) for rank, stop in got["stops"])
    assert stops == {0: {"step": 2, "signum": None}, 1: {"step": 2, "signum": int(signal.SIGTERM)}}
    assert got["left"] == ["step_2.pt"]
    assert {d for _, d in got["resumed"]} == {got["straight"]}


# ------------------------------------------------------------------------------------------------
# DiP-GO on a diffusers pipeline (its own sampling loop, prompts from a file)


def test_pipeline_trajectory_equals_the_pipeline_and_checkpointing_keeps_gradients(tiny_sd_pipe):
    """On StableDiffusionPipeline: the gated run with hard gates equals the pipeline under the hard plan,
    and the gates' gradient is the same with and without per-call gradient checkpointing."""
    from diffslim.methods.dipgo import _PipelineTrajectory

    pipe = tiny_sd_pipe
    u = plan_units(pipe.unet, "fine")
    plan = random_plan(u, STEPS, 0.5, seed=3)
    rt = apply_skip_plan(pipe.unet, plan, u)
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    for m in models:
        m.requires_grad_(False)  # as train_dipgo does: only the gates learn
    try:
        g = [torch.Generator().manual_seed(s) for s in (5, 6)]
        ref = pipe(["a cat", "a dog"], num_inference_steps=STEPS, generator=g, output_type="pt").images
        traj = _PipelineTrajectory(pipe, [{"prompt": "a cat"}, {"prompt": "a dog"}], [5, 6], STEPS, None)
        grads = []
        for ckpt in (True, False):
            gates = torch.tensor(effective_plan(plan, u), dtype=torch.float32, requires_grad=True)
            out = traj.run(rt.state, gates=gates, checkpoint=ckpt)
            torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=0)
            out.square().mean().backward()
            grads.append(gates.grad)
        assert grads[0][1:].abs().sum() > 0
        torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
        assert rt.state.gates is None and not rt.state.checkpoint  # training state does not leak into sampling
    finally:
        remove_skip_plan(pipe.unet)
        for m in models:
            m.requires_grad_(True)


def test_training_on_a_diffusers_pipeline_from_a_prompt_file(tiny_sd_pipe, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n\na green bird\n")
    u = plan_units(tiny_sd_pipe.unet, "fine")
    flags = [p.requires_grad for p in tiny_sd_pipe.unet.parameters()]
    cfg = lambda out, iters: DipgoConfig(ratio=0.5, num_inference_steps=STEPS, iters=iters, batch_size=2, width=16,
                                         heads=2, data=str(prompts), checkpoint_every=1, out=str(out), progress=False,
                                         call_kwargs={"guidance_scale": 2.0})
    a = train_dipgo(tiny_sd_pipe, cfg(tmp_path / "a", 2), u)
    train_dipgo(tiny_sd_pipe, cfg(tmp_path / "b", 1), u)
    b = train_dipgo(tiny_sd_pipe, cfg(tmp_path / "b", 2), u)  # resumes from its step-1 checkpoint
    assert np.array_equal(a.scores, b.scores) and a.plan.shape == (STEPS, len(u)) and a.macs_ratio <= 0.5
    assert all(np.isfinite(r["consistency"]) for r in a.log)
    assert [p.requires_grad for p in tiny_sd_pipe.unet.parameters()] == flags  # restored after training
    assert not hasattr(tiny_sd_pipe.unet, "_diffslim_skip_plan")


def test_an_img2img_run_below_strength_one_is_planned_over_the_calls_it_makes(tiny_sd_pipe, tmp_path):
    """At strength 0.5 a 4-step img2img run makes 2 denoiser calls: the pruner is trained for those 2 rows, the
    budget is theirs (it was of all 4, so the 2 rows no run reaches could pay for it), and the plan has a row per
    step, the last 2 keeping every unit; installed, it samples."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from test_image_inputs import _inputs_file

    from diffslim.sample import SampleSpec, denoiser_calls_per_run, sample
    from diffslim.train.data import pipeline_inputs

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png", "strength": 0.5},
                                   {"prompt": "a dog", "image": "im1.png", "strength": 0.5}], size=16)
    pool = pipeline_inputs(pipe, str(path), 0)
    assert denoiser_calls_per_run(pipe, SampleSpec(pool[:1], [0], num_inference_steps=STEPS)) == 2
    u = plan_units(pipe.unet, "fine")
    res = train_dipgo(pipe, DipgoConfig(ratio=0.5, num_inference_steps=STEPS, iters=2, batch_size=2, width=16,
                                        heads=2, progress=False), u, pool=pool)
    assert res.scores.shape == (2, len(u)) and res.plan.shape == (STEPS, len(u)) and res.plan[2:].all()
    assert res.macs_ratio == plan_macs_ratio(res.plan[:2], u) <= 0.5 < plan_macs_ratio(res.plan, u)
    # inputs of their own strengths: the plan covers the longest run (its first input's 2 calls crashed at call 2)
    mixed = [dict(pool[0], strength=0.5), dict(pool[1], strength=1.0)]
    assert denoiser_calls_per_run(pipe, SampleSpec(mixed, [0, 1], num_inference_steps=STEPS)) == STEPS
    res = train_dipgo(pipe, DipgoConfig(ratio=0.5, num_inference_steps=STEPS, iters=2, batch_size=1, width=16,
                                        heads=2, progress=False), u, pool=mixed)
    assert res.scores.shape == (STEPS, len(u))
    apply_skip_plan(pipe.unet, res.plan, u)  # the session's shared U-Net: removed after
    try:
        out = sample(pipe, SampleSpec(pool, [0, 1], num_inference_steps=STEPS, batch_size=2))
    finally:
        remove_skip_plan(pipe.unet)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_the_benchs_dipgo_plan_on_img2img_below_strength_one_has_a_row_per_step(tiny_sd_pipe, tmp_path,
                                                                                 monkeypatch):
    """dipgo:R re-derives its plan from the cached scores, which have a row per call the run makes (2 of 4 at
    strength 0.5): the plan it installs and records has a row per step again, the last ones keeping every unit
    (a 2-row plan in a recipe would pin the schedule at 2 steps, of which img2img then runs 1)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from test_image_inputs import _inputs_file

    import diffslim.bench as bench
    from diffslim.models.load import LoadedModel
    from diffslim.sample import SampleSpec
    from diffslim.train.data import pipeline_inputs

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "DEFAULT_DIPGO", dict(iters=2, batch_size=2, lr=2e-3, gradient_checkpointing=False))
    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png", "strength": 0.5},
                                   {"prompt": "a dog", "image": "im1.png", "strength": 0.5}], size=16)
    inputs = pipeline_inputs(pipe, str(path), 0)
    ctx = bench.BenchContext(loaded=LoadedModel("tiny-i2i", "pipeline", pipe.unet, pipe=pipe),
                             base_spec=SampleSpec(inputs, [0, 1], num_inference_steps=STEPS, batch_size=2),
                             default_steps=STEPS, task_weight=1.0)
    variant = bench.METHODS["dipgo"]("0.5", ctx)
    try:
        plan = np.asarray(variant.recipe["skip_plan"]["plan"])
        assert plan.shape[0] == STEPS and plan[2:].all() and not plan[:2].all()
        assert "over the 2 of its 4 steps the run makes" in variant.notes
    finally:
        variant.cleanup()  # the session's shared U-Net


def test_pipeline_inputs_read_prompts_jsonl_and_image_folders(tiny_sd_pipe, tiny_digits_pipe, tmp_path):
    from PIL import Image

    from diffslim.train.data import pipeline_inputs

    (tmp_path / "p.txt").write_text("one\ntwo\n")
    assert pipeline_inputs(tiny_sd_pipe, str(tmp_path / "p.txt"), 0) == [{"prompt": "one"}, {"prompt": "two"}]
    (tmp_path / "l.txt").write_text("3\n7\n")
    assert pipeline_inputs(tiny_digits_pipe, str(tmp_path / "l.txt"), 0) == [{"class_label": 3}, {"class_label": 7}]
    with pytest.raises(UserError, match="integer class label"):
        pipeline_inputs(tiny_digits_pipe, str(tmp_path / "p.txt"), 0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (20, 24), (255, 0, 0)).save(imgs / "a.png")
    (imgs / "a.txt").write_text("a red square")
    (tmp_path / "in.jsonl").write_text('{"prompt": "x", "image": "imgs/a.png"}\n')
    rows = pipeline_inputs(tiny_sd_pipe, str(tmp_path / "in.jsonl"), 0)
    assert rows[0]["prompt"] == "x" and rows[0]["image"].shape == (3, 16, 16)
    # StableDiffusionPipeline takes no image: a folder is refused with what to give instead
    with pytest.raises(UserError, match="takes no image input"):
        pipeline_inputs(tiny_sd_pipe, str(imgs), 0)
    from diffusers import StableDiffusionImg2ImgPipeline

    i2i = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pool = pipeline_inputs(i2i, str(imgs), 0)
    item = pool[0]
    assert len(pool) == 1 and item["prompt"] == "a red square" and item["image"].shape == (3, 16, 16)
    assert torch.allclose(item["image"][0], torch.ones(16, 16))
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    for bad, msg in ((tmp_path / "bad.jsonl", "object of pipeline inputs"), (tmp_path / "nope.txt", "does not exist")):
        with pytest.raises(UserError, match=msg):
            pipeline_inputs(tiny_sd_pipe, str(bad), 0)


def test_pipelines_that_cannot_give_gradients_are_refused():
    from diffslim.sample import SampleSpec, run_pipeline

    class ArrayPipe:  # decorated like diffusers' pipelines, but hands back numpy arrays whatever is asked
        @torch.no_grad()
        def __call__(self, prompt, num_inference_steps=2, generator=None, output_type="np"):
            return (np.zeros((len(prompt), 4, 4, 3), np.float32),)

    class PlainPipe:  # no no_grad decorator to bypass
        def __call__(self, prompt, num_inference_steps=2, generator=None, output_type="np"):
            return (torch.zeros(len(prompt), 3, 4, 4),)

    spec = SampleSpec([{"prompt": "a"}], [0], num_inference_steps=2)
    assert run_pipeline(ArrayPipe(), spec, [0]).shape == (1, 3, 4, 4)  # fine without gradients
    with pytest.raises(UserError, match="returns ndarray with output_type='pt'"):
        run_pipeline(ArrayPipe(), spec, [0], differentiable=True)
    with pytest.raises(UserError, match="not a torch.no_grad-decorated function"):
        run_pipeline(PlainPipe(), spec, [0], differentiable=True)


def test_cli_dipgo_and_bench_on_a_stable_diffusion_folder(tiny_sd_pipe, tmp_path):
    """A user's own pipeline folder: train from a prompt file, write a recipe, bench it and a dipgo:R run."""
    import json

    from typer.testing import CliRunner

    from diffslim.cli import app
    from diffslim.recipe import load_recipe

    folder = tmp_path / "sd"
    tiny_sd_pipe.save_pretrained(str(folder), safe_serialization=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    runner = CliRunner()
    r = runner.invoke(app, ["dipgo", str(folder), "--ratio", "0.5", "--steps", "4", "--iters", "2", "--batch-size",
                            "1", "--data", str(prompts), "--guidance-scale", "2.0", "--init", "steps",
                            "--select", "2", "--restarts", "2", "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "validated best" in r.output and " of 2)" in r.output
    rec = load_recipe(tmp_path / "r.json")
    assert rec.skip_plan.provenance["kept_restart"] in (0, 1) and rec.skip_plan.provenance["restarts"] == 2
    assert len(rec.skip_plan.plan) == 4 and rec.skip_plan.provenance["call_kwargs"] == {"guidance_scale": 2.0}
    assert rec.skip_plan.provenance["init"] == "steps"
    r = runner.invoke(app, ["bench", str(folder), "--methods", f"full,dipgo:@{tmp_path / 'r.json'},dipgo:0.5",
                            "--steps", "4", "--n", "2", "--prompts", str(prompts), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["method"]: row for row in json.loads(r.output[r.output.index("{"):])["rows"]}
    assert set(rows) == {"full", "dipgo:recipe", "dipgo:0.5"}
    # the rows' MACs are of the whole run (text encoder and VAE included); the plans' own are of the U-Net
    u = plan_units(tiny_sd_pipe.unet, "fine")
    assert plan_macs_ratio(np.asarray(rec.skip_plan.plan), u) <= 0.5
    assert rows["full"]["macs_ratio"] == 1.0 and rows["dipgo:0.5"]["macs_ratio"] < 1.0
    assert rows["full"]["psnr"] is None and rows["full"]["ssim"] is None  # "ref": no measurement, not PSNR 100
    timing = json.loads(r.output[r.output.index("{"):])["timing"]
    assert rows["full"]["seconds"] == min(timing["first"], timing["last"])
    assert 0 < rows["dipgo:0.5"]["psnr"] < 100
    assert "plan MACs ratio" in rows["dipgo:0.5"]["notes"]
    r = runner.invoke(app, ["dipgo", str(folder), "--ratio", "0.5", "--data", str(tmp_path / "none.txt"),
                            "--out", str(tmp_path / "x.json")])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_warm_starts_begin_as_their_plan_within_the_budget(units):
    from diffslim.methods.dipgo import prior_plan
    from diffslim.methods.skip_plan import deepcache_plan

    assert prior_plan("keep", units, 10, 0.5) is None
    steps = prior_plan("steps", units, 10, 0.6)
    rows = np.flatnonzero(steps.any(axis=1))
    assert rows[0] == 0 and steps[rows].all() and plan_macs_ratio(steps, units) <= 0.4
    # one more whole step, spread the same way, would break the budget
    more = np.zeros_like(steps)
    more[np.unique(np.floor(np.arange(len(rows) + 1) * 10 / (len(rows) + 1)).astype(int))] = True
    assert plan_macs_ratio(more, units) > 0.4
    dc = prior_plan("deepcache", units, 10, 0.5)
    k = next(k for k in range(1, 11) if plan_macs_ratio(deepcache_plan(units, 10, k, 0), units) <= 0.5)
    assert np.array_equal(dc, deepcache_plan(units, 10, k, 0))
    torch.manual_seed(0)
    p = Pruner(10, len(units), width=16, heads=2, keep_bias=3.0, prior=steps)
    assert np.array_equal(straight_through_gates(p()).detach().numpy().astype(bool), steps)
    # post-processing spends what the budget leaves on the most important of the closed units
    post = plan_from_scores(p.keep_prob().detach().numpy(), units, 0.6)
    assert np.array_equal(post | steps, post) and plan_macs_ratio(post, units) <= 0.4
    with pytest.raises(UserError, match="unknown init"):
        DipgoConfig(init="magic").check()


def test_annealed_sparsity_floor_falls_linearly_to_the_target(tiny_digits_pipe, units, tmp_path):
    from diffslim.methods.dipgo import sparsity_floor

    # the paper's schedule: the target from the first step
    assert [sparsity_floor(s, 0.8) for s in range(3)] == [pytest.approx(0.2)] * 3
    # annealed over 4 steps: 1 - 0.8 * (s + 1) / 4, then the target
    assert [sparsity_floor(s, 0.8, 4) for s in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2, 0.2])
    with pytest.raises(UserError, match="anneal must be >= 0"):
        DipgoConfig(anneal=-1).check()
    # the sparsity loss acts exactly when the kept share is above the floor of that step: with a floor that
    # falls slowly (near 1 for these 3 steps) the sampled plans sit below it, and only the consistency acts
    a = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "a", 3, anneal=1000), units)
    c = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "c", 3), units)
    for run, anneal in ((a, 1000), (c, 0)):
        for rec in run.log:
            floor = sparsity_floor(rec["step"] - 1, 0.5, anneal)
            sparse = rec["loss"] - rec["consistency"]
            assert sparse == pytest.approx(rec["kept_macs"] if rec["kept_macs"] > floor else 0.0, abs=1e-6)
    assert any(r["kept_macs"] <= sparsity_floor(r["step"] - 1, 0.5, 1000) for r in a.log)
    assert not np.array_equal(a.scores, c.scores)
    assert a.macs_ratio <= 0.5 and a.plan[0].all()


def test_validation_selection_keeps_the_scores_of_the_best_plan_and_resumes(tiny_digits_pipe, units, tmp_path):
    a = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "a", 3, anneal=3, select=2), units)
    vals = [r["val"] for r in a.log]
    assert all(np.isfinite(vals)) and all(v >= 0 for v in vals)
    best = int(np.argmin(vals)) + 1  # the first step with the lowest validation loss
    # selection only reads the pruner: the same run stopped at the best step ends with the selected scores
    upto = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "u", best, anneal=3), units)
    assert np.array_equal(a.scores, upto.scores)
    assert np.array_equal(a.plan, plan_from_scores(upto.scores, units, 0.5))
    # interrupted after one step and resumed: the same selection
    train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "b", 1, anneal=3, select=2), units)
    b = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "b", 3, anneal=3, select=2), units)
    assert np.array_equal(a.scores, b.scores) and [r["val"] for r in b.log] == vals
    with pytest.raises(UserError, match="select must be >= 0"):
        DipgoConfig(select=-1).check()


def test_restarts_keep_the_pruner_that_validates_best(tiny_digits_pipe, units, tmp_path):
    r = train_dipgo(tiny_digits_pipe, _cfg(tmp_path / "r", 2, anneal=2, select=2, restarts=2), units)
    # the same two pruners trained on their own, validated on the same batch (the first seed's)
    alone = [train_dipgo(tiny_digits_pipe, _cfg(tmp_path / f"s{k}", 2, anneal=2, select=2, seed=k, val_seed=0), units)
             for k in range(2)]
    vals = [min(x["val"] for x in a.log) for a in alone]
    k = int(np.argmin(vals))
    assert r.restart == k and np.array_equal(r.scores, alone[k].scores) and np.array_equal(r.plan, alone[k].plan)
    assert [x["val"] for x in r.log if x["restart"] == 1] == [x["val"] for x in alone[1].log]
    assert (tmp_path / "r" / "restart_1" / "scores.npy").exists() and (tmp_path / "r" / "scores.npy").exists()
    assert r.provenance()["kept_restart"] == k
    with pytest.raises(UserError, match="needs select"):
        DipgoConfig(restarts=2).check()


def test_bench_dipgo_runs_are_cached_per_ratio(monkeypatch):
    """dipgo:0.3 and dipgo:0.6 train a pruner each (the ratio sets its sparsity floor and validation): the
    cache gives each its own run, and a rerun of a ratio reuses its own, saying so."""
    from pathlib import Path
    from types import SimpleNamespace

    import diffslim.methods.dipgo as dipgo_mod
    from diffslim.bench import BenchContext, _default_dipgo
    from diffslim.models.load import load
    from diffslim.sample import SampleSpec

    trained = []

    def fake_train(pipe, cfg, units, pool=None):  # the training is not under test: its inputs and cache are
        trained.append(cfg.ratio)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        scores = np.random.default_rng(0).random((cfg.num_inference_steps, len(units.names)))
        np.save(out / "scores.npy", scores)
        return SimpleNamespace(seconds=1.0, log=[])

    monkeypatch.setattr(dipgo_mod, "train_dipgo", fake_train)
    loaded = load("zoo:digits-sd")
    ctx = BenchContext(loaded=loaded, base_spec=SampleSpec([{"class_label": 1}], [0], num_inference_steps=10),
                       default_steps=10)
    plans, notes = {}, {}
    for ratio in (0.3, 0.6, 0.3):
        plan, units, note, _ = _default_dipgo(ctx, ratio)
        plans.setdefault(ratio, []).append(plan)
        notes.setdefault(ratio, []).append(note)
    assert trained == [0.3, 0.6]
    roots = {r: {n.rsplit("cached at ", 1)[1] for n in ns} for r, ns in notes.items()}
    assert len(roots[0.3]) == 1 and roots[0.3] != roots[0.6]
    assert "reused" not in notes[0.3][0] and "reused" in notes[0.3][1] and "reused" not in notes[0.6][0]
    assert np.array_equal(plans[0.3][0], plans[0.3][1])
    assert plan_macs_ratio(plans[0.6][0], units) <= 0.4 + 1e-9 < plan_macs_ratio(plans[0.3][0], units)
