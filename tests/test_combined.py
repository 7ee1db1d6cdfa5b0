"""Depth-skip pruning and layer pruning stacked on one U-Net (``diffslim.combined``): either order gives the same
model, the removals' savings add up exactly, keep-all is the identity, and the result exports and reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import diffslim
from diffslim.combined import DepthSkipLayerPrunedUNet2DConditionModel, DepthSkipLayerPrunedUNet2DModel
from diffslim.errors import UserError
from diffslim.methods.depth_skip import depth_skip, max_depth, removed_modules
from diffslim.methods.layer_prune import candidate_names, candidates, prune_layers

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "diffslim" / "configs"
DEPTH = 7
# kept by depth 7 on the digits U-Net: an attention layer, the deepest kept output unit (its hidden input comes from
# a depth stand-in), an up resnet whose stand-in keeps the hidden input and one whose stand-in is its 1x1 shortcut
LAYERS = ["down_blocks.0.attentions.0", "up_blocks.1.resnets.2", "up_blocks.2.resnets.1", "up_blocks.3.resnets.0"]


def _n(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def unet(tiny_digits_pipe):
    return tiny_digits_pipe.denoiser.eval()


@pytest.fixture(scope="module")
def call():
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 1, 8, 8), torch.tensor([900, 30]), torch.randn(2, 2, 32)

    def run(model):
        with torch.no_grad():
            return model(x, t, encoder_hidden_states=ctx).sample
    return run


def test_the_chosen_layers_are_kept_by_the_depth(unet):
    gone = set(removed_modules(unet, DEPTH))
    assert not gone & set(LAYERS) and set(LAYERS) <= set(candidate_names(unet))
    assert set(LAYERS) <= set(candidate_names(depth_skip(unet, DEPTH)))


def test_either_order_gives_one_model_whose_savings_add_up(unet, call):
    deep = depth_skip(unet, DEPTH)
    a = prune_layers(deep, LAYERS)  # depth, then layers
    b = depth_skip(prune_layers(unet, LAYERS), DEPTH)  # layers, then depth
    for m in (a, b):
        assert type(m) is DepthSkipLayerPrunedUNet2DConditionModel
        assert m.config.depth_skip == DEPTH and list(m.config.removed_layers) == LAYERS
    out = call(a)
    assert torch.equal(out, call(b)) and out.shape == call(unet).shape
    assert not torch.allclose(out, call(deep))
    # the layers' savings, priced on the depth-skipped model, come off its count exactly
    saved = sum(layer.params for layer in candidates(deep, names=LAYERS))
    assert saved > 0 and _n(a) == _n(b) == _n(deep) - saved
    assert _n(a) < min(_n(deep), _n(prune_layers(unet, LAYERS)))


def test_keep_all_of_either_method_is_the_other_alone(unet, call):
    deep = depth_skip(unet, DEPTH)
    assert torch.equal(call(prune_layers(deep, [])), call(deep))
    pruned = prune_layers(unet, LAYERS)
    full = depth_skip(pruned, max_depth(unet))
    assert type(full) is DepthSkipLayerPrunedUNet2DConditionModel
    assert torch.equal(call(full), call(pruned))


def test_a_layer_inside_the_depths_removal_is_dropped_and_cannot_be_removed_again(unet, call):
    gone = removed_modules(unet, DEPTH)
    inside = [n for n in candidate_names(unet) if n in gone or n.startswith("mid_block.")][:2]
    assert len(inside) == 2
    m = depth_skip(prune_layers(unet, LAYERS + inside), DEPTH)
    assert list(m.config.removed_layers) == LAYERS
    assert torch.equal(call(m), call(prune_layers(depth_skip(unet, DEPTH), LAYERS)))
    with pytest.raises(UserError, match=f"{inside[0]} is already removed"):
        prune_layers(depth_skip(unet, DEPTH), [inside[0]])


def test_a_shallower_depth_keeps_the_layers_and_a_deeper_one_is_refused(unet, call):
    m = prune_layers(depth_skip(unet, DEPTH), LAYERS)
    shallower = depth_skip(m, DEPTH - 2)
    kept = [n for n in LAYERS if n not in removed_modules(unet, DEPTH - 2)]
    assert shallower.config.depth_skip == DEPTH - 2 and list(shallower.config.removed_layers or []) == kept
    assert torch.equal(call(shallower), call(depth_skip(prune_layers(unet, kept), DEPTH - 2)))
    with pytest.raises(UserError, match="already pruned to depth 7"):
        depth_skip(m, DEPTH + 1)


def test_the_stacked_model_exports_and_reloads(unet, call, tmp_path):
    m = prune_layers(depth_skip(unet, DEPTH), LAYERS)
    m.save_pretrained(str(tmp_path / "model"))
    again = diffslim.load(str(tmp_path / "model")).denoiser
    assert type(again) is DepthSkipLayerPrunedUNet2DConditionModel and _n(again) == _n(m)
    assert torch.equal(call(again), call(m))


def test_a_recipe_with_a_depth_and_removed_layers_applies_both(tiny_digits_folder, unet, call):
    pipe = diffslim.load(str(tiny_digits_folder)).pipe
    diffslim.apply(pipe, {"depth": {"depth": DEPTH}, "removed_layers": {"layers": LAYERS}})
    assert type(pipe.denoiser) is DepthSkipLayerPrunedUNet2DConditionModel
    assert torch.equal(call(pipe.denoiser), call(depth_skip(prune_layers(unet, LAYERS), DEPTH)))


def test_stacking_on_the_meta_device_prices_sd15():
    u = diffslim.load(str(CONFIGS / "sd15-unet")).denoiser
    deep = depth_skip(u, 9)
    names = ["up_blocks.1.attentions.0", "down_blocks.0.attentions.1"]
    m = prune_layers(deep, names)
    assert next(m.parameters()).device.type == "meta"
    assert type(m) is DepthSkipLayerPrunedUNet2DConditionModel and m.config.depth_skip == 9
    assert _n(m) == _n(deep) - sum(layer.params for layer in candidates(deep, names=names))
    assert _n(m) == _n(depth_skip(prune_layers(u, names), 9))


def test_unet2dmodel_stacks_too():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    u = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    names = ["down_blocks.0.resnets.1", "up_blocks.1.resnets.2"]
    a = prune_layers(depth_skip(u, 4), names)
    b = depth_skip(prune_layers(u, names), 4)
    assert type(a) is type(b) is DepthSkipLayerPrunedUNet2DModel
    with torch.no_grad():
        assert torch.equal(a(x, t).sample, b(x, t).sample)
    assert _n(a) < _n(depth_skip(u, 4))


def test_the_first_up_resnet_after_a_removed_mid_block_can_be_removed(unet, call):
    # depth 12 of 13 removes only the mid block; the first up resnet's hidden input is then the stand-in's zeros
    deep = depth_skip(unet, max_depth(unet) - 1)
    assert removed_modules(unet, max_depth(unet) - 1) == ["mid_block"]
    m = prune_layers(deep, ["up_blocks.0.resnets.0"])
    assert torch.equal(call(m), call(depth_skip(prune_layers(unet, ["up_blocks.0.resnets.0"]), max_depth(unet) - 1)))


def test_multi_depth_on_a_layer_pruned_unet_keeps_the_layers_removed_at_every_step(unet):
    from diffslim.methods.depth_skip import multi_depth

    pruned = prune_layers(unet, LAYERS)
    routed = multi_depth(depth_skip(pruned, max_depth(unet)), [(500, DEPTH)])
    x, ctx = torch.randn(1, 1, 8, 8), torch.randn(1, 2, 32)
    with torch.no_grad():
        for t, want in ((900, depth_skip(pruned, DEPTH)), (100, pruned)):
            tt = torch.tensor([t])
            assert torch.equal(routed(x, tt, encoder_hidden_states=ctx).sample,
                               want(x, tt, encoder_hidden_states=ctx).sample), t


@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_bk_sdm_on_a_depth_skipped_unet_removes_the_union(unet, call, variant):
    from diffslim.methods.layer_prune import bk_sdm_layers

    deep = depth_skip(unet, 9)
    names = bk_sdm_layers(deep, variant)
    full = bk_sdm_layers(unet, variant)
    gone = removed_modules(unet, 9)
    assert names == [n for n in full if not any(n == g or n.startswith(g + ".") for g in gone)] and names != full
    a = prune_layers(deep, names)
    b = depth_skip(prune_layers(unet, full), 9)
    assert torch.equal(call(a), call(b)) and _n(a) == _n(b) < _n(deep)


def test_more_layers_pruned_from_a_stacked_model_add_to_its_removed_layers(unet, call):
    a = prune_layers(depth_skip(unet, DEPTH), LAYERS[:2])
    b = prune_layers(a, LAYERS[2:])
    assert type(b) is DepthSkipLayerPrunedUNet2DConditionModel and list(b.config.removed_layers) == LAYERS
    assert torch.equal(call(b), call(prune_layers(depth_skip(unet, DEPTH), LAYERS)))
