import json

import pytest
import torch

from diffslim.bench import METHODS, count_run_macs, parse_methods, register_method, run_bench, timing_note
from diffslim.errors import UserError
from diffslim.evaluate import metrics_fn_for
from diffslim.models.load import LoadedModel
from diffslim.report import Report, image_grid, slug
from diffslim.sample import SampleSpec
from diffslim.zoo.evalsets import EvalSet


@pytest.fixture(scope="module")
def bench_result(tiny_digits_pipe):
    loaded = LoadedModel("tiny", "pipeline", tiny_digits_pipe.denoiser, pipe=tiny_digits_pipe)
    es = EvalSet(inputs=[{"class_label": i % 10} for i in range(6)], seeds=list(range(6)))
    res = run_bench(loaded, "steps:4,steps:2", es, default_steps=8, batch_size=6,
                    metrics_fn=metrics_fn_for(loaded, es), progress=False)
    return loaded, es, res


def test_rows_shape_and_relations(bench_result):
    loaded, es, res = bench_result
    rows = res.rows
    assert [r["method"] for r in rows] == ["full", "steps:4", "steps:2"]  # full first, always
    for r in rows:
        assert {"method", "params", "macs_ratio", "speedup", "psnr", "ssim"} <= set(r)
        assert r["params"] == 3_220_961
    assert rows[0]["macs_ratio"] == 1.0 and rows[0]["speedup"] == 1.0
    assert rows[0]["ssim"] == pytest.approx(1.0) and rows[0]["psnr"] == 100.0  # identical outputs, capped PSNR
    # the denoiser dominates the run: halving the steps halves the MACs (CFG doubles every call equally)
    assert rows[1]["macs_ratio"] == pytest.approx(0.5, rel=0.02)
    assert rows[2]["macs_ratio"] == pytest.approx(0.25, rel=0.02)
    assert rows[2]["psnr"] < 100 and rows[2]["ssim"] < 1
    assert json.loads(json.dumps(res.to_json()))["rows"][1]["method"] == "steps:4"
    assert res.outputs["steps:2"].shape == (6, 1, 8, 8)
    # the full model timed again after the methods: the first time is its row's, the drift their relative gap
    t = res.to_json()["timing"]
    assert rows[0]["seconds"] == min(t["first"], t["last"]) and rows[0]["speedup"] == 1.0  # the faster counts
    assert all(r["speedup"] == rows[0]["seconds"] / r["seconds"] for r in rows)
    assert t["drift"] == pytest.approx(abs(t["last"] - t["first"]) / t["first"])
    assert f"{100 * t['drift']:.0f} % apart" in timing_note(t)


def test_run_macs_counts_every_denoiser_call(tiny_digits_pipe):
    from diffslim.models.macs import count_macs, default_inputs

    den = tiny_digits_pipe.denoiser
    args, kwargs = default_inputs(den, batch=2, context_tokens=2)  # CFG: cond + uncond in one call
    per_call, _ = count_macs(den, *args, **kwargs)
    spec = SampleSpec([{"class_label": 3}], [0], num_inference_steps=5)
    total = count_run_macs(tiny_digits_pipe, spec)
    enc = total - 5 * per_call
    assert 0 <= enc < 0.01 * total  # the label encoder is all that runs outside the denoiser


def test_parse_methods_and_registry():
    assert parse_methods("full, steps:10") == [("full", None), ("steps", "10")]
    with pytest.raises(UserError, match="unknown bench method 'x'"):
        parse_methods("x:1")
    with pytest.raises(UserError, match="--methods is empty"):
        parse_methods(" , ")
    with pytest.raises(UserError, match="has an empty entry"):
        parse_methods("full,,steps:2")
    with pytest.raises(UserError, match="lists 'steps:2' twice"):
        parse_methods("full,steps:2, steps:2")
    assert parse_methods("steps:2,steps:3") == [("steps", "2"), ("steps", "3")]
    with pytest.raises(UserError, match="--stages 'steps:2,' has an empty entry"):
        parse_methods("steps:2,", "--stages")

    @register_method("testonly", "a method registered by a test")
    def _m(arg, ctx):
        return None

    try:
        assert parse_methods("testonly:3") == [("testonly", "3")]
    finally:
        METHODS.pop("testonly")


