"""Stock export: a layer-pruned model rewritten as its plain diffusers class (``stock_model``, ``diffslim stock``,
``layer-prune --stock``): same weights, same outputs, a config that counts the kept blocks, loadable without diffslim."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffslim.errors import UserError
from diffslim.methods import layer_prune as lp
from diffslim.models.load import load

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "diffslim" / "configs"


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _tiny_models():
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=3,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1).eval()
    dit_in = dict(hidden_states=torch.randn(2, 1, 8, 8, generator=g), timestep=torch.tensor([10, 700]),
                  class_labels=torch.tensor([3, 7]))
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=3, sample_size=8, patch_size=2, cross_attention_dim=16,
                                      caption_channels=16, norm_num_groups=None).eval()
    pixart_in = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([300]),
                     encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    # SD3.5-style: the first two blocks also run a second image self-attention
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                dual_attention_layers=(0, 1)).eval()
    sd3_in = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g))
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    flux_in = dict(hidden_states=torch.randn(1, 16, 16, generator=g), timestep=torch.tensor([0.5]),
                   encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                   pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(16, 3),
                   txt_ids=torch.zeros(5, 3))
    return {"dit": (dit, dit_in), "pixart": (pixart, pixart_in), "sd3": (sd3, sd3_in), "flux": (flux, flux_in)}


def _tiny_unet():
    """A U-Net with 1, 2 and 3 transformer blocks per attention layer in its three levels (SDXL's shape)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).eval()
    g = torch.Generator().manual_seed(1)
    return unet, (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]), torch.randn(1, 3, 16, generator=g))


CASES = {  # model: (removed blocks, the stock config's counts)
    "dit": (["transformer_blocks.1"], {"num_layers": 2}),
    "pixart": (["transformer_blocks.0", "transformer_blocks.2"], {"num_layers": 1}),
    "sd3": (["transformer_blocks.0"], {"num_layers": 2, "dual_attention_layers": [0]}),
    "flux": (["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.2"],
             {"num_layers": 1, "num_single_layers": 1}),
}


def test_transformer_denoisers_export_as_stock_bit_for_bit(tmp_path):
    """DiT, PixArt, SD3 (with SD3.5's dual-attention layers renumbered) and Flux (both block lists): the stock
    class, a config that counts the kept blocks, the same weights (shared) and the same outputs bit for bit."""
    for key, (model, kw) in _tiny_models().items():
        names, counts = CASES[key]
        pruned = lp.prune_layers(model, names)
        stock = lp.stock_model(pruned)
        assert type(stock) is type(model), key
        assert {k: stock.config[k] for k in counts} == counts and "removed_layers" not in stock.config, key
        assert _params(stock) == _params(pruned) < _params(model)
        shared = {p.data_ptr() for p in pruned.parameters()}
        assert all(p.data_ptr() in shared for p in stock.parameters()), key  # no copy
        with torch.no_grad():
            want = pruned(**kw).sample
            assert torch.equal(stock(**kw).sample, want), key
            assert not torch.equal(want, model(**kw).sample), key
        stock.save_pretrained(str(tmp_path / key), safe_serialization=True)
        assert json.loads((tmp_path / key / "config.json").read_text())["_class_name"] == type(model).__name__
        back = type(model).from_pretrained(str(tmp_path / key))
        for (k, a), b in zip(stock.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), (key, k)


def test_nothing_removed_gives_the_stock_class_with_the_same_outputs():
    model, kw = _tiny_models()["dit"]
    for m in (model, lp.prune_layers(model, [])):
        stock = lp.stock_model(m)
        assert type(stock) is type(model) and stock.config.num_layers == 3
        with torch.no_grad():
            assert torch.equal(stock(**kw).sample, model(**kw).sample)


