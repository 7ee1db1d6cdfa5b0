"""Layer pruning (LAPTOP-Diff) and BK-SDM: removal, export, criteria, knapsack, CLI."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffslim.errors import UserError
from diffslim.methods import layer_prune as lp
from diffslim.models.load import LoadedModel, load

from conftest import own_memory

CONFIGS = Path(__file__).parents[1] / "src" / "diffslim" / "configs"


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def calib(tiny_digits_pipe):
    return lp.calibration(tiny_digits_pipe, n=8, seed=0)


@pytest.fixture(scope="module")
def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_num_groups=1).eval()


def _dit_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 700]), torch.tensor([3, 7])


def test_candidates_cover_resnets_and_attentions(tiny_digits_pipe):
    unet = tiny_digits_pipe.denoiser
    names = lp.candidate_names(unet)
    from diffusers.models.resnet import ResnetBlock2D

    resnets = [n for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
    attns = [n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    assert sorted(names) == sorted(resnets + attns)
    # forward order: the mid block's resnet, attention, resnet
    i = names.index("mid_block.resnets.0")
    assert names[i:i + 3] == ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]


def test_removal_keeps_shape_and_lowers_params(tiny_digits_pipe, calib):
    unet = tiny_digits_pipe.denoiser
    layers = {l.name: l for l in lp.candidates(unet)}
    # a resnet with a 1x1 shortcut, attentions, the whole mid block and up resnets (skip dropped / 1x1)
    names = ["down_blocks.1.resnets.0", "down_blocks.1.attentions.1", "mid_block.resnets.0",
             "mid_block.attentions.0", "mid_block.resnets.1", "up_blocks.0.resnets.1", "up_blocks.2.resnets.0",
             "up_blocks.3.attentions.2"]
    assert layers["down_blocks.1.resnets.0"].keep is None  # 32 -> 64 channels: the 1x1 shortcut stays
    assert layers["up_blocks.0.resnets.1"].keep == 64  # hidden 64 == out 64: identity, the skip is dropped
    pruned = lp.prune_layers(unet, names)
    assert type(pruned).__name__ == "LayerPrunedUNet2DConditionModel"
    assert _params(pruned) == _params(unet) - sum(layers[n].params for n in names)
    # the kept weights are shared, not copied
    assert pruned.down_blocks[1].resnets[0].conv_shortcut.weight.data_ptr() == \
        unet.down_blocks[1].resnets[0].conv_shortcut.weight.data_ptr()
    out = calib.run(pruned)
    assert out.shape == calib.run(unet).shape
    assert torch.isfinite(out).all()


def test_removing_nothing_is_bit_exact(tiny_digits_pipe, calib, tiny_dit):
    unet = tiny_digits_pipe.denoiser
    assert torch.equal(calib.run(lp.prune_layers(unet, [])), calib.run(unet))
    x, t, y = _dit_inputs()
    with torch.no_grad():
        assert torch.equal(lp.prune_layers(tiny_dit, [])(x, t, class_labels=y).sample, tiny_dit(x, t, class_labels=y).sample)


def test_pruning_a_pruned_unet_again_equals_pruning_the_union_at_once(tiny_digits_pipe, calib, tmp_path):
    """Prune, then prune the result (as the workflow's stacked layer stages do): an up-block resnet whose
    predecessor is already gone takes its channels from that stand-in. The two-step model is the one-step
    model of the union, output for output, and the second scoring sees only the layers still there."""
    unet = tiny_digits_pipe.denoiser
    first = ["up_blocks.1.resnets.0", "down_blocks.1.attentions.0"]
    second = ["up_blocks.1.resnets.1", "up_blocks.1.resnets.2", "mid_block.attentions.0"]
    once = lp.prune_layers(unet, first)
    left = lp.candidate_names(once)
    assert not set(first) & set(left) and set(second) <= set(left)
    assert {l.name for l in lp.candidates(once)} == set(left)
    twice = lp.prune_layers(once, second)
    union = lp.prune_layers(unet, first + second)
    assert twice.config.removed_layers == first + second
    assert _params(twice) == _params(union) < _params(once) < _params(unet)
    assert torch.equal(calib.run(twice), calib.run(union))
    twice.save_pretrained(tmp_path / "twice")
    assert torch.equal(calib.run(own_memory(load(str(tmp_path / "twice")).denoiser)), calib.run(union))


def test_export_reloads_with_identical_outputs(tiny_digits_pipe, calib, tiny_dit, tmp_path):
    unet = tiny_digits_pipe.denoiser
    pruned = lp.prune_layers(unet, ["down_blocks.0.resnets.1", "up_blocks.1.attentions.0", "down_blocks.2.resnets.0"])
    pruned.save_pretrained(str(tmp_path / "unet"))
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert saved["removed_layers"] == ["down_blocks.0.resnets.1", "up_blocks.1.attentions.0", "down_blocks.2.resnets.0"]
    back = load(str(tmp_path / "unet")).denoiser
    assert type(back).__name__ == "LayerPrunedUNet2DConditionModel" and _params(back) == _params(pruned)
    for (k, a), b in zip(pruned.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    # same weights bit for bit; conv kernels may differ in the last bits with memory layout
    torch.testing.assert_close(calib.run(back), calib.run(pruned), atol=1e-5, rtol=1e-4)
    # DiT: removing block 0 keeps its conditioning embedding, which the output layer reads
    dit = lp.prune_layers(tiny_dit, ["transformer_blocks.0", "transformer_blocks.2"])
    assert _params(dit) < _params(tiny_dit)
    dit.save_pretrained(str(tmp_path / "dit"))
    dit_back = load(str(tmp_path / "dit")).denoiser
    x, t, y = _dit_inputs()
    with torch.no_grad():
        a, b = dit(x, t, class_labels=y).sample, dit_back(x, t, class_labels=y).sample
    assert a.shape == x.shape
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # pruning again adds to the removed layers
    again = lp.prune_layers(pruned, ["mid_block.attentions.0"])
    assert again.config.removed_layers[-1] == "mid_block.attentions.0" and len(again.config.removed_layers) == 4


def test_bk_sdm_params_on_sd15_config():
    """BK-SDM's U-Net sizes: 579.4M, 482.3M, 323.4M (the paper's table as recalled, within 1%), and the model
    card's 0.58B / 0.49B / 0.33B, which round up to 0.01B (its SD-1.4 U-Net, 859.5M, is listed as 0.86B)."""
    import math

    unet = load(str(CONFIGS / "sd15-unet")).denoiser
    assert math.ceil(_params(unet) / 1e7) / 100 == 0.86
    published = {"base": (579.4e6, 0.58), "small": (482.3e6, 0.49), "tiny": (323.4e6, 0.33)}
    for variant, (n, card) in published.items():
        pruned = lp.prune_layers(unet, lp.bk_sdm_layers(unet, variant))
        assert next(pruned.parameters()).device.type == "meta"
        assert abs(_params(pruned) - n) / n < 0.01, (variant, _params(pruned))
        assert math.ceil(_params(pruned) / 1e7) / 100 == card, (variant, _params(pruned))
    with pytest.raises(UserError):
        lp.bk_sdm_layers(unet, "huge")


def test_bk_sdm_tiny_runs_on_the_tiny_unet(tiny_digits_pipe, calib):
    unet = tiny_digits_pipe.denoiser
    for v in lp.BK_SDM:
        pruned = lp.prune_layers(unet, lp.bk_sdm_layers(unet, v))
        assert calib.run(pruned).shape == calib.run(unet).shape
    tiny = lp.prune_layers(unet, lp.bk_sdm_layers(unet, "tiny"))
    feats = lp.matched_features(unet, tiny)
    assert not {"mid_block", "down_blocks.2", "down_blocks.3", "up_blocks.0"} & set(feats)  # gone or resized
    assert "down_blocks.0" in feats and "up_blocks.3" in feats


def _brute(values, costs, target):
    best = None
    for k in range(len(values) + 1):
        for s in itertools.combinations(range(len(values)), k):
            if sum(costs[i] for i in s) >= target:
                v = sum(values[i] for i in s)
                best = v if best is None or v < best else best
    return best


def test_knapsack_is_exact_on_small_instances():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 9)
        values = [rng.random() for _ in range(n)]
        costs = [rng.randint(1, 40) for _ in range(n)]
        target = rng.randint(1, sum(costs))
        picked = lp.knapsack_min(values, costs, target)
        assert sum(costs[i] for i in picked) >= target
        assert sum(values[i] for i in picked) == pytest.approx(_brute(values, costs, target), abs=1e-12)
        # coarse units keep the constraint
        coarse = lp.knapsack_min(values, costs, target, max_states=3)
        assert sum(costs[i] for i in coarse) >= target
    with pytest.raises(UserError):
        lp.knapsack_min([1.0, 2.0], [3, 4], 8)


def _brute_capped(values, costs, target, caps, cap):
    best = None
    for k in range(len(values) + 1):
        for s in itertools.combinations(range(len(values)), k):
            if sum(costs[i] for i in s) >= target and sum(caps[i] for i in s) <= cap:
                v = sum(values[i] for i in s)
                best = v if best is None or v < best else best
    return best


def test_capped_knapsack_is_exact_on_small_instances():
    """Two constraints (MACs removed >= target, params removed <= cap): the optimum equals a brute force's, and an
    impossible pair gives None."""
    rng = random.Random(3)
    infeasible = 0
    for _ in range(60):
        n = rng.randint(1, 9)
        values = [rng.random() - 0.1 for _ in range(n)]  # a negative score (e.g. similarity) too
        costs = [rng.randint(0, 50) for _ in range(n)]
        caps = [rng.randint(1, 50) for _ in range(n)]
        target, cap = rng.randint(0, sum(costs)), rng.randint(0, sum(caps))
        best = _brute_capped(values, costs, target, caps, cap)
        picked = lp.knapsack_min_capped(values, costs, target, caps, cap)
        if best is None:
            infeasible += 1
            assert picked is None
            continue
        assert sum(costs[i] for i in picked) >= target and sum(caps[i] for i in picked) <= cap
        assert sum(values[i] for i in picked) == pytest.approx(best, abs=1e-9)
    assert 0 < infeasible < 60


def _layers(costs):
    return [lp.Layer(name=f"l{i}", kind="resnet", params=c) for i, c in enumerate(costs)]


def test_select_by_macs_with_a_params_cap():
    """A selection by MACs removes what is cheap to lose whatever its params; the cap keeps the params it removes
    under a share, at a higher summed score, and applies to MACs selections only."""
    def layer(name, params, macs):
        return lp.Layer(name=name, kind="resnet", params=params, macs=macs)

    layers = [layer("deep", 60, 10), layer("deep2", 60, 10), layer("hi", 10, 30), layer("hi2", 10, 30)]
    scores = {"deep": 0.01, "deep2": 0.01, "hi": 0.5, "hi2": 0.2}
    total_macs, params = 100, 140
    assert sorted(lp.select(layers, scores, 0.45, total_macs, "macs")) == ["deep", "deep2", "hi2"]  # 130 params
    assert sorted(lp.select(layers, scores, 0.45, total_macs, "macs", max_params=(0.5, params))) == ["hi", "hi2"]
    with pytest.raises(UserError, match=r"at most 0.1 of the params removed \(at most 0.300 of the MACs then\)"):
        lp.select(layers, scores, 0.45, total_macs, "macs", max_params=(0.1, params))
    with pytest.raises(UserError, match="--by macs"):
        lp.select(layers, scores, 0.45, params, "params", max_params=(0.5, params))
    with pytest.raises(UserError, match="outside"):
        lp.select(layers, scores, 0.45, total_macs, "macs", max_params=(1.0, params))


