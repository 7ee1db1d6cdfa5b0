"""--out into a folder another command wrote is refused before any work (the two commands' files would mix and some
would be replaced); the same command may write it again, and then leaves none of its earlier run's files behind."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "diffslim" / "configs"


def _cli(*args):
    from diffslim.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


def _refused(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    text = " ".join(res.output.split())
    for needle in needles:
        assert needle in text, (needle, res.output)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sign,owner", [("distill.json", "distill or finetune"), ("workflow.json", "workflow"),
                                        ("compare.json", "layer-compare"), ("grid.png", "sample"),
                                        ("scores.npy", "dipgo")])
def test_a_folder_an_earlier_command_wrote_is_refused_untouched(tmp_path, sign, owner):
    # folders written before the record: the file each command leaves names it
    out = tmp_path / "run"
    (out / "student").mkdir(parents=True)
    (out / sign).write_bytes(b"{}")
    (out / "student" / "config.json").write_text("{}")
    before = _tree(out)
    res = _cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-base", "--out", out)
    _refused(res, f"--out {out} holds the output of `diffslim {owner}` ({sign})", "give another folder")
    assert _tree(out) == before


def test_the_record_names_the_command_and_lets_it_write_again(tmp_path):
    out = tmp_path / "pruned"
    res = _cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-base", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / ".diffslim.json").read_text())["command"] == "layer-prune"
    # another command into it: refused, nothing written
    before = _tree(out)
    _refused(_cli("stock", out / "model", "--out", out), "holds the output of `diffslim layer-prune` (.diffslim.json)")
    _refused(_cli("demo", "--out", out), "`diffslim demo` writes its own files there")
    assert _tree(out) == before
    # the same command again: allowed (reruns and resumes write their own folder)
    res = _cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-small", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "scores.json").read_text())["criterion"] == "bk-sdm-small"


def test_a_model_folder_is_not_written_into(tmp_path):
    model = tmp_path / "sd15"
    model.mkdir()
    (model / "config.json").write_bytes((CONFIGS / "sd15-unet" / "config.json").read_bytes())
    pruned = tmp_path / "pruned"
    assert _cli("layer-prune", model, "--criterion", "bk-sdm-base", "--out", pruned).exit_code == 0
    before = _tree(model)
    _refused(_cli("stock", pruned / "model", "--out", model), "holds a model folder", "(config.json)")
    _refused(_cli("layer-prune", model, "--criterion", "bk-sdm-tiny", "--out", model), "holds a model folder")
    assert _tree(model) == before
    # its own export again: what the earlier export wrote is replaced (a pipeline's parts, where the new one is a
    # lone model), what it did not write stays
    stock = tmp_path / "stock"
    assert _cli("stock", pruned / "model", "--out", stock).exit_code == 0
    (stock / "unet").mkdir()
    (stock / "model_index.json").write_text("{}")
    (stock / "mine.txt").write_text("mine")
    record = json.loads((stock / ".diffslim.json").read_text())
    (stock / ".diffslim.json").write_text(json.dumps({**record, "wrote": ["config.json", "model_index.json",
                                                                          "unet"]}))
    assert _cli("stock", pruned / "model", "--out", stock).exit_code == 0
    assert sorted(p.name for p in stock.iterdir()) == [".diffslim.json", "README.md", "config.json", "mine.txt"]


def test_a_folder_with_other_files_is_written_beside_them_and_nothing_removed(tmp_path):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("mine")
    (out / "notes.txt").write_text("mine")
    res = _cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-base", "--out", out)
    assert res.exit_code == 0, res.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "model" / "notes.txt").read_text() == "mine"
    assert (out / "model" / "config.json").is_file()


def test_a_layer_prune_rerun_leaves_no_stale_pipeline_or_weights(tmp_path, tiny_digits_folder):
    out = tmp_path / "pruned"
    res = _cli("layer-prune", tiny_digits_folder, "--criterion", "random", "--ratio", "0.3", "--out", out)
    assert res.exit_code == 0, res.output
    assert (out / "pipeline" / "model_index.json").is_file()
    assert list((out / "model").glob("*.safetensors"))
    # the same folder again for a config-only model: no weights of the earlier model beside the new config
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_bytes((Path(tiny_digits_folder) / "denoiser" / "config.json").read_bytes())
    res = _cli("layer-prune", cfg, "--criterion", "random", "--ratio", "0.5", "--out", out)
    assert res.exit_code == 0, res.output
    assert not (out / "pipeline").exists() and not list((out / "model").glob("*.safetensors"))
    assert sorted(p.name for p in (out / "model").iterdir()) == ["README.md", "config.json"]  # and its card


def test_a_sample_rerun_with_fewer_samples_leaves_none_of_the_earlier(tmp_path):
    out = tmp_path / "s"
    assert _cli("sample", "zoo:digits-dit", "--n", "3", "--steps", "2", "--out", out).exit_code == 0
    (out / "mine.png").write_bytes(b"x")  # not a sample: kept
    assert _cli("sample", "zoo:digits-dit", "--n", "2", "--steps", "2", "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [".diffslim.json", "0000.png", "0001.png", "grid.png", "mine.png"]


def test_a_stock_rerun_removes_only_what_stock_wrote(tmp_path, monkeypatch):
    # --out . in a project folder: the user's files stay through any number of exports
    pruned = tmp_path / "lp"
    assert _cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-base", "--out", pruned).exit_code == 0
    project = tmp_path / "project"
    (project / "wf").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (project / "wf" / "workflow.json").write_text("{}")
    monkeypatch.chdir(project)
    for _ in range(2):
        res = _cli("stock", pruned / "model", "--out", ".")
        assert res.exit_code == 0, res.output
    assert (project / "notes.txt").read_text() == "mine" and (project / "wf" / "workflow.json").is_file()
    assert json.loads((project / ".diffslim.json").read_text())["wrote"] == ["README.md", "config.json"]


def test_an_out_that_holds_the_model_is_refused(tmp_path):
    out = tmp_path / "lp"
    assert _cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-base", "--out", out).exit_code == 0
    before = _tree(out)
    _refused(_cli("layer-prune", out / "model", "--criterion", "bk-sdm-small", "--out", out),
             f"MODEL {out / 'model'} lies inside --out {out} (model, which this command rewrites)")
    assert _tree(out) == before
    # a model elsewhere in the folder is no input it rewrites: `stock lp/model --out .` in a project folder
    project = tmp_path / "project"
    project.mkdir()
    import shutil

    shutil.copytree(out / "model", project / "lp")
    res = _cli("stock", project / "lp", "--out", project)
    assert res.exit_code == 0, res.output
    res = _cli("stock", project / "lp", "--out", project)  # again: it removes only its own config.json
    assert res.exit_code == 0 and (project / "lp" / "config.json").is_file(), res.output
    _refused(_cli("stock", project / "lp", "--out", project / "lp"), "holds a model folder")


def test_a_command_that_fails_before_writing_leaves_no_claim(tmp_path):
    out = tmp_path / "wf"
    _refused(_cli("workflow", "zoo:digits-dit", "--stages", "deepcache:2", "--n", "2", "--out", out))
    assert not out.exists()
    out.mkdir()
    _refused(_cli("workflow", "zoo:digits-dit", "--stages", "deepcache:2", "--n", "2", "--out", out))
    assert list(out.iterdir()) == []
    assert _cli("sample", "zoo:digits-dit", "--n", "1", "--steps", "2", "--out", out).exit_code == 0


def test_a_recipe_file_of_another_commands_folder_is_not_replaced(tmp_path):
    out = tmp_path / "lp"
    assert _cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-base", "--out", out).exit_code == 0
    before = _tree(out)
    _refused(_cli("timesteps", "--steps", "5", "--gamma", "2", "--out", out / "recipe.json"),
             f"--out {out / 'recipe.json'} is a file of `diffslim layer-prune`'s output")
    assert _tree(out) == before
    res = _cli("timesteps", "--steps", "5", "--gamma", "2", "--out", out / "mine.json")  # a new file beside them: allowed
    assert res.exit_code == 0, res.output


def test_an_applications_config_json_is_not_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text('{"name": "my app"}')
    res = _cli("sample", "zoo:digits-dit", "--n", "1", "--steps", "2", "--out", tmp_path)
    assert res.exit_code == 0, res.output


def test_a_training_run_past_the_steps_asked_for_is_refused(tmp_path):
    run = tmp_path / "zt"
    args = ("zoo-train", "digits-dit", "--batch-size", "4", "--checkpoint-every", "2", "--out", run)
    assert _cli(*args, "--steps", "4").exit_code == 0
    before = _tree(run / "digits-dit" / "pipeline")
    _refused(_cli(*args, "--steps", "2"), "holds a run trained to step 4, past --steps 2: give --steps 4 or more")
    assert _tree(run / "digits-dit" / "pipeline") == before


def test_a_report_rewritten_with_fewer_figures_leaves_none_of_the_old(tmp_path):
    from PIL import Image

    from diffslim.report import Report

    img = Image.new("L", (4, 4))
    rep = Report("a")
    for name in ("a.png", "b b.png"):
        rep.add_figure(name, name, img)
    rep.write(tmp_path)
    (tmp_path / "mine.png").write_bytes(b"x")
    rep = Report("b")
    rep.add_figure("a", "a.png", img)
    rep.write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "index.html", "mine.png", "report.json"]


def test_an_interrupted_workflow_rerun_leaves_no_recipe_of_the_earlier_run(tmp_path, monkeypatch):
    """A rerun with another model replaces the earlier run's stage folder: the earlier recipe, which loads that
    folder, is removed before, so a run stopped there leaves no recipe that loads this run's model."""
    out = tmp_path / "wf"
    res = _cli("workflow", "zoo:digits-sd", "--stages", "layers:0.3:random,steps:3", "--n", "2", "--steps", "4",
               "--out", out)
    assert res.exit_code == 0, res.output
    assert (out / "recipe.json").is_file()
    from diffslim import workflow

    real = workflow._model_stage

    def stopped(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "_model_stage", stopped)
    res = _cli("workflow", "zoo:digits-dit", "--stages", "layers:0.3:random,steps:3", "--n", "2", "--steps", "4",
               "--out", out)
    assert res.exit_code == 130
    assert not (out / "recipe.json").exists() and not (out / "workflow.json").exists()
    assert not (out / "index.html").exists()