def test_unet_pruned_inside_its_attention_layers_exports_per_attention_depths():
    unet, args = _tiny_unet()
    names = ["down_blocks.1.attentions.0.transformer_blocks.1", "up_blocks.0.attentions.2.transformer_blocks.0",
             "up_blocks.0.attentions.2.transformer_blocks.2"]
    pruned = lp.prune_layers(unet, names)
    stock = lp.stock_model(pruned)
    assert type(stock) is type(unet)
    assert [list(x) for x in stock.config.transformer_layers_per_block] == [[1, 1], [1, 2], [3, 3]]
    assert [list(x) for x in stock.config.reverse_transformer_layers_per_block] == [[3, 3, 1], [2, 2, 2], [1, 1, 1]]
    assert _params(stock) == _params(pruned) < _params(unet)
    with torch.no_grad():
        assert torch.equal(stock(*args).sample, pruned(*args).sample)
    # the mid block reads its depth from the last down block's entry: both must agree
    both = lp.prune_layers(unet, ["down_blocks.2.attentions.0.transformer_blocks.1",
                                  "mid_block.attentions.0.transformer_blocks.0"])
    stock = lp.stock_model(both)
    assert [list(x) for x in stock.config.transformer_layers_per_block][-1] == [2, 3]
    with torch.no_grad():
        assert torch.equal(stock(*args).sample, both(*args).sample)
    with pytest.raises(UserError, match="the mid block keeps \\[2\\] .* and the last down block \\[3, 3\\]"):
        lp.stock_model(lp.prune_layers(unet, ["mid_block.attentions.0.transformer_blocks.1"]))


def test_real_configs_on_the_meta_device():
    """SDXL pruned inside its deep attention layers, DiT-XL/2 and PixArt without some blocks: config only."""
    sdxl = load(str(CONFIGS / "sdxl-unet")).denoiser
    pruned = lp.prune_layers(sdxl, ["down_blocks.2.attentions.0.transformer_blocks.9",
                                    "mid_block.attentions.0.transformer_blocks.9",
                                    "up_blocks.0.attentions.1.transformer_blocks.3"])
    stock = lp.stock_model(pruned)
    assert type(stock).__name__ == "UNet2DConditionModel" and _params(stock) == _params(pruned) < _params(sdxl)
    assert [list(x) for x in stock.config.transformer_layers_per_block] == [[1, 1], [2, 2], [9, 10]]
    assert [list(x) for x in stock.config.reverse_transformer_layers_per_block][0] == [10, 9, 10]
    for name in ("dit-xl-2-256", "pixart-alpha-1024"):
        model = load(str(CONFIGS / name)).denoiser
        pruned = lp.prune_layers(model, ["transformer_blocks.3", "transformer_blocks.27"])
        stock = lp.stock_model(pruned)
        assert stock.config.num_layers == 26 and _params(stock) == _params(pruned), name