def _quad(names, lin, inter):
    return lp.predicted_loss(names, lin, inter)


def test_quadratic_select_is_exact_small_and_its_local_search_never_loses_to_the_knapsack():
    rng = random.Random(1)
    for trial in range(25):
        n = rng.randint(3, 10)
        costs = [rng.randint(1, 30) for _ in range(n)]
        layers = _layers(costs)
        lin = {l.name: rng.random() for l in layers}
        inter = {(a.name, b.name): rng.uniform(-0.3, 0.6) * min(lin[a.name], lin[b.name])
                 for k, a in enumerate(layers) for b in layers[k + 1:]}
        total = sum(costs) + rng.randint(0, 20)
        ratio = rng.uniform(0.05, 0.95) * sum(costs) / total
        target = lp.target_of(total, ratio)
        best = min(_quad([layers[i].name for i in s], lin, inter) for k in range(n + 1)
                   for s in itertools.combinations(range(n), k) if sum(costs[i] for i in s) >= target)
        exact = lp.quadratic_select(layers, lin, inter, ratio, total)
        local = lp.quadratic_select(layers, lin, inter, ratio, total, exact_up_to=0)
        first = lp.select(layers, lin, ratio, total)
        for names in (exact, local):
            assert sum(l.params for l in layers if l.name in names) >= target
        assert _quad(exact, lin, inter) == pytest.approx(best, abs=1e-12)
        assert best - 1e-12 <= _quad(local, lin, inter) <= _quad(first, lin, inter) + 1e-12
        # no interactions: the second-order selection is the knapsack's optimum
        plain = lp.quadratic_select(layers, lin, {}, ratio, total, exact_up_to=0)
        assert sum(lin[x] for x in plain) == pytest.approx(sum(lin[x] for x in first), abs=1e-12)
    with pytest.raises(UserError, match="removable layers hold only"):
        lp.quadratic_select(_layers([3, 4]), {"l0": 1.0, "l1": 1.0}, {}, 0.9, 10)


def test_quadratic_select_with_a_params_cap_is_exact_small_and_keeps_the_cap_in_its_local_search():
    """By MACs with a cap on the params removed: the exact path equals a brute force over both constraints, the
    local search keeps both and never loses to the capped knapsack's set, and an unreachable cap is refused."""
    rng = random.Random(2)
    checked = 0
    for trial in range(40):
        n = rng.randint(3, 10)
        macs = [rng.randint(1, 30) for _ in range(n)]
        params = [rng.randint(1, 30) for _ in range(n)]
        layers = [lp.Layer(name=f"l{i}", kind="resnet", params=p, macs=m) for i, (p, m) in enumerate(zip(params, macs))]
        lin = {l.name: rng.uniform(-0.3, 1.0) for l in layers}  # some negative (similarity can be): adding pays
        inter = {(a.name, b.name): rng.uniform(-0.3, 0.6) * min(lin[a.name], lin[b.name])
                 for k, a in enumerate(layers) for b in layers[k + 1:]}
        total = sum(macs)
        ratio, share = rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)
        target, cap = lp.target_of(total, ratio), math.floor(share * sum(params))
        sets = [s for k in range(n + 1) for s in itertools.combinations(range(n), k)
                if sum(macs[i] for i in s) >= target and sum(params[i] for i in s) <= cap]
        if not sets:
            with pytest.raises(lp.SelectionUnreachable, match="with at most"):
                lp.quadratic_select(layers, lin, inter, ratio, total, "macs", max_params=(share, sum(params)))
            continue
        checked += 1
        best = min(_quad([layers[i].name for i in s], lin, inter) for s in sets)
        exact = lp.quadratic_select(layers, lin, inter, ratio, total, "macs", max_params=(share, sum(params)))
        local = lp.quadratic_select(layers, lin, inter, ratio, total, "macs", exact_up_to=0,
                                    max_params=(share, sum(params)))
        first = lp.select(layers, lin, ratio, total, "macs", max_params=(share, sum(params)))
        for names in (exact, local):
            chosen = [l for l in layers if l.name in names]
            assert sum(l.macs for l in chosen) >= target and sum(l.params for l in chosen) <= cap
        assert _quad(exact, lin, inter) == pytest.approx(best, abs=1e-12)
        assert best - 1e-12 <= _quad(local, lin, inter) <= _quad(first, lin, inter) + 1e-12
    assert checked >= 20


def test_pair_interactions_predict_every_measured_pair_exactly(tiny_digits_pipe, calib):
    unet = tiny_digits_pipe.denoiser
    layers = lp.candidates(unet)[:6]
    ref = calib.run(unet)
    single = lp.score_layers(unet, layers, "output-loss", calib, reference=ref)
    inter = lp.pair_interactions(unet, layers, calib, single, reference=ref)
    assert len(inter) == 15 and any(abs(v) > 1e-6 for v in inter.values())
    for a, b in [("down_blocks.0.resnets.0", "down_blocks.0.resnets.1"), (layers[1].name, layers[4].name)]:
        assert lp.predicted_loss([b, a], single, inter) == pytest.approx(lp.output_loss(unet, calib, [a, b], ref),
                                                                         rel=1e-12)
    pooled = lp.pair_interactions(unet, layers, calib, single, pool=3, reference=ref)
    cheapest = sorted(layers, key=lambda l: single[l.name] / l.params)[:3]
    assert {n for pair in pooled for n in pair} == {l.name for l in cheapest} and len(pooled) == 3
    assert all(pooled[k] == inter[k] for k in pooled)
    with pytest.raises(UserError, match="at least 2"):
        lp.pair_interactions(unet, layers, calib, single, pool=1, reference=ref)


def test_second_order_output_loss_picks_a_lower_loss_set_on_the_few_block_dit():
    """zoo:digits-dit at ratio 0.5 (four of six blocks): single losses are far from additive there, and the
    first-order knapsack's set loses to the second-order one on held-out triples as well."""
    loaded = load("zoo:digits-dit")
    d = loaded.denoiser
    calib = lp.calibration(loaded.pipe, n=32, seed=0)
    held = lp.calibration(loaded.pipe, n=32, seed=1)
    first = lp.layer_prune(d, "output-loss", 0.5, calib=calib)
    second = lp.layer_prune(d, "output-loss-pairs", 0.5, calib=calib)
    assert len(second.extra["interactions"]) == 15
    assert second.params_removed >= 0.5 * second.params and set(second.removed) != set(first.removed)
    measured = lp.output_loss(d, calib, second.removed)  # the second-order prediction is the nearer one
    assert abs(second.extra["predicted_loss"] - measured) < abs(second.extra["summed_loss"] - measured)
    assert second.extra["check"]["kept"] == "second_order"
    ref = held.run(d)
    assert lp.output_loss(d, held, second.removed, ref) < lp.output_loss(d, held, first.removed, ref)
    # five of six blocks: the expansion over-counts and its set measures worse; the check keeps the first-order one
    at7 = lp.layer_prune(d, "output-loss-pairs", 0.7, calib=calib)
    check = at7.extra["check"]
    assert check["kept"] == "first_order" and at7.removed == lp.layer_prune(d, "output-loss", 0.7, calib=calib).removed
    assert check["first_order"]["measured"] < check["second_order"]["measured"]


def test_output_loss_of_one_layer_is_the_measured_mse(tiny_digits_pipe, calib):
    unet = tiny_digits_pipe.denoiser
    ref = calib.run(unet)
    for name in ("down_blocks.1.resnets.0", "up_blocks.2.attentions.1", "up_blocks.0.resnets.0"):
        loss = lp.output_loss(unet, calib, [name], ref)
        measured = float((calib.run(lp.prune_layers(unet, [name])) - ref).pow(2).mean())
        assert loss == measured and loss > 0
    assert torch.equal(calib.run(unet), ref)  # the hooks are gone


def test_criteria_select_at_the_ratio(tiny_digits_pipe, calib):
    unet = tiny_digits_pipe.denoiser
    total = _params(unet)
    layers = lp.candidates(unet)[:10]
    ratio = 0.5 * sum(l.params for l in layers) / total
    for crit in ("output-loss", "random", "magnitude", "taylor", "similarity"):
        s1 = lp.score_layers(unet, layers, crit, calib, seed=3)
        assert s1 == lp.score_layers(unet, layers, crit, calib, seed=3)  # deterministic
        assert set(s1) == {l.name for l in layers} and all(v >= 0 for v in s1.values())
        names = lp.select(layers, s1, ratio, total)
        assert sum(l.params for l in layers if l.name in names) >= ratio * total
    first = layers[0]
    mag = lp.score_layers(unet, [first], "magnitude")[first.name]
    assert mag == pytest.approx(sum(float(p.detach().abs().sum()) for p in unet.get_submodule(first.name).parameters()))
    order = lp.greedy_order(unet, layers[:5], calib, until=sum(l.params for l in layers[:2]))
    chosen = lp.greedy_select(order, layers[:5], 0.01, total)
    assert chosen == [n for n, _ in order][:len(chosen)]
    single = lp.score_layers(unet, layers, "output-loss", calib)
    add = lp.additivity(unet, layers, calib, single, n_sets=4)
    assert len(add["measured"]) == 4 and -1 <= add["pearson"] <= 1
    assert add["summed"][0] == pytest.approx(sum(single[n] for n in add["sets"][0]))


def test_distill_pruned_student_runs(tiny_digits_pipe, tmp_path):
    from diffslim.train.distill import DistillConfig

    teacher = tiny_digits_pipe.denoiser
    student = lp.prune_layers(teacher, lp.bk_sdm_layers(teacher, "tiny"))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = DistillConfig(steps=2, batch_size=4, lr=1e-4, out=tmp_path / "kd", checkpoint_every=2, log_every=1,
                        progress=False)
    res = lp.distill_pruned(tiny_digits_pipe, student, cfg)
    assert res.steps == 2 and res.final_losses["feat"] > 0
    saved = json.loads((tmp_path / "kd" / "distill.json").read_text())
    assert set(saved["features"]) == set(lp.matched_features(teacher, student))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    back = load(str(tmp_path / "kd" / "student")).denoiser
    assert back.config.removed_layers == student.config.removed_layers


def test_recipe_section_applies(tiny_digits_folder):
    from diffslim.apply import apply

    loaded = load(str(tiny_digits_folder))
    before = _params(loaded.denoiser)
    apply(loaded.pipe, {"removed_layers": {"layers": ["mid_block.attentions.0"], "criterion": "output-loss",
                                           "ratio": 0.1}})
    assert type(loaded.pipe.denoiser).__name__ == "LayerPrunedUNet2DConditionModel"
    assert _params(loaded.pipe.denoiser) < before
    from diffslim.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="ratio"):
        parse_recipe({"removed_layers": {"layers": [], "ratio": 2}})


