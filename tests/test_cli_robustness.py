"""Bad input at the command line: a one-line error naming what is wrong and what is accepted, exit code 2, no
traceback, and no lost work (checked before the work starts; a resume with other settings is refused)."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffslim.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "diffslim" / "configs"


def _cli(*args):
    from diffslim.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


def _refused(res, *needles):
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output  # one line, also for the parser's errors
    text = " ".join(res.output.split())
    for needle in needles:
        assert needle in text, (needle, res.output)


@pytest.mark.parametrize("args", [
    ("sample", "zoo:digits-sd", "--steps", "-3"),
    ("sample", "zoo:digits-sd", "--steps", "0"),
    ("sample", "zoo:digits-sd", "--batch-size", "0"),
    ("evaluate", "zoo:digits-sd", "--n", "0"),
    ("bench", "zoo:digits-sd", "--methods", "full", "--steps", "-3"),
    ("workflow", "zoo:digits-sd", "--stages", "steps:5", "--steps", "-1", "--out", "x"),
    ("depth-search", "zoo:digits-sd", "--threshold", "20", "--batch-size", "0"),
    ("timesteps", "zoo:digits-sd", "--steps", "5", "--full-steps", "-3"),
    ("finetune", "zoo:digits-sd", "--depth", "5", "--checkpoint-every", "0"),
    ("distill", "zoo:digits-dit", "x", "--log-every", "0"),
    ("dipgo", "zoo:digits-sd", "--ratio", "0.5", "--checkpoint-every", "0", "--out", "r.json"),
    ("zoo-train", "digits-dit", "--steps", "0"),
    ("distill", "zoo:digits-dit", "x", "--iters", "0"),  # --iters: the optimizer steps' other name, as in dipgo
    ("profile", "zoo:digits-sd", "--repeats", "0"),
])
def test_counts_below_one_are_refused_by_the_option_parser(args):
    _refused(_cli(*args), "Invalid value for", "greater than or equal to")


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (("sample", "zoo:digits-sd", "--out", afile), ("layer-prune", "zoo:digits-dit", "--ratio", "0.3",
                                                                  "--out", afile),
                 ("workflow", "zoo:digits-sd", "--stages", "steps:5", "--out", afile),
                 ("bench", "zoo:digits-sd", "--methods", "full", "--html", afile),
                 ("zoo-train", "digits-dit", "--out", afile)):
        _refused(_cli(*args), f"{afile} is a file; give a folder")
    for args in (("dipgo", "zoo:digits-sd", "--ratio", "0.5", "--out", tmp_path),
                 ("depth-search", "zoo:digits-sd", "--threshold", "20", "--out", tmp_path),
                 ("timesteps", "zoo:digits-sd", "--steps", "5", "--out", tmp_path)):
        _refused(_cli(*args), f"{tmp_path} is a folder; give a file name, e.g. {tmp_path / 'recipe.json'}")
    _refused(_cli("depth-search", "zoo:digits-sd", "--threshold", "20", "--plot", tmp_path), "--plot", "is a folder")
    _refused(_cli("sample", "zoo:digits-sd", "--out", "/proc/diffslim-x"), "cannot write into --out /proc/diffslim-x")
    _refused(_cli("sample", "zoo:digits-sd", "--out", afile / "sub"), "cannot write into --out")
    assert afile.read_text() == "x"


def test_options_that_would_be_ignored_or_misread_are_refused(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    _refused(_cli("sample", "zoo:digits-sd", "--prompts", prompts, "--out", tmp_path / "s"), "takes no prompts")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"sampling": {"num_inference_steps": 10}}))
    _refused(_cli("sample", "zoo:digits-sd", "--steps", "5", "--recipe", recipe, "--out", tmp_path / "s"),
             "--steps 5: the recipe", "samples 10 steps", "drop --steps")
    _refused(_cli("depth-search", "zoo:digits-sd", "--threshold", "20", "--split", "500"), "add --multi")
    _refused(_cli("depth-search", "zoo:digits-sd", "--threshold", "20", "--mode", "binray"),
             "unknown --mode 'binray'; accepted: binary, linear")
    _refused(_cli("depth-search", "zoo:digits-dit", "--threshold", "20", "--n", "1"), "depth-skip needs an SD-style U-Net")
    _refused(_cli("timesteps", "zoo:digits-sd", "--steps", "5", "--gamma", "0.5"), "drop --gamma, or drop MODEL")
    _refused(_cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-tiny", "--inner", "--out", tmp_path / "l"),
             "drop --inner")
    _refused(_cli("layer-prune", CONFIGS / "sd15-unet", "--ratio", "0.3", "--out", tmp_path / "l"),
             "is config-only (no weights): --criterion output-loss needs weights; use a bk-sdm-* criterion or random")
    _refused(_cli("evaluate", "zoo:digits-sd", "--clip", tmp_path / "nope"), "--clip", "no such file or folder")
    _refused(_cli("workflow", "zoo:digits-sd", "--stages", "stesp:2", "--out", tmp_path / "w"),
             "'stesp' cannot be a workflow stage; accepted: layers")
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full,layers:1.5"), "layers:R: the ratio R must lie in (0, 1)",
             "share of params")
    _refused(_cli("layer-compare", "zoo:digits-dit", "--sample", "-1", "--out", tmp_path / "c"),
             "--sample takes a count of evaluation inputs >= 0")


def test_recipe_files_that_are_not_json_text(tmp_path):
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    _refused(_cli("recipe", png), "is not a text file; a recipe is a JSON file")
    _refused(_cli("recipe", tmp_path), "is a folder; give a recipe JSON file")


def test_a_folder_of_unreadable_images_is_a_user_error(tmp_path):
    from diffslim.train.data import ImageFolder

    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="every sample of ImageFolder .* is unreadable \\(3 files\\)"):
        ImageFolder(tmp_path, size=8)[0]


def test_resuming_with_other_settings_is_refused(tmp_path):
    """DiP-GO, distillation and zoo training keep what shaped their checkpoints; a rerun into the same folder
    with another ratio, student, learning rate or batch size is refused instead of continuing another run."""
    dipgo = ("dipgo", "zoo:digits-sd", "--steps", "4", "--select", "0", "--anneal", "1", "--out", tmp_path / "d" / "r.json")
    res = _cli(*dipgo, "--ratio", "0.5", "--iters", "1")
    assert res.exit_code == 0, res.output
    _refused(_cli(*dipgo, "--ratio", "0.8", "--iters", "1"),
             "holds a pruner trained with ratio=0.5; this run has ratio=0.8")
    # more iterations of the same run resume
    res = _cli(*dipgo, "--ratio", "0.5", "--iters", "2")
    assert res.exit_code == 0 and "resumed from" in res.output, res.output

    lp = _cli("layer-prune", "zoo:digits-dit", "--criterion", "magnitude", "--ratio", "0.3", "--out", tmp_path / "p")
    assert lp.exit_code == 0, lp.output
    lp2 = _cli("layer-prune", "zoo:digits-dit", "--criterion", "magnitude", "--ratio", "0.5", "--out", tmp_path / "p2")
    assert lp2.exit_code == 0, lp2.output
    run = ("distill", "zoo:digits-dit", tmp_path / "p" / "model", "--steps", "2", "--batch-size", "4",
           "--checkpoint-every", "1", "--out", tmp_path / "k")
    assert _cli(*run).exit_code == 0
    _refused(_cli(*run[:-2], "--lr", "3e-4", "--out", tmp_path / "k"), "was started with lr=0.0001; this run has lr=0.0003")
    _refused(_cli("distill", "zoo:digits-dit", tmp_path / "p2" / "model", *run[3:]), "holds checkpoints of another student")
    res = _cli(*run[:4], "4", *run[5:])  # a longer run of the same settings resumes
    assert res.exit_code == 0, res.output
    # another --data resumed the run on other images without a word (session 28), and another teacher likewise
    from PIL import Image

    (tmp_path / "lab").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / "lab" / f"{i}.png")
        (tmp_path / "lab" / f"{i}.txt").write_text(str(i))
    _refused(_cli(*run, "--data", tmp_path / "lab"), "holds checkpoints of a run on other training data (ZooDigits")
    import torch

    from diffslim.models.load import load
    from diffslim.train.distill import _weights_digest

    den = load("zoo:digits-dit").denoiser
    same = _weights_digest(den)
    assert _weights_digest(load("zoo:digits-dit").denoiser) == same
    with torch.no_grad():
        next(den.parameters()).add_(1e-3)
    assert _weights_digest(den) != same
    _refused(_cli("distill", "zoo:sr", tmp_path / "p" / "model", "--steps", "1", "--out", tmp_path / "k2"),
             "does not fit the teacher")
    assert not (tmp_path / "k2" / "checkpoints").exists()

    train = ("zoo-train", "digits-dit", "--steps", "1", "--checkpoint-every", "1", "--out", tmp_path / "z")
    assert _cli(*train, "--batch-size", "4").exit_code == 0
    _refused(_cli(*train, "--batch-size", "8"), "was started with batch_size=4; this run has batch_size=8")


def test_mistakes_found_by_a_sweep_are_one_line_errors_before_any_work(tmp_path):
    """Session 23's sweep of bad input over every command: each of these once ran work first, printed a traceback,
    or exited 0. Each is now refused in one line with exit code 2, before the model is sampled or trained."""
    import torch

    _refused(_cli("sample", "zoo:digits-sd", "--seed", "99999999999999999999999", "--out", tmp_path / "s"),
             "Invalid value for '--seed'", "less than or equal to")
    _refused(_cli("depth-search", "zoo:digits-sd", "--plot", tmp_path / "d.txt"), "matplotlib writes no .txt figures")
    _refused(_cli("depth-search", "zoo:digits-sd", "--multi", "--split", "5000"), "must be a timestep in 1..999")
    _refused(_cli("depth-search", "zoo:digits-sd", "--metric", "ssim", "--threshold", "30"), "SSIM lies in [-1, 1]")
    _refused(_cli("timesteps", "--steps", "10", "--gamma", "1.5", "--n", "3", "--depth", "2"),
             "--n, --depth set up the search of gamma on a MODEL")
    for spec, needle in (("fbcache:abc", "'abc' is not a valid setting; fbcache[:THRESHOLD]"),
                         ("fbcache:-1", "'-1' is not a valid setting"),
                         ("fbcache:0.05:extra", "too many parts"),
                         ("magcache:macs=0.5:0", "magcache:macs=0.5:0: '0' is not a valid setting")):
        _refused(_cli("bench", "zoo:digits-dit", "--methods", f"full,{spec}"), needle)
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full,,steps:2"), "has an empty entry")
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full,full"), "lists 'full' twice")
    for spec in ("layers:0.5+kd+kd", "layers:0.5+ft"):
        _refused(_cli("bench", "zoo:digits-sd", "--methods", f"full,{spec}"), "the only suffix layers:R takes is one +kd")
    train = ("finetune", "zoo:digits-sd", "--depth", "5", "--steps", "2", "--out", tmp_path / "f")
    _refused(_cli(*train, "--ema-decay", "1.5"), "ema_decay (--ema-decay) must be in [0, 1)")
    _refused(_cli(*train, "--lambda-out", "-1"), "lambda_out (--lambda-out) must be a number >= 0")
    _refused(_cli(*train, "--lr", "-1"), "lr (--lr) must be a number > 0")
    if not torch.cuda.is_available():  # Accelerate would otherwise train in float32 without a word
        _refused(_cli(*train, "--mixed-precision", "fp16"), "'fp16' needs a CUDA GPU")
    assert not (tmp_path / "f" / "checkpoints").exists()
    dipgo = ("dipgo", "zoo:digits-sd", "--ratio", "0.5", "--out", tmp_path / "r.json")
    _refused(_cli(*dipgo, "--alpha", "-1"), "alpha (--alpha, the sparsity loss's weight) must be a number >= 0")
    _refused(_cli(*dipgo, "--lr", "0"), "lr (--lr) must be a number > 0")
    _refused(_cli(*dipgo, "--steps", "1"), "Invalid value for '--steps'", "greater than or equal to 2")
    wf = ("workflow", "zoo:digits-sd", "--out", tmp_path / "w")
    _refused(_cli(*wf, "--stages", ""), "--stages is empty")
    _refused(_cli(*wf, "--stages", "steps:2,"), "has an empty entry")
    _refused(_cli(*wf, "--stages", "steps:2", "--floor", "ssim=30"), "ssim is at most 1")
    _refused(_cli(*wf, "--stages", "steps:2", "--floor", "psnr=20,psnr=30"), "sets psnr twice")
    (tmp_path / "data.csv").write_text("x\n")
    (tmp_path / "empty").mkdir()
    bench = ("bench", "zoo:digits-sd", "--methods", "full")
    _refused(_cli(*bench, "--resolution", "64"), "--resolution sets the size of a --data folder's images")
    _refused(_cli(*bench, "--data", tmp_path / "data.csv"), "is a file; give 'zoo' or a folder of images")
    _refused(_cli(*bench, "--data", tmp_path / "empty"), "holds no images")
    _refused(_cli("distill", "zoo:digits-dit", tmp_path, "--teacher-samples", "5", "--out", tmp_path / "k"),
             "--teacher-samples sets how the teacher samples")
    _refused(_cli("profile", ""), "MODEL is empty")
    _refused(_cli("demo", "--methods", "full,bogus", "--out", tmp_path / "demo"), "unknown bench method 'bogus'")
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full", "--bogus"), "No such option: --bogus",
             "bench --help lists what it takes")
    # --dtype to a trainer: click suggested --data; what it takes instead
    _refused(_cli("finetune", "zoo:digits-sd", "--depth", "3", "--dtype", "bf16"),
             "no option --dtype: finetune trains float32 weights; --mixed-precision fp16|bf16")
    _refused(_cli("dipgo", "zoo:digits-sd", "--ratio", "0.3", "--out", tmp_path / "d.json", "--dtype", "bf16"),
             "no option --dtype: dipgo trains its pruner in float32", "dipgo:@RECIPE")
    assert not (tmp_path / "demo" / "index.html").exists()


def test_mistakes_found_by_the_session_28_sweep_are_one_line_errors(tmp_path, tiny_digits_pipe):
    """Session 28's sweep: nan and inf passed click's ranges (a learning rate of inf trained a model of NaNs, an age
    of nan cleared every entry), a config that is JSON but not an object, a .jsonl input of the wrong type or range
    and a step count above the scheduler's 1000 timesteps ended in tracebacks, and a class label of 1.7 sampled
    class 1 without a word. Each is now one line, exit code 2, before any work."""
    from diffslim.train.data import pipeline_inputs

    _refused(_cli("zoo-train", "digits-dit", "--lr=inf", "--steps", "2", "--out", tmp_path / "z"),
             "--lr: must be a finite number, got inf")
    assert not (tmp_path / "z").exists()
    _refused(_cli("cache", "--clear", "all", "--older-than", "nan"), "--older-than: must be a finite number, got nan")
    for floor in ("psnr=inf", "psnr=nan"):  # inf ran every stage, then failed in the report's figure; nan met nothing
        _refused(_cli("workflow", "zoo:digits-sd", "--stages", "steps:2", "--floor", floor, "--out", tmp_path / "w"),
                 f"floor '{floor}': give a finite number")
    for name, text, kind in (("model_index.json", "[]", "an array"), ("config.json", "null", "null")):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text(text)
        _refused(_cli("profile", folder), f"{folder / name} holds {kind}, not a JSON object")
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full,deepcache:2:99"),  # a plan that skipped nothing
             "deepcache:2:99: this U-Net has 4 levels, so branches B in 0..11")
    for steps in (["--methods", "full,steps:5000"], ["--methods", "full,uniform:1001"]):
        _refused(_cli("bench", "zoo:digits-sd", *steps), "steps, but DDIMScheduler has 1000 training timesteps")
    _refused(_cli("sample", "zoo:digits-sd", "--steps", "1001", "--out", tmp_path / "s"),
             "num_inference_steps: 1001 steps, but DDIMScheduler has 1000 training timesteps", "give at most 1000")
    (tmp_path / "r.json").write_text(json.dumps({"model": "zoo:digits-sd", "sampling": {"num_inference_steps": 5000}}))
    _refused(_cli("sample", "--recipe", tmp_path / "r.json", "--out", tmp_path / "s"),
             "sampling.num_inference_steps: 5000 steps")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    for row, needle in (({"prompt": 5}, "prompt must be text (or a list of texts), got 5"),
                        ({"prompt": "x", "strength": "high"}, 'strength must be a finite number, got "high"'),
                        ({"prompt": "x", "strength": 7}, "strength must lie in (0, 1]"),
                        ({"prompt": "x", "guidance_scale": None}, "guidance_scale must be a finite number, got null"),
                        ({"class_label": 1.7}, "class_label must be an integer in 0..9, the classes "
                                               "ZooClassPipeline has, got 1.7"),
                        ({"class_label": "3"}, 'class_label must be an integer in 0..9, the classes ZooClassPipeline '
                                               'has, got "3"'),
                        ({"class_label": 10}, "class_label must be an integer in 0..9")):
        (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(UserError, match="^" + re.escape(f"{tmp_path / 'in.jsonl'}:1: {needle}")):
            pipeline_inputs(tiny_digits_pipe, str(tmp_path / "in.jsonl"), 0)
    (tmp_path / "in.jsonl").write_text('{"class_label": 3}\n{"prompt": "a", "strength": 0.5, "guidance_scale": 2}\n')
    assert pipeline_inputs(tiny_digits_pipe, str(tmp_path / "in.jsonl"), 0)[0] == {"class_label": 3}


def test_mistakes_found_by_the_session_28_sweep_left_for_session_29(tmp_path):
    """What the session-28 sweep left: sizes a DiT cannot take ended in a torch reshape error; a method written
    twice with its number spelled two ways ran twice; an SSIM threshold below -1 (or a PSNR one below 0) was met by
    every depth; metric weights of the wrong kind (a folder for a file) were skipped with exit code 0 although
    asked for; a pipeline folder with only its model_index.json named a missing weights file."""
    for size, needle in ((["--height", "12"], "--height 12 and --width 8: DiTTransformer2DModel takes square inputs"),
                         (["--height", "9", "--width", "9"], "--height 9: DiTTransformer2DModel takes its input in "
                                                             "patches of 2 px; give a multiple of 2")):
        _refused(_cli("profile", "zoo:digits-dit", *size), needle)
    _refused(_cli("profile", CONFIGS / "pixart-alpha-1024", "--height", "1032"),
             "PixArtTransformer2DModel takes its input in patches of 16 px")
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full,layers:0.30,layers:0.3"),
             "lists 'layers:0.30' twice (as 'layers:0.30' and 'layers:0.3')")
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full,steps:10,deepcache:2,steps:010"), "'steps:10' twice")
    _refused(_cli("depth-search", "zoo:digits-sd", "--metric", "ssim", "--threshold", "-5"), "SSIM lies in [-1, 1]")
    _refused(_cli("depth-search", "zoo:digits-sd", "--threshold", "-1"), "a PSNR of at least 0 dB")
    _refused(_cli("evaluate", "zoo:digits-sd", "--inception", tmp_path), f"--inception {tmp_path} is a folder",
             "weights-inception-2015-12-05-6726825d.pth")
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full", "--lpips", tmp_path), "is a folder")
    _refused(_cli("evaluate", "zoo:digits-sd", "--clip", tmp_path), "give a CLIP model folder (config.json")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None]}))
    _refused(_cli("profile", tmp_path / "p"), "names components with no subfolder here: unet/, vae/")


def test_resume_messages_name_what_the_user_gave(tmp_path):
    """A longer dipgo run is refused naming --anneal's default; zoo-train names the default it ran with, accepts
    that default given explicitly, and says when a longer --steps changes its learning-rate schedule."""
    from diffslim.methods.dipgo import _check_resume

    with pytest.raises(UserError, match=re.escape("anneal=4; this run has anneal=6") + ".*give --anneal 4"):
        _check_resume(tmp_path, json.dumps({"anneal": 4, "ratio": 0.4}), json.dumps({"anneal": 6, "ratio": 0.4}))
    with pytest.raises(UserError) as e:
        _check_resume(tmp_path, json.dumps({"anneal": 4, "ratio": 0.4}), json.dumps({"anneal": 6, "ratio": 0.5}))
    assert "--anneal" not in str(e.value)  # the hint only where the default alone differs
    run = tmp_path / "zt"
    args = ("zoo-train", "digits-dit", "--batch-size", "4", "--checkpoint-every", "2", "--out", run)
    assert _cli(*args, "--steps", "2").exit_code == 0
    res = _cli(*args, "--steps", "3")
    assert res.exit_code == 0, res.output
    assert ("the run was planned for 2 steps, this one for 3: the learning-rate schedule (warm-up, then cosine decay "
            "to --steps) changes from here") in " ".join(res.output.split())
    res = _cli(*args, "--steps", "3")  # the same plan again: nothing to say
    assert res.exit_code == 0 and "planned for" not in res.output
    from diffslim.train.zoo import _run_pipeline_config

    (tmp_path / "sr").mkdir()
    assert _run_pipeline_config(tmp_path / "sr", None, {"blur_sigma": 1.6}) == {}
    assert _run_pipeline_config(tmp_path / "sr", {"blur_sigma": 1.6}, {"blur_sigma": 1.6}) == {}
    with pytest.raises(UserError, match=re.escape("was started with blur_sigma=1.6 (the default); this run has "
                                                  "blur_sigma=0.0")):
        _run_pipeline_config(tmp_path / "sr", {"blur_sigma": 0.0}, {"blur_sigma": 1.6})


def test_timesteps_without_a_model_writes_the_recipe_of_its_schedule(tmp_path):
    from diffslim.methods.timesteps import gamma_timesteps
    from diffslim.recipe import load_recipe

    res = _cli("timesteps", "--steps", "10", "--gamma", "1.5", "--coef", "20", "--out", tmp_path / "g.json")
    assert res.exit_code == 0, res.output
    rec = load_recipe(tmp_path / "g.json")
    assert rec.model is None and rec.sampling.timesteps == gamma_timesteps(10, 1.5, 20)
    assert (rec.sampling.gamma, rec.sampling.coef) == (1.5, 20.0)


def test_version_names_the_versions_a_bug_report_needs():
    from importlib.metadata import version

    import diffusers
    import torch

    res = _cli("--version")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"diffslim {version('diffslim')} (torch {torch.__version__}, diffusers "
                                 f"{diffusers.__version__}, python ")


def test_help_and_tables_keep_whole_names_and_numbers_on_80_columns(monkeypatch):
    """Help lists every option name whole (rich's panels cut them to '--checkpoint-ev…' on 80 columns), and a
    result table too wide for the terminal folds its headers and drops its rules instead of cutting numbers."""
    import io

    from rich.console import Console
    from rich.table import Table

    from diffslim import cli

    r = CliRunner().invoke(cli.app, ["finetune", "--help"], terminal_width=80)
    assert r.exit_code == 0
    assert "--gradient-checkpointing / --no-gradient-checkpointing" in r.output and "--checkpoint-every" in r.output
    assert "…" not in r.output
    buf = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=80, file=buf, soft_wrap=False))
    t = Table(title="bench")
    for c in ("method", "params", "macs_ratio", "speedup", "psnr", "ssim", "digit_accuracy", "fid", "clip_score"):
        t.add_column(c)
    t.add_row("layers:0.3+kd", "3,220,961", "0.9629", "1.183", "55.36", "0.9991", "1", "682.5", "31.07")
    cli._print_table(t)
    lines = buf.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in buf.getvalue()
    row = next(line for line in lines if "layers:0.3+kd" in line)
    assert all(v in row for v in ("3,220,961", "0.9629", "682.5", "31.07"))