def test_what_no_stock_config_describes_is_refused_with_the_reason():
    models = _tiny_models()
    with pytest.raises(UserError, match="no place for transformer_blocks.0.norm1.emb.* keep transformer_blocks.0"):
        lp.stock_model(lp.prune_layers(models["dit"][0], ["transformer_blocks.0"]))
    with pytest.raises(UserError, match="last block without the text stream.* keep transformer_blocks.2"):
        lp.stock_model(lp.prune_layers(models["sd3"][0], ["transformer_blocks.2"]))
    unet, _ = _tiny_unet()
    with pytest.raises(UserError, match="down_blocks.1.resnets.1 is removed without its attention layer"):
        lp.stock_model(lp.prune_layers(unet, ["down_blocks.1.resnets.1"]))
    with pytest.raises(UserError, match="down_blocks.1.attentions.0 is removed without its resnet"):
        lp.stock_model(lp.prune_layers(unet, ["down_blocks.1.attentions.0"]))
    with pytest.raises(UserError, match="a stock export takes a layer-pruned"):
        lp.stock_model(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def digits_sd():
    z = load("zoo:digits-sd")
    return z.denoiser, lp.calibration(z.pipe, n=4, seed=0)


def test_bk_sdm_exports_as_the_stock_unets_of_its_checkpoints(digits_sd):
    """BK-SDM Base, Small and Tiny on the SD-shaped zoo U-Net: one pair per down level and two per up level
    (layers_per_block=1), no mid block (Small), three levels (Tiny); the outputs bit for bit. On SD-1.5's
    config the stock models have BK-SDM's parameter counts."""
    unet, calib = digits_sd
    full = calib.run(unet)
    for variant, levels, mid in (("base", 4, "UNetMidBlock2DCrossAttn"), ("small", 4, None), ("tiny", 3, None)):
        pruned = lp.prune_layers(unet, lp.bk_sdm_layers(unet, variant))
        stock = lp.stock_model(pruned)
        assert type(stock) is type(unet) and stock.config.layers_per_block == 1, variant
        assert len(stock.config.block_out_channels) == len(stock.down_blocks) == levels, variant
        assert stock.config.mid_block_type == mid and (stock.mid_block is None) == (mid is None), variant
        want = calib.run(pruned)
        assert torch.equal(calib.run(stock), want) and not torch.equal(want, full), variant
        assert _params(stock) == _params(pruned)
    sd15 = load(str(CONFIGS / "sd15-unet")).denoiser
    counts = {v: _params(lp.stock_model(lp.prune_layers(sd15, lp.bk_sdm_layers(sd15, v)))) for v in ("base", "small", "tiny")}
    assert counts == {"base": 579_384_964, "small": 482_346_884, "tiny": 323_384_964}


def test_unet_removals_are_checked_by_where_the_skip_connections_go(digits_sd):
    """The innermost level keeps one pair: the up block must drop a skip connection that repeats another. Its
    first or middle resnet does (the same model as the stock one, bit for bit); its last one would drop the
    downsampler's output, which a stock U-Net reads, though every shape would fit."""
    unet, calib = digits_sd
    for up in ("up_blocks.0.resnets.0", "up_blocks.0.resnets.1"):
        pruned = lp.prune_layers(unet, ["down_blocks.3.resnets.1", up])
        stock = lp.stock_model(pruned)
        assert list(stock.config.layers_per_block) == [2, 2, 2, 1]
        assert torch.equal(calib.run(stock), calib.run(pruned)), up
    with pytest.raises(UserError, match="skip connections route differently"):
        lp.stock_model(lp.prune_layers(unet, ["down_blocks.3.resnets.1", "up_blocks.0.resnets.2"]))
    with pytest.raises(UserError, match="up_blocks.2 keeps 3 resnets and down_blocks.1 1"):
        lp.stock_model(lp.prune_layers(unet, ["down_blocks.1.resnets.1", "down_blocks.1.attentions.1"]))
    with pytest.raises(UserError, match="part of the mid block is removed"):
        lp.stock_model(lp.prune_layers(unet, ["mid_block.attentions.0"]))
    with pytest.raises(UserError, match="down_blocks.3 is removed whole: .* only with up_blocks.0"):
        lp.stock_model(lp.prune_layers(unet, ["down_blocks.3.resnets.0", "down_blocks.3.resnets.1"]))


def _cli(*args):
    from diffslim.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


def test_cli_stock_export_loads_with_diffusers_alone(tmp_path):
    """layer-prune --stock writes stock folders; a fresh Python without diffslim loads the model and gets the
    LayerPruned model's outputs; `diffslim stock` turns the LayerPruned folder into the same weights."""
    res = _cli("layer-prune", "zoo:digits-dit", "--ratio", "0.3", "--stock", "--out", tmp_path / "s", "--json")
    assert res.exit_code == 0, res.output
    removed = json.loads(res.stdout)["removed"]
    assert "transformer_blocks.0" not in removed and len(removed) == 2
    index = json.loads((tmp_path / "s" / "pipeline" / "model_index.json").read_text())
    assert index["denoiser"] == ["diffusers", "DiTTransformer2DModel"]
    assert _cli("layer-prune", "zoo:digits-dit", "--ratio", "0.3", "--out", tmp_path / "p").exit_code == 0
    res = _cli("stock", tmp_path / "p" / "pipeline", "--out", tmp_path / "c")
    assert res.exit_code == 0 and "DiTTransformer2DModel (2 layers removed" in res.output, res.output
    a = load(str(tmp_path / "s" / "pipeline")).denoiser
    b = load(str(tmp_path / "c")).denoiser
    assert type(a) is type(b) and a.config.num_layers == b.config.num_layers == 4
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    code = ("import sys, torch; from diffusers import DiTTransformer2DModel; "
            f"m = DiTTransformer2DModel.from_pretrained({str(tmp_path / 's' / 'model')!r}).eval(); "
            "g = torch.Generator().manual_seed(0); x = torch.randn(2, 1, 8, 8, generator=g); "
            "out = m(x, timestep=torch.tensor([10, 600]), class_labels=torch.tensor([2, 5])).sample; "
            f"torch.save(out, {str(tmp_path / 'out.pt')!r}); assert 'diffslim' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    pruned = load(str(tmp_path / "p" / "model")).denoiser
    assert type(pruned).__name__ == "LayerPrunedDiTTransformer2DModel"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        want = pruned(torch.randn(2, 1, 8, 8, generator=g), timestep=torch.tensor([10, 600]),
                      class_labels=torch.tensor([2, 5])).sample
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=1e-5, rtol=1e-4)


def test_cli_stock_selects_among_the_blocks_a_stock_config_can_lose(tmp_path):
    """DiT's first block is not a candidate under --stock (magnitude would remove it at 0.7)."""
    removed = {}
    for flag in ("", "--stock"):
        res = _cli("layer-prune", "zoo:digits-dit", "--criterion", "magnitude", "--ratio", "0.7", *([flag] if flag else []),
                   "--out", tmp_path / (flag or "plain"), "--json")
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        removed[flag] = report["removed"]
        assert report["params_removed"] >= 0.7 * report["params"]
    assert "transformer_blocks.0" in removed[""] and "transformer_blocks.0" not in removed["--stock"]
    assert report["kept_for_stock"] == ["transformer_blocks.0"]
    assert json.loads((tmp_path / "--stock" / "model" / "config.json").read_text())["num_layers"] == 1


def test_cli_stock_refusals(tmp_path):
    res = _cli("stock", "zoo:digits-dit", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "has no removed layers" in res.output and "stock already" in res.output
    # BK-SDM from a config-only folder: the stock config
    res = _cli("layer-prune", CONFIGS / "sd15-unet", "--criterion", "bk-sdm-small", "--stock", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "b" / "model" / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DConditionModel" and cfg["layers_per_block"] == 1 and cfg["mid_block_type"] is None
    # a pruned model no stock config describes: `diffslim stock` says why
    res = _cli("layer-prune", "zoo:digits-sd", "--criterion", "magnitude", "--ratio", "0.3", "--out", tmp_path / "i")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "i" / "model" / "config.json").read_text())["removed_layers"]
    res = _cli("stock", tmp_path / "i" / "model", "--out", tmp_path / "j")
    assert res.exit_code == 2 and "a stock UNet2DConditionModel" in res.output and not (tmp_path / "j").exists()
    (tmp_path / "f").write_text("x")
    res = _cli("stock", tmp_path / "i" / "model", "--out", tmp_path / "f")
    assert res.exit_code == 2 and "is a file; give a folder" in res.output


def _best_stock_by_brute_force(unet, groups, layers, scores, total, ratio):
    """(summed score, layers) of the best combination of ``groups``' options (one or none each) that reaches
    ``ratio`` of ``total`` params and exports as a whole: every combination enumerated."""
    from itertools import product

    by_name = {l.name: l for l in layers}

    def attentions(option):  # the attention layers an option removes whole or in part
        return {n.partition(".transformer_blocks.")[0] for n in option if ".attentions." in n}

    opts = [[None, *[(sum(by_name[n].params for n in o), sum(scores[n] for n in o), o, attentions(o))
                     for o in options]] for options in groups]
    target, feasible = lp.target_of(total, ratio), []
    for pick in product(*opts):
        pick = [p for p in pick if p]
        touched = [a for p in pick for a in p[3]]
        if sum(p[0] for p in pick) >= target and len(touched) == len(set(touched)):  # no attention touched twice
            feasible.append((sum(p[1] for p in pick), [n for p in pick for n in p[2]]))
    return next(f for f in sorted(feasible, key=lambda f: f[0]) if lp._stock_describes(unet, f[1]))


def test_stock_selection_on_a_unet_is_the_best_stock_describable_removal(digits_sd):
    """--stock on a U-Net: the options are (resnet, attention) pairs in line in a level's down and up blocks, and the
    whole mid block, each one a stock config describes (BK-SDM Base's pair among them at every level); the choice
    is the least summed score among every combination that reaches the ratio and exports as a whole (checked here
    by brute force); the stock export gives the LayerPruned model's outputs bit for bit, while the unconstrained
    choice at the same ratio has no stock config."""
    unet, calib = digits_sd
    names = lp.candidate_names(unet)
    groups = lp.stock_groups(unet, names)
    assert len(groups) == 5 and groups[-1] == [["mid_block.resnets.0", "mid_block.resnets.1", "mid_block.attentions.0"]]
    base = set(lp.bk_sdm_layers(unet, "base"))
    for i, options in enumerate(groups[:4]):
        assert any(set(o) <= base for o in options), i
        for o in options:
            lp.stock_model(lp.prune_layers(unet, o))  # each one exports alone
    layers = lp.candidates(unet, names=names)
    scores = lp.score_layers(unet, layers, "output-loss", calib)
    total = sum(p.numel() for p in unet.parameters())
    for ratio in (0.2, 0.4):
        chosen = lp.stock_select(unet, layers, scores, ratio, total)
        best = _best_stock_by_brute_force(unet, groups, layers, scores, total, ratio)
        assert sorted(chosen) == sorted(best[1]), ratio
        pruned = lp.prune_layers(unet, chosen)
        assert torch.equal(calib.run(lp.stock_model(pruned)), calib.run(pruned))
        free = lp.select(layers, scores, ratio, total)
        assert sum(scores[n] for n in free) <= best[0]
    assert not lp._stock_describes(unet, free)  # the unconstrained choice at 0.4
    with pytest.raises(UserError, match=r"reach 0\.\d+ of the model at most: choose a ratio below that"):
        lp.stock_select(unet, layers, scores, 0.9, total)


def test_stock_selection_inside_attention_layers(tmp_path):
    """--inner --stock (SDXL's way, as SSD-1B and KOALA remove blocks): per attention layer, its j blocks of least
    score; the mid block's attention tied to the last down block's first one (one depth in a stock config); the
    choice is the best valid combination (brute force) and exports bit for bit."""
    unet, args = _tiny_unet()
    names = lp.candidate_names(unet, inner=True)
    layers = lp.candidates(unet, inner=True, names=names)
    scores = lp.score_layers(unet, layers, "random", None, seed=3)
    groups = lp.stock_groups(unet, names, scores)
    tied = [g for g in groups if any(n.startswith("mid_block.") for o in g for n in o)]
    assert len(tied) == 1 and all(sum(n.startswith("mid_block.") for n in o) ==
                                  sum(n.startswith("down_blocks.2.attentions.0.") for n in o) for o in tied[0])
    inner_heads = {n.rpartition(".transformer_blocks.")[0] for g in groups for o in g for n in o
                   if ".transformer_blocks." in n}
    assert inner_heads == {"down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.2.attentions.0",
                           "down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                           "up_blocks.0.attentions.1", "up_blocks.0.attentions.2", "up_blocks.1.attentions.0",
                           "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"}
    total = _params(unet)
    for ratio in (0.1, 0.25):
        chosen = lp.stock_select(unet, layers, scores, ratio, total)
        best = _best_stock_by_brute_force(unet, groups, layers, scores, total, ratio)
        assert sum(scores[n] for n in chosen) == pytest.approx(best[0]), ratio
        pruned = lp.prune_layers(unet, chosen)
        stock = lp.stock_model(pruned)
        with torch.no_grad():
            assert torch.equal(stock(*args).sample, pruned(*args).sample), ratio
    # the CLI writes the stock config (SDXL's config on the meta device takes 35 s: the README quotes that run)
    unet.save_pretrained(str(tmp_path / "tiny"))
    res = _cli("layer-prune", tmp_path / "tiny", "--criterion", "random", "--inner", "--ratio", "0.25", "--stock",
               "--out", tmp_path / "x", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["params_removed"] >= 0.25 * report["params"]
    cfg = json.loads((tmp_path / "x" / "model" / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DConditionModel" and "removed_layers" not in cfg
    assert _params(load(str(tmp_path / "x" / "model")).denoiser) == report["params_after"]


def test_inner_stock_selection_also_removes_pairs_and_the_mid_block_in_multi_block_levels():
    """--inner --stock also scores the whole attention layers that hold several blocks, so the (resnet, attention)
    pair options and the whole mid block are offered in those levels too (KOALA's and BK-SDM's removals next to
    SSD-1B's); no combination touches one attention layer twice, the choice is the brute force's, it reaches ratios
    that inner blocks alone cannot, and it exports bit for bit."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 3), cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]), torch.randn(1, 3, 16, generator=g))
    names = lp.stock_candidate_names(unet, inner=True)
    assert {"down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.2",
            "down_blocks.1.attentions.0.transformer_blocks.2"} <= set(names)
    assert lp.stock_candidate_names(unet) == lp.candidate_names(unet)
    layers = lp.candidates(unet, inner=True, names=names)
    scores = lp.score_layers(unet, layers, "random", None, seed=3)
    groups = lp.stock_groups(unet, names, scores)
    whole = {n for gr in groups for o in gr for n in o if n.endswith(("attentions.0", "attentions.1", "attentions.2"))}
    assert {"down_blocks.1.attentions.1", "mid_block.attentions.0"} <= whole and any("up_blocks.0" in n for n in whole)
    total = _params(unet)
    only_inner = lp.candidates(unet, inner=True, names=lp.candidate_names(unet, inner=True))
    ratio = 0.45
    with pytest.raises(lp.StockUnreachable):  # what --inner --stock offered before: inner blocks and level 0's pairs
        lp.stock_select(unet, only_inner, scores, ratio, total)
    chosen = lp.stock_select(unet, layers, scores, ratio, total)
    best = _best_stock_by_brute_force(unet, groups, layers, scores, total, ratio)
    assert sum(scores[n] for n in chosen) == pytest.approx(best[0])
    assert set(chosen) & whole  # a whole multi-block attention layer goes, with its resnet or in the mid block
    assert not [(a, n) for a in chosen for n in chosen if n.startswith(a + ".")]  # no block of a removed layer too
    pruned = lp.prune_layers(unet, chosen)
    with torch.no_grad():
        assert torch.equal(lp.stock_model(pruned)(*args).sample, pruned(*args).sample)


def test_cli_stock_on_a_unet_writes_a_stock_unet_that_diffusers_loads(tmp_path):
    res = _cli("layer-prune", "zoo:digits-sd", "--ratio", "0.3", "--stock", "--n", "2", "--out", tmp_path / "s",
               "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["params_removed"] >= 0.3 * report["params"]
    cfg = json.loads((tmp_path / "s" / "model" / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DConditionModel" and "removed_layers" not in cfg
    from diffusers import UNet2DConditionModel

    stock = UNet2DConditionModel.from_pretrained(str(tmp_path / "s" / "model")).eval()
    pruned = lp.prune_layers(load("zoo:digits-sd").denoiser, report["removed"])
    assert sum(p.numel() for p in stock.parameters()) == report["params_after"] == _params(pruned)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 1, stock.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        assert torch.equal(stock(x, torch.tensor([10, 600]), c).sample, pruned(x, torch.tensor([10, 600]), c).sample)
    res = _cli("layer-prune", "zoo:digits-sd", "--ratio", "0.3", "--stock", "--criterion", "greedy", "--out",
               tmp_path / "g")
    assert res.exit_code == 2 and "use output-loss, similarity, taylor, magnitude or random" in \
        " ".join(res.output.split()) and not (tmp_path / "g").exists()


def test_distilling_a_stock_export_asks_for_the_layer_pruned_model():
    """A stock student no longer records which blocks it lost: automatic feature matching refuses rather than pair
    blocks by position; the LayerPruned model it came from matches by stream position, and named pairs still work."""
    from diffslim.train.distill import select_features

    model, _ = _tiny_models()["dit"]
    pruned = lp.prune_layers(model, ["transformer_blocks.1"])
    assert select_features(model, pruned)["transformer_blocks.0"] == "transformer_blocks.1"
    stock = lp.stock_model(pruned)
    with pytest.raises(UserError, match="the student has 2 transformer_blocks and the teacher 3 .*`diffslim stock`"):
        select_features(model, stock)
    assert select_features(model, stock, {"transformer_blocks.0": "transformer_blocks.1"}) == \
        {"transformer_blocks.0": "transformer_blocks.1"}


def test_a_controlnet_of_the_original_model_drives_the_layer_pruned_unet_not_its_stock_export(tiny_sd_pipe, tmp_path):
    """A ControlNet adds one residual per skip connection of the original U-Net. The layer-pruned U-Net keeps every
    skip connection's place (its stand-ins still hand a feature on), so it takes the original ControlNet bit for bit
    as the full model with the removed layers' stand-ins does; the stock export has fewer, diffusers pairs them by
    position and fails on a shape, and `diffslim stock` refuses such a pipeline up front."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel

    def unet():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8).eval()

    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(unet(), conditioning_embedding_out_channels=(8, 16)).eval()
    for p in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters()]:
        torch.nn.init.normal_(p, std=0.1)  # ControlNet's zero convolutions, as training leaves them: not zero
    g = torch.Generator().manual_seed(1)
    x = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 600]),
             encoder_hidden_states=torch.randn(2, 3, 16, generator=g))
    with torch.no_grad():
        down, mid = controlnet(**x, controlnet_cond=torch.randn(2, 3, 16, 16, generator=g), return_dict=False)
    removed = lp.bk_sdm_layers(unet(), "base")

    def run(model):
        with torch.no_grad():
            return model(**x, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    full = unet()
    with lp.layers_removed(full, removed):
        reference = run(full)
    assert torch.equal(run(lp.prune_layers(unet(), removed)), reference)
    assert not torch.equal(run(unet()), reference)
    with pytest.raises(RuntimeError, match="must match the size"):
        run(lp.stock_model(lp.prune_layers(unet(), removed)))
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_sd_pipe.vae, text_encoder=tiny_sd_pipe.text_encoder, tokenizer=tiny_sd_pipe.tokenizer,
        unet=lp.prune_layers(unet(), removed), controlnet=controlnet, scheduler=tiny_sd_pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pruned")
    res = _cli("stock", tmp_path / "pruned", "--out", tmp_path / "stock")
    assert res.exit_code == 2 and "ControlNet adds 6 residuals" in res.output and "stock U-Net has 4" in res.output
    assert not (tmp_path / "stock").exists()


def test_a_t2i_adapter_of_the_original_model_drives_layer_pruned_and_stock_bk_sdm_unets(digits_sd):
    """A T2I-Adapter adds one residual per U-Net level, after the level's last layer. A layer-pruned U-Net adds it
    where the full model with the removed layers' stand-ins does, and so do the stock BK-SDM Base and Small exports,
    bit for bit. Tiny loses the innermost level, whose residual then has no place (the README says how it differs)."""
    from diffusers import T2IAdapter

    unet, _ = digits_sd
    torch.manual_seed(3)
    adapter = T2IAdapter(in_channels=1, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=1,
                         adapter_type="full_adapter").eval()
    g = torch.Generator().manual_seed(1)
    x = dict(sample=torch.randn(2, 1, 8, 8, generator=g), timestep=torch.tensor([10, 600]),
             encoder_hidden_states=torch.randn(2, 1, 32, generator=g))
    with torch.no_grad():
        residuals = adapter(torch.randn(2, 1, 8, 8, generator=g))

    def run(model):
        with torch.no_grad():
            return model(**x, down_intrablock_additional_residuals=[r.clone() for r in residuals]).sample

    for variant in ("base", "small", "tiny"):
        removed = lp.bk_sdm_layers(unet, variant)
        with lp.layers_removed(unet, removed):
            reference = run(unet)
        pruned = lp.prune_layers(unet, removed)
        assert torch.equal(run(pruned), reference), variant
        with torch.no_grad():
            assert not torch.equal(pruned(**x).sample, reference), variant  # the adapter acts
        assert torch.equal(run(lp.stock_model(pruned)), reference) == (variant != "tiny"), variant