def test_report_writes_html_json_and_pngs(bench_result, tmp_path):
    from diffslim.report import add_bench_section

    _, _, res = bench_result
    rep = Report("t")
    rep.add_text("hello", "<b>escaped</b>")
    add_bench_section(rep, "zoo:tiny", res.rows, res.outputs, timing=timing_note(res.timing))
    out = rep.write(tmp_path / "rep")
    html = (out / "index.html").read_text()
    assert "&lt;b&gt;escaped" in html and "steps:2" in html
    assert "again after the other methods" in html[html.index("notes: zoo:tiny"):]  # the timing-noise line
    data = json.loads((out / "report.json").read_text())
    assert data["tables"]["bench: zoo:tiny"][0]["method"] == "full"
    # the reference cells are null in the JSON (no measurement), the other rows keep their values
    ref_cols = [c for c in ("psnr", "ssim", "lpips") if c in res.rows[0]]
    assert [data["tables"]["bench: zoo:tiny"][0][c] for c in ref_cols] == [None] * len(ref_cols)
    assert [data["tables"]["bench: zoo:tiny"][1][c] for c in ref_cols] == pytest.approx(
        [res.rows[1][c] for c in ref_cols])
    # as in the terminal: the full row's PSNR/SSIM compare it with itself ("ref"), the seconds say what they time
    table = html[html.index("<h2>bench: zoo:tiny</h2>"):]
    table = table[:table.index("</table>")]
    full = table[table.index("<td>full</td>"):]
    full = full[:full.index("</tr>")]
    assert full.count("<td>ref</td>") == sum(c in res.rows[0] for c in ("psnr", "ssim", "lpips")) >= 2
    assert "<td>ref</td>" not in table.replace(full, "")
    assert f"seconds (sampling all {len(res.outputs['full'])} inputs)" in table
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "bench_zoo_tiny.png" in pngs and "grid_zoo_tiny_steps-2.png" in pngs
    for name in pngs:
        assert f"src='{name}'" in html


def test_labelled_grid_puts_each_method_in_a_row_of_its_own_with_its_label():
    import numpy as np

    from diffslim.report import labelled_grid

    outs = {"full": torch.ones(5, 1, 8, 8), "steps:2": torch.zeros(5, 1, 8, 8)}
    g = np.asarray(labelled_grid(outs, k=4, height=16))
    row_h, row_w = (8 + 2) * 2, (4 * 9 + 1) * 2  # 4 tiles of 8 px and a 1 px border each, upscaled twice
    assert g.shape[0] == 2 * row_h and g.shape[1] > row_w
    tiles_x = g.shape[1] - row_w  # the tiles sit right of the labels
    first, second = g[:row_h, tiles_x:], g[row_h:, tiles_x:]
    assert first.mean() == 255 and second.mean() < 100  # the rows keep their order: white tiles, then black ones
    assert (g[:, :tiles_x] < 128).any(axis=-1).sum() > 10  # the labels are written in the left margin
    with pytest.raises(ValueError, match="no images"):
        labelled_grid({})


def test_image_grid_layout():
    imgs = torch.zeros(5, 1, 4, 4)
    imgs[1] = 1.0
    g = image_grid(imgs, nrow=3, pad=1)
    assert g.size == (3 * 5 + 1, 2 * 5 + 1)
    px = g.load()
    assert px[1 + 5, 1] == (255, 255, 255) and px[1, 1] == (0, 0, 0)


def test_finetune_recovery_figure_pairs_depth_rows():
    from diffslim.demo import finetune_recovery_figure

    rows = [{"method": "full", "psnr": 100, "ssim": 1.0}, {"method": "depth:7", "psnr": 30.0, "ssim": 0.9},
            {"method": "depth:9", "psnr": 40.0, "ssim": 0.99}, {"method": "depth:7+ft", "psnr": 35.0, "ssim": 0.95}]
    fig = finetune_recovery_figure("m", rows)
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert bars == [30.0, 35.0]  # only depth 7 has a fine-tuned row
    assert finetune_recovery_figure("m", rows[:3]) is None


