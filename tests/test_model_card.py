"""Model cards (README.md) in the folders diffslim exports: metadata the Hub reads, true sizes, a history that
follows the folder from export to export, and loading code that runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from diffslim import cli
from diffslim.models.load import load
from diffslim.report.card import PLACEHOLDER, earlier, hub_id

runner = CliRunner()


def _run(monkeypatch, *args):
    """The CLI as `diffslim ARGS` runs it: main() records the command line that the cards quote."""
    monkeypatch.setattr(cli, "_ARGV", [str(a) for a in args])
    res = runner.invoke(cli.app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _size_row(card_text: str) -> tuple[str, str]:
    """(original, this model) of the card's parameter row, as written."""
    found = re.search(r"^\| parameters \(denoiser\) \| ([\d,]*) \| ([\d,]+) \|", card_text, flags=re.M)
    assert found, card_text
    return found.group(1), found.group(2)


def _code(card_text: str, folder: Path) -> str:
    """The card's loading code, pointed at ``folder``."""
    code = re.search(r"## How to load\n\n```python\n(.*?)```", card_text, flags=re.S).group(1)
    assert PLACEHOLDER in code
    return code.replace(PLACEHOLDER, str(folder))


def _run_fresh(script: str) -> list[str]:
    """Run ``script`` in a new interpreter (nothing imported yet) and return its printed lines."""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_hub_ids_only_where_no_local_folder_has_the_name(tmp_path, monkeypatch):
    assert hub_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert hub_id("zoo:digits-sd") is None and hub_id("./sd15") is None and hub_id("/models/sd15") is None
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id("models/sd15") is None  # a folder here, not the Hub's


def test_layer_prune_distill_stock_cards_carry_the_history_and_their_code_loads(tmp_path, monkeypatch):
    pruned, distilled, stock = tmp_path / "pruned", tmp_path / "distilled", tmp_path / "stock"
    _run(monkeypatch, "layer-prune", "zoo:digits-dit", "--ratio", "0.5", "--out", pruned, "--json")
    _run(monkeypatch, "distill", "zoo:digits-dit", pruned / "model", "--steps", "2", "--batch-size", "2",
         "--checkpoint-every", "2", "--out", distilled)
    _run(monkeypatch, "stock", distilled / "pipeline", "--out", stock)
    full = _params(load("zoo:digits-dit").denoiser)
    removed = json.loads((pruned / "scores.json").read_text())["removed"]
    cards = {name: folder / "README.md" for name, folder in (
        ("model", pruned / "model"), ("pipeline", pruned / "pipeline"), ("student", distilled / "student"),
        ("student pipeline", distilled / "pipeline"), ("stock", stock))}
    for name, path in cards.items():
        card = ModelCard.load(path)
        assert card.data.library_name == "diffusers" and "diffslim" in card.data.tags, name
        assert card.data.base_model is None  # zoo:digits-dit is no Hub id
        text = path.read_text()
        assert text.count(f"Made from `zoo:digits-dit`") == 1, name
        assert _size_row(text)[0] == f"{full:,}", name  # the original's size, carried through every export
        for layer in removed:
            assert f"`{layer}`" in text, (name, layer)
    pruned_params = _params(load(str(pruned / "model")).denoiser)
    assert _size_row(cards["model"].read_text())[1] == f"{pruned_params:,}"
    assert _size_row(cards["stock"].read_text())[1] == f"{_params(load(str(stock)).denoiser):,}" == f"{pruned_params:,}"
    # the history: each export's card names every step before it, in order, with the commands that made them
    h = earlier(stock)
    assert [d.split(" ", 1)[0] for d in h.done] == ["Layer", "Removed:", "Distilled", "Rewritten"]
    assert "normalized" in h.done[2] and "2 steps" in h.done[2]
    assert h.commands == [f"diffslim layer-prune zoo:digits-dit --ratio 0.5 --out {pruned} --json",
                          f"diffslim distill zoo:digits-dit {pruned / 'model'} --steps 2 --batch-size 2 "
                          f"--checkpoint-every 2 --out {distilled}",
                          f"diffslim stock {distilled / 'pipeline'} --out {stock}"]
    assert earlier(distilled / "student").commands == h.commands[:2]
    # the loading code of each card, run as written in a fresh interpreter, loads that folder's model
    script = "\n".join(
        textwrap.dedent(f"""
        ns = {{}}
        exec({_code(p.read_text(), p.parent)!r}, ns)
        m = ns["pipe"].denoiser if "pipe" in ns else ns["model"]
        print(type(m).__name__, sum(p.numel() for p in m.parameters()))""") for p in cards.values())
    got = _run_fresh(script)
    classes, counts = got[0::2], [int(c) for c in got[1::2]]
    assert classes == ["LayerPrunedDiTTransformer2DModel"] * 4 + ["DiTTransformer2DModel"]
    assert counts == [pruned_params] * 5


