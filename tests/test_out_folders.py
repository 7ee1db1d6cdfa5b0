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
    # its own export again: replaced as a whole
    stock = tmp_path / "stock"
    assert _cli("stock", pruned / "model", "--out", stock).exit_code == 0
    (stock / "stale.safetensors").write_bytes(b"x")
    assert _cli("stock", pruned / "model", "--out", stock).exit_code == 0
    assert not (stock / "stale.safetensors").exists() and (stock / "config.json").is_file()


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
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json"]


def test_a_sample_rerun_with_fewer_samples_leaves_none_of_the_earlier(tmp_path):
    out = tmp_path / "s"
    assert _cli("sample", "zoo:digits-dit", "--n", "3", "--steps", "2", "--out", out).exit_code == 0
    (out / "mine.png").write_bytes(b"x")  # not a sample: kept
    assert _cli("sample", "zoo:digits-dit", "--n", "2", "--steps", "2", "--out", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [".diffslim.json", "0000.png", "0001.png", "grid.png", "mine.png"]
