"""The guided workflow: stages stacked in order, each judged against the original, its recipe reproducing the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import diffslim
from diffslim.cli import app
from diffslim.errors import UserError
from diffslim.evaluate import eval_set_for
from diffslim.measure.quality import psnr
from diffslim.sample import SampleSpec, sample
from diffslim.workflow import parse_floor, parse_stages, run_workflow

STAGES = "layers:0.3,steps:5,deepcache:2"
STEPS = 10  # the original's step count: fewer than the zoo's 50, to keep the tests fast


@pytest.mark.parametrize("text,match", [
    ("steps:20,layers:0.3", "model stages first"),
    ("deepcache:2,steps:20", "model stages first"),
    ("steps:20,steps:10", "2 schedule stages"),
    ("deepcache:2,dipgo:0.3", "2 plan stages"),
    ("gamma:10,dipgo:0.3", "cannot follow gamma:10"),
    ("layers:0.3,fbcache", "'fbcache' cannot be a workflow stage"),
    ("full", "'full' cannot be a workflow stage"),
    ("layers:0.3,nosuch:1", "'nosuch' cannot be a workflow stage"),
    ("layers:auto+kd", "auto takes no suffix"),
    ("layers:auto@psnr", "METRIC=VALUE"),
    ("layers:auto@fid=3", "METRIC one of"),
    ("layers:auto@psnr=30,ssim=0.9", "'ssim=0.9' cannot be a workflow stage"),
    ("bk-sdm:auto", "auto searches the setting of layers:auto"),
    ("layers:auto:fancy", "layers:auto:fancy is not a criterion; accepted: layers:auto, layers:auto:pairs, layers:auto:similarity"),
    ("layers:auto:macs:2", "cap on the params removed of 2.0 is outside"),
    ("layers:auto:greedy:macs", "a selection by MACs takes the criteria"),
    ("layers:auto:pairs+kd", "auto takes no suffix"),
    ("steps:auto:pairs", "only layers:auto takes a criterion"),
    ("layers:auto:pairs@fid=3", "METRIC one of"),
])
def test_stage_lists_that_cannot_stack_are_refused(text, match):
    with pytest.raises(UserError, match=match):
        parse_stages(text)


def test_stage_and_floor_parsing():
    assert parse_stages("layers:0.3+kd, bk-sdm:base ,steps:20,dipgo:0.3") == [
        ("layers", "0.3+kd"), ("bk-sdm", "base"), ("steps", "20"), ("dipgo", "0.3")]
    assert parse_stages("steps:10") == [("steps", "10")]
    assert parse_stages("layers:auto:pairs@psnr=40,steps:auto") == [("layers", "auto:pairs@psnr=40"), ("steps", "auto")]
    assert parse_stages("layers:auto:pairs:macs:0.34@psnr=30,layers:0.3:macs:0.2+kd") == [
        ("layers", "auto:pairs:macs:0.34@psnr=30"), ("layers", "0.3:macs:0.2+kd")]
    from diffslim.workflow import stage_floor

    assert stage_floor("auto:pairs@psnr=40", {"psnr": 30.0}) == {"psnr": 40.0}
    assert stage_floor("auto:pairs", {"psnr": 30.0}) == {"psnr": 30.0}
    assert parse_floor("psnr=20, digit_accuracy=0.9") == {"psnr": 20.0, "digit_accuracy": 0.9}
    assert parse_floor(None) == {}
    for bad, match in (("fid=3", "METRIC one of"), ("psnr", "METRIC=VALUE"), ("psnr=high", "not a number")):
        with pytest.raises(UserError, match=match):
            parse_floor(bad)


@pytest.fixture(scope="module")
def digits():
    loaded = diffslim.load("zoo:digits-sd")
    return loaded, eval_set_for(loaded, 4)


def _spec(es, steps=STEPS):
    return SampleSpec(inputs=es.inputs, seeds=es.seeds, num_inference_steps=steps, call_kwargs=dict(es.call_kwargs))


def test_stacked_stages_are_judged_against_the_original_and_the_recipe_reproduces_the_result(digits, tmp_path):
    loaded, es = digits
    res = run_workflow(loaded, STAGES, es, tmp_path / "wf", default_steps=STEPS, progress=False, log=lambda m: None,
                       metrics_fn=lambda out, ref: {"psnr": float(psnr(out, ref).mean())})
    assert [r["stage"] for r in res.rows] == ["original", "layers:0.3", "steps:5", "deepcache:2"]
    assert res.stopped is None and res.stages_kept == ["layers:0.3", "steps:5", "deepcache:2"]
    reference = sample(loaded.pipe, _spec(es))
    assert torch.equal(res.outputs["original"], reference)
    for r in res.rows[1:]:
        assert r["psnr"] == pytest.approx(float(psnr(res.outputs[r["stage"]], reference).mean()))
    # each stage stacks on the one before: the pruned params stay, the MACs keep falling
    p = [r["params"] for r in res.rows]
    assert p[1] == p[2] == p[3] and p[1] <= 0.7 * p[0] + 1
    m = [r["macs_ratio"] for r in res.rows]
    assert m[0] == 1.0 and m[0] > m[1] > m[2] > m[3]
    # the steps stage samples the pruned model, not the original
    pruned = diffslim.load(str(tmp_path / "wf" / "stages" / "1-layers-0.3" / "pipeline"))
    assert torch.equal(res.outputs["steps:5"], sample(pruned.pipe, _spec(es, 5)))

    # recipe.json: its model folder plus its sections give the last stage's outputs bit for bit, however called
    rec = diffslim.recipe.load_recipe(tmp_path / "wf" / "recipe.json")
    assert rec.model == str(tmp_path / "wf" / "stages" / "1-layers-0.3" / "pipeline")
    assert rec.sampling.num_inference_steps == 5 and len(rec.skip_plan.plan) == 5
    again = diffslim.load(rec.model)
    diffslim.apply(again.pipe, rec)
    assert torch.equal(sample(again.pipe, _spec(es, 50)), res.outputs["deepcache:2"])
    # the file names the stage relative to itself: a copy of the folder elsewhere loads its own copy of the stage
    assert json.loads((tmp_path / "wf" / "recipe.json").read_text())["model"] == "stages/1-layers-0.3/pipeline"
    shutil.copytree(tmp_path / "wf", tmp_path / "moved")
    moved = diffslim.from_recipe(tmp_path / "moved" / "recipe.json")
    assert moved._diffslim_recipe.model == str((tmp_path / "moved" / "stages" / "1-layers-0.3" / "pipeline").resolve())
    assert torch.equal(sample(moved, _spec(es, 50)), res.outputs["deepcache:2"])
    with pytest.raises(diffslim.RecipeError, match="names no model"):
        diffslim.from_recipe({"sampling": {"num_inference_steps": 5}})
    saved = json.loads((tmp_path / "wf" / "workflow.json").read_text())
    assert [r["stage"] for r in saved["rows"]] == [r["stage"] for r in res.rows]
    # the recipe records the original, so `diffslim evaluate --recipe` alone gives the last row again: the pruned
    # stage's pipeline (the recipe's model) with its schedule and plan, against the original's outputs
    assert rec.original == "zoo:digits-sd"
    recipe = str(tmp_path / "wf" / "recipe.json")
    r = CliRunner().invoke(app, ["evaluate", "--recipe", recipe, "--n", "4", "--steps", str(STEPS), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["model"] == rec.model and got["reference"] == "zoo:digits-sd"
    assert got["steps"] == 5 and got["reference_steps"] == STEPS  # the recipe's steps, and the reference's
    assert got["psnr"] == pytest.approx(res.rows[3]["psnr"], abs=1e-4)
    assert "fid" not in got and "more samples than its 64 classifier features" in got["skipped"]["fid"]
    # against another full model when asked; and a warning when MODEL is not the recipe's model
    r = CliRunner().invoke(app, ["evaluate", "--recipe", recipe, "--reference", rec.model, "--n", "4", "--steps",
                                 str(STEPS), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["psnr"] != got["psnr"], r.output
    r = CliRunner().invoke(app, ["sample", "zoo:digits-sd", "--recipe", recipe, "--n", "2", "--out",
                                 str(tmp_path / "s")])
    assert r.exit_code == 0 and "was made for" in " ".join(r.stderr.split()) and rec.model in r.stderr.replace(
        "\n", ""), r.output
    for args, says in ((["evaluate", "--n", "2"], "MODEL is missing"),
                       (["evaluate", "zoo:digits-sd", "--reference", "zoo:digits-sd"], "add --recipe")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and says in r.output, r.output

    # the same command again loads the built model stage instead of rebuilding it, with the same outputs
    res2 = run_workflow(loaded, STAGES, es, tmp_path / "wf", default_steps=STEPS, progress=False, log=lambda m: None)
    assert res2.rows[1]["notes"].startswith("loaded from")
    assert all(torch.equal(res.outputs[k], res2.outputs[k]) for k in res.outputs)

    # a floor just above the third stage's PSNR: it is rejected, and the result is the second stage
    floor = {"psnr": res.rows[3]["psnr"] + 0.01}
    res3 = run_workflow(loaded, STAGES, es, tmp_path / "wf", default_steps=STEPS, floor=floor, progress=False,
                        log=lambda m: None,
                        metrics_fn=lambda out, ref: {"psnr": float(psnr(out, ref).mean())})
    assert [r["accepted"] for r in res3.rows] == [True, True, True, False]
    assert res3.stages_kept == ["layers:0.3", "steps:5"] and "deepcache:2 fell below the floor" in res3.stopped
    assert res3.recipe.skip_plan is None and res3.recipe.sampling.num_inference_steps == 5


def test_a_second_model_stage_prunes_the_first_ones_result(digits, tmp_path):
    loaded, es = digits
    res = run_workflow(loaded, "layers:0.3,layers:0.2", es, tmp_path, default_steps=4, progress=False,
                       log=lambda m: None)
    p0, p1, p2 = (r["params"] for r in res.rows)
    assert p1 <= 0.7 * p0 + 1 and p2 <= 0.8 * p1 + 1 and p2 > 0.3 * p0
    assert res.recipe.model == str(tmp_path / "stages" / "2-layers-0.2" / "pipeline")
    assert diffslim.load(res.recipe.model).denoiser.config.removed_layers  # a pruned model of its own


def test_a_model_stage_is_let_go_before_the_next_one_is_loaded(digits, tmp_path, monkeypatch):
    """Each model stage is saved and reloaded; the stage before it (and the pruned copy sharing its weights) is let go
    first. It was still held: a workflow of two SD-1.5 model stages peaked at 3 sets of weights (8.9 GB RSS; 6.6 GB
    after)."""
    import gc
    import weakref

    from diffslim import workflow

    loaded, es = digits
    stages, real = [], workflow._reloaded_stage

    def reloaded(*args, **kwargs):
        gc.collect()
        alive = [s() is not None for s in stages]
        stage = real(*args, **kwargs)
        stages.append(weakref.ref(stage.denoiser))
        alive_before.append(alive)
        return stage

    alive_before = []
    monkeypatch.setattr(workflow, "_reloaded_stage", reloaded)
    res = run_workflow(loaded, "depth:9,depth:7,layers:0.2", es, tmp_path, default_steps=4, progress=False,
                       log=lambda m: None)
    assert res.stages_kept == ["depth:9", "depth:7", "layers:0.2"]
    assert alive_before == [[], [False], [False, False]]  # no earlier stage alive when the next one loads


def test_a_floor_that_the_first_stage_misses_leaves_the_original(digits, tmp_path):
    loaded, es = digits
    res = run_workflow(loaded, "steps:5", es, tmp_path, default_steps=STEPS, floor={"psnr": 1e6}, progress=False,
                       log=lambda m: None,
                       metrics_fn=lambda out, ref: {"psnr": float(psnr(out, ref).mean())})
    assert res.stages_kept == [] and "the result is the original" in res.stopped
    assert res.recipe.model == "zoo:digits-sd" and res.recipe.is_identity()
    with pytest.raises(UserError, match="have no digit_accuracy"):
        run_workflow(loaded, "steps:5", es, tmp_path, default_steps=STEPS, floor={"digit_accuracy": 0.5}, progress=False,
                     log=lambda m: None, metrics_fn=lambda out, ref: {"psnr": 1.0})


def test_workflow_cli_writes_the_report_and_refuses_bad_input(tmp_path):
    run = lambda *a: CliRunner().invoke(app, ["workflow", *map(str, a)])
    r = run("zoo:digits-sd", "--stages", "steps:5,deepcache:2", "--n", 4, "--steps", STEPS, "--out", tmp_path / "wf",
            "--floor", "psnr=10")
    assert r.exit_code == 0, r.output
    for f in ("index.html", "workflow.json", "recipe.json", "workflow_zoo_digits-sd.png"):
        assert (tmp_path / "wf" / f).is_file(), f
    html = (tmp_path / "wf" / "index.html").read_text()
    assert "steps:5" in html and "deepcache:2" in html and "the path of the stages" in html
    read = html[html.index("how to read it"):]
    read = read[:read.index("</p>")]
    assert "the same 4 inputs and seeds" in read and "floor: psnr &gt;= 10" in read
    assert "diffslim.from_recipe(&quot;recipe.json&quot;) loads zoo:digits-sd" in read
    timing = json.loads((tmp_path / "wf" / "workflow.json").read_text())["timing"]  # the original, timed twice
    note = f"timing: the full model sampled in {timing['first']:.3g} s first and {timing['last']:.3g} s again after " \
           "the stages"
    assert note in read and note in " ".join(r.output.split())
    run_info = html[html.index("how it was run"):]
    assert "ran on cpu, float32" in run_info[:run_info.index("</p>")] and "diffusers " in run_info
    rows = json.loads((tmp_path / "wf" / "workflow.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["original", "steps:5", "deepcache:2"]
    assert all(r["digit_accuracy"] >= 0 for r in rows)
    for args, match in ((("--stages", "deepcache:2,steps:10"), "model stages first"),
                        (("--stages", "steps:10", "--floor", "lpips=0.1"), "METRIC one of"),
                        (("--stages", "steps:10", "--n", 0), "greater than or equal to 1"),
                        (("--stages", "steps:auto", "--floor", "psnr=30", "--search", "all"), "accepted: greedy"),
                        (("--stages", "steps:10", "--search", "joint", "--objective", "time"), "accepted: macs"),
                        (("--stages", "steps:10", "--search", "joint", "--joint-width", -1), "give 0 to 10"),
                        (("--stages", "steps:10", "--objective", "params"), "steer search='joint'")):
        r = run("zoo:digits-sd", *args, "--out", tmp_path / "bad")
        assert r.exit_code != 0 and match in r.output, r.output
    assert not (tmp_path / "bad").exists()


def test_workflow_on_a_user_pipeline_trains_on_its_data_folder(tiny_sd_pipe, tmp_path):
    """A Stable Diffusion folder (not a zoo model): with an image folder the layer stage scores on it; the pruned stage
    is a StableDiffusionPipeline folder that reloads."""
    import numpy as np
    from PIL import Image

    tiny_sd_pipe.save_pretrained(str(tmp_path / "sd"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 50 * i + 20, np.uint8)).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text("a red cat" if i % 2 else "a blue dog")
    run = lambda *a: CliRunner().invoke(app, ["workflow", str(tmp_path / "sd"), "--stages", "layers:0.3,steps:3",
                                              "--n", "2", "--steps", "6", *map(str, a)])
    r = run("--data", tmp_path / "missing", "--out", tmp_path / "no")
    assert r.exit_code != 0 and "is no such folder; give 'zoo' or a folder of images" in " ".join(r.output.split()), r.output
    r = run("--data", imgs, "--out", tmp_path / "wf", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "wf" / "workflow.json").read_text())
    p = [row["params"] for row in res["rows"]]
    assert [row["stage"] for row in res["rows"]] == ["original", "layers:0.3", "steps:3"]
    assert p[1] == p[2] <= 0.7 * p[0] + 1
    pruned = diffslim.load(res["recipe"]["model"])
    assert type(pruned.pipe).__name__ == "StableDiffusionPipeline" and pruned.denoiser.config.removed_layers
    assert res["recipe"]["sampling"] == {"num_inference_steps": 3}


def test_an_explicit_timestep_stage_is_reproduced_by_its_recipe(digits, tmp_path):
    """A depth-skip stage then an explicit timestep list: the recipe's timesteps (non-uniform DDIM, as the bench
    samples them) on the saved depth-skipped folder give the stage's outputs bit for bit."""
    loaded, es = digits
    res = run_workflow(loaded, "depth:9,uniform:4", es, tmp_path, default_steps=STEPS, progress=False,
                       log=lambda m: None)
    assert res.recipe.sampling.timesteps == [999, 666, 333, 0]
    again = diffslim.load(res.recipe.model)
    assert again.denoiser.config.depth_skip == 9
    diffslim.apply(again.pipe, res.recipe)
    assert torch.equal(sample(again.pipe, _spec(es, 50)), res.outputs["uniform:4"])