def test_layer_pruning_section_of_the_demo_report(tmp_path):
    """The report's layer-pruning section on zoo:digits-dit: each criterion's held-out output loss at each ratio (what
    layer_prune measures for its selection), BK-SDM left out on a DiT, the additivity figure with the second-order
    prediction, and the loss-term balance of a normalized and a plain distillation."""
    from diffslim.demo import LAYER_RATIOS, layer_pruning_section
    from diffslim.methods import layer_prune as lp
    from diffslim.models.load import load

    loaded = load("zoo:digits-dit")
    rep = Report("t")
    res = layer_pruning_section(rep, loaded, "zoo:digits-dit", "digits-dit", greedy=True, pairs=True, kd_steps=2,
                                work=tmp_path / "work", sample=4)
    d = loaded.denoiser
    held = lp.calibration(loaded.pipe, n=32, seed=1)
    calib = lp.calibration(loaded.pipe, n=32, seed=0)
    for row in res["ratios"]:
        picked = lp.layer_prune(d, "output-loss", row["ratio"], calib=calib).removed
        assert row["output-loss_removed"] == picked
        assert row["output-loss"] == lp.output_loss(d, held, picked)
        assert row["greedy"] <= row["random"] and row["output-loss-pairs"] <= row["random"]
    assert [r["ratio"] for r in res["ratios"]] == list(LAYER_RATIOS) and res["bk_sdm"] == []
    assert len(res["additivity"]["second_order"]) == len(res["additivity"]["sets"]) == 32
    out = rep.write(tmp_path / "report")
    for name in ("output_loss_digits-dit.png", "additivity_digits-dit.png", "loss_balance_digits-dit.png",
                 "sampled_psnr_digits-dit.png"):
        assert (out / name).stat().st_size > 1000
    sampled = json.loads((out / "report.json").read_text())["tables"][
        "layer pruning: zoo:digits-dit (PSNR of samples against the full model's, higher is better)"]
    assert [r["output-loss"] for r in sampled] == [row["output-loss_sampled"]["psnr"] for row in res["ratios"]]
    for row in res["ratios"]:  # a set picked by two criteria is sampled once: the same metrics
        same = [c for c in ("greedy", "similarity", "output-loss-pairs")
                if set(row[f"{c}_removed"]) == set(row["output-loss_removed"])]
        assert all(row[f"{c}_sampled"] == row["output-loss_sampled"] for c in same)
        assert all(0 < row[f"{c}_sampled"]["psnr"] < 60 for c in ("output-loss", "taylor", "magnitude", "random"))
    assert res["sampled"] == {"n": 4, "steps": loaded.zoo.default_steps}
    table = json.loads((out / "report.json").read_text())["tables"]["layer pruning: zoo:digits-dit (held-out output "
                                                                    "loss, lower is better)"]
    assert [r["ratio"] for r in table] == list(LAYER_RATIOS) and {"output-loss", "output-loss-pairs", "similarity",
                                                                   "greedy"} <= set(table[0])