@pytest.mark.parametrize("args", [("profile", "zoo:digits-sd", "--pipeline", "--n", "2"),
                                  ("demo", "--out", "x"),
                                  ("stock", "zoo:digits-sd", "--out", "x")])
def test_commands_of_one_process_refuse_a_multi_process_launch(tmp_path, monkeypatch, args):
    """Under `accelerate launch` every process ran all of `profile`, `demo`, ... and wrote the same files.
    Refused, said once (by the first process)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    _refused(_cli(*args), f"`diffslim {args[0]}` runs in one process; started on 2", "run it without the launcher",
             "sample, evaluate, bench, workflow, depth-search, timesteps, layer-prune, layer-compare, distill, "
             "finetune, dipgo, zoo-train)")
    monkeypatch.setenv("RANK", "1")
    res = _cli(*args)
    assert res.exit_code == 2 and res.output == ""
    assert list(tmp_path.iterdir()) == []


def test_a_mistake_under_a_launch_is_said_once_and_scoring_shows_one_bar(tmp_path, monkeypatch):
    """Under a launch every process checks the options alike, and every process printed the same error (the others
    as "error (process 1): ..."); every process also drew its own progress bar of the layer scoring on one line.
    The first says the error and shows the bar; the others are quiet until they work (then an error may be theirs
    alone, and they say it)."""
    from diffslim.methods.layer_prune import _Bar

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    _refused(_cli("bench", "zoo:digits-sd", "--methods", "full,layers:abc"), "the ratio R must be a number")
    bar = _Bar(True, 3, "scores")
    assert bar.bar is not None
    bar.close()
    monkeypatch.setenv("RANK", "1")
    res = _cli("bench", "zoo:digits-sd", "--methods", "full,layers:abc")
    assert res.exit_code == 2 and res.output == ""
    assert _Bar(True, 3, "scores").bar is None


def test_bench_and_workflow_sample_on_each_process_gpu_under_a_launch_unless_told(monkeypatch):
    """bench and workflow sample on the CPU unless told (their timings compare methods there); under a launch that
    default left a GPU machine's GPUs idle and every process sampled on the CPU: there it is `auto`, each process's
    own GPU (the CPU on a machine without one). A --device given is kept."""
    from diffslim.cli import _sampling_device

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (_sampling_device(None), _sampling_device("cuda:1")) == ("cpu", "cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (_sampling_device(None), _sampling_device("cpu")) == ("auto", "cpu")


def test_zoo_training_of_the_classifier_refuses_a_multi_process_launch(tmp_path, monkeypatch):
    """zoo-train runs data parallel under a launch, but the digit classifier's fit is one process's (every process
    would write the package's classifier weights at once)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    _refused(_cli("zoo-train", "classifier", "--out", tmp_path / "z"), "`diffslim zoo-train classifier` fits in one "
             "process", "run it without the launcher")