@pytest.mark.parametrize("stages", ["depth:9,layers:0.3", "layers:0.3,depth:9"])
def test_depth_skip_and_layer_pruning_stack_in_either_order(digits, tmp_path, stages):
    """Each model stage prunes the one before; the saved last stage records both removals and reproduces the row."""
    loaded, es = digits
    res = run_workflow(loaded, stages, es, tmp_path, default_steps=STEPS, progress=False, log=lambda m: None)
    assert res.stopped is None and res.stages_kept == stages.split(",")
    p = [r["params"] for r in res.rows]
    assert p[0] > p[1] > p[2]
    assert res.rows[2]["macs_ratio"] < res.rows[1]["macs_ratio"] < 1.0
    again = diffslim.load(res.recipe.model)
    den = again.denoiser
    assert type(den).__name__ == "DepthSkipLayerPrunedUNet2DConditionModel"
    assert den.config.depth_skip == 9 and den.config.removed_layers
    assert sum(q.numel() for q in den.parameters()) == p[2]
    diffslim.apply(again.pipe, res.recipe)
    assert torch.equal(sample(again.pipe, _spec(es)), res.outputs[stages.split(",")[-1]])


def _psnr_metrics(out, ref):
    return {"psnr": float(psnr(out, ref).mean())}


def test_auto_bisects_to_the_most_aggressive_setting_that_meets_the_floor(digits):
    """With quality falling as the setting grows more aggressive, the search keeps the last setting that meets the
    floor, having measured its more aggressive neighbour miss it, in a logarithmic number of evaluations."""
    from diffslim.bench import BenchContext
    from diffslim.workflow import _auto_search

    loaded, es = digits
    ctx = BenchContext(loaded=loaded, base_spec=_spec(es, 50), default_steps=50)
    seen = []

    def evaluate(variant, label):  # a stand-in measurement: 20 dB plus one per step
        n = variant.spec.num_inference_steps
        seen.append(n)
        return {"stage": label, "psnr": 20.0 + n, "macs_ratio": n / 50}, torch.zeros(1)

    for floor, want in ((30.0, 10), (20.5, 1), (69.0, 49)):
        seen.clear()
        variant, row, _, trail = _auto_search("steps", ctx, evaluate, {"psnr": floor}, lambda m: None)
        assert row["stage"] == f"steps:{want}" and variant.spec.num_inference_steps == want
        assert [t["setting"] for t in trail] == [f"steps:{n}" for n in seen] and len(seen) <= 6
        assert all(t["accepted"] == (t["psnr"] >= floor) for t in trail)
        assert want == 1 or {"setting": f"steps:{want - 1}", "accepted": False}.items() <= next(
            t for t in trail if t["setting"] == f"steps:{want - 1}").items()
    # no setting meets it: the mildest is returned, measured to miss
    _, row, _, trail = _auto_search("steps", ctx, evaluate, {"psnr": 100.0}, lambda m: None)
    assert row["stage"] == "steps:49" and not any(t["accepted"] for t in trail)


