"""Depth-skip pruning: against an independent unit-by-unit forward, on real-model configs, and in folders."""

from pathlib import Path

import pytest
import torch

from diffslim.errors import UserError
from diffslim.methods.depth_skip import depth_skip, max_depth, removed_modules
from diffslim.models.anatomy import anatomy

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "diffslim" / "configs"


def _meta(name):
    from diffslim.models.load import load

    return load(str(CONFIGS / name)).denoiser


def _reference_depth_forward(unet, depth, x, t, ctx):
    """Depth-``depth`` output computed unit by unit from the original modules (the LDM layout)."""
    an = anatomy(unet, count_macs=False)
    ins, outs = an.input_units, an.output_units
    n = len(ins)
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    get = unet.get_submodule

    def run(unit, h, upsample_size=None):
        for m in unit.modules:
            mod = get(m)
            if ".resnets." in m:
                h = mod(h, emb)
            elif ".attentions." in m:
                h = mod(h, encoder_hidden_states=ctx, return_dict=False)[0]
            elif ".upsamplers." in m:
                h = mod(h, upsample_size)
            else:
                h = mod(h)
        return h

    skips = []
    h = None
    for i in range(depth if depth <= n else n):
        h = unet.conv_in(x) if i == 0 else run(ins[i], h)
        skips.append(h)
    if depth == n + 1:
        h = unet.mid_block(h, emb, encoder_hidden_states=ctx)
    first = n - min(depth, n)
    for j in range(first, n):
        skip = skips.pop()
        if j == first and depth <= n:
            in_ch = get(outs[j].modules[0]).in_channels
            h = torch.zeros(skip.shape[0], in_ch - skip.shape[1], *skip.shape[2:])  # the removed path's width
        h = torch.cat([h, skip], dim=1)
        up_size = skips[-1].shape[2:] if skips else None
        h = run(outs[j], h, up_size)
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h


@pytest.fixture(scope="module")
def unet(tiny_digits_pipe):
    return tiny_digits_pipe.denoiser.eval()


@pytest.mark.parametrize("depth", range(1, 14))
def test_depth_matches_unit_by_unit_reference(unet, depth):
    torch.manual_seed(depth)
    x, t, ctx = torch.randn(2, 1, 8, 8), torch.tensor([900, 30]), torch.randn(2, 2, 32)
    with torch.no_grad():
        got = depth_skip(unet, depth)(x, t, encoder_hidden_states=ctx).sample
        want = _reference_depth_forward(unet, depth, x, t, ctx)
        full = unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if depth == 13:
        assert torch.equal(got, full)  # the full depth is the original model, bit for bit


def test_pruned_is_smaller_shares_weights_and_keeps_shape(unet):
    sizes = []
    for d in range(1, 14):
        m = depth_skip(unet, d)
        sizes.append(sum(p.numel() for p in m.parameters()))
        kept = dict(m.named_parameters())
        for name, p in kept.items():  # kept weights are the original tensors, unchanged
            assert p.data_ptr() == unet.get_parameter(name).data_ptr()
    assert sizes == sorted(sizes) and len(set(sizes)) == 13
    assert sizes[-1] == sum(p.numel() for p in unet.parameters())


def test_save_and_reload(unet, tmp_path):
    from diffslim.methods.depth_skip import DepthSkipUNet2DConditionModel
    from diffslim.models.load import load

    m = depth_skip(unet, 5)
    m.save_pretrained(str(tmp_path / "u"))
    back = load(str(tmp_path / "u")).denoiser
    assert isinstance(back, DepthSkipUNet2DConditionModel) and back.config.depth_skip == 5
    x, t, ctx = torch.randn(1, 1, 8, 8), torch.tensor([500]), torch.randn(1, 2, 32)
    for (k, a), b in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    with torch.no_grad():  # same weights; kernels may differ in the last bit with memory layout
        torch.testing.assert_close(back(x, t, encoder_hidden_states=ctx).sample,
                                   m(x, t, encoder_hidden_states=ctx).sample, atol=1e-6, rtol=1e-5)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "u" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(m.state_dict()) and not any(k.startswith("mid_block") for k in saved)


