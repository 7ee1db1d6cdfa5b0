"""depth-search, timesteps and the issue-4 bench methods, end to end on a tiny random pipeline folder."""

import json

import pytest
import torch
from typer.testing import CliRunner

from diffslim.cli import app
from diffslim.methods.depth_search import search_depth
from diffslim.recipe import load_recipe
from diffslim.sample import SampleSpec, sample

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _spec(n=4, steps=6):
    return SampleSpec([{"class_label": i % 10} for i in range(n)], list(range(n)), num_inference_steps=steps,
                      batch_size=n)


def test_binary_search_agrees_with_linear_scan_on_a_monotone_curve(tiny_digits_pipe, monkeypatch):
    import diffslim.methods.depth_search as ds

    curve = {d: 10.0 + 3 * d for d in range(1, 14)}  # a known, monotone quality curve
    monkeypatch.setattr(ds, "depth_quality", lambda pipe, attr, spec, ref, d, metric: curve[d])
    for thr in (5, 20, 25.5, 40, 49, 60):
        b = search_depth(tiny_digits_pipe, "denoiser", None, None, thr, mode="binary")
        lin = search_depth(tiny_digits_pipe, "denoiser", None, None, thr, mode="linear")
        assert b.depth == lin.depth
        want = min([d for d in range(1, 13) if curve[d] >= thr], default=13)
        assert b.depth == want and b.reached == (want < 13)
        assert b.sampling_runs <= 4 and lin.sampling_runs == 12 and lin.monotone


def test_depth_search_real_sampling(tiny_digits_pipe):
    spec = _spec()
    ref = sample(tiny_digits_pipe, spec)
    res = search_depth(tiny_digits_pipe, "denoiser", spec, ref, threshold=-1.0, mode="binary")
    assert res.depth == 1 and res.reached  # every depth passes a threshold of -1 dB
    res = search_depth(tiny_digits_pipe, "denoiser", spec, ref, threshold=1e9, mode="binary")
    assert res.depth == 13 and not res.reached and res.best_pruned in res.evaluations


def test_depth_search_cli_writes_recipe_and_plot(tiny_digits_folder, tmp_path):
    out, plot = tmp_path / "r.json", tmp_path / "d.png"
    r = _run("depth-search", tiny_digits_folder, "--threshold", "0", "--n", "2", "--steps", "3", "--json",
             "--out", out, "--plot", plot)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["depth"] == 1 and d["reached"] and d["sampling_runs"] >= 1
    assert load_recipe(out).depth.depth == 1 and plot.stat().st_size > 1000
    r = _run("depth-search", tiny_digits_folder, "--threshold", "1000", "--n", "2", "--steps", "3")
    assert r.exit_code == 1 and "no pruned depth reaches psnr >= 1000" in " ".join(r.output.split())


def test_timesteps_cli_prints_schedule():
    r = _run("timesteps", "--steps", "5", "--gamma", "1", "--json")
    assert json.loads(r.stdout)["timesteps"] == [999, 749, 499, 249, 0]
    r = _run("timesteps", "--steps", "5")
    assert r.exit_code == 2 and "give --gamma" in r.output


def test_timesteps_cli_search_writes_applicable_recipe(tiny_digits_folder, tmp_path, tiny_digits_pipe):
    from diffslim.apply import apply
    from diffslim.models.load import load

    out = tmp_path / "t.json"
    r = _run("timesteps", tiny_digits_folder, "--steps", "3", "--method", "greedy", "--n", "2", "--full-steps", "6",
             "--json", "--out", out)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["timesteps"]) == 3 and d["methods"]["greedy"]["evaluations"] >= 3
    rec = load_recipe(out)
    pipe = load(str(tiny_digits_folder)).pipe
    apply(pipe, rec)  # DDIM + explicit timesteps -> non-uniform DDIM, pinned
    sample(pipe, _spec(n=1))
    assert pipe.scheduler.timesteps.tolist() == d["timesteps"]
    assert "NonUniformDDIMScheduler" in type(pipe.scheduler).__mro__[1].__name__


def test_apply_depth_recipe_shrinks_pipeline(tiny_digits_folder):
    from diffslim.apply import apply
    from diffslim.models.load import load

    pipe = load(str(tiny_digits_folder)).pipe
    before = sum(p.numel() for p in pipe.denoiser.parameters())
    apply(pipe, {"depth": {"depth": 6}, "sampling": {"num_inference_steps": 3}})
    assert sum(p.numel() for p in pipe.denoiser.parameters()) < before
    assert sample(pipe, _spec(n=2)).shape == (2, 1, 8, 8)