def test_auto_stages_search_in_the_workflow_and_a_rerun_loads_the_result(digits, tmp_path, monkeypatch):
    loaded, es = digits
    floor = {"psnr": 30.0}  # layers:0.3 keeps about 54 dB: the search keeps 0.3 or more, and leaves steps some room
    res = run_workflow(loaded, "layers:auto,steps:auto", es, tmp_path / "wf", default_steps=STEPS, floor=floor,
                       progress=False, log=lambda m: None, metrics_fn=_psnr_metrics)
    layers_row, steps_row = res.rows[1], res.rows[2]
    ratio = float(layers_row["stage"].split(":")[1])
    assert ratio >= 0.3 and layers_row["accepted"] and layers_row["psnr"] >= floor["psnr"]
    tried = {t["setting"]: t["accepted"] for t in layers_row["search"]}
    assert tried[layers_row["stage"]] and (ratio == 0.95 or tried[f"layers:{ratio + 0.05:g}"] is False)
    k = int(steps_row["stage"].split(":")[1])
    tried = {t["setting"]: t["accepted"] for t in steps_row["search"]}
    assert k < STEPS and steps_row["psnr"] >= floor["psnr"] and (k == 1 or tried[f"steps:{k - 1}"] is False)
    # the rows are what the kept settings give when run directly on the saved stage
    pruned = diffslim.load(res.recipe.model)
    assert sum(q.numel() for q in pruned.denoiser.parameters()) == layers_row["params"] <= (1 - ratio) * res.rows[0]["params"] + 1
    assert torch.equal(sample(pruned.pipe, _spec(es, k)), res.outputs[steps_row["stage"]])
    assert torch.equal(sample(pruned.pipe, _spec(es)), res.outputs[layers_row["stage"]])
    assert res.stages_kept == [layers_row["stage"], steps_row["stage"]]
    assert res.recipe.sampling.num_inference_steps == k
    # the same command again loads the searched model stage: no search, the same label and outputs, and samples
    # nothing: every stage's outputs were kept in evals/ (one file per model, stage and schedule sampled)
    import diffslim.workflow as wf

    calls = []
    monkeypatch.setattr(wf, "sample", lambda *a, **k: calls.append(k.get("description")) or sample(*a, **k))
    logs = []
    again = run_workflow(loaded, "layers:auto,steps:auto", es, tmp_path / "wf", default_steps=STEPS, floor=floor,
                         progress=False, log=logs.append, metrics_fn=_psnr_metrics)
    assert again.rows[1]["stage"] == layers_row["stage"] and again.rows[1]["search"] == layers_row["search"]
    assert not any(m.startswith("  layers:") for m in logs) and any("loaded from" in m for m in logs)
    assert torch.equal(again.outputs[layers_row["stage"]], res.outputs[layers_row["stage"]])
    assert calls == [] and all("earlier sampling of the same stage" in r["notes"] for r in again.rows[1:])
    # nothing sampled, nothing timed again; the original's faster time and the timing were kept in evals/: the same
    # speedups and the same timing note (it was missing, and after a run stopped right after sampling its last
    # stage, never made)
    assert res.timing is not None and again.timing == res.timing
    assert [r["speedup"] for r in again.rows] == [r["speedup"] for r in res.rows]
    n_evals = len(list((tmp_path / "wf" / "evals").glob("*.pt")))
    k = 2 + len(steps_row["search"])  # the original, the loaded layers stage, the steps search again
    assert f"  {k} of {k} samplings read from {tmp_path / 'wf' / 'evals'}" in logs[-1]
    assert [{k: r[k] for k in ("stage", "psnr", "macs_ratio", "seconds")} for r in again.rows] == [
        {k: r[k] for k in ("stage", "psnr", "macs_ratio", "seconds")} for r in res.rows]
    # a run stopped after its last sampling but before it timed the original again left no timing: the next run
    # reads every sampling and times the original again
    for f in (tmp_path / "wf" / "evals").glob("*.pt"):
        saved = torch.load(f, weights_only=True)
        if "timing" in saved:
            torch.save({k: v for k, v in saved.items() if k != "timing"}, f)
    calls.clear()
    third = run_workflow(loaded, "layers:auto,steps:auto", es, tmp_path / "wf", default_steps=STEPS, floor=floor,
                         progress=False, log=logs.append, metrics_fn=_psnr_metrics)
    assert calls == [wf.AGAIN] and third.timing is not None and third.timing["first"] == res.rows[0]["seconds"]
    assert n_evals == 1 + len(layers_row["search"]) + len(steps_row["search"])  # the original and each setting tried
    # a damaged file is sampled again, not trusted
    for f in (tmp_path / "wf" / "evals").glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    calls.clear()
    third = run_workflow(loaded, "layers:auto,steps:auto", es, tmp_path / "wf", default_steps=STEPS, floor=floor,
                         progress=False, log=lambda m: None, metrics_fn=_psnr_metrics)
    assert calls[-1] == wf.AGAIN and len(calls) == k + 1  # and the original timed again after them
    assert len(list((tmp_path / "wf" / "evals").glob("*.pt"))) == n_evals
    assert all("earlier sampling" not in r.get("notes", "") for r in third.rows[1:])
    assert torch.equal(third.outputs[steps_row["stage"]], res.outputs[steps_row["stage"]])
    monkeypatch.undo()
    # another floor searches again
    # an auto stage that nothing lets meet the floor is skipped, and the next stage still runs
    stricter = run_workflow(loaded, "steps:auto,deepcache:2", es, tmp_path / "wf", default_steps=4,
                            floor={"psnr": 1000.0}, progress=False, log=lambda m: None, metrics_fn=_psnr_metrics)
    assert [r["stage"] for r in stricter.rows] == ["original", "steps:3", "deepcache:2"]
    assert [r["accepted"] for r in stricter.rows] == [True, False, False]
    assert "no setting meets the floor" in stricter.rows[1]["notes"] and "deepcache:2 fell below" in stricter.stopped
    assert stricter.stages_kept == [] and stricter.recipe.is_identity()
    with pytest.raises(UserError, match="give one, e.g. --floor psnr=30"):
        run_workflow(loaded, "steps:auto", es, tmp_path / "nofloor", default_steps=STEPS, progress=False,
                     log=lambda m: None)


