"""Sampling under `accelerate launch` with two CPU processes equals sampling in one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffslim.sample import SampleSpec, sample
from diffslim.train.zoo import build_pipeline


@pytest.mark.xdist_group("accelerate-launch")  # one at a time: they share accelerate's port
def test_two_processes_agree_with_one(tmp_path):
    script = Path(__file__).parent / "scripts" / "sample_mp.py"
    out_file = tmp_path / "mp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), str(out_file)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(out_file))
    assert int(got["num_processes"]) == 2

    torch.manual_seed(0)
    pipe = build_pipeline("digits-sd")
    pipe.set_progress_bar_config(disable=True)
    spec = SampleSpec([{"class_label": i % 10} for i in range(5)], list(range(5)), num_inference_steps=3, batch_size=2)
    want = sample(pipe, spec)
    torch.testing.assert_close(got["images"], want, atol=1e-5, rtol=0)


def _launch(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", DIFFSLIM_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "diffslim.cli", *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.xdist_group("accelerate-launch")
def test_commands_under_a_launch_print_and_write_once(tmp_path):
    """Every process of `accelerate launch -m diffslim.cli ...` printed its own table or JSON document (`--json` gave
    two, which no JSON reader takes) and wrote the same files at once (the teacher's samples collided on their
    temporary names). The first process alone prints and writes; the teacher's samples are split among the
    processes and equal those one process samples."""
    import json

    r = _launch(tmp_path, "evaluate", "zoo:digits-sd", "--n", "4", "--steps", "3", "--json")
    assert json.loads(r.stdout)["n"] == 4  # one document
    r = _launch(tmp_path, "sample", "zoo:digits-sd", "--n", "3", "--steps", "3", "--out", "s")
    assert r.stdout.count("wrote 3 samples") == 1
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".diffslim.json", "0000.png", "0001.png",
                                                                  "0002.png", "grid.png"]
    # the teacher's own samples (distill --data PROMPTS.txt): split among the processes, as one process makes them
    from diffslim.sample import SampleSpec, write_samples

    torch.manual_seed(0)
    pipe = build_pipeline("digits-sd")
    pipe.set_progress_bar_config(disable=True)
    spec = SampleSpec([{"class_label": i % 10} for i in range(5)], list(range(5)), num_inference_steps=3, batch_size=2)
    script = tmp_path / "teacher.py"
    script.write_text(
        "import sys, torch\n"
        "from diffslim.sample import SampleSpec, write_samples\n"
        "from diffslim.train.zoo import build_pipeline\n"
        "torch.manual_seed(0)\n"
        "pipe = build_pipeline('digits-sd')\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "spec = SampleSpec([{'class_label': i % 10} for i in range(5)], list(range(5)), num_inference_steps=3, "
        "batch_size=2)\n"
        "write_samples(pipe, spec, sys.argv[1])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), str(tmp_path / "mp")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    write_samples(pipe, spec, tmp_path / "one")
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "mp").iterdir()) and len(names) == 11
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "mp" / name).read_bytes(), name


@pytest.mark.xdist_group("accelerate-launch")
def test_zoo_training_under_a_launch_is_data_parallel_and_resumes_exactly(tmp_path):
    """`accelerate launch` ran zoo-train as independent one-process runs on the CPU (each deleting the other's
    checkpoints), drawing the same batch in every process. Two processes with batch 2 now train what one process
    with batch 4 does (each takes its half of the step's examples, DDP averages the gradients), not what one with
    batch 2 does; a run that goes on from its step-1 checkpoint reaches the same step-2 weights."""
    import shutil

    from diffslim.train.zoo import train

    args = ("zoo-train", "digits-sd", "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--out", "mp")
    _launch(tmp_path, *args)
    ckpts = tmp_path / "mp" / "digits-sd" / "checkpoints"
    assert {p.name for p in (ckpts / "step_2").glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                  "random_states_1.pkl"}
    two = load_file(str(ckpts / "step_1" / "model.safetensors"))
    for batch in (4, 2):
        train("digits-sd", tmp_path / f"one_{batch}", steps=1, batch_size=batch, lr=1e-3, checkpoint_every=1)
        one = load_file(str(tmp_path / f"one_{batch}" / "checkpoints" / "step_1" / "model.safetensors"))
        assert one.keys() == two.keys()
        # Adam's first step is about lr * sign(gradient): where a gradient is near 0, the order of the sums (one
        # process, or two and DDP's mean) flips it; elsewhere the weights agree. Batch 2's data moves about half.
        moved = sum(int(((one[k] - two[k]).abs() > 1e-5).sum()) for k in one) / sum(v.numel() for v in one.values())
        assert moved < 1e-3 if batch == 4 else moved > 0.2, (batch, moved)
    step2 = load_file(str(ckpts / "step_2" / "model.safetensors"))
    shutil.rmtree(ckpts / "step_2")  # as if stopped after step 1's checkpoint
    _launch(tmp_path, *args)
    again = load_file(str(ckpts / "step_2" / "model.safetensors"))
    assert all(torch.equal(again[k], step2[k]) for k in step2)


@pytest.mark.xdist_group("accelerate-launch")
def test_bench_under_a_launch_samples_data_parallel_and_trains_its_cached_runs_together(tmp_path):
    """`bench` was refused under a launch (every process ran all of it; a method that trains waited forever for the
    others). Each process now samples its share of every variant's inputs, the searches see the gathered outputs,
    the cached trainings are built by the launch together (data parallel, the default batch split among the
    processes, a cache entry of their own) and the first process alone prints and writes. The rows that train
    nothing are those of one process."""
    import json

    script = Path(__file__).parent / "scripts" / "bench_mp.py"
    common = ["bench", "zoo:digits-sd", "--n", "4", "--steps", "6", "--batch-size", "2", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DIFFSLIM_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), *common,
           "--methods", "full,steps:4,layers:0.3,dipgo:0.3,layers:0.3+kd", "--html", "rep"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    two = {row["method"]: row for row in json.loads(r.stdout)["rows"]}  # one document
    assert json.loads((tmp_path / "rep" / ".diffslim.json").read_text())["command"] == "bench"
    assert (tmp_path / "rep" / "index.html").is_file()
    kd = list((tmp_path / "cache" / "layer_kd").glob("*-x2"))
    assert len(kd) == 1 and json.loads((kd[0] / "distill.json").read_text())["num_processes"] == 2
    assert "batch 4 over 2 processes, 2 each" in two["layers:0.3+kd"]["notes"]
    assert len(list((tmp_path / "cache" / "dipgo").glob("*-x2"))) == 1

    env["DIFFSLIM_CACHE"] = str(tmp_path / "cache_one")
    r = subprocess.run([sys.executable, str(script), *common, "--methods", "full,steps:4,layers:0.3"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = {row["method"]: row for row in json.loads(r.stdout)["rows"]}
    for method, row in one.items():
        assert (two[method]["params"], two[method]["macs_per_sample"]) == (row["params"], row["macs_per_sample"])
        if method != "full":
            assert abs(two[method]["psnr"] - row["psnr"]) < 0.01, method
    assert two["layers:0.3"]["notes"] == one["layers:0.3"]["notes"]  # the same layers

@pytest.mark.xdist_group("accelerate-launch")
def test_workflow_under_a_launch_keeps_what_one_process_keeps_and_resumes(tmp_path):
    """`workflow` was refused under a launch. Its processes now sample their shares of every stage, the first writes
    the stages, evals and recipe while the others wait for them, and every timing is the slowest process's (the
    processes had taken the faster of the original's two timings each from their own clock, and one waited for the
    other forever). A joint search keeps the stack one process keeps; a rerun reads every sampling back."""
    import json

    script = Path(__file__).parent / "scripts" / "bench_mp.py"
    args = ["workflow", "zoo:digits-dit", "--stages", "layers:auto,steps:auto", "--floor", "psnr=20", "--search",
            "joint", "--joint-width", "1", "--n", "4", "--steps", "6", "--batch-size", "2", "--json", "--out"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DIFFSLIM_CACHE=str(tmp_path / "cache"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), *args, "mp"]
    r = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout)
    r = subprocess.run([sys.executable, str(script), *args, "one"], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads(r.stdout)
    assert two["stages_kept"] == one["stages_kept"] and len(two["branches"]) == len(one["branches"]) > 1
    for a, b in zip(two["rows"], one["rows"], strict=True):
        assert (a["stage"], a["params"], a["macs_per_sample"], a["accepted"]) == \
            (b["stage"], b["params"], b["macs_per_sample"], b["accepted"])
        assert a["stage"] == "original" or abs(a["psnr"] - b["psnr"]) < 0.01, a["stage"]
    recipe = json.loads((tmp_path / "mp" / "recipe.json").read_text())
    assert (tmp_path / "mp" / recipe["model"] / "model_index.json").is_file()  # the kept stage, written once
    assert (tmp_path / "mp" / "index.html").is_file()
    # the model card, written once, with the rows one process writes (speedups aside: timings differ)
    cards = {d: (tmp_path / d / "README.md").read_text() for d in ("mp", "one")}
    table = {d: [line.split(" | ")[:3] for line in c.splitlines() if line.endswith((" | yes |", " | no |"))]
             for d, c in cards.items()}
    assert table["mp"] == table["one"] and len(table["mp"]) == len(two["rows"])
    assert cards["mp"].count("diffslim workflow zoo:digits-dit") == 1
    r = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["stages_kept"] == two["stages_kept"]
    assert "stacks loaded from an earlier run" in r.stderr


@pytest.mark.xdist_group("accelerate-launch")
def test_depth_and_timestep_searches_under_a_launch_find_what_one_process_finds(tmp_path, monkeypatch):
    """`depth-search` and `timesteps` were refused under a launch. Each of their sampling runs is now split among the
    processes, every process judges the gathered outputs, and the first writes the recipe and plot: the depth, the
    gamma and every evaluation are one process's."""
    import json

    depth = ["depth-search", "zoo:digits-sd", "--n", "4", "--steps", "4", "--threshold", "25", "--json"]
    gamma = ["timesteps", "zoo:digits-sd", "--steps", "3", "--full-steps", "6", "--n", "4", "--method", "greedy",
             "--json"]
    two_depth = json.loads(_launch(tmp_path, *depth, "--out", "d.json", "--plot", "d.png").stdout)
    two_gamma = json.loads(_launch(tmp_path, *gamma, "--out", "g.json").stdout)
    assert json.loads((tmp_path / "d.json").read_text())["depth"]["depth"] == two_depth["depth"]
    assert (tmp_path / "d.png").is_file()
    assert json.loads((tmp_path / "g.json").read_text())["sampling"]["timesteps"] == two_gamma["timesteps"]
    from typer.testing import CliRunner

    from diffslim.cli import app

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache_one"))
    one_depth, one_gamma = (json.loads(CliRunner().invoke(app, args).stdout) for args in (depth, gamma))  # one process
    assert (two_depth["depth"], two_depth["reached"]) == (one_depth["depth"], True)
    assert [e["depth"] for e in two_depth["evaluations"]] == [e["depth"] for e in one_depth["evaluations"]]
    for a, b in zip(two_depth["evaluations"], one_depth["evaluations"]):
        assert abs(a["psnr"] - b["psnr"]) < 0.01, a
    assert two_gamma["timesteps"] == one_gamma["timesteps"]
    assert abs(two_gamma["gamma"] - one_gamma["gamma"]) < 1e-6