def test_bench_bk_sdm_kd_distils_the_bk_sdm_removal_as_layers_kd_does(tmp_path, monkeypatch):
    """bk-sdm:VARIANT+kd: BK-SDM's removal after the same cached distillation as layers:R+kd (so the rows compare
    the removals under one retraining); the student is the BK-SDM model with trained weights."""
    from diffslim import bench
    from diffslim.cli import app
    from diffslim.methods.finetune import load_student

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "DEFAULT_KD", {**bench.DEFAULT_KD, "steps": 2, "batch_size": 4})
    r = CliRunner().invoke(app, ["bench", "zoo:digits-sd", "--methods", "bk-sdm:base,bk-sdm:base+kd", "--n", "2",
                                 "--steps", "3", "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["method"]: x for x in json.loads(r.stdout)["rows"]}
    assert rows["bk-sdm:base+kd"]["params"] == rows["bk-sdm:base"]["params"] < rows["full"]["params"]
    assert rows["bk-sdm:base+kd"]["psnr"] != rows["bk-sdm:base"]["psnr"]  # trained weights
    assert "feature weight matched to the plain sum" in rows["bk-sdm:base+kd"]["notes"]
    runs = list((tmp_path / "cache" / "layer_kd").glob("*/student"))
    assert len(runs) == 1
    unet = load("zoo:digits-sd").denoiser
    assert sorted(lp.removed_layers_of(load_student(runs[0]))) == sorted(lp.bk_sdm_layers(unet, "base"))
    r = CliRunner().invoke(app, ["bench", "zoo:digits-sd", "--methods", "bk-sdm:huge+kd", "--n", "2"])
    assert r.exit_code != 0 and "base, small, tiny (each +kd)" in r.output


def test_bench_layers_by_macs_removes_a_share_of_the_macs(monkeypatch):
    """layers:R:macs: the output-loss scores selected by the MACs each removal saves in the pipeline's own denoiser
    call; on the zoo U-Net the params selection removes the deep layers (much of the params, few MACs), the MACs
    selection cuts the run's cost by R."""
    from diffslim import bench
    from diffslim.cli import app

    monkeypatch.setattr(bench, "LAYER_CALIB", dict(n=8, seed=0))
    r = CliRunner().invoke(app, ["bench", "zoo:digits-sd", "--methods", "layers:0.3,layers:0.3:macs,layers:0.3:macs:0.25",
                                 "--n", "2", "--steps", "3", "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["method"]: x for x in json.loads(r.stdout)["rows"]}
    by_params, by_macs, capped = rows["layers:0.3"], rows["layers:0.3:macs"], rows["layers:0.3:macs:0.25"]
    full = rows["full"]["params"]
    assert by_params["macs_ratio"] > 0.9 and by_params["params"] <= 0.7 * full
    # the denoiser's MACs drop by 0.3 at least; the run's other MACs (the label encoder) are under 1 %
    assert 0.6 < by_macs["macs_ratio"] <= 0.71 and by_macs["params"] < 0.75 * full
    assert "a share of the MACs" in by_macs["notes"]
    # the cap binds: the same MACs go with at most a quarter of the params
    assert 0.6 < capped["macs_ratio"] <= 0.71 and capped["params"] >= 0.75 * full
    assert "at most 0.25 of the params" in capped["notes"]


def test_a_params_cap_out_of_reach_is_refused_before_scoring():
    """layer_prune checks that the cap can be met before it scores (here there is no calibration data at all, so
    reaching the scoring would fail otherwise)."""
    den = load("zoo:digits-sd").denoiser
    with pytest.raises(UserError, match=r"at most 0.01 of the params removed \(at most 0.0"):
        lp.layer_prune(den, "output-loss", 0.3, by="macs", max_params=0.01)
    with pytest.raises(UserError, match="one-shot criterion"):
        lp.layer_prune(den, "output-loss", 0.3, by="params", max_params=0.3)


def test_the_bench_refuses_an_unreachable_params_cap_before_sampling_any_row(monkeypatch):
    from diffslim import bench
    from diffslim.cli import app

    def no_sampling(*a, **k):
        raise AssertionError("the bench sampled a row before refusing the cap")

    monkeypatch.setattr(bench, "run_pipeline", no_sampling)
    r = CliRunner().invoke(app, ["bench", "zoo:digits-sd", "--methods", "steps:5,layers:0.5:pairs:macs:0.02+kd",
                                 "--n", "2", "--steps", "3"])
    assert r.exit_code == 2, r.output
    assert "no set of layers removes 0.5 of the MACs with at most 0.02 of the params removed" in r.output


def test_bench_methods_validate_arguments():
    from diffslim.bench import METHODS, BenchContext

    dry = BenchContext(loaded=None, base_spec=None, default_steps=1, dry_run=True)
    for name, arg in (("layers", "1.5"), ("layers", "x+kd"), ("layers", None), ("layers", "x:pairs")):
        with pytest.raises(UserError, match="ratio"):
            METHODS[name](arg, dry)
    with pytest.raises(UserError, match="accepted: layers:R, layers:R:pairs, layers:R:similarity, layers:R:taylor"):
        METHODS["layers"]("0.5:fancy", dry)
    with pytest.raises(UserError, match="base, small, tiny"):
        METHODS["bk-sdm"]("huge", dry)
    with pytest.raises(UserError, match="must be a number in"):
        METHODS["layers"]("0.3:macs:lots", dry)
    with pytest.raises(UserError, match="outside"):
        METHODS["layers"]("0.3:macs:1.5", dry)
    with pytest.raises(UserError, match=r"layers:R:\[CRITERION:\]macs\[:P\]"):
        METHODS["layers"]("0.3:pairs:0.2", dry)
    with pytest.raises(UserError, match="a selection by MACs takes the criteria"):
        METHODS["layers"]("0.3:greedy:macs", dry)


def _cli(*args):
    from diffslim.cli import app

    return CliRunner().invoke(app, ["layer-prune", *map(str, args)])


def test_cli_by_macs_counts_the_pipelines_own_denoiser_call(tmp_path):
    """layer-prune --by macs on a pipeline: the MACs are the denoiser call the pipeline makes (the zoo U-Net samples
    at another context than the anatomy's dummy call), and the removed share of them reaches the ratio."""
    from diffslim.evaluate import eval_set_for
    from diffslim.models.anatomy import anatomy
    from diffslim.sample import SampleSpec, first_denoiser_call

    res = _cli("zoo:digits-sd", "--criterion", "magnitude", "--by", "macs", "--ratio", "0.3", "--out",
               tmp_path / "m", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    loaded = load("zoo:digits-sd")
    es = eval_set_for(loaded, 1)
    own = anatomy(loaded.denoiser, inputs=first_denoiser_call(loaded.pipe, SampleSpec(es.inputs, es.seeds,
                                                                                      call_kwargs=es.call_kwargs)))
    dummy = anatomy(loaded.denoiser)
    assert report["macs"] == own.macs != dummy.macs
    assert report["macs_removed"] >= 0.3 * own.macs


def test_cli_errors(tmp_path):
    cfg = CONFIGS / "sd15-unet"
    for args, msg in (
        (("zoo:digits-sd", "--ratio", "1.5"), "outside (0, 1)"),
        (("zoo:digits-sd", "--ratio", "0"), "outside (0, 1)"),
        (("zoo:digits-sd", "--ratio", "0.5", "--criterion", "l1"), "unknown --criterion"),
        (("zoo:digits-sd", "--criterion", "output-loss"), "needs --ratio"),
        (("zoo:digits-sd", "--ratio", "0.5", "--by", "flops"), "unknown --by"),
        ((cfg, "--ratio", "0.5"), "config-only (no weights): --criterion output-loss needs weights"),
        ((cfg, "--ratio", "0.5", "--criterion", "magnitude"), "config-only"),
        ((cfg, "--criterion", "bk-sdm-base", "--ratio", "0.5"), "drop --ratio"),
        (("zoo:digits-sd", "--ratio", "0.5", "--pair-pool", "8"), "output-loss-pairs only"),
        (("zoo:digits-sd", "--ratio", "0.5", "--criterion", "output-loss-pairs", "--pair-pool", "1"), ">= 2"),
        (("zoo:digits-sd", "--ratio", "0.5", "--max-params", "0.3"), "needs --by macs"),
        (("zoo:digits-sd", "--ratio", "0.5", "--by", "macs", "--max-params", "1.2"), "outside (0, 1)"),
        (("zoo:digits-sd", "--ratio", "0.5", "--by", "macs", "--max-params", "0.3", "--criterion", "greedy"),
         "one-shot criterion"),
    ):
        r = _cli(*args, "--out", tmp_path / "x")
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output


def test_cli_bk_sdm_on_config_only_folder(tmp_path):
    r = _cli(CONFIGS / "sd15-unet", "--criterion", "bk-sdm-tiny", "--out", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["params_after"] == 323_384_964
    back = load(str(tmp_path / "model"))
    assert back.kind == "config" and _params(back.denoiser) == 323_384_964
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["removed_layers"]["layers"] == report["removed"]


def test_cli_output_loss_writes_a_loadable_model(tiny_digits_folder, tmp_path):
    r = _cli(tiny_digits_folder, "--ratio", "0.3", "--n", "4", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["params_removed_share"] >= 0.3
    assert _params(load(str(tmp_path / "model")).denoiser) == report["params_after"]
    assert type(load(str(tmp_path / "pipeline")).denoiser).__name__ == "LayerPrunedUNet2DConditionModel"


def test_cli_output_loss_pairs_with_a_pool(tiny_digits_folder, tmp_path):
    r = _cli(tiny_digits_folder, "--ratio", "0.3", "--n", "4", "--criterion", "output-loss-pairs", "--pair-pool", "4",
             "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "pairs measured" in r.output
    report = json.loads((tmp_path / "scores.json").read_text())
    assert len(report["interactions"]) == 6 and report["params_removed_share"] >= 0.3
    assert report["check"]["kept"] in ("both", "first_order", "second_order")
    assert _params(load(str(tmp_path / "model")).denoiser) == report["params_after"]


def test_cli_layer_compare_writes_the_comparison_and_its_figures(tiny_digits_folder, tmp_path):
    from diffslim.cli import app

    run = lambda *a: CliRunner().invoke(app, ["layer-compare", *map(str, a)])
    for args, msg in ((("--ratios", "0.5,x"), "comma-separated numbers"), (("--ratios", "1.2"), "outside (0, 1)"),
                      (("--n", "1"), "at least 2")):
        r = run(tiny_digits_folder, *args, "--out", tmp_path / "x")
        assert r.exit_code == 2 and msg in r.output, r.output
    r = run(CONFIGS / "sd15-unet", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "pipeline folder with weights" in r.output
    # (the pairs and greedy are what the demo-report test runs on zoo:digits-dit; 703 pairs here would be slow)
    r = run(tiny_digits_folder, "--ratios", "0.5,0.3", "--n", "4", "--no-greedy", "--no-pairs", "--out",
            tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert [row["ratio"] for row in res["ratios"]] == [0.3, 0.5] and json.loads(r.stdout) == res
    assert "greedy_order" not in res and "interactions" not in res
    for row in res["ratios"]:
        assert row["output-loss_share"] >= row["ratio"] and "output-loss-pairs" not in row
        assert row["output-loss"] <= row["magnitude"] or row["output-loss"] <= row["similarity"]
    assert [b["variant"] for b in res["bk_sdm"]] == ["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"]
    # the stock choice at each ratio: a stock config describes it, it reaches the ratio, and it costs at least the
    # free choice's output loss on the calibration triples' scores (it is chosen from fewer sets)
    assert "loss" in res["stock"][0] and "reach" in res["stock"][1]["unreachable"]  # 0.3 can be made, 0.5 not
    for st, row in zip(res["stock"][:1], res["ratios"]):
        assert st["ratio"] == row["ratio"] and st["share"] >= st["ratio"]
        assert lp._stock_describes(load(str(tiny_digits_folder)).denoiser, st["removed"])
        assert sum(res["scores"]["output-loss"][n] for n in st["removed"]) >= \
            sum(res["scores"]["output-loss"][n] for n in row["output-loss_removed"])
    for name in ("output_loss.png", "additivity.png"):
        assert (tmp_path / "c" / name).stat().st_size > 1000
    page = (tmp_path / "c" / "index.html").read_text()  # the tables and figures on one page, with what they show
    assert "held-out output loss" in page and "src='output_loss.png'" in page and "src='additivity.png'" in page
    assert f"<td>{res['ratios'][0]['output-loss']:.4g}</td>" in page
    assert not (tmp_path / "c" / "sampled_psnr.png").exists() and "sampled" not in res
    r = run(tiny_digits_folder, "--sample", "-1", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--sample takes a count of evaluation inputs >= 0" in r.output
    r = run(tiny_digits_folder, "--steps", "4", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "give --sample too" in r.output

    # --sample: every selection's samples judged against the full model's, the same as sampling it directly
    r = run(tiny_digits_folder, "--ratios", "0.3,0.5", "--n", "4", "--no-greedy", "--no-pairs", "--sample", "3",
            "--steps", "2", "--out", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "s" / "compare.json").read_text())
    assert res["sampled"] == {"n": 3, "steps": 2} and (tmp_path / "s" / "sampled_psnr.png").stat().st_size > 1000
    loaded = load(str(tiny_digits_folder))
    from diffslim.bench import _with_denoiser
    from diffslim.evaluate import eval_set_for, metrics_fn_for
    from diffslim.sample import SampleSpec, sample

    es = eval_set_for(loaded, 3)
    spec = SampleSpec(es.inputs, es.seeds, num_inference_steps=2, call_kwargs=dict(es.call_kwargs), batch_size=3)
    full = sample(loaded.pipe, spec)
    metrics = metrics_fn_for(loaded, es)
    for row in res["ratios"]:
        for crit in ("output-loss", "magnitude", "taylor", "similarity", "random#0"):
            assert 0 < row[f"{crit}_sampled"]["psnr"] < 100
        seeds = [row[f"random#{s}_sampled"]["psnr"] for s in (0, 1, 2)]
        assert row["random_sampled"]["psnr"] == pytest.approx(sum(seeds) / 3)
        direct = metrics(sample(_with_denoiser(loaded.pipe, lp.prune_layers(loaded.denoiser, row["output-loss_removed"])),
                                spec), full)
        assert row["output-loss_sampled"]["psnr"] == pytest.approx(direct["psnr"], abs=1e-6)
        same = [c for c in ("magnitude", "taylor", "similarity") if set(row[f"{c}_removed"]) == set(row["output-loss_removed"])]
        assert all(row[f"{c}_sampled"] == row["output-loss_sampled"] for c in same)
    assert all(0 < b["sampled"]["psnr"] < 100 for b in res["bk_sdm"])


def test_cli_layer_compare_by_macs_with_a_cap(tiny_digits_folder, tmp_path):
    from diffslim.cli import app

    run = lambda *a: CliRunner().invoke(app, ["layer-compare", str(tiny_digits_folder), *map(str, a)])
    for args, msg in ((("--by", "flops"), "accepted params, macs"), (("--max-params", "0.4"), "give --by macs too"),
                      (("--by", "macs", "--max-params", "1.5"), "outside (0, 1)")):
        r = run(*args, "--out", tmp_path / "x")
        assert r.exit_code == 2 and msg in r.output, r.output
    # a cap no set of layers meets at a ratio is refused before any scoring, naming the MACs share it allows
    r = run("--by", "macs", "--max-params", "0.01", "--ratios", "0.2,0.5", "--n", "4", "--out", tmp_path / "u")
    assert r.exit_code == 2 and "no set of layers removes 0.2 of the MACs with at most 0.01" in r.output, r.output
    assert not (tmp_path / "u" / "compare.json").exists()

    r = run("--by", "macs", "--max-params", "0.4", "--ratios", "0.35,0.2", "--n", "4", "--no-pairs", "--sample", "2",
            "--steps", "2", "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert res["by"] == "macs" and res["max_params"] == 0.4 and "greedy_order" not in res and res["stock"] == []
    assert [row["ratio"] for row in res["ratios"]] == [0.2, 0.35]
    for row in res["ratios"]:  # every criterion's set reaches the MACs share and keeps under the cap
        for crit in ("output-loss", "magnitude", "taylor", "similarity", "random#0"):
            assert row[f"{crit}_macs_share"] >= row["ratio"] and row[f"{crit}_share"] <= 0.4, (crit, row["ratio"])
    # the same selection as layer-prune --by macs --max-params makes on its own (magnitude needs no calibration)
    r = _cli(tiny_digits_folder, "--criterion", "magnitude", "--by", "macs", "--ratio", "0.35", "--max-params", "0.4",
             "--out", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.output
    assert sorted(json.loads((tmp_path / "p" / "scores.json").read_text())["removed"]) == \
        sorted(res["ratios"][1]["magnitude_removed"])
    # BK-SDM by MACs: the output-loss set at its MACs removes at least its MACs and at most its params, and is the
    # least-summed-loss such set by the exact capped knapsack
    d = load(str(tiny_digits_folder)).denoiser
    for b in res["bk_sdm"]:
        assert 0 < b["macs_ratio"] < 1 and 0 < b["ratio"] < 1
        if b["output_loss_at_macs"] is None:
            assert "no set of layers" in b["at_macs_unreachable"]
            continue
        assert b["output_loss_at_macs_share"] <= b["ratio"] + 1e-12
        assert b["output_loss_at_macs_macs_share"] >= b["macs_ratio"] - 1e-12
        single = res["scores"]["output-loss"]
        if set(b["removed"]) <= set(single):  # BK-SDM's own set qualifies (Tiny's samplers are no candidates)
            assert sum(single[n] for n in b["output_loss_at_macs_removed"]) <= sum(single[n] for n in b["removed"])
        assert 0 < b["output_loss_at_macs_sampled"]["psnr"] < 100 and 0 < b["sampled"]["psnr"] < 100
    assert res["bk_sdm"][0]["output_loss_at_macs"] is not None and set(res["bk_sdm"][0]["removed"]) <= set(single)
    assert lp.is_unet(d) and (tmp_path / "c" / "sampled_psnr.png").stat().st_size > 1000


def test_sdxl_inner_transformer_blocks_and_selection_by_macs(tiny_digits_pipe):
    sdxl = load(str(CONFIGS / "sdxl-unet")).denoiser
    outer, inner = lp.candidate_names(sdxl), lp.candidate_names(sdxl, inner=True)
    assert "down_blocks.2.attentions.0" in outer and "down_blocks.2.attentions.0" not in inner
    assert "down_blocks.2.attentions.0.transformer_blocks.9" in inner and len(inner) > len(outer)
    name = "down_blocks.2.attentions.0.transformer_blocks.9"
    cost = lp.candidates(sdxl, names=[name])[0].params
    assert _params(sdxl) - _params(lp.prune_layers(sdxl, [name])) == cost > 0
    with pytest.raises(UserError, match="cannot remove"):
        lp.prune_layers(sdxl, [name + ".attn1"])
    # by MACs: the removed share of the profiled forward's MACs reaches the ratio
    res = lp.layer_prune(tiny_digits_pipe.denoiser, "magnitude", 0.3, by="macs")
    assert res.macs_removed >= 0.3 * res.macs and res.params_removed < res.params


def _sd3_and_flux():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(1)
    sd3_in = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g))
    flux_in = dict(hidden_states=torch.randn(1, 16, 16, generator=g), timestep=torch.tensor([0.5]),
                   encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                   pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(16, 3),
                   txt_ids=torch.zeros(5, 3))
    return (sd3, sd3_in), (flux, flux_in)


def test_sd3_and_flux_blocks_are_removed_as_both_streams_passing_through(tmp_path):
    """SD3's and Flux's two-stream blocks: removal is SD3's own skip_layers (Flux: a hook that hands both
    streams through), bit for bit; the exported model is smaller and reloads with the same weights."""
    from diffslim.methods.layer_prune import candidates, prune_layers

    (sd3, sd3_in), (flux, flux_in) = _sd3_and_flux()
    with torch.no_grad():
        # SD3: removing block 1 equals SD3's own skip_layers=[1]
        assert [c.name for c in candidates(sd3)] == [f"transformer_blocks.{i}" for i in range(3)]
        assert torch.equal(prune_layers(sd3, [])(**sd3_in).sample, sd3(**sd3_in).sample)
        pruned = prune_layers(sd3, ["transformer_blocks.1"])
        want = sd3(**sd3_in, skip_layers=[1]).sample
        assert torch.equal(pruned(**sd3_in).sample, want) and not torch.equal(want, sd3(**sd3_in).sample)
        assert pruned.transformer_blocks[1].context_pre_only is False  # SD3's ControlNet loop reads it
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in sd3.parameters())
        # Flux: one double-stream and one single-stream block
        names = ["transformer_blocks.1", "single_transformer_blocks.0"]
        assert {"transformer_blocks.1", "single_transformer_blocks.1"} <= {c.name for c in candidates(flux)}
        hooks = [flux.get_submodule(n).register_forward_hook(
            lambda m, args, kwargs, out: (kwargs["encoder_hidden_states"], kwargs["hidden_states"]), with_kwargs=True)
            for n in names]
        want = flux(**flux_in).sample
        for h in hooks:
            h.remove()
        fpruned = prune_layers(flux, names)
        assert torch.equal(fpruned(**flux_in).sample, want) and not torch.equal(want, flux(**flux_in).sample)
        for model, kw, name in ((pruned, sd3_in, "sd3"), (fpruned, flux_in, "flux")):
            model.save_pretrained(str(tmp_path / name), safe_serialization=True)
            back = load(str(tmp_path / name)).denoiser
            assert type(back).__name__ == type(model).__name__ and _params(back) == _params(model)
            for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
                assert torch.equal(a, b), k
            # same weights bit for bit; kernels may differ in the last bits with memory layout
            torch.testing.assert_close(back(**kw).sample, model(**kw).sample, atol=1e-5, rtol=1e-4)
    assert type(fpruned).__name__ == "LayerPrunedFluxTransformer2DModel"


def test_cli_distill_the_pruned_model_with_matched_weight(tiny_digits_folder, tmp_path):
    from diffslim.cli import app

    r = _cli(tiny_digits_folder, "--ratio", "0.3", "--n", "4", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    run = ["distill", str(tiny_digits_folder), str(tmp_path / "model"), "--steps", "2", "--batch-size", "4",
           "--out", str(tmp_path / "kd")]
    r = CliRunner().invoke(app, [*run, "--match-plain-weight"])
    assert r.exit_code == 0, r.output
    scale = json.loads((tmp_path / "kd" / "distill.json").read_text())["feat_scale"]
    assert scale > 0 and f"feature weight x{scale:.4g}" in " ".join(r.output.split())
    # the teacher's pipeline with the distilled student in place, which sample and evaluate take
    from diffslim.models.load import load

    assert f"(sample, evaluate and bench take it): {tmp_path / 'kd' / 'pipeline'}" in " ".join(r.output.split())
    piped, student = load(str(tmp_path / "kd" / "pipeline")), load(str(tmp_path / "kd" / "student")).denoiser
    assert piped.pipe is not None and type(piped.denoiser) is type(student)
    sd = [m.state_dict() for m in (piped.denoiser, student)]
    assert sd[0].keys() == sd[1].keys() and all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    # the student's weights once on disk: the pipeline's are the same file, as are the pruned model's and its pipeline's
    weights = "diffusion_pytorch_model.safetensors"
    assert os.path.samefile(tmp_path / "kd" / "student" / weights, tmp_path / "kd" / "pipeline" / "denoiser" / weights)
    assert os.path.samefile(tmp_path / "model" / weights, tmp_path / "pipeline" / "denoiser" / weights)
    r = CliRunner().invoke(app, [*run, "--plain", "--match-plain-weight"])
    assert r.exit_code == 2 and "use it with normalized=True" in r.output
    r = CliRunner().invoke(app, [*run[:-1], str(tmp_path / "kd_sample"), "--feat-norm", "sample"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "kd_sample" / "distill.json").read_text())["config"]["feat_norm"] == "sample"
    r = CliRunner().invoke(app, [*run[:-1], str(tmp_path / "kd_bad"), "--feat-norm", "channel"])
    assert r.exit_code == 2 and "feat_norm (--feat-norm) 'channel': accepted 'batch' or 'sample'" in r.output


def test_bench_layers_kd_distils_once_and_caches(tmp_path, monkeypatch):
    from diffslim import bench
    from diffslim.cli import app

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "DEFAULT_KD", {**bench.DEFAULT_KD, "steps": 2, "batch_size": 4})
    monkeypatch.setattr(bench, "LAYER_CALIB", dict(n=8, seed=0))
    args = ["bench", "zoo:digits-dit", "--methods", "layers:0.3,layers:0.3+kd", "--n", "2", "--steps", "3", "--json"]
    r = CliRunner().invoke(app, args[:3] + ["layers:0.5,layers:0.5:pairs,layers:0.5:similarity,layers:0.3:similarity"]
                           + args[4:])
    assert r.exit_code == 0, r.output
    rows = {x["method"]: x for x in json.loads(r.stdout)["rows"]}
    assert rows["layers:0.5:pairs"]["params"] == rows["layers:0.5"]["params"]  # four of six equal blocks each
    assert rows["layers:0.5:pairs"]["psnr"] != rows["layers:0.5"]["psnr"] and "second order" in \
        rows["layers:0.5:pairs"]["notes"]
    assert rows["layers:0.5:similarity"]["params"] == rows["layers:0.5"]["params"] < rows["layers:0.3:similarity"][
        "params"] and "similarity criterion" in rows["layers:0.5:similarity"]["notes"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = {x["method"]: x for x in json.loads(r.stdout)["rows"]}  # the training progress bar is on stderr
    assert rows["layers:0.3+kd"]["params"] == rows["layers:0.3"]["params"] < rows["full"]["params"]
    assert rows["layers:0.3+kd"]["psnr"] != rows["layers:0.3"]["psnr"]  # trained weights
    assert "feature weight matched to the plain sum" in rows["layers:0.3+kd"]["notes"]
    runs = list((tmp_path / "cache" / "layer_kd").glob("*/distill.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["feat_scale"] > 0
    stamp = runs[0].stat().st_mtime_ns
    r = CliRunner().invoke(app, args)  # the second bench reuses the cached student
    assert r.exit_code == 0 and runs[0].stat().st_mtime_ns == stamp
    assert json.loads(runs[0].read_text())["config"]["lambda_task"] == 1.0
    # without the task loss: another cached student, trained on output and feature distillation only
    r = CliRunner().invoke(app, args + ["--kd-task-weight", "0"])
    assert r.exit_code == 0, r.output
    notask = {x["method"]: x for x in json.loads(r.stdout)["rows"]}["layers:0.3+kd"]
    assert "(no task loss)" in notask["notes"] and notask["psnr"] != rows["layers:0.3+kd"]["psnr"]
    runs = sorted((tmp_path / "cache" / "layer_kd").glob("*/distill.json"), key=lambda f: f.stat().st_mtime_ns)
    assert len(runs) == 2 and json.loads(runs[1].read_text())["config"]["lambda_task"] == 0.0
    r = CliRunner().invoke(app, args + ["--kd-task-weight", "-1"])
    assert r.exit_code != 0 and "give a number >= 0" in r.output


def test_denoiser_calls_record_each_inputs_call_and_stop_early(tiny_digits_pipe, calls_alone):
    from diffslim.models.load import denoiser_of
    from diffslim.sample import SampleSpec, denoiser_calls

    inputs, seeds = [{"class_label": 3}, {"class_label": 5}, {"class_label": 7}], [11, 12, 13]
    spec = SampleSpec(inputs, seeds, num_inference_steps=4, batch_size=2)
    count = [0]
    h = denoiser_of(tiny_digits_pipe).register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    try:
        got = denoiser_calls(tiny_digits_pipe, spec, [0, 3, 2])
    finally:
        h.remove()
    assert count[0] == 4 + 3  # the first batch stops at its call 3, the second at its call 2 (of 4 each)
    alone = calls_alone(tiny_digits_pipe, inputs, seeds, 4)
    for i, (named, rows, call) in enumerate(got):
        assert call == [0, 3, 2][i]
        assert rows == ([i, i + 2] if i < 2 else [0, 1])  # classifier-free guidance: [uncond; cond] per batch
        ref = alone[i][[0, 3, 2][i]][0]
        assert torch.allclose(named["sample"][rows], ref["sample"], atol=1e-5)
        assert torch.equal(named["encoder_hidden_states"][rows], ref["encoder_hidden_states"])
    assert torch.equal(got[0][0]["sample"][[0, 2]], alone[0][0][0]["sample"])  # call 0: the initial noise, exact
    with pytest.raises(UserError, match="call number 4 was asked for"):
        denoiser_calls(tiny_digits_pipe, spec, [4, 0, 0])
    with pytest.raises(UserError, match="one per input"):
        denoiser_calls(tiny_digits_pipe, spec, [0])


def test_sampling_calibration_is_the_pipelines_own_calls(tiny_digits_pipe, calls_alone):
    from diffslim.models.load import denoiser_of

    den = denoiser_of(tiny_digits_pipe)
    calib = lp.sampling_calibration(tiny_digits_pipe, n=6, seed=0, steps=6, sample_batch=4)
    src = calib.source
    assert len(calib) == 12 and src["rows"] == [2] * 6 and src["steps"] == 6
    assert sorted(src["calls"]) == list(range(6))  # n == steps: one call in each step's bin
    assert calib.target is None and calib.t.shape == (12,)
    again = lp.sampling_calibration(tiny_digits_pipe, n=6, seed=0, steps=6, sample_batch=2)  # batching changes nothing
    assert again.source == src and torch.allclose(again.xt, calib.xt, atol=1e-5)
    assert not torch.allclose(lp.sampling_calibration(tiny_digits_pipe, n=6, seed=1, steps=6).xt, calib.xt)
    # the calibration's predictions are the denoiser's outputs on the pipeline's own calls, input by input
    pred = calib.run(den)
    alone = calls_alone(tiny_digits_pipe, src["inputs"], src["seeds"], 6)
    for k, call in enumerate(src["calls"]):
        named, out = alone[k][call]
        assert torch.allclose(calib.t[2 * k:2 * k + 2], named["timestep"].reshape(-1).expand(2).to(calib.t.dtype))
        assert torch.allclose(pred[2 * k:2 * k + 2], out, atol=1e-5)
    with pytest.raises(UserError, match="taylor criterion needs the diffusion loss"):
        lp.score_layers(den, lp.candidates(den), "taylor", calib)
    # the criteria run on it: the output-loss selection reaches the ratio and removing nothing costs nothing
    res = lp.layer_prune(den, "output-loss", 0.3, calib=calib)
    assert res.params_removed >= 0.3 * res.params and lp.output_loss(den, calib, []) == 0.0


def _tiny_dit_pipeline(num_layers: int):
    """A tiny random-weight diffusers DiTPipeline: learned variance (8 output channels), 1000 classes as DiT's own
    (its pipeline passes 1000 as the null label), an 8 px VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=num_layers, sample_size=4, patch_size=2, num_embeds_ada_norm=1000,
                                norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=8)
    pipe = DiTPipeline(transformer=dit.eval(), vae=vae.eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sampling_calibration_keeps_a_learned_sigma_models_noise_half(tmp_path, calls_alone):
    pipe = _tiny_dit_pipeline(num_layers=2)
    dit = pipe.transformer
    (tmp_path / "labels.txt").write_text("1\n4\n")
    calib = lp.sampling_calibration(pipe, n=2, seed=0, steps=3, data=str(tmp_path / "labels.txt"))
    pred = calib.run(dit)
    assert pred.shape == (4, 4, 4, 4) and calib.source["rows"] == [2, 2]
    alone = calls_alone(pipe, calib.source["inputs"], calib.source["seeds"], 3)
    for k, call in enumerate(calib.source["calls"]):
        out = alone[k][call][1]
        assert out.shape[1] == 8 and torch.allclose(pred[2 * k:2 * k + 2], out[:, :4], atol=1e-5)


def test_cli_layer_prune_calibrated_on_prompts_alone(tiny_sd_pipe, tmp_path):
    folder = tmp_path / "sd"
    tiny_sd_pipe.save_pretrained(str(folder))
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    for args, msg in ((("--calibration", "noise"), "accepted: data, sampling"),
                      (("--calib-steps", "3"), "give that too"),
                      (("--calibration", "sampling", "--resolution", "16"), "drop --resolution"),
                      (("--calibration", "sampling", "--criterion", "taylor"), "use --calibration data")):
        r = _cli(folder, "--ratio", "0.3", *args, "--out", tmp_path / "x")
        assert r.exit_code == 2 and msg in r.output, r.output
    r = _cli(folder, "--ratio", "0.3", "--n", "3", "--calibration", "sampling", "--data", tmp_path / "prompts.txt",
             "--calib-steps", "3", "--out", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert report["params_removed_share"] >= 0.3 and all(l["score"] >= 0 for l in report["layers"])
    assert report["calibration"] == {"kind": "sampling", "n": 3, "seed": 0, "data": str(tmp_path / "prompts.txt"),
                                     "steps": 3}
    assert _params(load(str(tmp_path / "p" / "model")).denoiser) == report["params_after"]
    # the data calibration cannot take prompts alone, and says what it takes
    r = _cli(folder, "--ratio", "0.3", "--n", "3", "--data", tmp_path / "prompts.txt", "--out", tmp_path / "d")
    assert r.exit_code == 2, r.output


def test_cli_layer_compare_on_sampling_calibration(tiny_digits_folder, tmp_path):
    from diffslim.cli import app

    r = CliRunner().invoke(app, ["layer-compare", str(tiny_digits_folder), "--calibration", "sampling",
                                 "--calib-steps", "4", "--ratios", "0.3", "--n", "4", "--no-pairs", "--no-greedy",
                                 "--out", str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c" / "compare.json").read_text())
    row = res["ratios"][0]
    assert res["calibration"] == "sampling" and "taylor" not in row and "taylor" not in res["scores"]
    assert row["output-loss_share"] >= 0.3
    # judged on held-out sampling calls: other inputs, seeds and steps (seed 1), the same the library makes
    loaded = load(str(tiny_digits_folder))
    held = lp.sampling_calibration(loaded.pipe, n=4, seed=1, steps=4)
    assert row["output-loss"] == pytest.approx(lp.output_loss(loaded.denoiser, held, row["output-loss_removed"]),
                                               rel=1e-6)


def test_bench_layers_on_a_pipeline_without_data(tiny_sd_pipe, tiny_controlnet_pipe, tmp_path, monkeypatch):
    """A text-to-image pipeline without --data: layers:R scores on the pipeline's own denoiser calls, and +kd trains on
    images the full pipeline samples from the prompts; a ControlNet pipeline on its control images and its outputs
    as pairs (it needed --data before); a multi-ControlNet's lists of images need --data."""
    from diffslim import bench
    from diffslim.bench import LAYER_CALIB, run_bench
    from diffslim.evaluate import eval_set_for
    from diffslim.zoo.evalsets import EvalSet

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "DEFAULT_KD", {**bench.DEFAULT_KD, "steps": 2, "batch_size": 2})
    monkeypatch.setattr(bench, "TEACHER_SAMPLES", 3)
    tiny_sd_pipe.save_pretrained(str(tmp_path / "sd"))
    loaded = load(str(tmp_path / "sd"))
    es = eval_set_for(loaded, 2)
    rows = run_bench(loaded, "layers:0.3,layers:0.3+kd", es, default_steps=4, batch_size=2, progress=False).rows
    row = rows[1]
    assert "pipeline's own denoiser calls" in row["notes"]
    assert "3 images the full pipeline sampled from the prompts" in rows[2]["notes"]
    (folder,) = (tmp_path / "cache" / "teacher_samples").iterdir()
    assert sorted(f.name for f in folder.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert (folder / "00002.txt").read_text() == es.inputs[0]["prompt"]  # the bench's prompts, cycled
    assert rows[2]["params"] == row["params"]
    # on the teacher's own samples the default is no task loss (it only repeats the output term there); a weight
    # given is kept, in a cached run of its own
    assert "(no task loss)" in rows[2]["notes"]
    assert bench.default_task_weight(loaded) == 0.0 and bench.default_task_weight(loaded, str(tmp_path)) == 1.0
    runs = list((tmp_path / "cache" / "layer_kd").glob("*/distill.json"))
    assert [json.loads(f.read_text())["config"]["lambda_task"] for f in runs] == [0.0]
    rows1 = run_bench(loaded, "layers:0.3+kd", es, default_steps=4, batch_size=2, progress=False, task_weight=1).rows
    assert "task + output" in rows1[1]["notes"]
    runs = list((tmp_path / "cache" / "layer_kd").glob("*/distill.json"))
    assert sorted(json.loads(f.read_text())["config"]["lambda_task"] for f in runs) == [0.0, 1.0]
    cn = tmp_path / "cn"
    tiny_controlnet_pipe.save_pretrained(str(cn))
    cloaded = load(str(cn))
    with pytest.raises(UserError, match="samples from input images"):  # and no inputs file gives them
        eval_set_for(cloaded, 1)
    # a ControlNet pipeline samples its training pairs: the bench's control images beside the full model's outputs
    control = (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    ces = EvalSet(inputs=[{"prompt": "a cat", "image": control}], seeds=[0])
    crows = run_bench(cloaded, "layers:0.3+kd", ces, default_steps=2, batch_size=1, progress=False).rows
    assert "3 images the full pipeline sampled from the prompts and input images (as pairs)" in crows[1]["notes"]
    (pairs,) = [f for f in (tmp_path / "cache" / "teacher_samples").iterdir() if f != folder]
    assert sorted(f.name for f in (pairs / "target").glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert (pairs / "target" / "00001.txt").read_text() == "a cat"
    from diffslim.train.data import ConditionPairs

    pair = ConditionPairs(pairs)[2]
    assert torch.equal(pair["cond"], control) and pair["image"].shape == control.shape
    with pytest.raises(UserError, match="neither a zoo model nor a pipeline of prompts .and input images.: give"):
        run_bench(cloaded, "layers:0.3+kd", EvalSet(inputs=[{"prompt": "a cat", "image": [control, control]}],
                                                     seeds=[0]), default_steps=2, batch_size=1, progress=False)
    # the selection the library makes on the bench's calibration prompts (other seeds than evaluation's)
    calib = lp.sampling_calibration(loaded.pipe, inputs=es.inputs, steps=4, call_kwargs=es.call_kwargs, **LAYER_CALIB)
    direct = lp.layer_prune(loaded.denoiser, "output-loss", 0.3, calib=calib)
    assert row["params"] == direct.params - direct.params_removed < direct.params


def test_sampling_calibration_of_a_controlnet_pipelines_unet(tiny_controlnet_pipe, calls_alone):
    """A ControlNet pipeline has no training task here, but its U-Net calls record the ControlNet's residuals (a list,
    one per skip connection), which a pruned U-Net takes as they are: the output loss runs on them."""
    pipe = tiny_controlnet_pipe
    g = torch.Generator().manual_seed(0)
    inputs = [{"prompt": p, "image": torch.rand(3, 16, 16, generator=g)} for p in ("a cat", "a dog")]
    calib = lp.sampling_calibration(pipe, n=3, steps=3, inputs=inputs, call_kwargs={"height": 16, "width": 16})
    pred = calib.run(pipe.unet)
    alone = calls_alone(pipe, calib.source["inputs"], calib.source["seeds"], 3, {"height": 16, "width": 16})
    n_res = len(alone[0][0][0]["down_block_additional_residuals"])
    assert len(calib) == 6 and len(calib.cond["down_block_additional_residuals"]) == n_res > 1
    assert calib.cond["mid_block_additional_residual"].shape[0] == 6
    for k, call in enumerate(calib.source["calls"]):
        named, out = alone[k][call]
        assert isinstance(named["down_block_additional_residuals"], (list, tuple))
        assert torch.allclose(pred[2 * k:2 * k + 2], out, atol=1e-5)
    res = lp.layer_prune(pipe.unet, "output-loss", 0.3, calib=calib)
    assert res.params_removed >= 0.3 * res.params and lp.output_loss(pipe.unet, calib, []) == 0.0


def test_cli_distill_on_teacher_samples_from_prompts(tiny_sd_pipe, tmp_path):
    """Prompts alone: the layer-pruned student is scored on the pipeline's calls and distilled on images the teacher
    samples from the prompts (captioned, resumable, refused when made for other settings)."""
    import numpy as np
    from PIL import Image

    from diffslim.cli import app
    from diffslim.sample import SampleSpec, sample

    tiny_sd_pipe.save_pretrained(str(tmp_path / "sd"))
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    r = _cli(tmp_path / "sd", "--ratio", "0.3", "--n", "3", "--calibration", "sampling", "--data",
             tmp_path / "prompts.txt", "--calib-steps", "2", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    run = ["distill", str(tmp_path / "sd"), str(tmp_path / "p" / "model"), "--data", str(tmp_path / "prompts.txt"),
           "--teacher-samples", "3", "--sample-steps", "2", "--steps", "2", "--batch-size", "2",
           "--out", str(tmp_path / "kd")]
    r = CliRunner().invoke(app, run)
    assert r.exit_code == 0, r.output
    folder = tmp_path / "kd" / "teacher_samples"
    assert sorted(f.name for f in folder.iterdir()) == ["00000.png", "00000.txt", "00001.png", "00001.txt",
                                                         "00002.png", "00002.txt", "samples.json"]
    assert [(folder / f"0000{i}.txt").read_text() for i in range(3)] == ["a red cube", "a blue ball", "a red cube"]
    # the images are the teacher's samples at those seeds, to the 8-bit rounding of a PNG
    ref = sample(tiny_sd_pipe, SampleSpec([{"prompt": "a red cube"}, {"prompt": "a blue ball"}], [300_000, 300_001],
                                          num_inference_steps=2))
    for i in range(2):
        png = torch.from_numpy(np.asarray(Image.open(folder / f"0000{i}.png"), dtype=np.float32) / 255).permute(2, 0, 1)
        assert (png - ref[i]).abs().max() <= 0.5 / 255 + 1e-6
    assert (tmp_path / "kd" / "student" / "config.json").exists()
    assert json.loads((tmp_path / "kd" / "distill.json").read_text())["config"]["lambda_task"] == 0.0  # the default
    assert "(the default here)" not in r.output
    # an interrupted sampling resumes: only the missing image is sampled again, the others are kept as they are
    (folder / "00001.png").unlink()
    kept = (folder / "00000.png").stat().st_mtime_ns
    r = CliRunner().invoke(app, [*run[:-1], str(tmp_path / "kd2"), "--lambda-task", "1"])
    assert r.exit_code == 0, r.output
    assert "without it (the default here)" in " ".join(r.output.split())  # the task loss, asked for: a hint
    assert json.loads((tmp_path / "kd2" / "distill.json").read_text())["config"]["lambda_task"] == 1.0
    r = CliRunner().invoke(app, [*run[:-1], str(tmp_path / "kd")])  # same run folder: the checkpoint resumes too
    assert r.exit_code == 0, r.output
    assert (folder / "00001.png").exists() and (folder / "00000.png").stat().st_mtime_ns == kept
    r = CliRunner().invoke(app, [*run[:8], "3", *run[9:]])  # other sampling steps into the same folder
    assert r.exit_code == 2 and "other prompts, seeds or steps" in r.output, r.output
    (tmp_path / "prompts.csv").write_text("x\n")
    r = CliRunner().invoke(app, [*run[:3], "--data", str(tmp_path / "prompts.csv"), *run[5:]])
    assert r.exit_code == 2 and "a .txt file of prompts" in r.output, r.output


def test_cli_distill_a_class_conditional_student_on_teacher_samples_of_labels(tiny_digits_folder, tmp_path,
                                                                               monkeypatch):
    """Class labels instead of prompts: the teacher samples each label, the caption is the label, and the trainer
    reads the folder as labelled grey images (a folder without integer captions is refused). The teacher is loaded
    where the trainer runs ('auto': this process's GPU), not on the CPU, since it samples first."""
    import diffslim.models.load as loader
    from diffslim.cli import app
    from diffslim.train.data import LabelledFolder, make_dataset

    r = _cli(tiny_digits_folder, "--ratio", "0.3", "--criterion", "magnitude", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    devices, real_load = {}, loader.load

    def recording_load(model, *args, **kwargs):
        devices.setdefault(str(model), kwargs.get("device", "cpu"))
        return real_load(model, *args, **kwargs)

    monkeypatch.setattr(loader, "load", recording_load)
    (tmp_path / "labels.txt").write_text("3\n7\n")
    r = CliRunner().invoke(app, ["distill", str(tiny_digits_folder), str(tmp_path / "p" / "model"), "--data",
                                 str(tmp_path / "labels.txt"), "--teacher-samples", "3", "--sample-steps", "2",
                                 "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "kd")])
    assert r.exit_code == 0, r.output
    assert devices[str(tiny_digits_folder)] == "auto"
    folder = tmp_path / "kd" / "teacher_samples"
    assert [(folder / f"0000{i}.txt").read_text() for i in range(3)] == ["3", "7", "3"]
    pipe = load(str(tiny_digits_folder)).pipe
    ds = make_dataset(str(folder), pipe)
    assert isinstance(ds, LabelledFolder) and len(ds) == 3
    item = ds[1]
    assert item["label"] == 7 and item["image"].shape == (1, 8, 8) and 0 <= float(item["image"].min())
    (folder / "00001.txt").write_text("a seven")
    with pytest.raises(UserError, match="00001.png's caption 'a seven' is not a class label in 0..9"):
        make_dataset(str(folder), pipe)


def test_cli_distills_a_dit_pipeline_on_its_samples_of_class_labels(tmp_path, monkeypatch):
    """diffusers' DiTPipeline had no distillation task (refused after the teacher had sampled): it trains on VAE
    latents of labelled images, labels dropped to the null class as the pipeline's guidance passes it, and on the
    noise half of the learned-variance output. A pipeline without a task is refused before any sampling."""
    from diffslim.cli import app
    from diffslim.errors import UserError
    from diffslim.train import distill as trainer
    from diffslim.train.data import LabelledFolder, collate, make_dataset

    _tiny_dit_pipeline(num_layers=4).save_pretrained(tmp_path / "dit")
    (tmp_path / "labels.txt").write_text("1\n4\n7\n")
    r = _cli(tmp_path / "dit", "--ratio", "0.3", "--criterion", "magnitude", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    args = ["distill", str(tmp_path / "dit"), str(tmp_path / "p" / "model"), "--data", str(tmp_path / "labels.txt"),
            "--teacher-samples", "3", "--sample-steps", "2", "--steps", "2", "--batch-size", "2"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "kd")])
    assert r.exit_code == 0, r.output
    samples = tmp_path / "kd" / "teacher_samples"
    assert [(samples / f"0000{i}.txt").read_text() for i in range(3)] == ["1", "4", "7"]
    pipe = load(str(tmp_path / "dit")).pipe
    ds = make_dataset(str(samples), pipe)
    assert isinstance(ds, LabelledFolder) and ds[2]["label"] == 7 and ds[2]["image"].shape == (3, 8, 8)
    task = trainer.task_for(pipe, label_dropout=1.0)  # every label dropped: the null class, 1000
    x0, cond = task.encode(collate([ds[0], ds[1]]), torch.Generator().manual_seed(0), "cpu")
    assert x0.shape == (2, 4, 4, 4) and cond["class_labels"].tolist() == [1000, 1000]
    t = torch.tensor([10, 500])
    full = pipe.transformer(x0, timestep=t, class_labels=cond["class_labels"], return_dict=False)[0]
    assert full.shape[1] == 8 and torch.equal(task.predict(pipe.transformer, x0, t, cond), full[:, :4])
    rows = list(csv.DictReader(open(tmp_path / "kd" / "train_log.csv")))
    assert float(rows[0]["out"]) > 0 and float(rows[0]["feat"]) > 0  # a pruned student, distilled

    def no_task(pipe, label_dropout=0.1):
        raise UserError(f"no distillation task for {type(pipe).__name__}")

    monkeypatch.setattr(trainer, "task_for", no_task)
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "kd2")])
    assert r.exit_code == 2 and "no distillation task for DiTPipeline" in r.output
    assert not (tmp_path / "kd2" / "teacher_samples").exists()  # refused before the teacher sampled


def test_bench_layer_calibration_sets_how_many_triples_the_criteria_score_on():
    """bench --layer-calibration N: layers:R scores on N calibration triples (default 32) and the row says how many.
    On zoo:digits-dit at 0.5 one triple selects blocks 0-3 and 32 select 1, 3, 4 and 5 (checked here through
    layer_prune), and the two rows sample differently; N below 1 is refused."""
    from diffslim.cli import app

    loaded = load("zoo:digits-dit")
    picks = [sorted(lp.layer_prune(loaded.denoiser, "output-loss", 0.5, calib=lp.calibration(loaded.pipe, n=n, seed=0))
                    .removed) for n in (1, 32)]
    assert picks[0] != picks[1]
    rows = []
    for extra in (["--layer-calibration", "1"], []):
        r = CliRunner().invoke(app, ["bench", "zoo:digits-dit", "--methods", "layers:0.5", "--n", "2", "--steps", "3",
                                     "--json", *extra])
        assert r.exit_code == 0, r.output
        rows.append(json.loads(r.stdout)["rows"][1])
    assert "(output loss, 1 calibration triple)" in rows[0]["notes"]
    assert "(output loss, 32 calibration triples)" in rows[1]["notes"]
    assert rows[0]["psnr"] != rows[1]["psnr"]
    r = CliRunner().invoke(app, ["bench", "zoo:digits-dit", "--methods", "layers:0.5", "--layer-calibration", "0"])
    assert r.exit_code != 0 and "--layer-calibration" in r.output


def test_a_denoiser_that_cannot_be_exported_is_refused_before_scoring(tiny_sd_pipe, tmp_path, monkeypatch):
    """AuraFlow's two-stream blocks were scored (and crashed there, their stand-ins returning one stream) before
    the export's class check refused the model: layer_prune, bench's layers:R and the layer-prune command refuse a
    model without an export first (LTX-Video's here; AuraFlow has one since session 35, Qwen-Image and Chroma since
    session 37, Flux.2 since session 38).
    The command sampled its whole calibration first (189 s on a tiny Qwen-Image) and then refused."""
    from diffusers import LTXVideoTransformer3DModel

    import diffslim.cli as cli
    import diffslim.models.load as load_module
    from diffslim.bench import BenchContext, METHODS
    from diffslim.sample import SampleSpec

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                       num_layers=2, caption_channels=16)
    assert lp.candidate_names(model) == ["transformer_blocks.0", "transformer_blocks.1"]
    with pytest.raises(UserError, match="layer pruning exports .* not LTXVideoTransformer3DModel"):
        lp.layer_prune(model, "output-loss", 0.3)
    loaded = LoadedModel("ltx", "pipeline", model, pipe=tiny_sd_pipe)
    dry = BenchContext(loaded=loaded, base_spec=SampleSpec(inputs=[{"prompt": "a"}], seeds=[0]), default_steps=2,
                       dry_run=True)
    with pytest.raises(UserError, match="not LTXVideoTransformer3DModel"):
        METHODS["layers"]("0.3", dry)

    def no_calibration(*a, **k):
        raise AssertionError("calibrated before the refusal")

    monkeypatch.setattr(load_module, "load", lambda *a, **k: loaded)
    monkeypatch.setattr(cli, "_layer_calibration", no_calibration)
    r = CliRunner().invoke(cli.app, ["layer-prune", "ltx", "--ratio", "0.3", "--calibration", "sampling",
                                     "--out", str(tmp_path / "lp")])
    assert r.exit_code == 2 and "not LTXVideoTransformer3DModel" in " ".join(r.output.split()), r.output


def _tiny_family_denoiser(family: str):
    """A tiny random ``family`` denoiser (Sana, CogView4, AuraFlow, Lumina2, HunyuanDiT, Z-Image, Qwen-Image) and keyword inputs
    of one call."""
    import diffusers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = torch.tensor([10.0, 500.0])
    if family == "sana":
        m = diffusers.SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=3,
                                             num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                             cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                             sample_size=4)
        kw = dict(hidden_states=r(2, 4, 4, 4), encoder_hidden_states=r(2, 5, 8), timestep=t)
    elif family == "cogview4":  # its blocks return (image, text): the other order from SD3's and Flux's
        m = diffusers.CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
                                                 num_attention_heads=4, out_channels=4, text_embed_dim=32,
                                                 time_embed_dim=8, condition_dim=4, sample_size=8,
                                                 pos_embed_max_size=32, rope_axes_dim=(4, 4))
        kw = dict(hidden_states=r(2, 4, 8, 8), encoder_hidden_states=r(2, 5, 32), timestep=t,
                  original_size=torch.tensor([[16.0, 16.0]] * 2), target_size=torch.tensor([[16.0, 16.0]] * 2),
                  crop_coords=torch.zeros(2, 2))
    elif family == "auraflow":
        m = diffusers.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                                 num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                                                 caption_projection_dim=16, joint_attention_dim=16, out_channels=4,
                                                 pos_embed_max_size=64)
        kw = dict(hidden_states=r(2, 4, 8, 8), encoder_hidden_states=r(2, 5, 16), timestep=t)
    elif family == "lumina2":  # blocks in ``layers``, after two refiner lists that are not candidates
        m = diffusers.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=8, num_layers=3,
                                                num_refiner_layers=1, num_attention_heads=1, num_kv_heads=1,
                                                multiple_of=16, axes_dim_rope=(4, 2, 2), cap_feat_dim=8)
        kw = dict(hidden_states=r(2, 4, 8, 8), timestep=torch.tensor([0.1, 0.7]), encoder_hidden_states=r(2, 5, 8),
                  encoder_attention_mask=torch.ones(2, 5, dtype=torch.bool))
    elif family == "zimage":  # per-sample lists: latents (C, frames, H, W) and captions of their own lengths
        m = diffusers.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                               n_layers=3, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                               axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
        kw = dict(x=[r(4, 1, 8, 8), r(4, 1, 8, 8)], t=torch.tensor([0.1, 0.7]), cap_feats=[r(5, 16), r(3, 16)])
    elif family == "chroma":  # Flux's layout; a caption mask over text and image tokens; modulations by position
        m = diffusers.ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                               axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                               approximator_hidden_dim=16, approximator_layers=1)
        mask = torch.ones(2, 5 + 16, dtype=torch.bool)
        mask[1, 3:5] = False
        kw = dict(hidden_states=r(2, 16, 16), encoder_hidden_states=r(2, 5, 16), timestep=torch.tensor([0.01, 0.5]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                     indexing="ij"), -1).reshape(16, 3),
                  txt_ids=torch.zeros(5, 3), attention_mask=mask)
    elif family == "flux2":  # Flux.2: two-stream then one-stream blocks, one modulation shared by all; 4-axis ids
        m = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2))
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1),
                                         indexing="ij"), -1).reshape(16, 4)
        kw = dict(hidden_states=r(2, 16, 8), encoder_hidden_states=r(2, 5, 16), timestep=torch.tensor([0.01, 0.5]),
                  guidance=torch.tensor([3.5, 3.5]), img_ids=ids, txt_ids=torch.zeros(5, 4))
    elif family == "qwenimage":  # two-stream blocks over packed 2x2 patches; the grid's shape per image
        m = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                  axes_dims_rope=(2, 2, 4))
        kw = dict(hidden_states=r(2, 16, 16), encoder_hidden_states=r(2, 5, 16),
                  encoder_hidden_states_mask=torch.tensor([[1] * 5, [1] * 3 + [0] * 2]),
                  timestep=torch.tensor([0.01, 0.5]), img_shapes=[[(1, 4, 4)]] * 2)
    else:
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        m = diffusers.HunyuanDiT2DModel(sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=3, in_channels=4, cross_attention_dim=32,
                                        cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
                                        activation_fn="gelu-approximate", text_len=5, text_len_t5=6)
        kw = dict(hidden_states=r(2, 4, 8, 8), timestep=t, encoder_hidden_states=r(2, 5, 32),
                  text_embedding_mask=torch.ones(2, 5), encoder_hidden_states_t5=r(2, 6, 32),
                  text_embedding_mask_t5=torch.ones(2, 6),
                  image_meta_size=torch.tensor([[16.0, 16.0, 16.0, 16.0, 0.0, 0.0]] * 2),
                  style=torch.zeros(2, dtype=torch.long),
                  image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4)))
    return m.eval(), kw