def test_workflow_section_of_the_demo_report(tmp_path):
    """The demo's workflow section: the rows of the stacked stages, the path figure and a grid per stage, written
    into the report; a floor above a stage's PSNR rejects it there."""
    from diffslim.demo import workflow_section
    from diffslim.models.load import load

    loaded = load("zoo:digits-sd")
    rep = Report("t")
    res = workflow_section(rep, loaded, "zoo:digits-sd", 10, n=4, stages="steps:5,deepcache:2", floor={"psnr": 0.0})
    assert [r["stage"] for r in res["rows"]] == ["original", "steps:5", "deepcache:2"]
    assert res["stopped"] is None and res["recipe"]["sampling"] == {"num_inference_steps": 5}
    # a joint search on the same model gets a section of its own, its files beside the first one's
    joint = workflow_section(rep, loaded, "zoo:digits-sd", 10, n=4, stages="steps:auto,deepcache:auto",
                             floor={"psnr": 25.0}, search="joint", joint_width=1)
    assert len(joint["branches"]) == 3 and sum(b["chosen"] for b in joint["branches"]) == 1
    out = rep.write(tmp_path / "r")
    html = (out / "index.html").read_text()
    assert "workflow: zoo:digits-sd" in html and (out / "workflow_zoo_digits-sd.png").is_file()
    assert (out / "workflow_grid_zoo_digits-sd_deepcache-2.png").is_file()
    assert "workflow: zoo:digits-sd (joint search)" in html and "--search joint --joint-width 1" in html
    assert (out / f"workflow_{slug('zoo:digits-sd (joint search)')}.png").is_file()
    strict = workflow_section(Report("t"), loaded, "zoo:digits-sd", 10, n=4, stages="steps:5,deepcache:2",
                              floor={"psnr": res["rows"][1]["psnr"] + 0.01})
    assert [r["accepted"] for r in strict["rows"]] == [True, False] and strict["stages_kept"] == []


def test_workflow_figure_draws_the_path_the_rejected_stage_and_the_settings_auto_tried():
    from diffslim.report import workflow_figure

    rows = [{"stage": "original", "macs_ratio": 1.0, "psnr": 100.0},
            {"stage": "layers:0.4", "macs_ratio": 0.9, "psnr": 38.0, "accepted": True,
             "search": [{"setting": "layers:0.5", "accepted": False, "psnr": 29.0, "macs_ratio": 0.87},
                        {"setting": "layers:0.25", "accepted": True, "psnr": 57.0, "macs_ratio": 0.97}]},
            {"stage": "steps:6", "macs_ratio": 0.11, "psnr": 30.2, "accepted": True},
            {"stage": "deepcache:2", "macs_ratio": 0.06, "psnr": 27.9, "accepted": False}]
    ax = workflow_figure(rows, "psnr", 30.0).axes[0]
    offsets = [c.get_offsets().tolist() for c in ax.collections]
    assert [[0.97, 57.0]] in offsets and [[0.87, 29.0]] in offsets  # the tried settings, one marker each
    assert [[0.06, 27.9]] in offsets  # the rejected stage
    # the original (no PSNR of its own) is drawn on the top edge, off the scale, above every point, tried ones
    # included; the path joins the accepted stages
    original = [(c, o[0]) for c, o in zip(ax.collections, offsets) if o[0] == [1.0, 1.0]]
    assert len(original) == 1 and original[0][0].get_offset_transform() == ax.get_xaxis_transform()
    assert ax.get_ylim()[1] > 57.0 and ax.get_ylim()[0] < 27.9
    labels = [t.get_text() for t in ax.texts]
    assert {"original (the reference: psnr infinite)", "layers:0.4", "steps:6", "deepcache:2 (rejected)"} <= set(labels)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "tried by auto, met its floor", "tried by auto, missed its floor", "floor 30"}
    # a joint search's other stacks: their results as diamonds (the chosen one is the path itself)
    branches = [{"stages": "layers:auto,steps:auto", "macs_ratio": 0.11, "psnr": 30.2, "chosen": True},
                {"stages": "steps:auto", "macs_ratio": 0.12, "psnr": 30.6, "chosen": False}]
    ax = workflow_figure(rows, "psnr", 30.0, branches=branches).axes[0]
    assert [[0.12, 30.6]] in [c.get_offsets().tolist() for c in ax.collections]
    assert "other stacks the joint search tried (their results)" in {t.get_text() for t in ax.get_legend().get_texts()}


def test_a_report_renders_its_figures_when_added_and_keeps_none_open(tmp_path):
    import matplotlib.pyplot as plt

    plt.close("all")
    rep = Report("t")
    for i in range(25):
        fig, ax = plt.subplots()
        ax.plot([0, i])
        rep.add_figure(f"f{i}", f"f{i}.png", fig)
    assert plt.get_fignums() == []
    out = rep.write(tmp_path / "r")
    from PIL import Image

    assert Image.open(out / "f24.png").size[0] > 100 and "f24.png" in (out / "index.html").read_text()