def test_bench_issue4_methods(tiny_digits_folder):
    r = _run("bench", tiny_digits_folder, "--methods", "depth:7,uniform:3,karras:3,ays:3,gamma:3:1.2",
             "--n", "3", "--steps", "6", "--json")
    assert r.exit_code == 0, r.output
    rows = {x["method"]: x for x in json.loads(r.stdout)["rows"]}
    assert set(rows) == {"full", "depth:7", "uniform:3", "karras:3", "ays:3", "gamma:3:1.2"}
    assert rows["depth:7"]["params"] < rows["full"]["params"] and rows["depth:7"]["macs_ratio"] < 1
    for k in ("uniform:3", "karras:3", "ays:3", "gamma:3:1.2"):
        assert rows[k]["macs_ratio"] == pytest.approx(0.5, rel=0.02)
    assert "timesteps" in rows["uniform:3"]["notes"]


@pytest.mark.parametrize("methods, needle", [
    ("depth:20", "depth 20 is outside 1..13"), ("gamma:1", "gamma:N needs an integer >= 2"),
    ("uniform:4:sideways", "uniform:4:sideways"), ("karras:x", "karras:N needs an integer")])
def test_bench_method_argument_errors(tiny_digits_folder, methods, needle):
    r = _run("bench", tiny_digits_folder, "--methods", methods, "--n", "1", "--steps", "2")
    assert r.exit_code == 2 and needle in " ".join(r.output.split()), r.output


def test_every_refused_method_and_stage_is_named_in_one_line(tiny_digits_folder, tmp_path):
    """Several methods the model cannot run were refused one per try (fix one, run, learn of the next); all are named
    at once now, on one line, before anything samples. One keeps its own message."""
    r = _run("bench", tiny_digits_folder, "--methods", "full,fbcache,depth:20,steps:2,karras:x", "--n", "1",
             "--steps", "2")
    lines = [line for line in r.output.splitlines() if line.strip()]
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: 3 methods cannot run here. "), r.output
    for needle in ("fbcache: diffusers' cache hooks find transformer blocks", "depth 20 is outside 1..13",
                   "karras:N needs an integer"):
        assert said.count(needle) == 1, (needle, r.output)
    assert "steps:2" not in said
    r = _run("workflow", tiny_digits_folder, "--stages", "depth:20,karras:x", "--n", "1", "--steps", "2",
             "--out", tmp_path / "wf")
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and said.startswith("error: 2 stages cannot run here. ") and "depth 20" in said, r.output
    assert not (tmp_path / "wf").exists()
    r = _run("bench", tiny_digits_folder, "--methods", "karras:x", "--n", "1", "--steps", "2")
    assert r.exit_code == 2 and " ".join(r.output.split()).startswith("error: karras:N needs an integer"), r.output