def test_layers_auto_with_another_criterion_searches_the_ratio_with_its_selections(monkeypatch, tmp_path):
    """``layers:auto:pairs`` bisects the ratio with the output-loss-pairs selections: the pair losses are measured
    once for the whole search, and the kept stage removes what that criterion removes at the kept ratio."""
    import diffslim.methods.layer_prune as lp
    from diffslim.bench import LAYER_CALIB
    from diffslim.workflow import LAYER_RATIOS

    loaded = diffslim.load("zoo:digits-dit")
    es = eval_set_for(loaded, 4)
    calls = []
    real = lp.pair_interactions
    monkeypatch.setattr(lp, "pair_interactions", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = run_workflow(loaded, "layers:auto:pairs", es, tmp_path / "wf", default_steps=6, floor={"psnr": 10.0},
                       progress=False, log=lambda m: None, metrics_fn=_psnr_metrics)
    row = res.rows[1]
    assert len(row["search"]) >= 3 and len(calls) == 1  # one pass of pair losses serves every ratio tried
    assert all(t["setting"].endswith(":pairs") for t in row["search"])
    assert row["candidates"] == [f"layers:{r:g}:pairs" for r in LAYER_RATIOS]
    ratio = float(row["stage"].split(":")[1])
    assert row["stage"].endswith(":pairs") and row["accepted"] and row["psnr"] >= 10.0
    direct = lp.layer_prune(loaded.denoiser, "output-loss-pairs", ratio,
                            calib=lp.calibration(loaded.pipe, **LAYER_CALIB)).removed
    saved = diffslim.load(res.recipe.model)
    assert sorted(saved.denoiser.config.removed_layers) == sorted(direct)


def test_a_stage_trained_with_another_task_weight_is_not_reused():
    from types import SimpleNamespace

    from diffslim.workflow import _stage_key

    cur = SimpleNamespace(source="zoo:digits-sd")
    assert _stage_key(cur, ("layers", "0.3+kd"), {}, 4) == _stage_key(cur, ("layers", "0.3+kd"), {}, 4, 1.0)
    assert _stage_key(cur, ("layers", "0.3+kd"), {}, 4, 0.0)["task_weight"] == 0.0
    assert _stage_key(cur, ("depth", "7+ft"), {}, 4, 0.5)["task_weight"] == 0.5
    assert "task_weight" not in _stage_key(cur, ("layers", "0.3"), {}, 4, 0.0)
    auto = _stage_key(cur, ("layers", "auto"), {"psnr": 30.0}, 16)
    assert auto["floor"] == {"psnr": 30.0} and auto["n"] == 16
    from diffslim.bench import check_task_weight

    assert check_task_weight(0) == 0.0
    for bad in (float("nan"), -0.5, float("inf")):
        with pytest.raises(UserError, match="give a number >= 0"):
            check_task_weight(bad)


def test_without_stages_the_cli_runs_the_default_auto_stack_for_the_denoiser(tmp_path):
    from diffslim.workflow import default_stages

    run = lambda *a: CliRunner().invoke(app, ["workflow", *map(str, a)])
    r = run("zoo:digits-dit", "--n", 2, "--steps", 4, "--floor", "psnr=20", "--out", tmp_path / "wf", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    stages = [x["stage"].split(":")[0] for x in res["rows"][1:]]
    assert stages == ["layers", "steps"] == [s.split(":")[0] for s in default_stages(
        diffslim.load("zoo:digits-dit").denoiser).split(",")]
    assert all(x["search"] for x in res["rows"][1:])
    assert res["rows"][0]["psnr"] is None and all(0 < x["psnr"] < 100 for x in res["rows"][1:])  # original: "ref"
    assert default_stages(diffslim.load("zoo:digits-sd").denoiser) == "layers:auto,steps:auto,deepcache:auto"
    r = run("zoo:digits-dit", "--out", tmp_path / "bad")
    assert r.exit_code != 0 and "give --stages, or a --floor" in r.output and not (tmp_path / "bad").exists()


def test_an_auto_stage_with_its_own_floor_keeps_quality_for_the_stages_after_it(digits, tmp_path):
    loaded, es = digits
    kw = dict(default_steps=STEPS, progress=False, log=lambda m: None, metrics_fn=_psnr_metrics)
    own = run_workflow(loaded, "steps:auto@psnr=45", es, tmp_path / "b", floor={"psnr": 25.0}, **kw)
    assert own.rows[1]["psnr"] >= 45.0 and own.rows[1]["accepted"]
    trail = own.rows[1]["search"]
    assert all(t["accepted"] == (t["psnr"] >= 45.0) for t in trail)
    # the stage's floor was the binding one: a setting the workflow's floor alone would have kept was refused
    assert any(25.0 <= t["psnr"] < 45.0 and not t["accepted"] for t in trail)
    assert "its own floor: psnr 45" in own.rows[1]["notes"]
    with pytest.raises(UserError, match="keeps more quality than the workflow's, not less"):
        run_workflow(loaded, "steps:auto@psnr=20", es, tmp_path / "c", floor={"psnr": 25.0}, **kw)
    from diffslim.workflow import stage_floor

    assert stage_floor("auto@psnr=45", {}) == {"psnr": 45.0}  # an own floor is enough to search with
    assert stage_floor("auto@ssim=0.99", {"psnr": 25.0}) == {"psnr": 25.0, "ssim": 0.99}
    assert stage_floor("auto", {"psnr": 25.0}) == {"psnr": 25.0} and stage_floor("0.3", {"psnr": 25.0}) is None


def test_the_joint_search_tries_milder_settings_and_no_stage_and_keeps_the_cheapest_stack(digits, tmp_path,
                                                                                           monkeypatch):
    """Greedy auto stages spend the floor in order; the joint search also runs the stack with the first auto stage
    at milder settings and without it, and returns the stack whose result is cheapest in the objective."""
    from diffslim.workflow import JOINT_WIDTH, _final_row, cheapest

    loaded, es = digits
    floor = {"psnr": 30.0}
    kw = dict(default_steps=6, progress=False, log=lambda m: None, metrics_fn=_psnr_metrics, floor=floor)
    import diffslim.workflow as wf

    calls = []
    monkeypatch.setattr(wf, "sample", lambda *a, **k: calls.append(k.get("description")) or sample(*a, **k))
    res = run_workflow(loaded, "depth:auto,steps:auto", es, tmp_path / "j", search="joint", **kw)
    # every model, stage and schedule is sampled once for all stacks: the milder depths that the greedy run's search
    # tried are not sampled again in their own stacks
    # and the greedy stack's run times the original once more after its stages
    assert calls.count(wf.AGAIN) == 1 and res.rows[0]["seconds"] == min(res.timing["first"], res.timing["last"])
    calls.remove(wf.AGAIN)
    assert len(calls) == len(list((tmp_path / "j" / "evals").glob("*.pt")))
    assert all(calls.count(c) == 1 for c in calls if not c.startswith("steps:"))  # the original and each depth
    # the first stack is the greedy run, in the top folder
    greedy = json.loads(next((tmp_path / "j" / "stages").glob("1-depth-auto-*/stage.json")).read_text())
    cands, kept = greedy["candidates"], greedy["label"]
    k = cands.index(kept)
    milder = [cands[j] for j in sorted({round(k * w / (JOINT_WIDTH + 1)) for w in range(1, JOINT_WIDTH + 1)} - {k})]
    depths = [int(c.split(":")[1]) for c in cands]
    assert depths == sorted(depths, reverse=True) and k > 0 and milder  # mildest first
    assert all(int(m.split(":")[1]) > int(kept.split(":")[1]) for m in milder)
    stacks = [b["stages"] for b in res.branches]
    assert stacks == ["depth:auto,steps:auto", *(f"{m},steps:auto" for m in milder), "steps:auto"]
    assert res.branches[0]["kept"][0] == kept and res.branches[-1]["kept"][0].startswith("steps:")
    assert all(b["psnr"] >= 30.0 for b in res.branches)  # every stack kept something above the floor
    chosen = [b for b in res.branches if b["chosen"]]
    assert len(chosen) == 1 and chosen[0]["macs_ratio"] == min(b["macs_ratio"] for b in res.branches)
    assert chosen[0]["kept"] == res.stages_kept and _final_row(res)["macs_ratio"] == chosen[0]["macs_ratio"]
    # each stack ran in its own folder; the top folder's recipe is the chosen one's and reproduces its outputs
    saved = json.loads((tmp_path / "j" / "workflow.json").read_text())
    assert saved["stages_kept"] == res.stages_kept and [b["stages"] for b in saved["branches"]] == stacks
    for b in res.branches:
        assert b["out"] == str(tmp_path / "j") or json.loads((Path(b["out"]) / "workflow.json").read_text())[
            "stages_kept"] == b["kept"]
    recipe = diffslim.load_recipe(tmp_path / "j" / "recipe.json")
    again = diffslim.load(recipe.model)
    diffslim.apply(again.pipe, recipe)
    assert torch.equal(sample(again.pipe, _spec(es, recipe.sampling.num_inference_steps)),
                       res.outputs[res.stages_kept[-1]])
    # the stacks share their model stages: one folder per depth setting, none under joint/
    assert sorted(f.name.rsplit("-", 1)[0] for f in (tmp_path / "j" / "stages").iterdir()) == sorted(
        f"1-{c.replace(':', '-')}" for c in ["depth:auto", *milder])
    assert not list((tmp_path / "j" / "joint").rglob("stages"))
    # run again after an "interruption" that lost one stack: the others load, that one and the chosen one run
    (Path(res.branches[-1]["out"]) / "joint_run.json").unlink()
    logs = []
    again = run_workflow(loaded, "depth:auto,steps:auto", es, tmp_path / "j", search="joint", **{**kw, "log": logs.append})
    assert f"joint search: {len(stacks) - 1} of {len(stacks)} stacks loaded from an earlier run" in "\n".join(logs)
    assert sum(m.startswith("stage 1/") for m in logs) == 2  # the lost stack's run and the chosen one's again
    assert len(calls) == len(list((tmp_path / "j" / "evals").glob("*.pt")))  # both from evals/: nothing sampled
    assert again.timing == res.timing  # the greedy stack's, loaded with it
    assert [{k: v for k, v in r.items() if k != "notes"} for r in again.rows] == [
        {k: v for k, v in r.items() if k != "notes"} for r in res.rows]
    assert again.branches == res.branches and again.stages_kept == res.stages_kept
    assert torch.equal(again.outputs[again.stages_kept[-1]], res.outputs[res.stages_kept[-1]])
    # the report lists every stack, the chosen one marked
    from diffslim.report import Report, add_workflow_section

    rep = Report("t")
    add_workflow_section(rep, "zoo:digits-sd", again, floor)
    rep.write(tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "joint search: every stack tried" in page and all(b["stages"] in page for b in res.branches)
    joint = page[page.index("joint search: every stack tried"):]
    assert joint[:joint.index("</table>")].count("<td>yes</td>") == 1  # one stack chosen
    # the objectives: the least MACs or parameters first, the other cost and then quality breaking ties
    bs = [{"params": 5, "macs_ratio": 0.5, "psnr": 31.0}, {"params": 9, "macs_ratio": 0.3, "psnr": 30.5},
          {"params": 5, "macs_ratio": 0.5, "psnr": 33.0}, {"params": 5, "macs_ratio": 0.6, "psnr": 40.0}]
    assert cheapest(bs, "macs", floor) is bs[1] and cheapest(bs, "params", floor) is bs[2]
    for bad, match in ((dict(search="best"), "accepted: greedy"), (dict(search="joint", objective="fid"),
                                                                   "accepted: macs, params")):
        with pytest.raises(UserError, match=match):
            run_workflow(loaded, "depth:auto,steps:auto", es, tmp_path / "bad", **bad, **kw)


def test_the_joint_search_runs_every_combination_of_kept_milder_and_left_out_settings(monkeypatch, tmp_path):
    """With three auto stages the joint search branches at the first two: each takes its kept setting, one of
    JOINT_WIDTH milder ones, or is left out, in every combination, (JOINT_WIDTH + 2) ** 2 stacks. A stand-in
    workflow run keeps fixed settings, so the tree is checked exactly, and a stack other than the greedy one wins."""
    import diffslim.workflow as wf
    from diffslim.recipe import Recipe

    cands = {"depth": [f"depth:{d}" for d in range(11, 0, -1)], "steps": [f"steps:{n}" for n in range(9, 0, -1)],
             "deepcache": [f"deepcache:{k}" for k in range(2, 10)]}
    runs = []

    def run_stages(loaded, text, evalset, where, floor, log, reference, **kw):
        runs.append(text)
        rows = [{"stage": "original", "params": 100, "macs_ratio": 1.0, "psnr": 99.0, "accepted": True,
                 "seconds": 1.0, "macs_per_sample": 1}]
        params, macs, depth = 100, 1.0, 12
        for name, arg in wf.parse_stages(text):
            # depth 7 spends the floor: after it, steps:auto keeps 4 steps; after a milder depth, 3
            setting = {"depth": "7", "steps": "4" if depth < 9 else "3", "deepcache": "2"}[name] if arg == "auto" \
                else arg
            if name == "depth":
                depth = int(setting)
                params, macs = params * depth // 12, macs * (0.5 + depth / 24)
            elif name == "steps":
                macs *= int(setting) / 10
            else:
                macs *= 0.9
            rows.append({"stage": f"{name}:{setting}", "params": params, "macs_ratio": macs, "psnr": 31.0,
                         "accepted": True, **({"candidates": cands[name]} if arg == "auto" else {})})
        Path(where).mkdir(parents=True, exist_ok=True)
        return wf.WorkflowResult(rows=rows, outputs={"original": torch.zeros(1)}, recipe=Recipe(),
                                 stages_kept=[r["stage"] for r in rows[1:]])

    monkeypatch.setattr(wf, "_run_stages", run_stages)
    from types import SimpleNamespace

    model, inputs = SimpleNamespace(source="zoo:digits-sd"), SimpleNamespace(inputs=[{}], seeds=[0], call_kwargs={})
    res = run_workflow(model, "depth:auto,steps:auto,deepcache:auto", inputs, tmp_path, floor={"psnr": 30.0},
                       search="joint", log=lambda m: None)
    assert wf.JOINT_WIDTH == 3 and len(runs) == len(set(runs)) == 25
    # depth 7 is the 5th candidate: the milder ones lie 1/4, 2/4 and 3/4 of the way to it (rounded half to even);
    # steps 4 is the 6th (milder: 8, 7, 5), steps 3 the 7th (milder: 7, 6, 5)
    milder = {4: ["steps:8", "steps:7", "steps:5"], 3: ["steps:7", "steps:6", "steps:5"]}
    want = {"depth:auto,steps:auto,deepcache:auto"}
    for d in ("depth:7", "depth:10", "depth:9", "depth:8", None):
        kept = 4 if d in ("depth:7", "depth:8") else 3
        for t in ["steps:auto" if d != "depth:7" else None] + milder[kept] + ["no steps"]:
            if t is not None:
                want.add(",".join(s for s in (d, t, "deepcache:auto") if s and s != "no steps"))
    assert set(runs) == want and runs[0] == "depth:auto,steps:auto,deepcache:auto"
    assert "depth:7,steps:8,deepcache:auto" in runs  # the later stage branches with the earlier one as kept
    best = min(res.branches, key=lambda b: (b["macs_ratio"], b["params"]))
    assert [b for b in res.branches if b["chosen"]] == [best] and best["stages"] != runs[0]
    assert res.stages_kept == best["kept"] and res.stages_kept[:2] == ["depth:9", "steps:3"]
    runs.clear()  # one milder setting each, half way: (1 + 2) ** 2 stacks
    run_workflow(model, "depth:auto,steps:auto,deepcache:auto", inputs, tmp_path / "w1", floor={"psnr": 30.0},
                 search="joint", joint_width=1, log=lambda m: None)
    assert len(runs) == 9 and "depth:9,steps:auto,deepcache:auto" in runs and "depth:7,steps:7,deepcache:auto" in runs


def test_a_stock_layer_stage_saves_the_stock_class_and_its_recipe_reproduces_it(digits, tmp_path):
    """layers:R:stock selects among removals a stock config describes and its model is the stock diffusers class:
    the saved stage is a UNet2DConditionModel with no removed_layers (tests/test_stock_export.py checks the stock
    class against the LayerPruned model), and the recipe reproduces the last stage bit for bit."""
    from diffusers import UNet2DConditionModel

    loaded, es = digits
    res = run_workflow(loaded, "layers:0.3:stock,steps:5", es, tmp_path / "wf", default_steps=STEPS, progress=False,
                       log=lambda m: None)
    assert [r["stage"] for r in res.rows] == ["original", "layers:0.3:stock", "steps:5"]
    folder = tmp_path / "wf" / "stages" / "1-layers-0.3-stock" / "pipeline"
    cfg = json.loads((folder / "denoiser" / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DConditionModel" and "removed_layers" not in cfg
    stage = UNet2DConditionModel.from_pretrained(str(folder / "denoiser"))
    assert sum(p.numel() for p in stage.parameters()) == res.rows[1]["params"] <= 0.7 * res.rows[0]["params"] + 1
    rec = diffslim.recipe.load_recipe(tmp_path / "wf" / "recipe.json")
    again = diffslim.load(rec.model)
    assert type(again.denoiser) is UNet2DConditionModel
    diffslim.apply(again.pipe, rec)
    assert torch.equal(sample(again.pipe, _spec(es, 50)), res.outputs["steps:5"])


def test_layers_auto_stock_treats_ratios_past_the_stock_reach_as_missing(digits):
    """layers:auto:stock bisects over the ratios; those no stock removal reaches are not made and count as misses,
    so the search ends at a ratio a stock config describes."""
    from diffslim.bench import BenchContext
    from diffslim.workflow import _auto_search

    loaded, es = digits
    ctx = BenchContext(loaded=loaded, base_spec=_spec(es, STEPS), default_steps=STEPS)

    def evaluate(variant, label):  # every ratio that can be made meets the floor
        return {"stage": label, "psnr": 50.0, "macs_ratio": 0.5}, torch.zeros(1)

    variant, row, _, trail = _auto_search("layers", ctx, evaluate, {"psnr": 30.0}, lambda m: None, criterion="stock")
    made = [t for t in trail if "unavailable" not in t]
    cut = [t for t in trail if "unavailable" in t]
    assert cut and all(not t["accepted"] and "a stock UNet2DConditionModel config describes" in t["unavailable"]
                       for t in cut)
    best = max(float(t["setting"].split(":")[1]) for t in made)
    assert row["stage"] == f"layers:{best:g}:stock" and min(float(t["setting"].split(":")[1]) for t in cut) > best
    assert type(variant.pipe.denoiser).__name__ == "UNet2DConditionModel"


def test_layers_auto_with_a_params_cap_treats_ratios_past_its_reach_as_missing(digits, monkeypatch):
    """layers:auto:macs:P searches the share of the MACs with at most P of the params removed; ratios the cap cannot
    reach are refused before any scoring and count as misses, so the search ends at a ratio the cap allows."""
    from diffslim import bench
    from diffslim.bench import BenchContext
    from diffslim.workflow import _auto_search

    monkeypatch.setattr(bench, "LAYER_CALIB", dict(n=8, seed=0))
    loaded, es = digits
    full = sum(p.numel() for p in loaded.denoiser.parameters())
    ctx = BenchContext(loaded=loaded, base_spec=_spec(es, STEPS), default_steps=STEPS)

    def evaluate(variant, label):  # every ratio that can be made meets the floor
        return {"stage": label, "psnr": 50.0, "macs_ratio": 0.5}, torch.zeros(1)

    variant, row, _, trail = _auto_search("layers", ctx, evaluate, {"psnr": 30.0}, lambda m: None,
                                          criterion="macs:0.2")
    made = [t for t in trail if "unavailable" not in t]
    cut = [t for t in trail if "unavailable" in t]
    assert made and cut and all(not t["accepted"] and "with at most 0.2 of the params removed" in t["unavailable"]
                                for t in cut)
    best = max(float(t["setting"].split(":")[1]) for t in made)
    assert row["stage"] == f"layers:{best:g}:macs:0.2" and min(float(t["setting"].split(":")[1]) for t in cut) > best
    assert variant.params >= 0.8 * full


def test_repeats_time_each_stage_that_many_times_and_keep_the_fastest(digits, tmp_path, monkeypatch):
    """--repeats R: each stage is sampled once for its outputs and R-1 more times for its timing, the fastest run
    counting; the outputs judged are the first run's, the same as with one timed run."""
    import diffslim.workflow as wf

    loaded, es = digits
    runs = []
    real = wf.sample
    monkeypatch.setattr(wf, "sample", lambda pipe, s, **kw: runs.append(s.num_inference_steps) or real(pipe, s, **kw))
    once = run_workflow(loaded, "steps:5", es, tmp_path / "once", default_steps=STEPS, progress=False,
                        log=lambda m: None, batch_size=4)
    assert runs == [STEPS, 5, STEPS]  # the original, the stage, the original timed again
    runs.clear()
    thrice = run_workflow(loaded, "steps:5", es, tmp_path / "thrice", default_steps=STEPS, progress=False,
                          log=lambda m: None, batch_size=4, repeats=3)
    assert runs == [STEPS] * 3 + [5] * 3 + [STEPS] * 3
    assert all(torch.equal(once.outputs[k], thrice.outputs[k]) for k in once.outputs)
    # the speedups are over the faster of the original's two timings, as in the bench
    for res in (once, thrice):
        first, last = res.timing["first"], res.timing["last"]
        assert res.timing["drift"] == abs(last - first) / first and res.rows[0]["seconds"] == min(first, last)
        assert res.rows[1]["speedup"] == res.rows[0]["seconds"] / res.rows[1]["seconds"]
    assert [r["stage"] for r in thrice.rows] == ["original", "steps:5"] and thrice.rows[1]["speedup"] > 0


def test_the_workflows_layers_stage_scores_on_layer_calibration_triples(tmp_path):
    """workflow --layer-calibration N: the layers stage scores on N triples (on zoo:digits-dit at 0.5, 1 triple and the
    default 32 remove different blocks, see test_bench_layer_calibration_...); its saved stage is kept apart by the
    count, so a rerun with another count rebuilds it (where it read the old count's samples before) and one with the
    same count loads it."""
    run = lambda *a: CliRunner().invoke(app, ["workflow", "zoo:digits-dit", "--stages", "layers:0.5", "--n", "2",
                                              "--steps", "3", "--out", str(tmp_path / "wf"), "--json", *a])

    def stage():
        r = json.loads((tmp_path / "wf" / "workflow.json").read_text())["rows"][1]
        model = diffslim.load(str(tmp_path / "wf" / json.loads((tmp_path / "wf" / "recipe.json").read_text())["model"]
                                  )).denoiser
        return r, sorted(model.config.removed_layers)

    r = run("--layer-calibration", "1")
    assert r.exit_code == 0, r.output
    one, removed_one = stage()
    assert "(output loss, 1 calibration triple)" in one["notes"]
    r = run()
    assert r.exit_code == 0, r.output
    default, removed_default = stage()
    assert "(output loss, 32 calibration triples)" in default["notes"] and removed_default != removed_one
    r = run("--layer-calibration", "1")  # the stage's folder holds the default's: rebuilt, its sampling read back
    assert r.exit_code == 0, r.output
    again, removed_again = stage()
    assert removed_again == removed_one and again["psnr"] == one["psnr"]
    assert "outputs and time from an earlier sampling of the same stage" in again["notes"]
    r = run("--layer-calibration", "1")
    assert r.exit_code == 0, r.output
    assert stage()[0]["notes"].startswith("loaded from")
    r = run("--layer-calibration", "0")
    assert r.exit_code != 0 and "--layer-calibration" in r.output


def test_a_model_stage_built_in_another_dtype_is_built_again(tmp_path):
    """A workflow's model stage is saved in the run's dtype: a float32 rerun into a bfloat16 run's folder loaded the
    bfloat16 stage (and sampled it as float32's result); it builds its own now, and a second float32 run loads it."""
    from safetensors.torch import load_file

    run = lambda *a: CliRunner().invoke(app, ["workflow", "zoo:digits-dit", "--stages", "layers:0.5", "--n", "2",
                                              "--steps", "3", "--out", str(tmp_path / "wf"), "--json", *a])

    def stage():
        row = json.loads((tmp_path / "wf" / "workflow.json").read_text())["rows"][1]
        weights = next((tmp_path / "wf" / "stages").glob("1-*/pipeline/*/diffusion_pytorch_model.safetensors"))
        return row, {t.dtype for t in load_file(str(weights)).values()}

    r = run("--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    assert stage()[1] == {torch.bfloat16}
    assert json.loads((tmp_path / "wf" / "workflow.json").read_text())["ran_on"] == {"device": "cpu",
                                                                                   "dtype": "bfloat16"}
    assert json.loads((tmp_path / "wf" / "report.json").read_text())["ran_on"]["dtype"] == "bfloat16"
    r = run()
    assert r.exit_code == 0, r.output
    row, dtypes = stage()
    assert dtypes == {torch.float32} and "loaded from" not in row["notes"]
    r = run()
    assert r.exit_code == 0, r.output
    assert stage()[0]["notes"].startswith("loaded from")