def test_a_stock_sd_pipeline_card_loads_with_diffusers_alone(tiny_sd_pipe, tmp_path, monkeypatch):
    src = tmp_path / "sd"
    tiny_sd_pipe.save_pretrained(str(src), safe_serialization=True)
    for out, stock in (("stock", ["--stock"]), ("pruned", [])):
        _run(monkeypatch, "layer-prune", src, "--ratio", "0.3", "--criterion", "magnitude", *stock,
             "--out", tmp_path / out)
    stock_card = (tmp_path / "stock" / "pipeline" / "README.md").read_text()
    pruned_card = (tmp_path / "pruned" / "pipeline" / "README.md").read_text()
    assert ModelCard.load(tmp_path / "stock" / "pipeline" / "README.md").data.pipeline_tag == "text-to-image"
    assert "import diffslim" not in stock_card and "import diffslim" in pruned_card
    title = next(line for line in stock_card.splitlines() if line.startswith("# "))
    assert title.startswith("# sd, layer-pruned")  # a local folder by its name
    script = textwrap.dedent(f"""
        import sys
        ns = {{}}
        exec({_code(stock_card, tmp_path / "stock" / "pipeline")!r}, ns)
        print(type(ns["pipe"].unet).__name__, "diffslim" in sys.modules)
        exec({_code(pruned_card, tmp_path / "pruned" / "pipeline")!r}, ns)
        print(type(ns["pipe"].unet).__name__)""")
    assert _run_fresh(script) == ["UNet2DConditionModel", "False", "LayerPrunedUNet2DConditionModel"]


def test_a_users_readme_is_kept_and_a_rerun_replaces_its_own_card(tmp_path, monkeypatch):
    pruned, stock = tmp_path / "pruned", tmp_path / "stock"
    _run(monkeypatch, "layer-prune", "zoo:digits-dit", "--ratio", "0.3", "--out", pruned)
    first = (pruned / "model" / "README.md").read_text()
    _run(monkeypatch, "layer-prune", "zoo:digits-dit", "--ratio", "0.5", "--out", pruned)
    second = (pruned / "model" / "README.md").read_text()
    assert "ratio of 0.3" in first and "ratio of 0.5" in second and "ratio of 0.3" not in second
    stock.mkdir()
    (stock / "README.md").write_text("my notes\n")
    res = _run(monkeypatch, "stock", pruned / "pipeline", "--out", stock)
    assert (stock / "README.md").read_text() == "my notes\n"
    assert "not a diffslim model card: kept it" in res.output
    assert (stock / "model_index.json").is_file()