def test_lora_section_of_the_demo_report(tmp_path):
    """The demo's LoRA section: the mirroring LoRA of bench/lora_transfer.py, trained on the full zoo:digits-sd,
    adapted to a pruned model; the full model with it draws mirrored digits, and the pruned one keeps fewer LoRA
    modules and stays close to the full model with the LoRA."""
    from diffslim.demo import LORA_FILE, lora_section

    rep = Report("t")
    res = lora_section(rep, LORA_FILE, "zoo:digits-sd", "full,depth:9", n=10)
    full, pruned = res["rows"]
    assert full["method"] == "full" and full["lora_modules_dropped"] == 0
    assert full["mirrored_digit_accuracy"] >= 0.9  # the LoRA works: its digits read right once mirrored back
    assert pruned["lora_modules_kept"] < full["lora_modules_kept"] and pruned["lora_modules_dropped"] > 0
    assert pruned["lora_modules_kept"] + pruned["lora_modules_dropped"] == full["lora_modules_kept"]
    assert pruned["psnr_vs_full_with_lora"] > 30 and pruned["mirrored_digit_accuracy"] >= 0.9
    out = rep.write(tmp_path / "r")
    assert "LoRAs on pruned models: zoo:digits-sd" in (out / "index.html").read_text()
    assert (out / "lora_digits-sd.png").is_file()


def test_ip_adapter_section_of_the_demo_report(tmp_path):
    """The demo's IP-Adapter section: the IP-Adapter of bench/ip_adapter_transfer.py, trained on the full
    zoo:digits-sd, loaded as it is into a pruned model; the full model with it draws the prompt digits, the pruned
    one has fewer IP layers and stays close to the full model with the IP-Adapter."""
    from diffslim.demo import IP_ADAPTER_FILE, ip_adapter_section

    rep = Report("t")
    res = ip_adapter_section(rep, IP_ADAPTER_FILE, "zoo:digits-sd", "full,depth:9", n=10)
    full, pruned = res["rows"]
    assert full["method"] == "full" and full["ip_layers"] == 16
    assert full["prompt_digit_accuracy"] >= 0.9  # the null label draws chance digits; the image prompt steers it
    assert 0 < pruned["ip_layers"] < full["ip_layers"]
    assert pruned["psnr_vs_full_with_ip_adapter"] > 30 and pruned["prompt_digit_accuracy"] >= 0.9
    out = rep.write(tmp_path / "r")
    assert "IP-Adapters on pruned models: zoo:digits-sd" in (out / "index.html").read_text()
    assert (out / "ip_adapter_digits-sd.png").is_file()


def test_bench_figure_puts_both_panels_on_one_macs_axis(bench_result):
    """Both panels of the cost/quality figure share one x convention, the MACs reduction (full / method): a method
    sits at the same x in both, right of 1 when it saves MACs."""
    from diffslim.report import bench_figure

    _, _, res = bench_result
    fig = bench_figure(res.rows)
    left, right = fig.axes[:2]
    xs_left = [float(c.get_offsets()[0][0]) for c in left.collections]
    xs_right = [float(c.get_offsets()[0][0]) for c in right.collections]
    expected = [1 / r["macs_ratio"] for r in res.rows]
    assert xs_right == pytest.approx(expected)
    assert xs_left == pytest.approx([x for x, r in zip(expected, res.rows) if r["method"] != "full"])
    assert left.get_xlabel() == right.get_xlabel() == "MACs reduction (x): full / sampling run"
    assert any(x > 1 for x in xs_left)