def test_pipeline_folder_with_pruned_unet_reloads(tiny_sd_pipe, tmp_path):
    import copy

    from diffslim.models.load import load

    pipe = copy.copy(tiny_sd_pipe)
    pipe.unet = depth_skip(tiny_sd_pipe.unet, 3)
    pipe.save_pretrained(str(tmp_path / "p"))
    loaded = load(str(tmp_path / "p"))
    assert type(loaded.denoiser).__name__ == "DepthSkipUNet2DConditionModel"
    assert sum(p.numel() for p in loaded.denoiser.parameters()) == sum(p.numel() for p in pipe.unet.parameters())


def test_errors(unet):
    with pytest.raises(UserError, match="depth 14 is outside 1..13"):
        depth_skip(unet, 14)
    with pytest.raises(UserError, match="depth 0 is outside"):
        depth_skip(unet, 0)
    with pytest.raises(UserError, match="already pruned to depth 4"):
        depth_skip(depth_skip(unet, 4), 6)


def test_sd15_unit_mapping_is_pinned():
    u = _meta("sd15-unet")
    an = anatomy(u, count_macs=False)
    assert [x.modules for x in an.input_units] == [
        ("conv_in",),
        ("down_blocks.0.resnets.0", "down_blocks.0.attentions.0"), ("down_blocks.0.resnets.1", "down_blocks.0.attentions.1"),
        ("down_blocks.0.downsamplers.0",),
        ("down_blocks.1.resnets.0", "down_blocks.1.attentions.0"), ("down_blocks.1.resnets.1", "down_blocks.1.attentions.1"),
        ("down_blocks.1.downsamplers.0",),
        ("down_blocks.2.resnets.0", "down_blocks.2.attentions.0"), ("down_blocks.2.resnets.1", "down_blocks.2.attentions.1"),
        ("down_blocks.2.downsamplers.0",),
        ("down_blocks.3.resnets.0",), ("down_blocks.3.resnets.1",),
    ]
    assert an.middle_unit.modules == ("mid_block",)
    assert [x.modules for x in an.output_units] == [
        ("up_blocks.0.resnets.0",), ("up_blocks.0.resnets.1",), ("up_blocks.0.resnets.2", "up_blocks.0.upsamplers.0"),
        *[tuple(f"up_blocks.{i}.{p}.{k}" for p in ("resnets", "attentions")) + ((f"up_blocks.{i}.upsamplers.0",) if k == 2 and i < 3 else ())
          for i in (1, 2, 3) for k in range(3)],
    ]
    assert [x.pair for x in an.output_units] == list(range(11, -1, -1))
    assert max_depth(u) == 13


def test_sdxl_unit_mapping_is_pinned():
    u = _meta("sdxl-unet")
    an = anatomy(u, count_macs=False)
    assert [x.modules for x in an.input_units] == [
        ("conv_in",), ("down_blocks.0.resnets.0",), ("down_blocks.0.resnets.1",), ("down_blocks.0.downsamplers.0",),
        ("down_blocks.1.resnets.0", "down_blocks.1.attentions.0"), ("down_blocks.1.resnets.1", "down_blocks.1.attentions.1"),
        ("down_blocks.1.downsamplers.0",),
        ("down_blocks.2.resnets.0", "down_blocks.2.attentions.0"), ("down_blocks.2.resnets.1", "down_blocks.2.attentions.1"),
    ]
    assert [x.modules for x in an.output_units] == [
        ("up_blocks.0.resnets.0", "up_blocks.0.attentions.0"), ("up_blocks.0.resnets.1", "up_blocks.0.attentions.1"),
        ("up_blocks.0.resnets.2", "up_blocks.0.attentions.2", "up_blocks.0.upsamplers.0"),
        ("up_blocks.1.resnets.0", "up_blocks.1.attentions.0"), ("up_blocks.1.resnets.1", "up_blocks.1.attentions.1"),
        ("up_blocks.1.resnets.2", "up_blocks.1.attentions.2", "up_blocks.1.upsamplers.0"),
        ("up_blocks.2.resnets.0",), ("up_blocks.2.resnets.1",), ("up_blocks.2.resnets.2",),
    ]
    assert max_depth(u) == 10