def test_workflow_card_has_every_row_and_its_recipe_code_loads_the_result(tmp_path, monkeypatch):
    out = tmp_path / "w"
    _run(monkeypatch, "workflow", "zoo:digits-dit", "--stages", "layers:0.3,steps:6", "--n", "2", "--out", out)
    text = (out / "README.md").read_text()
    rows = json.loads((out / "workflow.json").read_text())["rows"]
    table = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and " | yes |" in line + " |"]
    assert [r[0].lstrip("| ") for r in table] == [r["stage"] for r in rows] == ["original", "layers:0.3", "steps:6"]
    assert [r[1] for r in table] == [f"{r['params']:,}" for r in rows]
    assert "of the MACs)" in text.splitlines()[text.splitlines().index("---", 1) + 2]
    figures = re.findall(r"^!\[[^]]*\]\(([^)]+)\)$", text, flags=re.M)  # the samples grid and the trade-off
    assert len(figures) == 2 and figures[0].startswith("workflow_grid_") and all((out / f).is_file() for f in figures)
    ns = {}
    exec(_code(text, out), ns)
    pipe = ns["pipe"]
    assert _params(pipe.denoiser) == rows[-1]["params"]
    assert pipe._diffslim_recipe.sampling.num_inference_steps == 6


def test_config_only_exports_say_how_to_build_them(tmp_path, monkeypatch):
    cfg = tmp_path / "dit"
    load("zoo:digits-dit").denoiser.save_config(str(cfg))  # a config.json without weights
    for out, stock in (("stock", ["--stock"]), ("pruned", [])):
        _run(monkeypatch, "layer-prune", cfg, "--criterion", "random", "--ratio", "0.3", *stock, "--out", tmp_path / out)
    stock_card = (tmp_path / "stock" / "model" / "README.md").read_text()
    pruned_card = (tmp_path / "pruned" / "model" / "README.md").read_text()
    assert "from_config" in stock_card and "meta device" in pruned_card
    script = textwrap.dedent(f"""
        import sys
        ns = {{}}
        exec({_code(stock_card, tmp_path / "stock" / "model")!r}, ns)
        print(type(ns["model"]).__name__, sum(p.numel() for p in ns["model"].parameters()), "diffslim" in sys.modules)
        exec({_code(pruned_card, tmp_path / "pruned" / "model")!r}, ns)
        print(type(ns["model"]).__name__, sum(p.numel() for p in ns["model"].parameters()))""")
    counts = [_params(load(str(tmp_path / out / "model")).denoiser) for out in ("stock", "pruned")]
    assert _run_fresh(script) == ["DiTTransformer2DModel", str(counts[0]), "False",
                                  "LayerPrunedDiTTransformer2DModel", str(counts[1])]
    assert _size_row(stock_card)[1] == f"{counts[0]:,}"


def _cache_copy(repo: str, folder: Path) -> Path:
    """Put ``folder`` in the (test's own) Hugging Face cache as the ``main`` revision of ``repo``, laid out as
    ``from_pretrained`` leaves a download."""
    import shutil

    import huggingface_hub.constants

    entry = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(sha)
    shutil.copytree(folder, entry / "snapshots" / sha)
    return entry / "snapshots" / sha