def _first(model, kw) -> torch.Tensor:
    """A denoiser's prediction for ``kw``, stacked where it returns one tensor per sample (Z-Image)."""
    out = model(**kw, return_dict=False)[0]
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("family", ["sana", "cogview4", "auraflow", "lumina2", "hunyuandit", "zimage", "qwenimage",
                                    "chroma", "flux2"])
def test_transformer_families_are_layer_pruned_and_exported(family, tmp_path):
    """Each block of these denoisers is a candidate (AuraFlow's two-stream joint blocks and one-stream single blocks,
    CogView4's blocks that return the image stream first, Lumina2's main stack, HunyuanDiT's blocks with long
    skips, Z-Image's main stack over per-sample lists, Qwen-Image's two-stream blocks, Chroma's Flux-like lists, and
    since session 38 Flux.2's, whose one modulation for all blocks lets a stock export drop blocks).
    A keep-all pruning is
    the model bit for bit; a pruned model is what the scoring's runtime removal computes, bit for bit, smaller, and
    reloads. Its stock export, a diffusers model with fewer blocks that knows nothing of our stand-ins, computes the
    same bit for bit, which checks that a stand-in passes each stream where the next block reads it. HunyuanDiT
    pairs its long skips by position, and Chroma's modulations are sized by its block counts, so they have no stock
    export and say so, before any scoring too."""
    import diffusers

    from diffslim.models.load import load

    model, kw = _tiny_family_denoiser(family)
    names = lp.candidate_names(model)
    assert len(names) >= 3
    with torch.no_grad():
        full = _first(model, kw)
        assert torch.equal(_first(lp.prune_layers(model, []), kw), full)
        for name in names:
            pruned = lp.prune_layers(model, [name])
            assert type(pruned).__name__ == f"LayerPruned{type(model).__name__}"
            out = _first(pruned, kw)
            with lp.layers_removed(model, [name]):
                assert torch.equal(_first(model, kw), out)
            assert out.shape == full.shape and not torch.equal(out, full)
            assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
            if family in ("hunyuandit", "chroma"):
                why = "long skips pair" if family == "hunyuandit" else "modulation by position"
                with pytest.raises(UserError, match=why):
                    lp.stock_model(pruned)
                with pytest.raises(UserError, match=why):
                    lp.check_stock_selection(model, "output-loss")
                continue
            stock = lp.stock_model(pruned)
            assert type(stock) is getattr(diffusers, type(model).__name__)
            assert sum(len(getattr(stock, ln)) for ln in lp._transformer_lists(stock)) == len(names) - 1
            assert torch.equal(_first(stock, kw), out)
        pruned = lp.prune_layers(model, names[1:3])
        pruned.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
        again = load(str(tmp_path / "m")).denoiser
        assert list(again.config.removed_layers) == names[1:3]
        assert torch.equal(_first(again, kw), _first(pruned, kw))


