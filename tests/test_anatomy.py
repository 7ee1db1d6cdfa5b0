"""Anatomy and MACs: real-model structure from config-only folders on meta, tiny random models on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel)
from diffusers.models.attention_processor import Attention

from diffslim.models.macs import count_macs, default_inputs, macs_by_kind
from diffslim.models.anatomy import Anatomy, DepthUnit, anatomy

CONFIGS = Path(__import__("diffslim").__file__).parent / "configs"


def meta_model(folder: str):
    config = json.loads((CONFIGS / folder / "config.json").read_text())
    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


@pytest.fixture(scope="module")
def sd15():
    model = meta_model("sd15-unet")
    return model, anatomy(model)


def param_ids(model, names):
    return {id(p) for n in names for p in model.get_submodule(n).parameters()}


# --- attention is counted ------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_sdpa_counted_like_hand_formula(device):
    b, h, lq, lk, d = 2, 4, 16, 10, 8
    q = torch.randn(b, h, lq, d, device=device)
    k = torch.randn(b, h, lk, d, device=device)

    class SDPA(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    total, per = count_macs(SDPA(), q, k, k)
    assert total == 2 * b * h * lq * lk * d  # QK^T and AV
    assert per[""] == total


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_diffusers_attention_macs(device):
    b, lq, lk, dim, ctx, heads, head_dim = 2, 16, 10, 32, 24, 4, 8
    with torch.device(device):
        attn = Attention(query_dim=dim, cross_attention_dim=ctx, heads=heads, dim_head=head_dim)
        x, e = torch.randn(b, lq, dim), torch.randn(b, lk, ctx)
    inner = heads * head_dim
    projections = b * (lq * dim * inner + 2 * lk * ctx * inner + lq * inner * dim)
    products = 2 * b * heads * lq * lk * head_dim
    total, per = count_macs(attn, x, encoder_hidden_states=e)
    assert total == projections + products
    assert per["to_q"] == b * lq * dim * inner and per["to_out.0"] == b * lq * inner * dim
    assert macs_by_kind(attn, x, encoder_hidden_states=e) == {"linear": projections, "attention": products}


# --- real models, config only, on meta ---------------------------------------------------------


def test_sd15_params_and_macs(sd15):
    model, a = sd15
    assert a.family == "unet2d_condition" and a.sample_size == (64, 64)
    assert a.params == 859_520_964
    # QK^T/AV included: 401.6 G. BK-SDM's 338.7 G leaves the attention products out.
    assert a.macs == 401_636_720_640
    args, kwargs = default_inputs(model)
    assert kwargs["encoder_hidden_states"].shape == (1, 77, 768)
    kinds = macs_by_kind(model, *args, **kwargs)
    assert sum(kinds.values()) == a.macs
    assert a.macs - kinds["attention"] == pytest.approx(338.7e9, rel=0.01)


def test_sd15_depth_units(sd15):
    model, a = sd15
    assert len(a.input_units) == 12 and len(a.output_units) == 12
    names = dict(model.named_modules())
    for u in a.depth_units:
        assert isinstance(u, DepthUnit) and u.kind == "depth_unit"
        assert u.name == u.modules[0] and all(m in names for m in u.modules)
    assert a.input_units[0].modules == ("conv_in",)
    assert a.input_units[3].modules == ("down_blocks.0.downsamplers.0",)
    assert a.input_units[11].modules == ("down_blocks.3.resnets.1",)
    assert a.middle_unit.modules == ("mid_block",) and a.middle_unit.pair is None
    assert a.output_units[2].modules == ("up_blocks.0.resnets.2", "up_blocks.0.upsamplers.0")
    assert a.output_units[11].modules == ("up_blocks.3.resnets.2", "up_blocks.3.attentions.2")
    for j, u in enumerate(a.output_units):
        assert u.index == j and u.pair == 11 - j and a.input_units[11 - j].pair == j
    # output unit j's resnet takes the previous output concatenated with input unit 11 - j's output
    prev = model.mid_block.resnets[-1].out_channels
    for j, u in enumerate(a.output_units):
        skip = model.get_submodule(a.input_units[11 - j].modules[0]).out_channels
        resnet = model.get_submodule(u.modules[0])
        assert resnet.in_channels == prev + skip
        prev = resnet.out_channels


def test_sd15_depth_units_partition_parameters(sd15):
    model, a = sd15
    outside = [n for n in a.outside if n != "conv_in"]
    groups = [param_ids(model, outside)] + [param_ids(model, u.modules) for u in a.depth_units]
    everything = {id(p) for p in model.parameters()}
    assert sum(len(g) for g in groups) == len(everything)  # disjoint ...
    assert set().union(*groups) == everything  # ... and covering
    assert sum(u.params for u in a.depth_units) + a.outside_params - a.input_units[0].params == a.params
    assert a.outside_params == sum(p.numel() for n in a.outside for p in model.get_submodule(n).parameters())


def test_sd15_layers_and_blocks(sd15):
    _, a = sd15
    assert [u.name for u in a.blocks] == [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [
        f"up_blocks.{i}" for i in range(4)]
    assert sum(u.params for u in a.blocks) + a.outside_params == a.params
    assert sum(u.params for u in a.layers) == sum(u.params for u in a.blocks)
    assert sum(u.macs for u in a.layers) == sum(u.macs for u in a.blocks) <= a.macs
    assert len(a.layers) == 3 * 3 + 2 + 1 + 4 * 3 + 3
    assert a.layers[0].kind == "layer" and a.layers[2].kind == "downsampler"
    assert a.table()[0] == {"name": "down_blocks.0", "params": a.blocks[0].params, "macs": a.blocks[0].macs}


def test_sdxl():
    a = anatomy(meta_model("sdxl-unet"))
    assert a.params == 2_567_463_684
    assert a.sample_size == (128, 128)
    assert len(a.input_units) == 9 and len(a.output_units) == 9
    assert [u.pair for u in a.output_units] == list(range(8, -1, -1))
    assert a.output_units[2].modules[-1] == "up_blocks.0.upsamplers.0"
    assert a.macs == 3_380_618_199_040


def test_dit_xl_2():
    model = meta_model("dit-xl-2-256")
    a = anatomy(model)
    assert a.family == "transformer" and a.sample_size == (32, 32)
    # diffusers gives each of the 28 blocks its own copy of the timestep + class embedder that the
    # original DiT shares; and DiT counts its frozen pos_embed, a buffer in diffusers.
    assert a.params == 749_826_464
    emb = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    assert emb == 2_777_472
    assert a.params - 27 * emb + model.pos_embed.pos_embed.numel() == 675_129_632  # DiT paper: 675M
    assert a.macs == pytest.approx(118.6e9, rel=0.01)
    assert len(a.blocks) == 28 and a.layers == a.blocks and a.input_units == ()
    assert sum(u.params for u in a.blocks) + a.outside_params == a.params


def test_init_empty_weights_with_cpu_buffers():
    from accelerate import init_empty_weights

    config = json.loads((CONFIGS / "dit-xl-2-256" / "config.json").read_text())
    with init_empty_weights():
        model = DiTTransformer2DModel.from_config(config)
    assert model.pos_embed.pos_embed.device.type == "cpu"  # a real buffer next to meta parameters
    assert anatomy(model).macs == anatomy(meta_model("dit-xl-2-256")).macs
    assert model.pos_embed.pos_embed.device.type == "cpu"  # left as it was


def test_pixart_alpha():
    model = meta_model("pixart-alpha-1024")
    assert model.use_additional_conditions
    a = anatomy(model)
    assert a.params == 611_349_152  # "0.6B"
    assert a.sample_size == (128, 128) and len(a.blocks) == 28
    assert "scale_shift_table" in a.outside
    assert sum(u.params for u in a.blocks) + a.outside_params == a.params


# --- tiny random-weight models on CPU ----------------------------------------------------------


TINY_SD = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=2,
               block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=4,
               norm_num_groups=8,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def check_sums(a: Anatomy):
    assert sum(u.params for u in a.blocks) + a.outside_params == a.params
    assert sum(u.params for u in a.layers) == sum(u.params for u in a.blocks)
    assert sum(u.macs for u in a.blocks) <= a.macs
    assert sum(u.macs for u in a.layers) <= a.macs
    assert sum(u.macs for u in a.depth_units) <= a.macs
    assert all(u.macs > 0 for u in a.blocks)


def test_tiny_unet2d_condition_cpu_matches_meta():
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_SD).eval()
    a = anatomy(model, context_tokens=2)
    check_sums(a)
    assert len(a.input_units) == 12 and len(a.output_units) == 12
    assert a.params == sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        meta = UNet2DConditionModel(**TINY_SD)
    m = anatomy(meta, context_tokens=2)
    assert m.macs == a.macs and m.table("depth") == a.table("depth")  # CPU flash SDPA == meta math path
    # the token count reaches the cross-attention
    assert anatomy(model, context_tokens=4).macs > a.macs
    args, kwargs = default_inputs(model, height=16, width=8)
    assert args[0].shape == (1, 1, 16, 8) and kwargs["encoder_hidden_states"].shape == (1, 77, 32)
    assert anatomy(model, height=16, width=8, context_tokens=2).sample_size == (16, 8)


def test_tiny_unet2d_cpu():
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(16, 32), norm_num_groups=8, num_class_embeds=3,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    a = anatomy(model)
    check_sums(a)
    assert a.family == "unet2d" and "class_embedding" in a.outside
    assert len(a.input_units) == 1 + 2 + 1 and len(a.output_units) == 2 * 2
    assert [u.role for u in a.input_units] == ["conv_in", "resnet", "downsampler", "layer"]


def test_skip_blocks_leftovers_keep_the_partition():
    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(32, 32), norm_num_groups=8, attention_head_dim=8,
                        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"))
    a = anatomy(model.eval())
    check_sums(a)
    groups = [param_ids(model, [n for n in a.outside if n != "conv_in"])]
    groups += [param_ids(model, u.modules) for u in a.depth_units]
    assert sum(len(g) for g in groups) == len({id(p) for p in model.parameters()})
    assert any("skip_conv" in m for u in a.input_units for m in u.modules)


def test_tiny_dit_cpu():
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1).eval()
    a = anatomy(model)
    check_sums(a)
    # per block: attention products over 16 tokens: 2 * heads * L * L * head_dim
    attn = macs_by_kind(model, **default_inputs(model)[1])["attention"]
    assert attn == 3 * 2 * 2 * 16 * 16 * 8
    assert [u.name for u in a.blocks] == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]


@pytest.mark.parametrize("extra", [{}, {"use_additional_conditions": True}])
def test_tiny_pixart_cpu(extra):
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, cross_attention_dim=24, caption_channels=12,
                                     norm_num_groups=1, **extra).eval()
    _, kwargs = default_inputs(model)
    assert kwargs["encoder_hidden_states"].shape == (1, 120, 12)
    assert (kwargs["added_cond_kwargs"]["resolution"] is None) != bool(extra)
    check_sums(anatomy(model))


def test_generic_transformers_cpu():
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    check_sums(anatomy(sd3, context_tokens=5))
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        default_inputs(flux)
    a = anatomy(flux, height=8, width=8, context_tokens=5)
    check_sums(a)
    assert [u.name for u in a.blocks] == ["transformer_blocks.0", "single_transformer_blocks.0",
                                          "single_transformer_blocks.1"]
    assert anatomy(flux, count_macs=False).macs is None


def test_unsupported_family_is_named():
    with pytest.raises(ValueError, match="Linear"):
        anatomy(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Linear"):
        default_inputs(torch.nn.Linear(2, 2))