def test_side_by_side_grids_show_the_inputs_and_ground_truth_above_the_methods(bench_result, tmp_path):
    """Image-to-image and super-resolution reports show each input (and the ground truth where there is one) above
    the methods' samples; a class-conditional set has neither."""
    from PIL import Image

    from diffslim.evaluate import reference_images
    from diffslim.report import add_bench_section
    from diffslim.zoo.evalsets import task_eval_set

    _, es, res = bench_result
    assert reference_images(es) == {}
    sr = task_eval_set("sr", 3, eval_patch=16)
    refs = reference_images(sr)
    assert list(refs) == ["input", "ground truth"]
    assert refs["input"].shape == (3, 3, 8, 8) and torch.equal(refs["ground truth"], sr.ground_truth)
    plain, with_refs = Report("a"), Report("b")
    add_bench_section(plain, "zoo:tiny", res.rows, res.outputs)
    add_bench_section(with_refs, "zoo:tiny", res.rows, res.outputs,
                      references={"input": torch.rand(6, 3, 4, 4), "ground truth": torch.rand(6, 3, 8, 8)})
    heights = []
    for rep, name in ((plain, "plain"), (with_refs, "refs")):
        out = rep.write(tmp_path / name)
        with Image.open(out / "grid_zoo_tiny_all.png") as im:
            heights.append(im.height)
    assert heights[1] - heights[0] >= 2 * 64  # two more rows, each about 64 px high
    assert "above them: input and ground truth" in (tmp_path / "refs" / "index.html").read_text()


def test_pareto_figure_joins_the_best_trade_offs_and_keeps_labels_apart():
    """The quality-against-MACs figure put every label at the same offset from its point, so rows of equal MACs
    (every 10-step schedule of a bench) wrote their names over one another, and a label near the right edge left
    the figure. Labels now never overlap and stay inside the axes; the rows no other row beats in both MACs and
    quality are joined by a line."""
    from diffslim.report import pareto_figure, pareto_front

    assert pareto_front([(0.2, 30.0), (0.2, 35.0), (0.5, 45.0), (0.4, 45.0), (0.9, 33.0), (0.97, 60.0)]) == [1, 3, 5]
    rows = [{"method": "full", "macs_ratio": 1.0, "psnr": None}, {"method": "depth:9", "macs_ratio": 0.97, "psnr": 60.0},
            {"method": "steps:25", "macs_ratio": 0.5, "psnr": 45.0}, {"method": "deepcache:3:0", "macs_ratio": 0.4,
                                                                      "psnr": 45.2}]
    rows += [{"method": f"{name}:10", "macs_ratio": 0.2, "psnr": 33.0 + 0.4 * k}
             for k, name in enumerate(("steps", "gamma", "karras", "uniform", "ays", "dpm", "xue"))]
    fig = pareto_figure(rows, "psnr", "t")
    fig.canvas.draw()
    ax = fig.axes[0]
    texts = [t for t in ax.texts]
    assert sorted(t.get_text() for t in texts) == sorted(r["method"] for r in rows[1:])
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t) for t in texts]  # the label alone, not its line to the point
    inside = ax.get_window_extent()
    for i, a in enumerate(boxes):
        assert inside.x0 <= a.x0 and a.x1 <= inside.x1, texts[i].get_text()
        for j in range(i):
            assert not a.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0.2, 0.4, 0.97] and list(line.get_ydata()) == [35.4, 45.2, 60.0]


def test_bench_and_evaluate_results_say_where_and_in_which_dtype_they_ran(tmp_path):
    """bench --json, its report.json and evaluate --json name the device and dtype their numbers were sampled in (a
    bfloat16 run's rows could not be told from a float32 run's)."""
    from typer.testing import CliRunner

    from diffslim.cli import app

    for dtype in ("bfloat16", "float32"):
        r = CliRunner().invoke(app, ["bench", "zoo:digits-dit", "--methods", "full,steps:2", "--n", "2", "--steps", "3",
                                     "--dtype", dtype, "--html", str(tmp_path / dtype), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["ran_on"] == {"device": "cpu", "dtype": dtype}
        assert json.loads((tmp_path / dtype / "report.json").read_text())["ran_on"]["dtype"] == dtype
        r = CliRunner().invoke(app, ["evaluate", "zoo:digits-dit", "--n", "2", "--steps", "3", "--dtype", dtype,
                                     "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["ran_on"] == {"device": "cpu", "dtype": dtype}