def _control_pairs(folder, n: int = 4, size: int = 16):
    """A folder of ``n`` ControlNet training pairs: input/ (control images) and target/ (images and captions)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("input", "target"):
        (folder / sub).mkdir(parents=True)
    for i in range(n):
        for sub in ("input", "target"):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / sub / f"{i}.png")
        (folder / "target" / f"{i}.txt").write_text("a cat" if i % 2 else "a dog")
    return folder


def test_a_controlnet_pipeline_scores_and_distils_its_unet_under_its_controlnet(tiny_controlnet_pipe, tmp_path):
    """On control pairs the calibration runs the ControlNet once per batch of triples (not once per scored layer),
    the U-Net's predictions take its residuals, and the trainer runs it once per step for teacher and student alike.
    Before, both left the ControlNet out: the output loss and the distillation were text to image."""
    from diffslim.train.data import make_dataset
    from diffslim.train.distill import DistillConfig, distill

    pipe = tiny_controlnet_pipe
    pairs = _control_pairs(tmp_path / "pairs")
    calls = []
    hook = pipe.controlnet.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        calib = lp.calibration(pipe, n=4, data=str(pairs), batch_size=2)
        assert len(calls) == 2 and len(calib.cond["controlnet"]["down"]) == len(pipe.controlnet.controlnet_down_blocks)
        with torch.no_grad():
            pred = calib.run(pipe.unet)
            emb, control = calib.cond["encoder_hidden_states"], calib.cond["control"]
            down, mid = pipe.controlnet(calib.xt, calib.t, encoder_hidden_states=emb, controlnet_cond=control,
                                        return_dict=False)
            own = pipe.unet(calib.xt, calib.t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        torch.testing.assert_close(pred, own)
        calls.clear()
        res = lp.layer_prune(pipe.unet, "output-loss", 0.3, calib=calib)
        assert calls == [] and res.params_removed >= 0.3 * res.params
        cfg = DistillConfig(steps=3, batch_size=2, out=tmp_path / "kd", lr=1e-4, progress=False)
        distill(pipe, lp.prune_layers(pipe.unet, res.removed), make_dataset(str(pairs), pipe), cfg)
        assert len(calls) == 3
    finally:
        hook.remove()


def test_cli_controlnet_distils_on_teacher_pairs_of_its_control_images(tiny_controlnet_pipe, tmp_path):
    """A ControlNet user with control images and prompts (no target images): layer-prune scores on the pipeline's
    calls, distill samples the teacher's outputs of the .jsonl inputs and trains on them as pairs beside the control
    images (it refused before: 'takes images: the teacher cannot make its training pairs')."""
    import numpy as np
    from PIL import Image

    from diffslim.cli import app
    from diffslim.train.data import ConditionPairs

    cn = tmp_path / "cn"
    tiny_controlnet_pipe.save_pretrained(str(cn))
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"edges{i}.png")
        lines.append(json.dumps({"prompt": f"a cat {i}", "image": f"edges{i}.png"}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    r = _cli(cn, "--ratio", "0.3", "--n", "2", "--calibration", "sampling", "--data", tmp_path / "in.jsonl",
             "--calib-steps", "2", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    run = ["distill", str(cn), str(tmp_path / "p" / "model"), "--data", str(tmp_path / "in.jsonl"),
           "--teacher-samples", "3", "--sample-steps", "2", "--steps", "2", "--batch-size", "2",
           "--out", str(tmp_path / "kd")]
    r = CliRunner().invoke(app, run)
    assert r.exit_code == 0, r.output
    pairs = ConditionPairs(tmp_path / "kd" / "teacher_samples")
    assert len(pairs) == 3
    for i in range(3):  # the inputs cycled: each control image beside the output sampled from it, and its prompt
        assert np.array_equal(np.asarray(Image.open(tmp_path / "kd" / "teacher_samples" / "input" / f"{i:05d}.png")),
                              np.asarray(Image.open(tmp_path / f"edges{i % 2}.png")))
        assert pairs[i]["text"] == f"a cat {i % 2}"
    assert (tmp_path / "kd" / "student" / "config.json").is_file()


def test_bench_trains_on_its_own_samples_at_their_size(tiny_sd_pipe, tmp_path, monkeypatch):
    """Benched at --height/--width without --data, +kd and +ft train on the full pipeline's samples at the size they
    were sampled at (they were blown up to the pipeline's own size before), and a given --resolution now reaches
    +ft as it reached +kd."""
    import numpy as np
    from PIL import Image

    from diffslim import bench
    from diffslim.bench import run_bench
    from diffslim.evaluate import eval_set_for, sized
    from diffslim.train import data as train_data

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "DEFAULT_KD", {**bench.DEFAULT_KD, "steps": 1, "batch_size": 2})
    monkeypatch.setattr(bench, "DEFAULT_FT", {**bench.DEFAULT_FT, "steps": 1, "batch_size": 2})
    monkeypatch.setattr(bench, "TEACHER_SAMPLES", 2)
    sizes = []
    real = train_data.make_dataset

    def recorded(spec, pipe, size=None):
        ds = real(spec, pipe, size)
        sizes.append((size, tuple(ds[0]["image"].shape[-2:])))
        return ds

    monkeypatch.setattr(train_data, "make_dataset", recorded)
    tiny_sd_pipe.save_pretrained(str(tmp_path / "sd"))
    loaded = load(str(tmp_path / "sd"))
    assert train_data.pipeline_image_size(loaded.pipe) == 16  # the pipeline's own size, which they trained at
    es = sized(eval_set_for(loaded, 2), loaded, 24, 24)
    run_bench(loaded, "layers:0.3+kd,depth:1+ft", es, default_steps=2, batch_size=2, progress=False)
    assert sizes == [(24, (24, 24)), (24, (24, 24))]
    sizes.clear()
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    run_bench(loaded, "depth:1+ft", eval_set_for(loaded, 2), default_steps=2, batch_size=2, progress=False,
              data=str(tmp_path / "imgs"), resolution=32)
    assert sizes == [(32, (32, 32))]