def test_finetune_cli_then_bench_the_student(tiny_digits_folder, tmp_path):
    out = tmp_path / "ft"
    r = _run("finetune", tiny_digits_folder, "--depth", "7", "--steps", "4", "--batch-size", "4",
             "--checkpoint-every", "2", "--out", out)
    assert r.exit_code == 0, r.output
    student = out / "student"
    assert (student / "config.json").exists()
    assert json.loads((student / "config.json").read_text())["depth_skip"] == 7
    # the teacher's pipeline with the student in place: what sample and evaluate take (the student alone is a model)
    from diffslim.models.load import load

    assert f"pipeline with the student (sample, evaluate and bench take it): {out / 'pipeline'}" in \
        " ".join(r.output.split())
    both = load(str(out / "pipeline")).denoiser, load(str(student)).denoiser
    assert all(json.loads((f / "config.json").read_text())["depth_skip"] == 7 for f in (student, out / "pipeline" /
                                                                                        "denoiser"))
    sd = [m.state_dict() for m in both]
    assert sd[0].keys() == sd[1].keys() and all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    # both folders' model cards say what was done and count the student's params against the teacher's
    teacher = sum(p.numel() for p in load(str(tiny_digits_folder)).denoiser.parameters())
    for folder in (student, out / "pipeline"):
        card = (folder / "README.md").read_text()
        assert "Depth-skip pruning (Kim and Cho, 2024) at depth 7, then fine-tuned" in card and "4 steps" in card
        assert "; final losses loss " in card
        assert f"| parameters (denoiser) | {teacher:,} | {sum(p.numel() for p in both[0].parameters()):,} |" in card
    r = _run("sample", out / "pipeline", "--n", "2", "--steps", "2", "--out", tmp_path / "s")
    assert r.exit_code == 0 and (tmp_path / "s" / "grid.png").exists(), r.output
    r = _run("bench", tiny_digits_folder, "--methods", f"depth:7,depth:7+ft@{student}", "--n", "2", "--steps", "3",
             "--json")
    assert r.exit_code == 0, r.output
    rows = {x["method"]: x for x in json.loads(r.stdout)["rows"]}
    assert rows["depth:7+ft"]["params"] == rows["depth:7"]["params"]
    assert rows["depth:7+ft"]["psnr"] != rows["depth:7"]["psnr"]  # trained weights, different outputs
    r = _run("bench", tiny_digits_folder, "--methods", f"depth:6+ft@{student}", "--n", "1", "--steps", "2")
    assert r.exit_code == 2 and "has depth 7" in " ".join(r.output.split())
    r = _run("finetune", tiny_digits_folder, "--depth", "30", "--steps", "1")
    assert r.exit_code == 2 and "depth 30 is outside" in r.output
    r = _run("finetune", tiny_digits_folder, "--depth", "7", "--steps", "1", "--feat-norm", "sample", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "feat_norm (--feat-norm) 'sample' divides by each sample's teacher norm" in " ".join(r.output.split())


def test_timesteps_search_for_a_depth_skipped_model(tiny_digits_folder, tmp_path):
    out = tmp_path / "t.json"
    r = _run("timesteps", tiny_digits_folder, "--steps", "3", "--method", "greedy", "--n", "2", "--full-steps", "6",
             "--depth", "7", "--json", "--out", out)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["depth"] == 7 and len(d["timesteps"]) == 3
    rec = load_recipe(out)
    assert rec.depth.depth == 7 and rec.sampling.timesteps == d["timesteps"]  # depth + schedule in one recipe


def test_multi_depth_staircase_finds_the_cheapest_passing_pair(tiny_digits_pipe, monkeypatch):
    """On a known quality surface (rising in both depths) the staircase walk returns the pair of least
    run MACs among ALL passing pairs (brute force), within 2 * full sampling runs."""
    import diffslim.methods.depth_search as ds

    monkeypatch.setattr(ds, "multi_depth_quality",
                        lambda pipe, attr, spec, ref, split, h, lo, metric: 2.0 * h + 1.0 * lo + 0.1 * h * lo)
    spec = _spec(steps=10)
    for thr in (5.0, 20.0, 33.3, 45.0):
        res = ds.search_multi_depth(tiny_digits_pipe, "denoiser", spec, None, thr)
        full, m = res.full_depth, res.depth_macs
        assert res.steps_high + res.steps_low == 10 and res.split == ds.spec_timesteps(tiny_digits_pipe, spec)[4]

        def ratio(h, lo):
            return (res.steps_high * m[h] + res.steps_low * m[lo]) / (10 * m[full])

        passing = [(h, lo) for h in range(1, full + 1) for lo in range(1, full + 1)
                   if (h, lo) == (full, full) or 2.0 * h + lo + 0.1 * h * lo >= thr]
        assert res.macs_ratio == pytest.approx(min(ratio(h, lo) for h, lo in passing))
        assert (res.depth_high, res.depth_low) in passing
        assert res.sampling_runs <= 2 * full + 1
        lows = [r["depth_low"] for r in res.frontier]
        assert lows == sorted(lows, reverse=True)


def test_depth_search_cli_multi(tiny_digits_folder, tmp_path):
    r = _run("depth-search", tiny_digits_folder, "--threshold", "0", "--n", "2", "--steps", "4", "--multi",
             "--json", "--out", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    multi = data["multi"]
    # any quality passes a threshold of -5 dB: the shallowest pair wins, cheaper than or equal to depth 1
    assert (multi["depth_high"], multi["depth_low"]) == (1, 1)
    assert multi["macs_ratio"] == pytest.approx(multi["single_macs_ratio"])
    assert load_recipe(tmp_path / "r.json").depth.depth == data["depth"] == 1
    assert data["seconds_total"] == pytest.approx(data["seconds"] + multi["seconds"])  # both searches' time
    assert "wrote recipe (depth 1)" in r.stderr  # stdout holds the JSON alone