def test_a_hub_id_in_the_local_hf_cache_loads_and_its_card_names_it(tiny_sd_pipe, tmp_path, monkeypatch):
    from diffslim.models.load import ModelLoadError

    tiny_sd_pipe.save_pretrained(str(tmp_path / "sd"), safe_serialization=True)
    _cache_copy("someone/tiny-sd", tmp_path / "sd")
    loaded = load("someone/tiny-sd")  # read from the snapshot, named by its id (recipes, cards, cache keys)
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline" and loaded.source == "someone/tiny-sd"
    assert _params(loaded.denoiser) == _params(tiny_sd_pipe.unet)
    from diffslim.sample import model_fingerprint

    assert model_fingerprint("someone/tiny-sd") != model_fingerprint("someone/other")  # the snapshot's files count
    unet = load("someone/tiny-sd/unet")  # a component's subfolder, as from_pretrained(..., subfolder="unet")
    assert unet.pipe is None and _params(unet.denoiser) == _params(tiny_sd_pipe.unet)
    with pytest.raises(ModelLoadError, match="the local Hugging Face cache has no copy of it"):
        load("someone/other")
    with pytest.raises(ModelLoadError, match="is in the local Hugging Face cache, but its copy has no subfolder nope"):
        load("someone/tiny-sd/nope")
    _cache_copy("someone/dit", tmp_path / "sd" / "unet")
    with pytest.raises(ModelLoadError, match="no such file or folder"):  # no way out of the snapshot
        load("someone/tiny-sd/../../models--someone--dit/snapshots/0123456789abcdef0123456789abcdef01234567")
    out = tmp_path / "pruned"
    _run(monkeypatch, "layer-prune", "someone/tiny-sd", "--ratio", "0.3", "--criterion", "magnitude", "--out", out)
    card = ModelCard.load(out / "pipeline" / "README.md")
    assert card.data.base_model == "someone/tiny-sd" and card.text.startswith("\n# someone/tiny-sd, layer-pruned")
    _run(monkeypatch, "layer-prune", "someone/tiny-sd/unet", "--ratio", "0.3", "--criterion", "magnitude", "--out",
         tmp_path / "unet")
    card = ModelCard.load(tmp_path / "unet" / "model" / "README.md")
    assert card.data.base_model == "someone/tiny-sd" and card.text.startswith("\n# someone/tiny-sd/unet, layer")
    # a workflow of a schedule alone names the Hub id in its recipe: `sample --recipe` loads it from the cache
    _run(monkeypatch, "workflow", "someone/tiny-sd", "--stages", "steps:2", "--n", "2", "--steps", "3",
         "--out", tmp_path / "wf")
    assert json.loads((tmp_path / "wf" / "recipe.json").read_text())["model"] == "someone/tiny-sd"
    res = _run(monkeypatch, "sample", "--recipe", tmp_path / "wf" / "recipe.json", "--n", "1", "--out", tmp_path / "s")
    assert "warning" not in res.output and (tmp_path / "s" / "0000.png").is_file()
    res = _run(monkeypatch, "sample", "someone/tiny-sd", "--recipe", tmp_path / "wf" / "recipe.json", "--n", "1",
               "--out", tmp_path / "s2")
    assert "warning" not in res.output  # the id is the model the recipe names