def test_sd15_params_and_macs_fall_with_depth_on_meta():
    from diffslim.models.macs import count_macs, default_inputs

    u = _meta("sd15-unet")
    rows = []
    for d in (1, 4, 7, 10, 13):
        m = depth_skip(u, d)
        params = sum(p.numel() for p in m.parameters())
        macs, _ = count_macs(m, *default_inputs(m)[0], **default_inputs(m)[1])
        rows.append((d, params, macs))
    assert rows[-1][1] == 859_520_964
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)
    assert [r[2] for r in rows] == sorted(r[2] for r in rows)
    assert rows[0][1] < 0.05 * rows[-1][1]  # depth 1 keeps conv_in, the last output unit and the head


def test_controlnet_residuals_of_removed_units_are_dropped(unet):
    """Residuals that would feed removed units (and the mid-block residual) change nothing; kept ones do."""
    m = depth_skip(unet, 4)
    x, t, ctx = torch.randn(1, 1, 8, 8), torch.tensor([400]), torch.randn(1, 2, 32)
    an = anatomy(unet, count_macs=False)
    # skip-connection shapes of the 12 input units, from a hook-free full forward
    feats = []
    hooks = [unet.get_submodule(u.modules[-1]).register_forward_hook(
        lambda mod, a, out, f=feats: f.append(out[0] if isinstance(out, tuple) else out)) for u in an.input_units]
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)
    for hk in hooks:
        hk.remove()
    shapes = [f.shape for f in feats]
    base = m(x, t, encoder_hidden_states=ctx).sample
    removed = [torch.zeros(s) for s in shapes]
    for i in range(4, 12):
        removed[i] = torch.randn(shapes[i])
    with torch.no_grad():
        out = m(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(removed),
                mid_block_additional_residual=torch.randn(1, 64, 1, 1)).sample
    assert torch.equal(out, base)
    kept = [torch.zeros(s) for s in shapes]
    kept[2] = torch.randn(shapes[2])
    with torch.no_grad():
        out = m(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(kept),
                mid_block_additional_residual=torch.zeros(1, 64, 1, 1)).sample
    assert not torch.allclose(out, base)


def test_unet2dmodel_depth_skip():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    u = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8).eval()
    n = max_depth(u)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(depth_skip(u, n)(x, t).sample, u(x, t).sample)
        for d in range(1, n):
            out = depth_skip(u, d)(x, t).sample
            assert out.shape == (1, 3, 8, 8) and not torch.allclose(out, u(x, t).sample)
    assert removed_modules(u, n) == []


def test_multi_depth_routes_each_timestep_to_its_depth(unet):
    from diffslim.methods.depth_skip import depth_skip, max_depth, multi_depth

    routed = multi_depth(depth_skip(unet, max_depth(unet)), [(600, 5), (300, 9)])
    x, ctx = torch.randn(1, 1, 8, 8), torch.randn(1, 2, 32)
    with torch.no_grad():
        for t, want in ((900, 5), (600, 5), (450, 9), (300, 9), (100, 13)):
            tt = torch.tensor([t])
            ref = depth_skip(unet, want)(x, tt, encoder_hidden_states=ctx).sample
            assert torch.equal(routed(x, tt, encoder_hidden_states=ctx).sample, ref), t
    # the loaded model itself is untouched (the router sits on a weight-sharing copy)
    # (an empty registry may be left by other tests' removed hooks)
    assert not getattr(getattr(unet, "_diffusers_hook", None), "hooks", None)
    with pytest.raises(UserError, match="repeat a t_min"):
        multi_depth(depth_skip(unet, 13), [(500, 5), (500, 7)])