def test_shared_files_are_one_copy_on_disk_and_a_copy_where_links_fail(tmp_path, monkeypatch):
    import os

    from diffslim import outputs

    src, dst = tmp_path / "pipeline" / "unet", tmp_path / "model"
    src.mkdir(parents=True)
    (src / "w.safetensors").write_bytes(b"weights" * 100)
    (src / "config.json").write_text("{}")
    assert outputs.share_files(src, dst) == 702
    assert all(os.path.samefile(src / n, dst / n) for n in ("w.safetensors", "config.json"))
    assert outputs.share_files(src, dst) == 0  # already one file
    # removing one folder (a rerun's cleanup) leaves the other whole
    outputs.remove_previous(tmp_path, ["model"])
    assert (src / "w.safetensors").read_bytes() == b"weights" * 100
    # only over identical bytes: a file that differs stays as it was
    (dst).mkdir()
    (dst / "w.safetensors").write_bytes(b"weights" * 100)
    (dst / "config.json").write_text('{"other": 1}')
    assert outputs.share_files(src, dst, only_identical=True) == 700
    assert os.path.samefile(src / "w.safetensors", dst / "w.safetensors")
    assert (dst / "config.json").read_text() == '{"other": 1}' and not os.path.samefile(src / "config.json",
                                                                                        dst / "config.json")

    def no_links(a, b):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    other = tmp_path / "other"
    assert outputs.share_files(src, other) == 0
    assert _tree(other) == _tree(src) and not os.path.samefile(src / "w.safetensors", other / "w.safetensors")
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "w.safetensors"]  # no temporary left
    # only over identical bytes and no links: nothing to gain from a copy, the file is left as it was
    (dst / "config.json").unlink()
    (dst / "config.json").write_text("{}")
    ino = (dst / "config.json").stat().st_ino
    assert outputs.share_files(src, dst, only_identical=True) == 0 and (dst / "config.json").stat().st_ino == ino