def test_workflow_stages_and_reexports_keep_the_story_and_a_relative_model_stays_loadable(tiny_digits_folder,
                                                                                           tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    import shutil

    shutil.copytree(tiny_digits_folder, work / "digits")
    monkeypatch.chdir(work)
    # a schedule-only workflow of a MODEL given relative to the working directory: its recipe names the folder so
    # that the card's code loads it from anywhere
    _run(monkeypatch, "workflow", "digits", "--stages", "steps:2", "--n", "2", "--steps", "3", "--out", "wf")
    recipe = json.loads((work / "wf" / "recipe.json").read_text())
    assert recipe["model"] == str(work / "digits")
    card = (work / "wf" / "README.md").read_text()
    assert "pruned" not in ModelCard.load(work / "wf" / "README.md").data.tags  # a schedule prunes nothing
    assert "diffslim evaluate --recipe wf/recipe.json --n 2 --steps 3" in card  # the command the CLI prints
    assert f"its recipe loads `{work / 'digits'}`, which lies outside it" in card
    assert re.search(r"^\| original \| [\d,]+ \| 1\.000 \| 1\.00x \| ref \| ref \|", card, flags=re.M)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(_code(card, work / "wf"), ns)
    assert ns["pipe"]._diffslim_recipe.sampling.num_inference_steps == 2
    # a layer-pruned model pruned again, then a workflow stage of it, then its stock export: one story throughout
    monkeypatch.chdir(work)
    _run(monkeypatch, "layer-prune", "digits", "--ratio", "0.2", "--criterion", "magnitude", "--out", "lp")
    _run(monkeypatch, "layer-prune", "lp/pipeline", "--ratio", "0.2", "--criterion", "magnitude", "--out", "lp2")
    h = earlier(work / "lp2" / "pipeline")
    assert h.base == "digits" and len(h.commands) == 2 and [d.split(" ")[0] for d in h.done] == \
        ["Layer", "Removed:", "Layer", "Removed:"]
    full = _params(load("digits").denoiser)
    assert h.params == full and h.macs[0] == earlier(work / "lp" / "pipeline").macs[0]  # the original's, carried
    _run(monkeypatch, "workflow", "lp2/pipeline", "--stages", "layers:0.2:magnitude", "--n", "2", "--steps", "3",
         "--out", "wf2")
    stage = Path(json.loads((work / "wf2" / "recipe.json").read_text())["model"])
    stage = stage if stage.is_absolute() else work / "wf2" / stage
    h = earlier(stage)
    assert h.base == "digits" and h.params == full and h.done[-2].startswith("Workflow stage `layers:0.2:magnitude`")
    assert h.done[-1].startswith("Removed: `") and h.commands[-1].startswith("diffslim workflow lp2/pipeline")
    assert earlier(work / "wf2").base == "digits"
    res = runner.invoke(cli.app, ["stock", "wf2", "--out", "st"])  # the workflow's folder: it names the stage
    assert res.exit_code == 2 and f"give the model its recipe.json names, {stage.relative_to(work)}" in " ".join(res.output.split())
    res = runner.invoke(cli.app, ["stock", "lp", "--out", "st"])  # layer-prune's folder: its models are inside
    assert res.exit_code == 2 and "lp is an output folder, not a model: give the model in it, lp/pipeline or lp/model" \
        in " ".join(res.output.split())
    # the stage's denoiser distilled from the original: a pipeline's component takes its pipeline's card
    _run(monkeypatch, "distill", "digits", stage / "denoiser", "--steps", "2", "--batch-size", "2", "--data",
         "zoo", "--out", "ds")
    h = earlier(work / "ds" / "student")
    assert h.base == "digits" and h.params == full and len(h.commands) == 4  # layer-prune x2, workflow, distill
    assert _size_row((work / "ds" / "student" / "README.md").read_text())[1] == \
        f"{_params(load('ds/student').denoiser):,}"


def test_bk_sdm_cards_name_bk_sdm_and_macs_counted_on_the_pipeline_call_say_so(tmp_path, monkeypatch):
    from diffslim.methods.layer_prune import candidate_names

    cfg = Path(cli.__file__).parent / "configs" / "sd15-unet"
    _run(monkeypatch, "layer-prune", cfg, "--criterion", "bk-sdm-small", "--out", tmp_path / "bk")
    card = (tmp_path / "bk" / "model" / "README.md").read_text()
    removed = json.loads((tmp_path / "bk" / "scores.json").read_text())["removed"]
    total = len(candidate_names(load(str(cfg)).denoiser))
    assert f"BK-SDM's Small removal (Kim et al., 2023), by the same removal machinery: the {len(removed)} of " \
           f"{total} layers it names (a config without weights)" in card and len(removed) < total
    tags = ModelCard.load(tmp_path / "bk" / "model" / "README.md").data.tags
    assert "bk-sdm" in tags and "laptop-diff" not in tags and "Retraining" not in card  # nothing to distil
    _run(monkeypatch, "stock", tmp_path / "bk" / "model", "--out", tmp_path / "st")  # its stock rewrite says the same
    card = (tmp_path / "st" / "README.md").read_text()
    tags = ModelCard.load(tmp_path / "st" / "README.md").data.tags
    assert "bk-sdm" in tags and "laptop-diff" not in tags and card.count("Removed: ") == 1
    # --by macs on a pipeline: the MACs of the call it makes (classifier-free guidance doubles the batch)
    _run(monkeypatch, "layer-prune", "zoo:digits-dit", "--ratio", "0.3", "--by", "macs", "--criterion", "magnitude",
         "--out", tmp_path / "m")
    card = (tmp_path / "m" / "model" / "README.md").read_text()
    assert "| MACs per denoiser call as the pipeline makes it (its guidance batch included) |" in card