@pytest.mark.xdist_group("accelerate-launch")
def test_layer_scoring_under_a_launch_splits_the_layers_and_pairs_and_selects_what_one_process_selects(tmp_path,
                                                                                                      monkeypatch):
    """`layer-prune` and `layer-compare` were refused under a launch. Each process now measures its share of the
    layers' output losses, of the pairs' and of the greedy re-scoring's candidates (and samples its share of a
    sampling calibration's runs), every process receives all of them, and the first writes: the scores, the
    selections and the comparison are one process's."""
    import json

    prune = ["layer-prune", "zoo:digits-dit", "--ratio", "0.5", "--criterion", "output-loss-pairs", "--n", "8",
             "--json", "--out"]
    # the calibration on sampling runs: each process samples its share of the trajectories, all receive every call
    compare = ["layer-compare", "zoo:digits-dit", "--ratios", "0.5", "--n", "8", "--calibration", "sampling",
               "--calib-steps", "4", "--json", "--out"]
    two_prune = json.loads(_launch(tmp_path, *prune, "p2").stdout)
    two_compare = json.loads(_launch(tmp_path, *compare, "c2").stdout)
    assert json.loads((tmp_path / "p2" / "scores.json").read_text())["removed"] == two_prune["removed"]
    assert (tmp_path / "p2" / "model" / "config.json").is_file() and (tmp_path / "c2" / "index.html").is_file()
    from typer.testing import CliRunner

    from diffslim.cli import app

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache_one"))
    one_prune, one_compare = (json.loads(CliRunner().invoke(app, [*args, str(tmp_path / out)]).stdout)  # one process
                              for args, out in ((prune, "p1"), (compare, "c1")))
    assert two_prune["removed"] == one_prune["removed"]
    scores = {row["name"]: row["score"] for row in one_prune["layers"]}
    assert {row["name"]: row["score"] for row in two_prune["layers"]} == pytest.approx(scores, rel=1e-5)
    assert [i["layers"] for i in two_prune["interactions"]] == [i["layers"] for i in one_prune["interactions"]]
    assert [i["interaction"] for i in two_prune["interactions"]] == pytest.approx(
        [i["interaction"] for i in one_prune["interactions"]], rel=1e-5, abs=1e-9)
    assert len(one_prune["interactions"]) == 15  # every pair of digits-dit's 6 blocks
    assert two_compare["ratios"][0].keys() == one_compare["ratios"][0].keys()
    for key, value in one_compare["ratios"][0].items():
        if isinstance(value, float):
            assert two_compare["ratios"][0][key] == pytest.approx(value, rel=1e-5), key
    assert two_compare["additivity"]["pearson"] == pytest.approx(one_compare["additivity"]["pearson"], rel=1e-5)