def test_multi_depth_recipe(tiny_digits_pipe):
    import copy

    from diffslim.apply import apply
    from diffslim.recipe import RecipeError, parse_recipe
    from diffslim.sample import SampleSpec, sample

    spec = SampleSpec([{"class_label": 3}], [0], num_inference_steps=4)
    a = copy.deepcopy(tiny_digits_pipe)
    apply(a, {"depth": {"schedule": [{"t_min": 0, "depth": 6}]}})  # every step at depth 6 ...
    b = copy.deepcopy(tiny_digits_pipe)
    apply(b, {"depth": {"depth": 6}})  # ... is the depth-6 model
    assert torch.equal(sample(a, spec), sample(b, spec))
    for bad, msg in (({"depth": {}}, "exactly one of depth"),
                     ({"depth": {"depth": 5, "schedule": [{"t_min": 0, "depth": 6}]}}, "exactly one of depth"),
                     ({"depth": {"schedule": [{"t_min": 1200, "depth": 6}]}}, "t_min: must lie in 0..999")):
        with pytest.raises(RecipeError, match=msg):
            parse_recipe(bad)


@pytest.mark.parametrize("kind", ["instruct-pix2pix", "x4-upscaler"])
def test_depth_skip_on_image_conditioned_unets(kind):
    """InstructPix2Pix's 8 input channels and the x4 upscaler's 7 channels + noise-level class embedding:
    the full depth reproduces the model, every pruned depth keeps the output shape and sheds parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    common = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=8,
                  attention_head_dim=4, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if kind == "instruct-pix2pix":
        u, cin, cout, extra = UNet2DConditionModel(in_channels=8, out_channels=4, **common), 8, 4, {}
    else:
        u = UNet2DConditionModel(in_channels=7, out_channels=4, class_embed_type="timestep", num_class_embeds=1000,
                                 **common)
        cin, cout, extra = 7, 4, {"class_labels": torch.tensor([20])}
    u.eval()
    x, t, ctx = torch.randn(1, cin, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    n = max_depth(u)
    params = sum(p.numel() for p in u.parameters())
    with torch.no_grad():
        full = u(x, t, encoder_hidden_states=ctx, **extra).sample
        assert torch.equal(depth_skip(u, n)(x, t, encoder_hidden_states=ctx, **extra).sample, full)
        for d in range(1, n):
            pruned = depth_skip(u, d)
            assert pruned(x, t, encoder_hidden_states=ctx, **extra).sample.shape == (1, cout, 8, 8)
            assert sum(p.numel() for p in pruned.parameters()) < params


def test_depth_macs_are_priced_on_the_pipelines_own_call():
    """zoo:sr's U-Net works at twice its config's sample_size; the multi-depth search prices depths on
    the call the pipeline makes, which is what FlopCounterMode counts over a real run at that depth."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from diffslim.models.macs import attention_flop_mapping
    from diffslim.methods.depth_search import depth_macs
    from diffslim.methods.depth_skip import depth_skip, max_depth
    from diffslim.sample import SampleSpec, first_denoiser_call, run_pipeline
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("sr")
    pipe.set_progress_bar_config(disable=True)
    size = pipe.denoiser.config.sample_size
    spec = SampleSpec(inputs=[{"image": torch.rand(3, size, size)}], seeds=[0], num_inference_steps=2, batch_size=1)
    at_call, at_config = depth_macs(pipe.denoiser, first_denoiser_call(pipe, spec)), depth_macs(pipe.denoiser)

    def run_macs(depth):
        variant = copy.copy(pipe)
        variant.denoiser = depth_skip(pipe.denoiser, depth)
        with FlopCounterMode(display=False, custom_mapping=attention_flop_mapping()) as fc:
            run_pipeline(variant, spec, [0])
        return sum(fc.get_flop_counts()[type(variant.denoiser).__name__].values()) // 2

    full = max_depth(pipe.denoiser)
    assert at_call[full] * 2 == run_macs(full)  # two steps, one call each
    measured = run_macs(3) / run_macs(full)
    assert at_call[3] / at_call[full] == pytest.approx(measured, rel=1e-9)
    assert abs(at_config[3] / at_config[full] - measured) > 0.02
