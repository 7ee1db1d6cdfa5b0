"""diffusers' own pipelines of the families users bring (ControlNet, the x4 upscaler, PixArt-alpha), built tiny and
offline, run through the sampling harness: the right output shape, seeds that decide the sample, batching that does not."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffslim.sample import SampleSpec, sample


def _same_regardless_of_batching(pipe, inputs, **kw):
    seeds = list(range(len(inputs)))
    a = sample(pipe, SampleSpec(inputs, seeds, batch_size=len(inputs), **kw))
    b = sample(pipe, SampleSpec(inputs, seeds, batch_size=1, **kw))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # a different seed gives a different sample
    c = sample(pipe, SampleSpec(inputs[:1], [seeds[0] + 7], batch_size=1, **kw))
    assert not torch.allclose(a[:1], c)
    return a


def test_controlnet_pipeline_through_harness(tiny_controlnet_pipe):
    pipe = tiny_controlnet_pipe
    g = torch.Generator().manual_seed(0)
    inputs = [{"prompt": p, "image": torch.rand(3, 16, 16, generator=g)} for p in ("a cat", "a dog")]
    out = _same_regardless_of_batching(pipe, inputs, num_inference_steps=2,
                                       call_kwargs={"height": 16, "width": 16})
    assert out.shape == (2, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1


def tiny_upscaler(tiny_sd_pipe):
    """diffusers' x4 upscaler, tiny: 7 input channels (4 latent + 3 low-res image), the noise level through a class
    embedding; 8 px inputs give 32 px outputs."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8, class_embed_type="timestep",
        num_class_embeds=1000)
    # three levels, two upsamplers: the decoder turns the low-res-sized latent into a 4x image
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, scaling_factor=0.08333)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=tiny_sd_pipe.text_encoder, tokenizer=tiny_sd_pipe.tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(), scheduler=tiny_sd_pipe.scheduler, max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_x4_upscaler_pipeline_through_harness(tiny_sd_pipe):
    pipe = tiny_upscaler(tiny_sd_pipe)
    g = torch.Generator().manual_seed(1)
    inputs = [{"prompt": "", "image": torch.rand(3, 8, 8, generator=g)} for _ in range(2)]
    out = _same_regardless_of_batching(pipe, inputs, num_inference_steps=2, call_kwargs={"noise_level": 20})
    assert out.shape == (2, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1


# resolution binning only knows PixArt's real sizes (256/512/1024); cleaning captions wants bs4/ftfy
PIXART_KW = {"use_resolution_binning": False, "max_sequence_length": 16, "clean_caption": False}


def _tiny_pixart(tiny_sd_pipe, num_layers: int):
    """A tiny PixArtAlphaPipeline (T5 encoder, PixArtTransformer2DModel, the tiny SD VAE), DDIM."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=16, norm_num_groups=None)
    # eval(): dropout off, as from_pretrained leaves a model
    text = T5EncoderModel(T5Config(vocab_size=1000, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tiny_sd_pipe.tokenizer, text_encoder=text, vae=tiny_sd_pipe.vae,
                               transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pixart_pipeline_through_harness(tiny_sd_pipe):
    """PixArt-alpha: a T5 text encoder and a PixArtTransformer2DModel, prompts in, images out."""
    pipe = _tiny_pixart(tiny_sd_pipe, 2)
    inputs = [{"prompt": "a red square"}, {"prompt": "a blue circle"}]
    out = _same_regardless_of_batching(pipe, inputs, num_inference_steps=2, scheduler="dpm++", call_kwargs=PIXART_KW)
    assert out.shape == (2, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1


def _plan_applied(build, units, plan):
    """A fresh pipeline from ``build()`` with the skip-plan recipe ``plan`` over ``units`` applied."""
    from diffslim.apply import apply
    from diffslim.recipe import parse_recipe

    pipe = build()
    apply(pipe, parse_recipe({"skip_plan": {"granularity": "fine", "units": units, "plan": plan.tolist()}}))
    return pipe


def _check_plan_recipes(build, units, spec, col):
    """A keep-all plan reproduces ``build()``'s images exactly; skipping unit ``col`` after step 0 changes them.
    Returns ``(keep, sparse)``."""
    import numpy as np

    full = sample(build(), spec)
    keep = np.ones((spec.num_inference_steps, len(units)), dtype=bool)
    assert torch.equal(sample(_plan_applied(build, units, keep), spec), full)
    sparse = keep.copy()
    sparse[1:, col] = False
    assert not torch.allclose(sample(_plan_applied(build, units, sparse), spec), full)
    return keep, sparse


def test_skip_plan_applies_to_pixart(tiny_sd_pipe):
    """A DiP-GO skip plan on a live PixArt pipeline: keep-all reproduces it exactly, a sparse plan changes it."""
    spec = SampleSpec([{"prompt": "a red square"}], [0], num_inference_steps=4, call_kwargs=PIXART_KW)
    _check_plan_recipes(lambda: _tiny_pixart(tiny_sd_pipe, 3), [f"transformer_blocks.{i}" for i in range(3)], spec, 1)


def test_pixart_plan_skips_the_dead_patch_embedding_exactly(tiny_sd_pipe):
    """PixArt's patch embedding (read by the first block only) and final LayerNorm: skipping the one and reusing
    the other where the plan allows gives the same images as running both at every step."""
    import numpy as np

    from diffslim.methods.skip_plan import plan_units

    spec = SampleSpec([{"prompt": "a red square"}], [0], num_inference_steps=4, call_kwargs=PIXART_KW)
    pipe = _tiny_pixart(tiny_sd_pipe, 3)
    u = plan_units(pipe.transformer, "fine")
    assert u.stem == ("pos_embed",) and u.tail == ("norm_out",)
    plan = np.ones((4, 3), dtype=bool)
    plan[1, 0] = plan[2, :] = plan[3, 2] = False
    with_skips, without = _sample_with_and_without_outside_skips(pipe, spec, plan, u)
    assert torch.equal(with_skips, without)


def _sample_with_and_without_outside_skips(pipe, spec, plan, units):
    """``pipe``'s images under ``plan`` with the runtime's stem/tail skips, and with both modules always run."""
    import dataclasses

    from diffslim.methods.skip_plan import apply_skip_plan, remove_skip_plan

    out = []
    for u in (units, dataclasses.replace(units, stem=(), stem_macs=0, tail=())):
        apply_skip_plan(pipe.transformer, plan, u)
        try:
            out.append(sample(pipe, spec))
        finally:
            remove_skip_plan(pipe.transformer)
    return out


def _tiny_sd3(tiny_sd_pipe):
    """A tiny StableDiffusion3Pipeline (two CLIP encoders with projections, T5, an MMDiT, flow matching)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()

    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, shift_factor=0.1)
    tok = tiny_sd_pipe.tokenizer
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=tok,
                                    text_encoder_3=t5, tokenizer_3=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _captioned_images(folder, n=3):
    import numpy as np
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((20, 16, 3), 60 * i + 10, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red cat" if i % 2 else "a blue dog")
    return folder


def test_flow_matching_noising_is_the_schedulers_own():
    """SD3's rectified flow: the trainer's noisy input is the scheduler's ``scale_noise`` at the same timestep, the
    target is noise - x0, and the stratified timesteps follow the scheduler's shifted sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffslim.train.distill import Noising

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    flow = Noising("flow", 1000, shift=3.0)
    for t in sched.timesteps[[0, 4, 9]]:
        xt, target = flow.noisy(x0, noise, t.reshape(1))
        torch.testing.assert_close(xt, sched.scale_noise(x0, t.reshape(1), noise))
        torch.testing.assert_close(target, noise - x0)
    t = flow.timesteps(8, torch.Generator().manual_seed(1), stratified=True)
    u = (torch.arange(8) + 0.5) / 8  # the bins' midpoints, shifted: each stratified timestep lies in its bin
    lo, hi = [3 * v / (1 + 2 * v) * 1000 for v in (u - 0.5 / 8, u + 0.5 / 8)]
    assert bool(((t >= lo - 1e-3) & (t <= hi + 1e-3)).all()) and bool((t[1:] > t[:-1]).all())


# per family: the blocks the criteria score, the block the student lacks, the features it distils
# ({student block: teacher block}: a block followed by a removed one distils the removed one's output)
_FAMILY_BLOCKS = {
    "pixart": ([f"transformer_blocks.{i}" for i in range(3)], "transformer_blocks.1",
               {"transformer_blocks.0": "transformer_blocks.1", "transformer_blocks.2": "transformer_blocks.2"}),
    "sd3": ([f"transformer_blocks.{i}" for i in range(3)], "transformer_blocks.1",
            {"transformer_blocks.0": "transformer_blocks.1", "transformer_blocks.2": "transformer_blocks.2"}),
    # Flux: the stream runs on from the double-stream into the single-stream blocks
    "flux": (["single_transformer_blocks.0", "single_transformer_blocks.1", "transformer_blocks.0", "transformer_blocks.1"],
             "single_transformer_blocks.0",
             {"transformer_blocks.0": "transformer_blocks.0", "transformer_blocks.1": "single_transformer_blocks.0",
              "single_transformer_blocks.1": "single_transformer_blocks.1"}),
}


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_output_loss_scoring_and_distillation_on_transformer_pipelines(family, tiny_sd_pipe, tmp_path):
    """PixArt, SD3 and Flux pipelines get calibration triples from captioned images (DDPM noising for PixArt, flow
    matching for SD3 and, with its dynamic shift, Flux), the output-loss criterion scores their blocks, and a pruned
    student distils from them, reproducibly, with the image stream of two-stream blocks as the feature."""
    from diffslim.methods.layer_prune import calibration, candidates, output_loss, prune_layers, score_layers
    from diffslim.train.data import make_dataset
    from diffslim.train.distill import DistillConfig, distill, noising_for

    pipe = {"pixart": lambda p: _tiny_pixart(p, 3), "sd3": _tiny_sd3, "flux": _tiny_flux}[family](tiny_sd_pipe)
    blocks, removed, features = _FAMILY_BLOCKS[family]
    data = str(_captioned_images(tmp_path / "imgs"))
    assert noising_for(pipe).kind == ("ddpm" if family == "pixart" else "flow")
    calib, again = calibration(pipe, n=4, data=data), calibration(pipe, n=4, data=data)
    assert torch.equal(calib.xt, again.xt) and torch.equal(calib.target, again.target)
    assert calib.xt.shape == calib.target.shape == (4, 4, 8, 8)
    den = pipe.transformer
    assert calib.run(den).shape == calib.xt.shape  # PixArt's learned-variance half is dropped, Flux's tokens unpacked
    scores = score_layers(den, candidates(den), "output-loss", calib)
    assert sorted(scores) == blocks and all(v > 0 for v in scores.values())
    assert output_loss(den, calib, []) == 0.0
    before = {k: v.clone() for k, v in den.state_dict().items()}

    def run(name):
        student = prune_layers(den, [removed])
        cfg = DistillConfig(steps=2, batch_size=2, lr=1e-3, out=tmp_path / name, checkpoint_every=100, log_every=1,
                            progress=False, warmup=0)
        return distill(pipe, student, make_dataset(data, pipe), cfg)

    a, b = run("a"), run("b")
    assert a.final_losses == b.final_losses and all(torch.isfinite(torch.tensor(v)) for v in a.final_losses.values())
    assert a.final_losses["feat"] > 0  # the block after the removed one reads another input: its feature moved
    assert json.loads((a.out_dir / "distill.json").read_text())["features"] == features
    assert all(torch.equal(before[k], v) for k, v in den.state_dict().items())


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_layer_prune_cli_scores_a_pipeline_folder_with_captioned_images(family, tiny_sd_pipe, tmp_path):
    """From a saved folder: PixArt at its own size; Flux (whose pipeline would train at 1024 px, 256 px for this
    tiny VAE) at --resolution 16, which must be a multiple of 4 (VAE factor 2 x 2x2 packing)."""
    from typer.testing import CliRunner

    from diffslim.cli import app
    from diffslim.models.load import load

    (_tiny_pixart(tiny_sd_pipe, 3) if family == "pixart" else _tiny_flux(tiny_sd_pipe)).save_pretrained(
        str(tmp_path / family))
    data = _captioned_images(tmp_path / "imgs")
    args = ["layer-prune", str(tmp_path / family), "--ratio", "0.3", "--n", "4", "--data", str(data),
            "--out", str(tmp_path / "out"), "--json"]
    if family == "flux":
        res = CliRunner().invoke(app, [*args, "--resolution", "18"])
        assert res.exit_code == 2 and "positive multiples of 4 px" in " ".join(res.output.split()), res.output
        args += ["--resolution", "16"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert report["criterion"] == "output-loss" and report["removed"]
    assert all(row["score"] > 0 for row in report["layers"])
    pruned = load(str(tmp_path / "out" / "pipeline")).denoiser
    assert sum(p.numel() for p in pruned.parameters()) == report["params_after"]


def _tiny_flux(tiny_sd_pipe):
    """A tiny FluxPipeline (CLIP + T5, double- and single-stream blocks, guidance embedding, dynamic shift)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, shift_factor=0.1, scaling_factor=0.5)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
    tok = tiny_sd_pipe.tokenizer
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok)
    pipe.default_sample_size = 8  # 16 px images (8x8 latents, 16 tokens) instead of Flux's 1024 px
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux_noising_follows_the_dynamic_shift_of_the_scheduler(tiny_sd_pipe):
    """Flux shifts its sigmas by mu, which grows with the image's token count: the trainer's flow sigmas are the
    scheduler's own at each size, and the packed tokens are FluxPipeline's."""
    import math

    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from diffslim.train.distill import noising_for, pack_latents, unpack_latents

    pipe = _tiny_flux(tiny_sd_pipe)
    noising = noising_for(pipe)
    cfg = pipe.scheduler.config
    shifts = []
    for side in (8, 16):  # latents of 8x8 and 16x16: 16 and 64 tokens
        mu = calculate_shift(side * side // 4, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                             cfg.max_shift)
        pipe.scheduler.set_timesteps(sigmas=list(torch.linspace(1.0, 1 / 8, 8).tolist()), mu=mu)
        mine = noising.shifted(torch.linspace(1.0, 1 / 8, 8), (1, 4, side, side))
        torch.testing.assert_close(mine, pipe.scheduler.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
        shifts.append(noising.shift_for((side, side)))
    assert shifts[1] > shifts[0] > 1 and shifts[0] == pytest.approx(math.exp(0.5 + 0.65 * 12 / 60))
    with pytest.raises(ValueError, match="shape"):
        noising.timesteps(2, torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 8, 6)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 6), x)
    from diffslim.train.distill import latent_image_ids

    assert torch.equal(latent_image_ids(4, 3, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32))


def test_skip_plan_applies_to_flux(tiny_sd_pipe):
    """A DiP-GO skip plan over Flux's double- and single-stream blocks on a live pipeline: keep-all reproduces it
    exactly, skipping the patch embedding where the first block is skipped changes nothing, a sparse plan changes
    the images."""
    from diffslim.methods.skip_plan import plan_macs_ratio, plan_units, plan_units_at

    kw = {"height": 16, "width": 16, "max_sequence_length": 16}
    spec = SampleSpec([{"prompt": "a red cat"}], [0], num_inference_steps=4, call_kwargs=kw)
    full = sample(_tiny_flux(tiny_sd_pipe), spec)
    units = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    keep, sparse = _check_plan_recipes(lambda: _tiny_flux(tiny_sd_pipe), units, spec, 2)
    pipe = _plan_applied(lambda: _tiny_flux(tiny_sd_pipe), units, sparse)
    with pytest.raises(ValueError, match="call it with num_inference_steps=4"):  # Flux passes sigmas for 6 steps
        pipe("a red cat", num_inference_steps=6, **kw)

    pipe = _tiny_flux(tiny_sd_pipe)
    # Flux's transformer has no sample_size: its MACs are counted on the call the pipeline makes
    with pytest.raises(ValueError, match="no sample_size"):
        plan_units(pipe.transformer, "fine")
    u = plan_units_at(pipe, spec)
    assert list(u.names) == units and u.stem == ("x_embedder",) and 0 < u.stem_macs < u.outside_macs
    assert 0 < plan_macs_ratio(sparse, u) < 1 and plan_macs_ratio(keep, u) == 1.0
    plan = keep.copy()
    plan[1, 0] = plan[2, :] = False
    with_skips, without = _sample_with_and_without_outside_skips(pipe, spec, plan, u)
    assert torch.equal(with_skips, without) and not torch.equal(with_skips, full)


def test_dipgo_trains_on_flux_and_resumes_exactly(tiny_sd_pipe, tmp_path):
    """A DiP-GO pruner trains through a live Flux pipeline (packed tokens, dynamic shift, guidance embedding): the
    consistency loss is finite and moves, a run resumed from its step-1 checkpoint equals an uninterrupted one, the
    plan meets the budget and every model is left as it was."""
    from diffslim.methods.dipgo import DipgoConfig, train_dipgo

    pipe = _tiny_flux(tiny_sd_pipe)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green bird\n")
    flags = [p.requires_grad for p in pipe.transformer.parameters()]
    cfg = lambda out, iters: DipgoConfig(ratio=0.5, num_inference_steps=3, iters=iters, batch_size=2, width=16,
                                         heads=2, data=str(prompts), checkpoint_every=1, out=str(out),
                                         progress=False, call_kwargs={"height": 16, "width": 16,
                                                                      "max_sequence_length": 16})
    a = train_dipgo(pipe, cfg(tmp_path / "a", 2))
    train_dipgo(pipe, cfg(tmp_path / "b", 1))
    b = train_dipgo(pipe, cfg(tmp_path / "b", 2))  # resumes from its step-1 checkpoint
    assert np.array_equal(a.scores, b.scores) and a.plan.shape == (3, 4) and a.macs_ratio <= 0.5
    assert all(np.isfinite(r["consistency"]) for r in a.log)
    assert [p.requires_grad for p in pipe.transformer.parameters()] == flags
    assert not hasattr(pipe.transformer, "_diffslim_skip_plan")


def test_flux_gated_trajectory_equals_the_pipeline_and_passes_gradients_to_the_gates(tiny_sd_pipe):
    """What a DiP-GO pruner learns from on Flux: with hard gates, the differentiable run of FluxPipeline's own loop
    equals the pipeline under that plan, and the images' gradient reaches the gates of every step but the first
    (whose units always run: the first step fills the cache)."""
    from diffslim.methods.dipgo import _PipelineTrajectory
    from diffslim.methods.skip_plan import apply_skip_plan, effective_plan, plan_units_at, remove_skip_plan

    pipe = _tiny_flux(tiny_sd_pipe)
    kw = {"height": 16, "width": 16, "max_sequence_length": 16}
    spec = SampleSpec([{"prompt": "a red cat"}, {"prompt": "a blue dog"}], [5, 6], num_inference_steps=3,
                      call_kwargs=kw)
    u = plan_units_at(pipe, spec)
    plan = np.ones((3, len(u)), dtype=bool)
    plan[1, 1] = plan[2, 2] = plan[2, 3] = False
    rt = apply_skip_plan(pipe.transformer, plan, u)
    pipe.transformer.requires_grad_(False)
    try:
        g = [torch.Generator().manual_seed(s) for s in (5, 6)]
        ref = pipe(["a red cat", "a blue dog"], num_inference_steps=3, generator=g, output_type="pt", **kw).images
        traj = _PipelineTrajectory(pipe, spec.inputs, [5, 6], 3, None, kw)
        gates = torch.tensor(effective_plan(plan, u), dtype=torch.float32, requires_grad=True)
        out = traj.run(rt.state, gates=gates)
        torch.testing.assert_close(out.detach(), torch.as_tensor(ref), atol=1e-6, rtol=0)
        out.square().mean().backward()
        assert gates.grad[1].abs().sum() > 0 and gates.grad[2].abs().sum() > 0
    finally:
        remove_skip_plan(pipe.transformer)


def test_compiled_skip_plans_on_stable_diffusion_and_flux_match_eager(tiny_sd_pipe):
    """diffslim.compile on diffusers' own pipelines with a skip plan: every unit module compiles in one graph
    (fullgraph; Dynamo's eager backend), and the images are the eager plan's bit for bit."""
    import copy

    import torch._dynamo

    import diffslim
    from diffslim.compiling import compiled_info, uncompile
    from diffslim.methods.skip_plan import deepcache_plan, plan_units

    sd = copy.deepcopy(tiny_sd_pipe)
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=5, output_type="pt", guidance_scale=5.0)
    u = plan_units(sd.unet, "fine", count_macs=False)
    plan = deepcache_plan(u, 5, 2)
    diffslim.apply(sd, {"skip_plan": {"granularity": "fine", "units": list(u.names), "plan": plan.tolist()}})
    eager = sd(**kw, generator=torch.Generator().manual_seed(0)).images
    torch._dynamo.reset()
    diffslim.compile(sd, backend="eager", fullgraph=True)
    assert compiled_info(sd.unet).regions == len(sd.unet._diffslim_skip_plan.hooked)
    assert torch.equal(sd(**kw, generator=torch.Generator().manual_seed(0)).images, eager)
    uncompile(sd.unet)

    spec = SampleSpec([{"prompt": "a red cat"}], [0], num_inference_steps=4,
                      call_kwargs={"height": 16, "width": 16, "max_sequence_length": 16})
    units = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    sparse = np.ones((4, 4), dtype=bool)
    sparse[1:, 1] = sparse[2, 2:] = False
    pipe = _plan_applied(lambda: _tiny_flux(tiny_sd_pipe), units, sparse)
    eager = sample(pipe, spec)
    torch._dynamo.reset()
    diffslim.compile(pipe, backend="eager", fullgraph=True)
    assert compiled_info(pipe.transformer).how == "skip-plan units"
    assert torch.equal(sample(pipe, spec), eager)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_magcache_ratios_match_diffusers_calibration_on_two_stream_models(tiny_sd_pipe, family):
    """The bench's MagCache calibration on Flux (double- and single-stream blocks: the residual spans both lists)
    and SD3 (the last block returns the image stream only) gives the ratios diffusers' calibrate mode prints."""
    import ast
    import contextlib
    import io

    from diffusers import hooks as H

    from diffslim.methods.skip_plan import magcache_ratios, remove_diffusers_cache

    pipe = (_tiny_flux if family == "flux" else _tiny_sd3)(tiny_sd_pipe)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(prompt=["a cat"], num_inference_steps=4, height=32, width=32, output_type="pt",
                       generator=torch.Generator().manual_seed(0))
    ours = magcache_ratios(pipe.transformer, run)
    H.apply_mag_cache(pipe.transformer, H.MagCacheConfig(calibrate=True, num_inference_steps=4))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run()
    finally:
        remove_diffusers_cache(pipe.transformer, "magcache")
    assert len(ours) == 4 and len(set(ours[1:])) == 3
    assert ours == pytest.approx(ast.literal_eval(printed.getvalue().strip().splitlines()[-1]), rel=1e-6, abs=0)


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_sampling_calibration_on_pixart_and_sd3(tiny_sd_pipe, calls_alone, family):
    """Calibration on the pipelines' own denoiser calls needs no training images: PixArt (T5 mask, learned variance:
    the noise half) and SD3 (pooled projections, flow matching). Its predictions are what the denoiser gave each
    input when sampled alone, and the output-loss criterion scores on it."""
    from diffslim.methods import layer_prune as lp

    pipe, kw = (_tiny_pixart(tiny_sd_pipe, 3), PIXART_KW) if family == "pixart" else (_tiny_sd3(tiny_sd_pipe), {})
    den = pipe.transformer
    calib = lp.sampling_calibration(pipe, n=3, steps=3, inputs=[{"prompt": "a red square"}, {"prompt": "a cat"}],
                                    call_kwargs=kw)
    pred = calib.run(den)
    assert pred.shape == (6, 4, 8, 8) and calib.source["rows"] == [2, 2, 2]
    alone = calls_alone(pipe, calib.source["inputs"], calib.source["seeds"], 3, kw)
    for k, call in enumerate(calib.source["calls"]):
        out = alone[k][call][1]
        torch.testing.assert_close(pred[2 * k:2 * k + 2], out[:, :4], atol=1e-5, rtol=0)
    scores = lp.score_layers(den, lp.candidates(den), "output-loss", calib)
    assert len(scores) == 3 and all(v > 0 for v in scores.values())


def test_profile_of_a_flux_pipeline_counts_at_its_default_size(tiny_sd_pipe):
    """Flux's transformer has no sample_size: profile counts at its pipeline's default_sample_size (it failed with a
    traceback asking for a size), the same count as that size given in pixels; a denoiser profile cannot build
    inputs for is refused in one line (a UserError, not a traceback)."""
    from diffslim.measure.profile import profile_denoiser
    from diffslim.models.load import LoadedModel

    pipe = _tiny_flux(tiny_sd_pipe)
    loaded = LoadedModel("flux", "pipeline", pipe.transformer, pipe=pipe, vae_scale_factor=pipe.vae_scale_factor)
    default = profile_denoiser(loaded, pipe.transformer, timing=False)
    px = 8 * pipe.vae_scale_factor
    given = profile_denoiser(loaded, pipe.transformer, height=px, width=px, timing=False)
    assert default["macs"] == given["macs"] > 0
    smaller = profile_denoiser(loaded, pipe.transformer, height=px // 2, width=px // 2, timing=False)
    assert smaller["macs"] < default["macs"]
    from diffusers import UVit2DModel

    from diffslim.errors import UserError
    from diffslim.models.macs import default_inputs

    with pytest.raises(UserError, match="default_inputs does not know how to call UVit2DModel"):
        default_inputs(UVit2DModel(hidden_size=8, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
                                   encoder_hidden_size=8, vocab_size=8, codebook_size=8, in_channels=8,
                                   block_out_channels=8, num_res_blocks=1, block_num_heads=2, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=8))


def test_an_lcm_unet_trains_and_scores_with_the_guidance_embedding_its_pipeline_passes(tiny_sd_pipe, tmp_path):
    """A latent consistency model's U-Net (time_cond_proj_dim) gets a guidance embedding with every call its pipeline
    makes; the trainer's and the layer criteria's calls lacked it, so the U-Net skipped that projection and they
    trained and scored a model that sampling never runs. They pass the pipeline's own now."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    from diffslim.methods import layer_prune as lp
    from diffslim.models.macs import default_inputs
    from diffslim.train.distill import task_for

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_sd_pipe.unet.config, time_cond_proj_dim=8)
    parts = {k: v for k, v in tiny_sd_pipe.components.items() if k not in ("unet", "scheduler")}
    pipe = LatentConsistencyModelPipeline(**parts, unet=unet, scheduler=LCMScheduler(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep_cond"]), with_kwargs=True)
    pipe(prompt=["a cat"], num_inference_steps=1, output_type="np", height=16, width=16)
    handle.remove()
    (sampled,) = seen
    assert sampled is not None and sampled.shape == (1, 8)
    task = task_for(pipe)
    batch = {"image": torch.rand(2, 3, 16, 16), "text": ["a cat", "a dog"]}
    x0, cond = task.encode(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(cond["timestep_cond"], sampled.expand(2, -1))
    t = torch.tensor([500, 500])
    with_cond = task.predict(unet, x0, t, cond)
    without = unet(x0, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]
    assert not torch.allclose(with_cond, without)  # the embedding changes the prediction
    # the layer criteria's calibration calls the U-Net the same way; profile's dummy call includes the projection
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / f"{k}.png")
    calib = lp.calibration(pipe, n=2, data=str(tmp_path), size=16)
    xt, t, c = calib.inputs(0, 2, torch.float32)
    assert torch.equal(c["timestep_cond"], sampled.expand(2, -1))
    assert torch.equal(calib.run(unet), unet(xt, t, **c, return_dict=False)[0])
    args, kwargs = default_inputs(unet)
    assert kwargs["timestep_cond"].shape == (1, 8)


def test_a_consistency_model_is_distilled_without_the_task_loss_unless_asked(tiny_sd_pipe, tmp_path):
    """A consistency model's sampler reads the denoiser's output as its trajectory's end; the diffusion task loss
    regresses it to the mean clean image instead. distill, finetune, the bench's +kd/+ft and the workflow leave it out
    for an LCM (its U-Net's guidance embedding, or an LCM/TCD scheduler over a plain U-Net: LCM-LoRA, TCD), and say
    so; a --lambda-task the user gives is kept."""
    import json

    from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
    from diffusers import TCDScheduler, UNet2DConditionModel
    from typer.testing import CliRunner

    from diffslim.bench import default_task_weight
    from diffslim.cli import app
    from diffslim.models.load import LoadedModel
    from diffslim.train.distill import consistency_model

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_sd_pipe.unet.config, time_cond_proj_dim=8)
    parts = {k: v for k, v in tiny_sd_pipe.components.items() if k not in ("unet", "scheduler")}
    lcm = LatentConsistencyModelPipeline(**parts, unet=unet, scheduler=LCMScheduler(), requires_safety_checker=False)
    plain = {k: v for k, v in tiny_sd_pipe.components.items() if k != "scheduler"}
    lora_style = StableDiffusionPipeline(**plain, scheduler=LCMScheduler(), requires_safety_checker=False)
    tcd = StableDiffusionPipeline(**plain, scheduler=TCDScheduler(), requires_safety_checker=False)
    ddim = StableDiffusionPipeline(**plain, scheduler=DDIMScheduler(), requires_safety_checker=False)
    assert [consistency_model(p) for p in (lcm, lora_style, tcd, ddim, None)] == [True, True, True, False, False]
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / f"{k}.png")
        (tmp_path / f"{k}.txt").write_text("a cat")
    weights = {name: default_task_weight(LoadedModel(name, "pipeline", p.unet, pipe=p), str(tmp_path))
               for name, p in (("lcm", lcm), ("tcd", tcd), ("ddim", ddim))}
    assert weights == {"lcm": 0.0, "tcd": 0.0, "ddim": 1.0}
    lcm.save_pretrained(str(tmp_path / "lcm"), safe_serialization=True)
    unet.save_pretrained(str(tmp_path / "student"), safe_serialization=True)
    run = ["distill", str(tmp_path / "lcm"), str(tmp_path / "student"), "--data", str(tmp_path), "--steps", "1",
           "--batch-size", "2", "--resolution", "16", "--ema-decay", "0"]
    for extra, task, said in (((), 0.0, True), (("--lambda-task", "0.5"), 0.5, False)):
        out = tmp_path / f"kd{task}"
        r = CliRunner().invoke(app, [*run, "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "distill.json").read_text())["config"]["lambda_task"] == task
        assert ("samples a consistency model (LCMScheduler)" in " ".join(r.output.split())) == said, r.output
    # depth-skip fine-tuning too
    r = CliRunner().invoke(app, ["finetune", str(tmp_path / "lcm"), "--depth", "1", "--data", str(tmp_path),
                                 "--steps", "1", "--batch-size", "2", "--ema-decay", "0", "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ft" / "distill.json").read_text())["config"]["lambda_task"] == 0.0


def test_flux_kontext_samples_from_prompts_alone(tiny_sd_pipe, tmp_path):
    """Flux Kontext's input image is optional (without one it generates from the prompt): a text file of prompts is
    taken, where the pipelines that cannot do without an image refuse it."""
    from diffusers import FluxKontextPipeline, StableDiffusionImg2ImgPipeline

    from diffslim.errors import UserError
    from diffslim.evaluate import eval_set_for
    from diffslim.models.load import LoadedModel
    from diffslim.train.data import pipeline_inputs

    from diffusers import FlowMatchEulerDiscreteScheduler

    flux = _tiny_flux(tiny_sd_pipe)  # (Kontext's shift at 16 tokens overflows the tiny scheduler's dynamic one)
    pipe = FluxKontextPipeline(**{**flux.components, "scheduler": FlowMatchEulerDiscreteScheduler()})
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    assert pipeline_inputs(pipe, str(prompts), seed=0) == [{"prompt": "a red square"}, {"prompt": "a blue circle"}]
    es = eval_set_for(LoadedModel("k", "pipeline", pipe.transformer, pipe=pipe), 2, prompts_file=prompts)
    out = sample(pipe, SampleSpec(inputs=es.inputs, seeds=es.seeds, num_inference_steps=2, batch_size=2,
                                  call_kwargs={"max_area": 16 * 16}))  # Kontext scales its size to max_area
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="samples from input images, and a text file gives only prompts"):
        pipeline_inputs(StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components), str(prompts), seed=0)


def test_profile_counts_on_the_pipelines_own_call_where_it_has_no_dummy_inputs(tiny_sd_pipe, monkeypatch):
    """For a denoiser default_inputs cannot feed (HunyuanDiT, Sana, AuraFlow, CogView4), profile counts and times the
    call its pipeline makes on one default prompt without the guidance batch. On the SD U-Net, which has dummy inputs
    of the same shape (77 text tokens, the pipeline's size), both counts agree."""
    from diffslim.errors import UserError
    from diffslim.measure.profile import profile_denoiser
    from diffslim.models import macs
    from diffslim.models.load import LoadedModel

    loaded = LoadedModel("sd", "pipeline", tiny_sd_pipe.unet, pipe=tiny_sd_pipe, vae_scale_factor=2)
    dummy = profile_denoiser(loaded, tiny_sd_pipe.unet, repeats=1)
    assert dummy["counted_on"] == "dummy inputs"

    def refuse(*a, **k):
        raise UserError("default_inputs does not know how to call it")

    monkeypatch.setattr(macs, "default_inputs", refuse)
    own = profile_denoiser(loaded, tiny_sd_pipe.unet, repeats=1)
    assert own["counted_on"] == "the pipeline's own first call" and own["latency_s"] > 0
    assert own["macs"] == dummy["macs"] > 0 and own["blocks"] == dummy["blocks"]
    assert own["sample_size"] == dummy["sample_size"]
    with pytest.raises(UserError, match="does not know how to call it; profile counts such a denoiser on its "
                                        "pipeline's own call, for a text-to-image pipeline at --batch-size 1"):
        profile_denoiser(loaded, tiny_sd_pipe.unet, batch=2, repeats=1)
    with pytest.raises(UserError, match="does not know how to call it"):  # a lone model has no pipeline to ask
        profile_denoiser(LoadedModel("u", "model", tiny_sd_pipe.unet), tiny_sd_pipe.unet, repeats=1)


def test_caches_and_skip_plans_refuse_what_they_would_crash_on(tiny_sd_pipe):
    """diffusers' FirstBlockCache subtracts the last block's text stream, which SD3's last block (context_pre_only)
    returns as None: a TypeError mid-sampling, refused now (MagCache, which works there, is not). A K-diffusion
    U-Net (the latent upscaler's) has unpaired skip levels, on which the skip-plan units indexed with None."""
    from diffusers import UNet2DConditionModel

    from diffslim.errors import UserError
    from diffslim.methods.skip_plan import apply_diffusers_cache, plan_units

    sd3 = _tiny_sd3(tiny_sd_pipe).transformer
    assert sd3.transformer_blocks[-1].context_pre_only
    with pytest.raises(UserError, match="fbcache: diffusers' FirstBlockCache reads a text stream .* use magcache"):
        apply_diffusers_cache(sd3, "fbcache", None, num_steps=3)
    # the bench says so before anything samples (it said so after the full model's row): SD3's, and Chroma's blocks
    # that diffusers' registry does not know, for both caches at once
    from diffslim.bench import run_bench
    from diffslim.models.load import LoadedModel
    from diffslim.zoo.evalsets import EvalSet

    chroma = _tiny_chroma(tiny_sd_pipe)
    sampled = []
    chroma.transformer.register_forward_pre_hook(lambda *a: sampled.append(1))
    es = EvalSet(inputs=[{"prompt": "a"}], seeds=[0], call_kwargs={"height": 32, "width": 32})
    with pytest.raises(UserError, match=r"2 methods cannot run here\. fbcache: diffusers' cache does not know "
                                        r"ChromaTransformer2DModel's block class .* \| magcache: "):
        run_bench(LoadedModel("chroma", "pipeline", chroma.transformer, pipe=chroma), "full,pab,fbcache,magcache", es,
                  default_steps=2, progress=False)
    assert not sampled
    torch.manual_seed(0)
    kunet = UNet2DConditionModel(
        sample_size=16, in_channels=8, out_channels=5, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
        down_block_types=("KDownBlock2D",) + ("KCrossAttnDownBlock2D",) * 3,
        up_block_types=("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",), mid_block_type=None, cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=None, act_fn="gelu", time_embedding_type="fourier",
        timestep_post_act="gelu", conv_in_kernel=1, conv_out_kernel=1, resnet_time_scale_shift="scale_shift",
        time_cond_proj_dim=144, only_cross_attention=False, upcast_attention=True)
    with pytest.raises(UserError, match=r"skip connections do not pair its input and output levels one to one \(8 "
                                        r"against 4"):
        plan_units(kunet, count_macs=False)
    from diffslim.methods import layer_prune as lp

    with pytest.raises(UserError, match="the model has no layer that layer pruning can remove"):
        lp.layer_prune(kunet, "random", 0.3)


def _tiny_sana(tiny_sd_pipe, flow_sigmas: bool = False):
    """A tiny SanaPipeline: Gemma2 text encoder, the deep-compression autoencoder (deterministic latents), a linear
    DiT; flow matching by FlowMatchEuler, or (``flow_sigmas``) by DPM-Solver on flow sigmas as Sana is released."""
    from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline,
                           SanaTransformer2DModel)
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    tr = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=3, num_attention_heads=2,
                                attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                cross_attention_dim=8, caption_channels=8, sample_size=8, timestep_scale=0.5).eval()
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        downsample_block_type="conv", upsample_block_type="interpolate",
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41).eval()
    te = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=16, max_position_embeddings=512,
                                  num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2, vocab_size=1000,
                                  attn_implementation="eager")).eval()
    sched = (DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
             if flow_sigmas else FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe = SanaPipeline(tokenizer=tiny_sd_pipe.tokenizer, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_auraflow(tiny_sd_pipe):
    """A tiny AuraFlowPipeline (UMT5 text encoder, joint and single blocks, flow matching with a shift)."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tr = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                    num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                                    caption_projection_dim=16, joint_attention_dim=16, out_channels=4,
                                    pos_embed_max_size=64).eval()
    te = UMT5EncoderModel(UMT5Config(vocab_size=1000, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16).eval()
    pipe = AuraFlowPipeline(tokenizer=tiny_sd_pipe.tokenizer, text_encoder=te, vae=vae, transformer=tr,
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_lumina2(tiny_sd_pipe):
    """A tiny Lumina2Pipeline (Gemma2 text encoder, refiners and a main stack; time runs from noise at 0 to the image
    at 1; with guidance it calls the denoiser for the prompt and then for the negative prompt)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    tr = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=8, num_layers=3,
                                   num_refiner_layers=1, num_attention_heads=1, num_kv_heads=1, multiple_of=16,
                                   axes_dim_rope=(4, 2, 2), cap_feat_dim=8).eval()
    te = Gemma2Model(Gemma2Config(head_dim=4, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                  num_hidden_layers=1, num_key_value_heads=2, vocab_size=1000,
                                  attn_implementation="eager")).eval()
    pipe = Lumina2Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                           vae=_tiny_vae(shift_factor=0.1),
                           text_encoder=te, tokenizer=tiny_sd_pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_zimage(tiny_sd_pipe):
    """A tiny ZImagePipeline (Qwen3 text encoder through a chat template; a transformer that takes lists of per-image
    latents and captions; time runs from noise at 0 to the image at 1)."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    tok = copy.deepcopy(tiny_sd_pipe.tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=3,
                                  n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                                  axes_lens=[64, 32, 32]).eval()
    te = Qwen3Model(Qwen3Config(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=8)).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(shift_factor=0.1),
                          text_encoder=te, tokenizer=tok, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_cogview4(tiny_sd_pipe):
    """A tiny CogView4Pipeline (GLM text encoder; captions padded to each call's longest, so calls differ in length)."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    torch.manual_seed(0)
    tr = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
                                    num_attention_heads=4, out_channels=4, text_embed_dim=32, time_embed_dim=8,
                                    condition_dim=4, sample_size=8, pos_embed_max_size=32, rope_axes_dim=(4, 4)).eval()
    te = GlmModel(GlmConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                            head_dim=8, vocab_size=1000, pad_token_id=1)).eval()
    sched = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                            use_dynamic_shifting=True, time_shift_type="linear")
    pipe = CogView4Pipeline(tokenizer=tiny_sd_pipe.tokenizer, text_encoder=te, vae=_tiny_vae(), transformer=tr,
                            scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_hunyuandit(tiny_sd_pipe, tmp_path):
    """A tiny HunyuanDiTPipeline (BERT and T5 text encoders, blocks with long skips, v-prediction DDPM); its VAE has
    the factor 8 the pipeline assumes for its rotary grid."""
    import copy

    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel, BertTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tr = HunyuanDiT2DModel(sample_size=4, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                           in_channels=4, cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16,
                           hidden_size=24, activation_fn="gelu-approximate").eval()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                  + [chr(c) for c in range(97, 123)]) + "\n")
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    tok2 = copy.deepcopy(tiny_sd_pipe.tokenizer)
    tok2.model_max_length = 256
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=32).eval()
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03,
                          prediction_type="v_prediction", clip_sample=False)
    pipe = HunyuanDiTPipeline(vae=vae, text_encoder=bert, tokenizer=BertTokenizer(str(tmp_path / "vocab.txt"),
                                                                                  model_max_length=77),
                              transformer=tr, scheduler=sched, safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=t5, tokenizer_2=tok2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16, **kw).eval()


def test_dpm_solver_on_flow_sigmas_is_trained_as_the_flow_it_samples():
    """Sana's released scheduler, DPM-Solver on flow sigmas shifted by flow_shift: the trainer's noisy input at one of
    its sigmas is the scheduler's own add_noise there, the target noise - x0 (its flow_prediction); the timestep the
    denoiser gets while sampling is that sigma x 1000 truncated to an integer, less than 1 from the trainer's."""
    from diffusers import DPMSolverMultistepScheduler

    from diffslim.train.distill import noising_for

    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    sched.set_timesteps(10)
    flow = noising_for(SimpleNamespace(scheduler=sched))
    assert (flow.kind, flow.shift) == ("flow", 3.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for i in (0, 4, 9):
        t = sched.sigmas[i].reshape(1) * 1000
        assert 0 <= float(t - sched.timesteps[i]) < 1
        xt, target = flow.noisy(x0, noise, t)
        torch.testing.assert_close(xt, sched.add_noise(x0, noise, sched.timesteps[i].reshape(1)))
        torch.testing.assert_close(target, noise - x0)
    u = torch.tensor([0.1, 0.5, 0.9])  # the trainer's shifted sigmas are the scheduler's
    torch.testing.assert_close(flow.shifted(u), 3 * u / (1 + 2 * u))


@pytest.mark.parametrize("family", ["sana", "auraflow", "lumina2", "zimage", "cogview4", "hunyuandit", "qwenimage",
                                    "chroma"])
def test_transformer_family_tasks_call_the_denoiser_as_their_pipelines_do(family, tiny_sd_pipe, tmp_path):
    """The distillation task of Sana (Gemma embeddings encoded with the pipeline's complex human instruction, the
    timestep times timestep_scale), of AuraFlow (the timestep as a fraction), of Lumina2 (its system prompt, time
    reversed, the prediction negated as its pipeline negates it) and of Z-Image (lists of per-image latents and
    captions, time reversed, negated), of CogView4 (sizes, the unshifted timestep: see the next test) and of
    HunyuanDiT (two encoders, size ids, style, rotary grid), of Qwen-Image (its video VAE's normalized latents,
    packed patches, the timestep as a fraction, the grid's shape) and of Chroma (Flux's layout, a caption mask over
    text and image tokens) predicts what the pipeline's own denoiser call predicts
    for the same prompt,
    latents and timestep; the output-loss criterion scores their blocks on captioned images and a pruned student
    distils from them, reproducibly."""
    from diffslim.methods.layer_prune import calibration, candidates, prune_layers, score_layers
    from diffslim.sample import SampleSpec, _stop_at_first_call
    from diffslim.train.data import make_dataset
    from diffslim.train.distill import DistillConfig, distill, task_for, unpack_latents

    pipe = (_tiny_hunyuandit(tiny_sd_pipe, tmp_path) if family == "hunyuandit" else
            {"sana": _tiny_sana, "auraflow": _tiny_auraflow, "lumina2": _tiny_lumina2, "zimage": _tiny_zimage,
             "cogview4": _tiny_cogview4, "qwenimage": _tiny_qwenimage, "chroma": _tiny_chroma}[family](tiny_sd_pipe))
    den = pipe.transformer
    spec = SampleSpec(inputs=[{"prompt": "a red cat"}], seeds=[0], num_inference_steps=3,
                      call_kwargs={"guidance_scale": 0.0 if family == "zimage" else 1.0, "height": 32, "width": 32,
                                   **({"use_resolution_binning": False} if family in ("sana", "hunyuandit") else {})})
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]  # no guidance (Z-Image guides at any scale above 0)
    with torch.no_grad():
        own = den(*args, **{**kwargs, "return_dict": False})[0]
        task = task_for(pipe)
        _, cond = task.encode({"image": torch.zeros(1, 3, 32, 32), "text": ["a red cat"]}, torch.Generator(), "cpu")
        if family == "zimage":  # forward(x, t, cap_feats), one (C, 1, H, W) tensor per image
            x, ts, own = torch.stack(args[0]).squeeze(2), args[1], -torch.stack(own).squeeze(2)
        elif family == "hunyuandit":  # latents and timestep by position; the learned variance dropped
            x, ts, own = args[0], args[1], own[:, :4]
        elif family in ("qwenimage", "chroma"):  # packed 2x2 patches of 16x16 latents
            x, ts, own = (unpack_latents(kwargs["hidden_states"], 16, 16), kwargs["timestep"],
                          unpack_latents(own, 16, 16))
        else:
            call = dict(zip(("hidden_states",), args), **kwargs)
            x, ts, own = call["hidden_states"], call["timestep"], -own if family == "lumina2" else own
        # the trainer's sigma x 1000 (CogView4's first call: sigma 1, unshifted as shifted)
        t = {"sana": ts / 0.5, "auraflow": ts * 1000, "lumina2": (1 - ts) * 1000, "zimage": (1 - ts) * 1000,
             "cogview4": ts, "hunyuandit": ts, "qwenimage": ts * 1000, "chroma": ts * 1000}[family]
        torch.testing.assert_close(task.predict(den, x, t, cond), own)
        if family == "qwenimage":  # the training latents: one frame through the video VAE, normalized per channel
            import diffusers

            img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
            x0, _ = task.encode({"image": img, "text": ["a", "b"]}, torch.Generator().manual_seed(3), "cpu")
            i2i = diffusers.QwenImageImg2ImgPipeline(**pipe.components)
            ref = i2i._encode_vae_image((img * 2 - 1).unsqueeze(2), torch.Generator().manual_seed(3))
            torch.testing.assert_close(x0, ref.squeeze(2))
    data = str(_captioned_images(tmp_path / "imgs"))
    calib = calibration(pipe, n=4, data=data, size=32)
    assert torch.equal(calib.xt, calibration(pipe, n=4, data=data, size=32).xt)
    scores = score_layers(den, candidates(den), "output-loss", calib)
    assert len(scores) >= 3 and all(v > 0 for v in scores.values())

    def run(name):
        cfg = DistillConfig(steps=2, batch_size=2, lr=1e-3, out=tmp_path / name, checkpoint_every=100, log_every=1,
                            progress=False, warmup=0)
        return distill(pipe, prune_layers(den, [sorted(scores)[1]]), make_dataset(data, pipe, size=32), cfg)

    a, b = run("a"), run("b")
    assert a.final_losses == b.final_losses and all(torch.isfinite(torch.tensor(v)) for v in a.final_losses.values())
    # the kept blocks of every list are distilled (Lumina2's and Z-Image's layers and AuraFlow's joint blocks were
    # not: a feature term of 0)
    features = json.loads((a.out_dir / "distill.json").read_text())["features"]
    assert a.final_losses["feat"] > 0 and len(features) == len(scores) - 1


def _tiny_chroma(tiny_sd_pipe, variant: str = "ChromaPipeline"):
    """A tiny Chroma pipeline of class ``variant`` (T5 alone, Flux's packed layout, modulations from a distilled
    guidance layer), sampling 32 px by default."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tr = diffusers.ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                            axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                            approximator_hidden_dim=16, approximator_layers=1).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                      max_image_seq_len=64)
    flux = _tiny_flux(tiny_sd_pipe)
    pipe = getattr(diffusers, variant)(scheduler=sched, vae=flux.vae, text_encoder=t5,
                                       tokenizer=tiny_sd_pipe.tokenizer, transformer=tr)
    pipe.default_sample_size = 16  # 32 px (16 latents)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layer_prune_counts_the_macs_removed_on_the_pipelines_call_where_no_dummy_inputs_exist(tiny_sd_pipe, tmp_path):
    """Flux, Qwen-Image and Chroma transformers state no sample size, so no dummy inputs count their MACs:
    `layer-prune` reported no MACs removed for them. It counts the call their pipeline makes now."""
    import json

    from typer.testing import CliRunner

    from diffslim.cli import app

    _tiny_chroma(tiny_sd_pipe).save_pretrained(str(tmp_path / "chroma"))
    r = CliRunner().invoke(app, ["layer-prune", str(tmp_path / "chroma"), "--ratio", "0.3", "--criterion",
                                 "magnitude", "--out", str(tmp_path / "lp")])
    assert r.exit_code == 0, r.output
    scores = json.loads((tmp_path / "lp" / "scores.json").read_text())
    assert 0 < scores["macs_removed"] < scores["macs"]
    assert f"MACs removed {scores['macs_removed_share']:.3f}" in " ".join(r.output.split())


def _tiny_qwenimage(tiny_sd_pipe, variant: str = "QwenImagePipeline"):
    """A tiny Qwen-Image pipeline of class ``variant`` (a Qwen2.5-VL text encoder through its prompt template, a video
    VAE taking one frame, two-stream blocks over packed 2x2 patches), sampling 32 px by default."""
    import diffusers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tr = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                               axes_dims_rope=(2, 2, 4)).eval()
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                           temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                           latents_std=[1.5, 0.5, 1.0, 2.0]).eval()
    text = dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                  fullatt_block_indexes=[0])
    te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                      max_image_seq_len=64, base_shift=0.5, max_shift=0.9)
    pipe = getattr(diffusers, variant)(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tiny_sd_pipe.tokenizer,
                                       transformer=tr)
    pipe.default_sample_size = 16  # 32 px (16 latents) instead of its 1024 px
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sdxl(tiny_sd_pipe, variant: str = "StableDiffusionXLPipeline"):
    """A tiny SDXL pipeline of class ``variant`` (two CLIP encoders, the second's pooled projection and the size ids
    through the U-Net's text_time embedding)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    clip = dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    parts = dict(unet=unet, vae=tiny_sd_pipe.vae, text_encoder=CLIPTextModel(CLIPTextConfig(**clip)).eval(),
                 text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval(),
                 tokenizer=tiny_sd_pipe.tokenizer, tokenizer_2=tiny_sd_pipe.tokenizer,
                 scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                            beta_end=0.012, steps_offset=1))
    pipe = getattr(diffusers, variant)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", ["ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "FluxImg2ImgPipeline",
                                     "FluxInpaintPipeline", "StableDiffusion3InpaintPipeline",
                                     "StableDiffusionInpaintPipeline", "StableDiffusionXLPipeline",
                                     "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                                     "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "ChromaImg2ImgPipeline"])
def test_image_to_image_and_inpainting_pipelines_train_as_their_text_to_image_family(variant, tiny_sd_pipe):
    """An image-to-image or inpainting pipeline whose denoiser takes no mask channels calls it as its text-to-image
    pipeline does (the input image sets where sampling starts, the mask blends latents between steps): its task
    predicts what its own first call predicted. Flux's image-to-image pipelines guide its guidance embedding at their
    own default (7, where FluxPipeline's is 3.5). They were refused: no task for Z-Image's and Flux's, and every
    pipeline that takes a mask was taken for a mask-channel U-Net."""
    import diffusers

    from diffslim.sample import _stop_at_first_call
    from diffslim.train.distill import task_for, unpack_latents

    family = variant[:5]
    base = {"ZImag": _tiny_zimage, "FluxI": _tiny_flux, "StableDiffusion3": _tiny_sd3}.get(
        "StableDiffusion3" if variant.startswith("StableDiffusion3") else family)
    base = (_tiny_sdxl(tiny_sd_pipe) if variant.startswith("StableDiffusionXL") else
            _tiny_qwenimage(tiny_sd_pipe) if family == "QwenI" else
            _tiny_chroma(tiny_sd_pipe) if family == "Chrom" else
            base(tiny_sd_pipe) if base is not None else tiny_sd_pipe)
    parts = dict(base.components)
    if variant.startswith("StableDiffusion3"):  # SD3's inpainting takes 16 latent channels (or 33 with the mask's)
        parts["transformer"] = diffusers.SD3Transformer2DModel.from_config(parts["transformer"].config, in_channels=16,
                                                                          out_channels=16)
        parts["vae"] = diffusers.AutoencoderKL.from_config(parts["vae"].config, latent_channels=16)
    pipe = getattr(diffusers, variant)(**parts)
    pipe.set_progress_bar_config(disable=True)
    size = 32 if family in ("ZImag", "QwenI", "Chrom") else 16
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    row = {"prompt": "a red cat"}
    if "Img2Img" in variant or "Inpaint" in variant or variant.startswith("Flux"):
        row["image"] = image
    if "Inpaint" in variant:
        row["mask_image"] = Image.fromarray(np.tile(np.arange(size, dtype=np.uint8) * (255 // size), (size, 1)))
    guidance = {"ZImag": 0.0, "FluxI": 7.0}.get(family, 1.0)  # no CFG batch; Flux's guidance is its default
    spec = SampleSpec(inputs=[row], seeds=[0], num_inference_steps=4,
                      call_kwargs={**({"strength": 0.75} if "image" in row else {}), "height": size, "width": size,
                                   **({} if family == "FluxI" else {"guidance_scale": guidance})})
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    den = getattr(pipe, "transformer", None) or pipe.unet
    with torch.no_grad():
        own = den(*args, **{**kwargs, "return_dict": False})[0]
        task = task_for(pipe)
        _, cond = task.encode({"image": torch.zeros(1, 3, size, size), "text": ["a red cat"]}, torch.Generator(), "cpu")
        if family == "ZImag":
            x, t, own = torch.stack(args[0]).squeeze(2), (1 - args[1]) * 1000, -torch.stack(own).squeeze(2)
        elif family in ("FluxI", "QwenI", "Chrom"):
            assert family != "FluxI" or float(kwargs["guidance"][0]) == 7.0
            h = w = size // 2
            x, t, own = (unpack_latents(kwargs["hidden_states"], h, w), kwargs["timestep"] * 1000,
                         unpack_latents(own, h, w))
        else:
            call = dict(zip(("hidden_states" if den is getattr(pipe, "transformer", None) else "sample",
                             "timestep"), args), **kwargs)
            x, t = call.get("sample", call.get("hidden_states")), call["timestep"]
        t = t.reshape(-1).expand(x.shape[0])
        assert 0 < float(t[0]) < (1000 if "image" in row else 1001)  # strength 0.75: part-way, not at pure noise
        torch.testing.assert_close(task.predict(den, x, t, cond), own)


@pytest.mark.parametrize("variant", ["sd", "sdxl", "cosxl"])
def test_instruct_pix2pix_tasks_condition_on_the_input_as_their_pipelines_do(variant, tiny_sd_pipe):
    """InstructPix2Pix's U-Net takes the input image's latents beside the noisy ones: the task's (the latent mode,
    unscaled; CosXL Edit's scaled by the VAE's factor, as its pipeline scales them) are what the pipeline's own first
    call concatenates, and the task predicts what that call predicted."""
    import diffusers

    from diffslim.sample import _stop_at_first_call
    from diffslim.train.distill import task_for

    base = tiny_sd_pipe if variant == "sd" else _tiny_sdxl(tiny_sd_pipe)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(base.unet.config, in_channels=8).eval()
    parts = {k: v for k, v in base.components.items()
             if k not in ("unet", "image_encoder", "feature_extractor", "safety_checker")}
    if variant == "sd":
        pipe = diffusers.StableDiffusionInstructPix2PixPipeline(**parts, unet=unet, safety_checker=None,
                                                                feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionXLInstructPix2PixPipeline(**parts, unet=unet,
                                                                  is_cosxl_edit=variant == "cosxl")
    pipe.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    spec = SampleSpec(inputs=[{"prompt": "make it red", "image": Image.fromarray(pixels)}], seeds=[0],
                      num_inference_steps=3, call_kwargs={"guidance_scale": 1.0, "height": 16, "width": 16})
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    with torch.no_grad():
        own = unet(*args, **{**kwargs, "return_dict": False})[0]
        task = task_for(pipe)
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
        _, cond = task.encode({"image": image, "cond": image, "text": ["make it red"]}, torch.Generator(), "cpu")
        torch.testing.assert_close(cond["concat"], args[0][:, 4:])
        torch.testing.assert_close(task.predict(unet, args[0][:, :4], args[1].reshape(1), cond), own)


def test_an_lcm_pipeline_refuses_a_scheduler_it_cannot_sample_with(tiny_sd_pipe):
    """LatentConsistencyModelPipeline passes original_inference_steps to its scheduler: dpm:N, xue:N, a recipe's
    scheduler and sample --scheduler crashed with a TypeError inside diffusers; they are refused in one line (the
    bench's before anything samples), and steps:N, on its own scheduler, samples."""
    from types import SimpleNamespace

    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    import diffslim
    from diffslim.bench import run_bench
    from diffslim.errors import UserError
    from diffslim.models.load import LoadedModel
    from diffslim.sample import SampleSpec, sample

    from diffusers import UNet2DConditionModel

    parts = {k: v for k, v in tiny_sd_pipe.components.items() if k not in ("unet", "scheduler")}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_sd_pipe.unet.config, time_cond_proj_dim=8)
    pipe = LatentConsistencyModelPipeline(**parts, unet=unet, scheduler=LCMScheduler(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    evalset = SimpleNamespace(inputs=[{"prompt": "a cat"}], seeds=[0], call_kwargs={"height": 16, "width": 16})
    loaded = LoadedModel("lcm", "pipeline", pipe.unet, pipe=pipe)
    for methods in ("full,dpm:2", "full,xue:2"):
        with pytest.raises(UserError, match="LatentConsistencyModelPipeline samples with its LCMScheduler .*"
                                            "'dpm\\+\\+' cannot sample it"):
            run_bench(loaded, methods, evalset, default_steps=2, progress=False)
    spec = SampleSpec(inputs=[{"prompt": "a cat"}], seeds=[0], num_inference_steps=2, scheduler="dpm++",
                      call_kwargs={"height": 16, "width": 16})
    with pytest.raises(UserError, match="cannot sample it"):
        sample(pipe, spec)
    with pytest.raises(UserError, match="cannot sample it"):
        diffslim.apply(pipe, {"model": "lcm", "sampling": {"scheduler": "dpm++", "num_inference_steps": 2}})
    rows = run_bench(loaded, "full,steps:1", evalset, default_steps=2, progress=False).rows
    assert [r["method"] for r in rows] == ["full", "steps:1"]
    sd = StableDiffusionPipeline(**parts, unet=tiny_sd_pipe.unet, scheduler=LCMScheduler(),
                                 requires_safety_checker=False)  # an SD pipeline with an LCM scheduler may swap it
    assert sample(sd, spec).shape == (1, 3, 16, 16)


def test_sampling_calibration_takes_steps_not_calls_where_guidance_calls_the_denoiser_twice(tiny_sd_pipe):
    """Lumina2 guides with a call for the prompt and one for the negative prompt at every step. Sampling calibration
    stratifies over the steps a run makes: each of 4 triples is at another of the 4 steps (it took the first 4 calls,
    two steps' cond and uncond, before), each the prompt's call."""
    from diffslim.methods.layer_prune import sampling_calibration

    pipe = _tiny_lumina2(tiny_sd_pipe)
    kw = {"guidance_scale": 4.0, "height": 32, "width": 32}
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(float(k["timestep"][0])),
                                                      with_kwargs=True)
    try:
        pipe("a red cat", num_inference_steps=4, **kw)
    finally:
        hook.remove()
    assert len(seen) == 8 and seen[0::2] == seen[1::2]  # two calls a step
    calib = sampling_calibration(pipe, n=4, steps=4, inputs=[{"prompt": "a red cat"}], call_kwargs=kw)
    assert sorted(calib.source["calls"]) == [0, 1, 2, 3]
    torch.testing.assert_close(sorted(calib.t.tolist()), sorted(seen[0::2]))
    assert calib.cond["encoder_attention_mask"].sum(1).min() > 1  # the prompt's tokens, not the empty negative's


def test_sampling_calibration_batches_calls_whose_captions_differ_in_length(tiny_sd_pipe):
    """CogView4 pads captions to each call's longest and passes no mask, so calls for a short and a long prompt differ
    in length and could not be joined (a RuntimeError in torch.cat). They are kept in segments of one length: no
    batch straddles two, and the predictions are those of each triple alone."""
    import dataclasses

    from diffslim.methods.layer_prune import output_loss, sampling_calibration

    pipe = _tiny_cogview4(tiny_sd_pipe)
    prompts = [{"prompt": "a cat"}, {"prompt": "a very long prompt about a red dog on a green hill under the sky"}]
    calib = sampling_calibration(pipe, n=4, steps=2, inputs=prompts, sample_batch=1,
                                 call_kwargs={"guidance_scale": 1.0, "height": 32, "width": 32})
    assert len(calib) == 4 and len(calib.bounds) == 1 and isinstance(calib.cond, list)
    lengths = {c["encoder_hidden_states"].shape[1] for c in calib.cond}
    assert len(lengths) == 2
    den = pipe.transformer
    together = calib.run(den)
    alone = dataclasses.replace(calib, batch_size=1).run(den)
    torch.testing.assert_close(together, alone)
    assert output_loss(den, calib, []) == 0.0 and output_loss(den, calib, ["transformer_blocks.1"]) > 0


def _scored_pruned_and_stock(den, calib, blocks: str, count: str, tmp_path) -> None:
    """On a calibration of a 3-block ``den``: the output loss scores every block above 0, and the stock export of the
    model without the middle block has ``count`` 2, reloads with diffusers alone and predicts as the pruned model
    does, bit for bit."""
    from diffslim.methods import layer_prune as lp

    scores = lp.score_layers(den, lp.candidates(den), "output-loss", calib)
    assert sorted(scores) == [f"{blocks}.{i}" for i in range(3)] and all(v > 0 for v in scores.values())
    pruned = lp.prune_layers(den, [f"{blocks}.1"])
    stock = lp.stock_model(pruned)
    assert type(stock) is type(den) and stock.config[count] == 2
    stock.save_pretrained(str(tmp_path / "m"))
    again = type(den).from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(calib.run(again), calib.run(pruned), rtol=0, atol=0)


def test_zimage_samples_at_its_call_default_and_is_calibrated_and_layer_pruned_on_its_sampling(tiny_sd_pipe,
                                                                                              tmp_path):
    """Z-Image states no image size (its call falls back to 1024 px); it takes lists of per-image latents and of
    captions of their own lengths, and its timestep argument is ``t``. A sampling calibration records its calls (the
    prompt's and the empty negative prompt's captions differ in length, padded and cut back), predicts what its own
    call predicted, and a layer-pruned model saved as the stock class with one block fewer reloads and predicts the
    same."""
    from diffslim.methods import layer_prune as lp
    from diffslim.sample import _stop_at_first_call
    from diffslim.train.data import pipeline_image_size

    pipe = _tiny_zimage(tiny_sd_pipe)
    assert pipeline_image_size(pipe) == 1024
    kw = {"guidance_scale": 3.0, "height": 32, "width": 32}
    calib = lp.sampling_calibration(pipe, n=1, steps=1, inputs=[{"prompt": "a red cat"}], call_kwargs=kw, seed=0)
    assert len(calib) == 2
    spec = SampleSpec(inputs=[{"prompt": "a red cat"}], seeds=calib.source["seeds"], num_inference_steps=1,
                      call_kwargs=kw)
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    den = pipe.transformer
    assert len(args[0]) == 2 and args[2][0].shape[0] != args[2][1].shape[0]  # guidance: the prompt's, the negative's
    with torch.no_grad():
        own = torch.stack(den(*args, **{**kwargs, "return_dict": False})[0])
    torch.testing.assert_close(calib.run(den), own)
    _scored_pruned_and_stock(den, calib, "layers", "n_layers", tmp_path)


def test_qwenimage_is_calibrated_on_its_sampling_and_layer_pruned(tiny_sd_pipe, tmp_path):
    """Qwen-Image's calls take packed latents, a caption mask and the grid's shape as a list: a sampling calibration
    predicts what its own call predicted, keeps calls of other caption lengths (two prompts, with true CFG a
    negative prompt of a third) in their own segments, scores every block above 0, and a stock export with one block
    fewer reloads and predicts what the pruned model does, bit for bit."""
    from diffslim.methods import layer_prune as lp
    from diffslim.sample import _stop_at_first_call

    pipe = _tiny_qwenimage(tiny_sd_pipe)
    den = pipe.transformer
    kw = {"true_cfg_scale": 4.0, "negative_prompt": "blurry"}
    calib = lp.sampling_calibration(pipe, n=1, steps=2, inputs=[{"prompt": "a red cat"}], call_kwargs=kw, seed=0)
    spec = SampleSpec(inputs=[{"prompt": "a red cat"}], seeds=calib.source["seeds"], num_inference_steps=2,
                      call_kwargs=kw)
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    with torch.no_grad():
        own = den(*args, **{**kwargs, "return_dict": False})[0]
    assert calib.source["calls"] == [0]  # one triple: the first step's prompt call (its negative call is skipped)
    torch.testing.assert_close(calib.run(den), own)
    prompts = [{"prompt": "a red cat"}, {"prompt": "a small green house by the sea at night"}]
    calib = lp.sampling_calibration(pipe, n=2, steps=2, inputs=prompts, call_kwargs=kw, seed=0, sample_batch=1)
    assert len(calib) == 2 and calib.bounds == (1,)
    assert float(lp.output_loss(den, calib, [])) == 0.0
    # batches of 2 and 1 prompts: img_shapes has one entry per row, and a batch without padding passes no caption
    # mask (refused before: "calls differ in an argument that has no row per input"); all ones stand in for it
    three = [{"prompt": "a red cat"}, {"prompt": "a blue dog"}, {"prompt": "a tree"}]
    calib3 = lp.sampling_calibration(pipe, n=3, steps=2, inputs=three, seed=0, sample_batch=2)
    assert len(calib3) == 3 and float(lp.output_loss(den, calib3, [])) == 0.0
    xt, t, c = calib3.inputs(0, 1, torch.float32)
    with torch.no_grad():
        kw = {**c, "img_shapes": [(1, 8, 8)], "timestep": t, "return_dict": False}
        ones = torch.ones_like(c["encoder_hidden_states_mask"])
        torch.testing.assert_close(den(xt, **{**kw, "encoder_hidden_states_mask": None})[0],
                                   den(xt, **{**kw, "encoder_hidden_states_mask": ones})[0])
    _scored_pruned_and_stock(den, calib, "transformer_blocks", "num_layers", tmp_path)


def test_cogview4_task_passes_the_unshifted_timestep_beside_the_shifted_sigma(tiny_sd_pipe):
    """CogView4's pipeline noises its latents at sigmas shifted by its own mu (sqrt(tokens / 256) * max_shift +
    base_shift, not Flux's rule) and passes its transformer the unshifted timestep. At the second of 3 steps
    (timestep 500), the trainer's noising at that u gives the scheduler's sigma, and the task, given that sigma x
    1000, predicts what the pipeline's call predicted."""
    from diffslim.train.distill import noising_for, task_for

    pipe = _tiny_cogview4(tiny_sd_pipe)
    den, calls = pipe.transformer, []
    hook = den.register_forward_pre_hook(lambda m, a, k: calls.append({kk: v for kk, v in k.items()}), with_kwargs=True)
    try:
        pipe("a red cat", num_inference_steps=3, guidance_scale=1.0, height=32, width=32, output_type="latent")
    finally:
        hook.remove()
    call = calls[1]
    assert float(call["timestep"][0]) == 500.0
    sigma = pipe.scheduler.sigmas[1]
    assert abs(float(sigma) - 0.5) > 0.05  # shifted away from the timestep's 0.5
    x = call["hidden_states"]
    noising = noising_for(pipe)
    torch.testing.assert_close(noising.shifted(torch.tensor([0.5]), x.shape), sigma.reshape(1).float())
    with torch.no_grad():
        own = den(**{**call, "return_dict": False})[0]
        task = task_for(pipe)
        _, cond = task.encode({"image": torch.zeros(1, 3, 32, 32), "text": ["a red cat"]}, torch.Generator(), "cpu")
        torch.testing.assert_close(task.predict(den, x, sigma.reshape(1) * 1000, cond), own)


def _tiny_controlnet(base, variant: str):
    """A ControlNet pipeline of class ``variant`` over ``base``'s parts (SD or SDXL), its ControlNet made from the
    U-Net with output convolutions not zero (as training leaves them)."""
    import diffusers

    torch.manual_seed(1)
    net = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    for p in list(net.controlnet_down_blocks.parameters()) + list(net.controlnet_mid_block.parameters()):
        torch.nn.init.normal_(p, std=0.1)
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor",
                                                                   "safety_checker")}
    extra = {} if "XL" in variant else {"safety_checker": None, "feature_extractor": None,
                                        "requires_safety_checker": False}
    pipe = getattr(diffusers, variant)(**parts, controlnet=net, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", ["StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
                                     "StableDiffusionXLControlNetPipeline"])
def test_controlnet_tasks_add_the_controlnets_residuals_as_their_pipelines_do(variant, tiny_sd_pipe):
    """A ControlNet pipeline's task runs its ControlNet on the control image (a training pair's input) and the noisy
    latents, and hands the U-Net the residuals its own first call handed it: it predicts what that call predicted.
    Before, the task left the ControlNet out and trained the U-Net as text to image, the control images unread."""
    from diffslim.sample import _stop_at_first_call
    from diffslim.train.distill import task_for

    pipe = _tiny_controlnet(_tiny_sdxl(tiny_sd_pipe) if "XL" in variant else tiny_sd_pipe, variant)
    size = 16
    rng = np.random.default_rng(0)
    control = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    row = {"prompt": "a red cat", "image": control}
    if "Img2Img" in variant:
        row = {"prompt": "a red cat", "control_image": control,
               "image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))}
    spec = SampleSpec(inputs=[row], seeds=[0], num_inference_steps=4,
                      call_kwargs={"height": size, "width": size, "guidance_scale": 1.0,
                                   **({"strength": 0.75} if "Img2Img" in variant else {})})
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    with torch.no_grad():
        own = pipe.unet(*args, **{**kwargs, "return_dict": False})[0]
        task = task_for(pipe)
        cond_image = torch.from_numpy(np.asarray(control)).permute(2, 0, 1)[None].float() / 255
        _, cond = task.encode({"image": torch.zeros(1, 3, size, size), "text": ["a red cat"], "cond": cond_image},
                              torch.Generator(), "cpu")
        x, t = args[0], args[1]
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        extra = task.extra_cond(x, t, cond)
        down = extra["controlnet"]["down"]
        assert len(down) == len(kwargs["down_block_additional_residuals"]) > 1
        for i, r in enumerate(kwargs["down_block_additional_residuals"]):
            torch.testing.assert_close(down[str(i)], r)
        torch.testing.assert_close(extra["controlnet"]["mid"], kwargs["mid_block_additional_residual"])
        torch.testing.assert_close(task.predict(pipe.unet, x, t, {**cond, **extra}), own)
        torch.testing.assert_close(task.predict(pipe.unet, x, t, cond), own)  # the residuals made on the way
        assert not torch.allclose(task.predict(pipe.unet, x, t, {k: v for k, v in cond.items() if k != "control"}),
                                  own, atol=1e-4)  # the ControlNet's part is not nothing


def test_controlnet_task_needs_the_control_image_and_one_controlnet(tiny_controlnet_pipe):
    import diffusers

    from diffslim.errors import UserError
    from diffslim.train.distill import task_for

    task = task_for(tiny_controlnet_pipe)
    with pytest.raises(UserError, match="control image: give a folder with input/"):
        task.encode({"image": torch.zeros(1, 3, 16, 16), "text": ["a"]}, torch.Generator(), "cpu")
    parts = dict(tiny_controlnet_pipe.components)
    parts["controlnet"] = diffusers.MultiControlNetModel([parts["controlnet"], parts["controlnet"]])
    multi = diffusers.StableDiffusionControlNetPipeline(**parts, requires_safety_checker=False)
    with pytest.raises(UserError, match="holds 2 ControlNets, and a training pair gives one control image"):
        task_for(multi)


def _tiny_transformer_controlnet(tiny_sd_pipe, family: str):
    """A tiny FluxControlNetPipeline or StableDiffusion3ControlNetPipeline (``family`` "flux" or "sd3"): a one-block
    ControlNet made from the transformer, its output projections not zero (as training leaves them)."""
    import copy

    import diffusers

    base = _tiny_flux(tiny_sd_pipe) if family == "flux" else _tiny_sd3(tiny_sd_pipe)
    torch.manual_seed(1)
    tr = copy.deepcopy(base.transformer)  # SD3's from_transformer writes its num_layers into the transformer's config
    if family == "flux":
        net = diffusers.FluxControlNetModel.from_transformer(tr, num_layers=1, num_single_layers=1,
                                                             attention_head_dim=8, num_attention_heads=2)
    else:
        net = diffusers.SD3ControlNetModel.from_transformer(tr, num_layers=1, num_extra_conditioning_channels=0)
    for name, p in net.named_parameters():
        if "controlnet_" in name:
            torch.nn.init.normal_(p, std=0.1)
    cls = diffusers.FluxControlNetPipeline if family == "flux" else diffusers.StableDiffusion3ControlNetPipeline
    pipe = cls(**{k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")},
               controlnet=net.eval())
    if family == "flux":
        pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_transformer_controlnets_sample_their_control_images_as_users_give_them(family, tiny_sd_pipe, calls_alone,
                                                                              tmp_path):
    """Flux's and SD3's ControlNet pipelines take a control image given as a tensor as already preprocessed (in [-1, 1],
    at the sampling size). The harness reads images into [0, 1], so it handed them images they read as half grey, and
    Flux's crashed on a size other than the call's: it now hands them PIL images, which they resize and normalize as
    a user's. The sampling calibration records the ControlNet's block residuals, which a layer-pruned transformer
    (every block's place kept) takes as they are."""
    from diffslim.methods import layer_prune as lp
    from diffslim.sample import _pil

    pipe = _tiny_transformer_controlnet(tiny_sd_pipe, family)
    g = torch.Generator().manual_seed(0)
    controls = [(torch.rand(3, 16, 16, generator=g) * 255).round() / 255 for _ in range(2)]
    inputs = [{"prompt": p, "control_image": c} for p, c in zip(("a cat", "a dog"), controls)]
    kw = {"height": 16, "width": 16, "guidance_scale": 1.0}
    ours = sample(pipe, SampleSpec(inputs=inputs[:1], seeds=[0], num_inference_steps=2, call_kwargs=kw))
    own = pipe("a cat", control_image=_pil(controls[0]), num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(ours, own.float(), atol=1e-6, rtol=0)
    big = [{"prompt": "a cat", "control_image": torch.nn.functional.interpolate(controls[0][None], 32)[0]}]
    assert sample(pipe, SampleSpec(inputs=big, seeds=[0], num_inference_steps=2, call_kwargs=kw)).shape[-1] == 16
    calib = lp.sampling_calibration(pipe, n=2, steps=2, inputs=inputs, call_kwargs=kw)
    pred = calib.run(pipe.transformer)
    alone = calls_alone(pipe, calib.source["inputs"], calib.source["seeds"], 2, kw)
    for k, call in enumerate(calib.source["calls"]):
        named, out = alone[k][call]
        assert isinstance(named["controlnet_block_samples" if family == "flux" else "block_controlnet_hidden_states"],
                          (list, tuple))
        torch.testing.assert_close(pred[k:k + 1], out, atol=1e-5, rtol=1e-5)
    res = lp.layer_prune(pipe.transformer, "output-loss", 0.3, calib=calib)
    assert res.params_removed >= 0.3 * res.params and lp.output_loss(pipe.transformer, calib, []) == 0.0
    # a folder of training pairs gives their inputs as the control images (these pipelines take no "image")
    from diffslim.train.data import pipeline_inputs

    for sub in ("input", "target"):
        (tmp_path / sub).mkdir()
        _pil(controls[0]).save(tmp_path / sub / "a.png")
    (tmp_path / "target" / "a.txt").write_text("a cat")
    (row,) = list(pipeline_inputs(pipe, str(tmp_path), 0))
    assert set(row) == {"prompt", "control_image"} and torch.equal(row["control_image"], controls[0])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_transformers_controlnet_refuses_the_stock_export(family, tiny_sd_pipe):
    """A transformer's ControlNet adds its residuals to the blocks by position, spread over the original's count: a
    stock transformer with fewer blocks takes them at other blocks and computes something else, with no error to
    show it. So a stock export of such a pipeline is refused (before any scoring), while the layer-pruned transformer
    computes what the stock one does without the ControlNet."""
    from diffslim.errors import UserError
    from diffslim.methods import layer_prune as lp

    pipe = _tiny_transformer_controlnet(tiny_sd_pipe, family)
    den = pipe.transformer
    name = "single_transformer_blocks.0" if family == "flux" else "transformer_blocks.0"
    pruned = lp.prune_layers(den, [name])
    stock = lp.stock_model(pruned)
    with pytest.raises(UserError, match="by position, placed among the original's .*other blocks: keep the layer-pruned"):
        lp.check_controlnet_fits(pipe)
    with pytest.raises(UserError, match=r"a stock export has \d, so diffusers would add them to other blocks"):
        lp.check_controlnet_fits(pipe, stock)
    lp.check_controlnet_fits(pipe, pruned)  # every block's place kept: it fits
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, generator=g) if family == "flux" else torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 5, 32, generator=g)
    pooled = torch.randn(1, 16 if family == "flux" else 32, generator=g)
    if family == "flux":
        args = dict(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                    pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=torch.zeros(5, 3),
                    img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32))
        residuals = {"controlnet_block_samples": [torch.randn(1, 16, 16, generator=g)],
                     "controlnet_single_block_samples": [torch.randn(1, 16, 16, generator=g)]}
    else:
        args = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=emb,
                    pooled_projections=pooled)
        residuals = {"block_controlnet_hidden_states": [torch.randn(1, 16, 16, generator=g)]}
    with torch.no_grad():
        torch.testing.assert_close(stock(**args).sample, pruned(**args).sample)
        assert not torch.allclose(stock(**args, **residuals).sample, pruned(**args, **residuals).sample, atol=1e-4)


@pytest.mark.parametrize("variant", ["FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline",
                                     "StableDiffusion3ControlNetPipeline"])
def test_transformer_controlnet_tasks_add_the_residuals_their_pipelines_add(variant, tiny_sd_pipe):
    """SD3's and Flux's ControlNet tasks encode the control image as their pipelines do (VAE latents, shifted; SD3's
    InstantX ControlNet unshifted, with a zero pooled projection), run the ControlNet on the noisy latents and hand the
    transformer the block residuals of the pipeline's own first call: they predict what it predicted. SD3's task left
    the ControlNet out before, and Flux's ControlNet pipelines had none. The VAE's posterior is made near exact
    (log-variance -30), since the pipelines sample it with their own generator."""
    import diffusers

    from diffslim.sample import _pil, _stop_at_first_call
    from diffslim.train.distill import task_for, unpack_latents

    family = "flux" if variant.startswith("Flux") else "sd3"
    base = _tiny_transformer_controlnet(tiny_sd_pipe, family)
    latent = base.vae.config.latent_channels
    base.vae.quant_conv.bias.data[latent:] = -30.0
    import inspect

    cls = getattr(diffusers, variant)
    takes = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in base.components.items() if k in takes})
    pipe.set_progress_bar_config(disable=True)
    if family == "flux":
        pipe.default_sample_size = 8
    size = 16
    g = torch.Generator().manual_seed(0)
    control = (torch.rand(3, size, size, generator=g) * 255).round() / 255
    row = {"prompt": "a red cat", "control_image": control}
    if "Img2Img" in variant:
        row["image"] = (torch.rand(3, size, size, generator=g) * 255).round() / 255
    seen = {}
    hook = pipe.controlnet.register_forward_pre_hook(lambda m, a, kw: seen.setdefault("net", kw) and None,
                                                     with_kwargs=True)
    try:
        spec = SampleSpec(inputs=[row], seeds=[0], num_inference_steps=4,
                          call_kwargs={"height": size, "width": size,  # Flux's guidance: its pipeline's default
                                       **({} if family == "flux" else {"guidance_scale": 1.0}),
                                       **({"strength": 0.75} if "Img2Img" in variant else {})})
        args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    finally:
        hook.remove()
    den = pipe.transformer
    with torch.no_grad():
        own = den(*args, **{**kwargs, "return_dict": False})[0]
        task = task_for(pipe)
        _, cond = task.encode({"image": torch.zeros(1, 3, size, size), "text": ["a red cat"], "cond": control[None]},
                              torch.Generator().manual_seed(0), "cpu")
        if family == "flux":
            h = w = size // 2
            x, t, own = unpack_latents(kwargs["hidden_states"], h, w), kwargs["timestep"] * 1000, unpack_latents(own, h, w)
            torch.testing.assert_close(cond["control"], unpack_latents(seen["net"]["controlnet_cond"], h, w),
                                       atol=1e-5, rtol=0)
            keys = {"double": "controlnet_block_samples", "single": "controlnet_single_block_samples"}
        else:
            x, t = kwargs["hidden_states"], kwargs["timestep"]
            torch.testing.assert_close(cond["control"], seen["net"]["controlnet_cond"], atol=1e-5, rtol=0)
            keys = {"blocks": "block_controlnet_hidden_states"}
        t = t.reshape(-1).expand(x.shape[0])
        extra = task.extra_cond(x, t, cond)
        for ours, theirs in keys.items():
            assert len(extra["controlnet"][ours]) == len(kwargs[theirs]) > 0
            for i, r in enumerate(kwargs[theirs]):
                torch.testing.assert_close(extra["controlnet"][ours][str(i)], r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(task.predict(den, x, t, {**cond, **extra}), own, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(task.predict(den, x, t, cond), own, atol=1e-5, rtol=1e-5)
        bare = {k: v for k, v in cond.items() if k != "control"}
        assert not torch.allclose(task.predict(den, x, t, bare), own, atol=1e-4)
    assert _pil(control).size == (size, size)


@pytest.mark.parametrize("variant", ["FluxControlPipeline", "FluxControlImg2ImgPipeline"])
def test_flux_control_tasks_concatenate_the_control_latents_as_their_pipelines_do(variant, tiny_sd_pipe):
    """Flux Control (Canny and Depth dev): the transformer takes the control image's latents beside the noisy ones,
    packed and concatenated along the channels. The task does the same (it concatenates before packing, which makes
    the same tokens) and predicts what the pipeline's own first call predicted; there was no task for them."""
    import inspect

    import diffusers

    from diffslim.errors import UserError
    from diffslim.sample import _stop_at_first_call
    from diffslim.train.distill import task_for, unpack_latents

    base = _tiny_flux(tiny_sd_pipe)
    base.vae.quant_conv.bias.data[base.vae.config.latent_channels:] = -30.0  # a near exact posterior (see above)
    tr = diffusers.FluxTransformer2DModel.from_config(base.transformer.config, in_channels=32, out_channels=16)
    cls = getattr(diffusers, variant)
    takes = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in {**base.components, "transformer": tr.eval()}.items() if k in takes})
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    size, g = 16, torch.Generator().manual_seed(0)
    control = (torch.rand(3, size, size, generator=g) * 255).round() / 255
    row = {"prompt": "a red cat", "control_image": control}
    if "Img2Img" in variant:
        row["image"] = (torch.rand(3, size, size, generator=g) * 255).round() / 255
    spec = SampleSpec(inputs=[row], seeds=[0], num_inference_steps=4,
                      call_kwargs={"height": size, "width": size,
                                   **({"strength": 0.75} if "Img2Img" in variant else {})})
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    with torch.no_grad():
        own = pipe.transformer(*args, **{**kwargs, "return_dict": False})[0]
        task = task_for(pipe)
        _, cond = task.encode({"image": torch.zeros(1, 3, size, size), "text": ["a red cat"], "cond": control[None]},
                              torch.Generator().manual_seed(0), "cpu")
        h = w = size // 2
        hidden = kwargs["hidden_states"]
        x, ctrl = unpack_latents(hidden[..., :16], h, w), unpack_latents(hidden[..., 16:], h, w)
        torch.testing.assert_close(cond["concat"], ctrl, atol=1e-5, rtol=0)
        t = (kwargs["timestep"] * 1000).reshape(-1).expand(1)
        torch.testing.assert_close(task.predict(pipe.transformer, x, t, cond), unpack_latents(own, h, w),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="is steered by a control image: give a folder with input"):
        task.encode({"image": torch.zeros(1, 3, size, size), "text": ["a"]}, torch.Generator(), "cpu")


def test_flux_kontext_calibration_scores_only_the_tokens_it_generates(tiny_sd_pipe, calls_alone):
    """Flux Kontext appends the input image's tokens to the noisy ones and drops their outputs after each call. The
    sampling calibration now keeps only the generated tokens' outputs, so the output loss scores what the pipeline
    uses: its predictions are the first tokens of each call's outputs, fewer than the call's tokens (it scored the
    dropped ones too)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from diffslim.methods import layer_prune as lp

    flux = _tiny_flux(tiny_sd_pipe)
    pipe = FluxKontextPipeline(**{**flux.components, "scheduler": FlowMatchEulerDiscreteScheduler()})
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    inputs = [{"prompt": p, "image": torch.rand(3, 16, 16, generator=g)} for p in ("a cat", "a dog")]
    kw = {"max_area": 16 * 16, "_auto_resize": False}
    calib = lp.sampling_calibration(pipe, n=2, steps=2, inputs=inputs, call_kwargs=kw)
    pred = calib.run(pipe.transformer)
    assert calib.xt.shape[1] == 32 and pred.shape[1] == 16  # 16 generated tokens and the image's 16
    alone = calls_alone(pipe, calib.source["inputs"], calib.source["seeds"], 2, kw)
    for k, call in enumerate(calib.source["calls"]):
        _, out = alone[k][call]
        torch.testing.assert_close(pred[k:k + 1], out[:, :16], atol=1e-5, rtol=1e-5)
    res = lp.layer_prune(pipe.transformer, "output-loss", 0.3, calib=calib)
    assert res.params_removed >= 0.3 * res.params


def test_flux_kontext_task_sees_the_input_images_tokens_as_its_pipeline_does(tiny_sd_pipe):
    """Flux Kontext's task: a training pair's input image goes in as its pipeline puts it (VAE latents at the
    posterior's mode, packed, after the noisy tokens, their position ids marked 1) and the input's outputs are
    dropped; it predicts what the pipeline's own first call predicted, and without an input image what FluxPipeline's
    task predicts. There was no task for it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from diffslim.sample import _stop_at_first_call
    from diffslim.train.distill import task_for, unpack_latents

    flux = _tiny_flux(tiny_sd_pipe)
    pipe = FluxKontextPipeline(**{**flux.components, "scheduler": FlowMatchEulerDiscreteScheduler()})
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    image = (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    spec = SampleSpec(inputs=[{"prompt": "make it red", "image": image}], seeds=[0], num_inference_steps=4,
                      call_kwargs={"max_area": 16 * 16, "_auto_resize": False})
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    assert kwargs["hidden_states"].shape[1] == 32  # 16 noisy tokens and the image's 16
    with torch.no_grad():
        own = pipe.transformer(*args, **{**kwargs, "return_dict": False})[0][:, :16]
        task = task_for(pipe)
        _, cond = task.encode({"image": torch.zeros(1, 3, 16, 16), "text": ["make it red"], "cond": image[None]},
                              torch.Generator(), "cpu")
        x, t = unpack_latents(kwargs["hidden_states"][:, :16], 8, 8), (kwargs["timestep"] * 1000).reshape(1)
        torch.testing.assert_close(task.predict(pipe.transformer, x, t, cond), unpack_latents(own, 8, 8),
                                   atol=1e-5, rtol=1e-5)
        _, plain = task.encode({"image": torch.zeros(1, 3, 16, 16), "text": ["make it red"]}, torch.Generator(), "cpu")
        assert "reference" not in plain
        torch.testing.assert_close(task.predict(pipe.transformer, x, t, plain),
                                   task_for(flux).predict(flux.transformer, x, t, plain))


def test_qwenimage_edit_calibration_scores_only_the_tokens_it_generates(tiny_sd_pipe, calls_alone, monkeypatch):
    """Qwen-Image Edit appends the input image's tokens to the noisy ones (``img_shapes`` lists the generated grid
    first) and drops their outputs: the sampling calibration keeps the generated tokens' outputs. Its Qwen2.5-VL
    prompt encoding (which also sees the image through a processor no test here can build) is stubbed; the
    transformer's calls are the pipeline's own. It reads the input's size as a PIL image's: the harness hands it PIL
    images (a tensor failed in its first line). Its input image is resized to a 1024 x 1024 area, here to 32 x 32 (the
    test took minutes at 1024)."""
    import diffusers
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    from diffslim.methods import layer_prune as lp

    real = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: real(32 * 32, ratio))
    base = _tiny_qwenimage(tiny_sd_pipe)
    pipe = diffusers.QwenImageEditPipeline(processor=None, **base.components)
    pipe.set_progress_bar_config(disable=True)

    def encode_prompt(prompt, image=None, device=None, num_images_per_prompt=1, **_):
        prompts = [prompt] if isinstance(prompt, str) else prompt  # each prompt's own, batched or alone
        emb = torch.stack([torch.randn(5, 16, generator=torch.Generator().manual_seed(len(p))) for p in prompts])
        emb = emb.repeat_interleave(num_images_per_prompt, 0)
        return emb, torch.ones(emb.shape[:2], dtype=torch.long)

    pipe.encode_prompt = encode_prompt
    g = torch.Generator().manual_seed(0)
    inputs = [{"prompt": p, "image": torch.rand(3, 32, 32, generator=g)} for p in ("make it red", "make it blue")]
    kw = {"height": 32, "width": 32, "true_cfg_scale": 1.0}
    calib = lp.sampling_calibration(pipe, n=2, steps=2, inputs=inputs, call_kwargs=kw)
    pred = calib.run(pipe.transformer)
    n = calib.xt.shape[1]
    assert pred.shape[1] < n
    alone = calls_alone(pipe, calib.source["inputs"], calib.source["seeds"], 2, kw)
    for k, call in enumerate(calib.source["calls"]):
        named, out = alone[k][call]
        (f, h, w), *rest = named["img_shapes"][0]
        assert rest and pred.shape[1] == f * h * w
        torch.testing.assert_close(pred[k:k + 1], out[:, :f * h * w], atol=1e-5, rtol=1e-5)


def test_qwenimage_controlnet_task_adds_the_residuals_its_pipeline_adds(tiny_sd_pipe):
    """Qwen-Image's ControlNet pipeline: the control image's latents from its video VAE (normalized per channel,
    packed), the ControlNet run on the packed noisy latents with the caption mask and the grid's shape, its residuals
    handed to the transformer. The task predicts what the pipeline's own first call predicted (there was no task);
    a stock export under it is refused, as for SD3's and Flux's."""
    import copy

    import diffusers

    from diffslim.errors import UserError
    from diffslim.methods import layer_prune as lp
    from diffslim.sample import _stop_at_first_call
    from diffslim.train.distill import task_for, unpack_latents

    base = _tiny_qwenimage(tiny_sd_pipe)
    base.vae.quant_conv.bias.data[base.vae.config.z_dim:] = -30.0  # a near exact posterior, as above
    torch.manual_seed(1)
    net = diffusers.QwenImageControlNetModel.from_transformer(copy.deepcopy(base.transformer), num_layers=1,
                                                              attention_head_dim=8, num_attention_heads=2)
    for name, p in net.named_parameters():
        if "controlnet_blocks" in name:
            torch.nn.init.normal_(p, std=0.1)
    pipe = diffusers.QwenImageControlNetPipeline(**base.components, controlnet=net.eval())
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    size, g = 32, torch.Generator().manual_seed(0)
    control = (torch.rand(3, size, size, generator=g) * 255).round() / 255
    spec = SampleSpec(inputs=[{"prompt": "a red cat", "control_image": control}], seeds=[0], num_inference_steps=4,
                      call_kwargs={"height": size, "width": size, "true_cfg_scale": 1.0})
    args, kwargs = _stop_at_first_call(pipe, spec)["call"]
    h = w = size // pipe.vae_scale_factor
    with torch.no_grad():
        own = unpack_latents(pipe.transformer(*args, **{**kwargs, "return_dict": False})[0], h, w)
        task = task_for(pipe)
        _, cond = task.encode({"image": torch.zeros(1, 3, size, size), "text": ["a red cat"], "cond": control[None]},
                              torch.Generator().manual_seed(0), "cpu")
        x, t = unpack_latents(kwargs["hidden_states"], h, w), (kwargs["timestep"] * 1000).reshape(1)
        extra = task.extra_cond(x, t, cond)
        blocks = extra["controlnet"]["blocks"]
        assert len(blocks) == len(kwargs["controlnet_block_samples"]) > 0
        for i, r in enumerate(kwargs["controlnet_block_samples"]):
            torch.testing.assert_close(blocks[str(i)], r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(task.predict(pipe.transformer, x, t, cond), own, atol=1e-5, rtol=1e-5)
        bare = {k: v for k, v in cond.items() if k != "control"}
        assert not torch.allclose(task.predict(pipe.transformer, x, t, bare), own, atol=1e-4)
    with pytest.raises(UserError, match="by position, placed among the original's 3"):
        lp.check_controlnet_fits(pipe)


def test_zimage_controlnet_samples_calibrates_and_refuses_the_stock_export(tiny_sd_pipe, calls_alone):
    """Z-Image's ControlNet adds its residuals at the transformer layers it names by index: a stock transformer with
    fewer layers would take them at other layers, so its stock export is refused too (the check knew only the
    blocks of SD3, Flux and Qwen-Image). Its pipeline takes a control image tensor as preprocessed: it gets PIL
    images, and its calls (a dict of residuals by layer) calibrate the layer-pruned transformer."""
    import diffusers

    from diffslim.errors import UserError
    from diffslim.methods import layer_prune as lp

    base = _tiny_zimage(tiny_sd_pipe)
    torch.manual_seed(1)
    net = diffusers.ZImageControlNetModel(control_layers_places=[0, 2], control_in_dim=4, dim=32, n_refiner_layers=1,
                                          n_heads=2, n_kv_heads=2)
    net = diffusers.ZImageControlNetModel.from_transformer(net, base.transformer).eval()
    pipe = diffusers.ZImageControlNetPipeline(**base.components, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    inputs = [{"prompt": p, "control_image": (torch.rand(3, 32, 32, generator=g) * 255).round() / 255}
              for p in ("a cat", "a dog")]
    kw = {"height": 32, "width": 32, "guidance_scale": 0.0}
    out = sample(pipe, SampleSpec(inputs=inputs[:1], seeds=[0], num_inference_steps=2, call_kwargs=kw))
    assert out.shape == (1, 3, 32, 32)
    calib = lp.sampling_calibration(pipe, n=2, steps=2, inputs=inputs, call_kwargs=kw)
    pred = calib.run(pipe.transformer)
    alone = calls_alone(pipe, calib.source["inputs"], calib.source["seeds"], 2, kw)
    for k, call in enumerate(calib.source["calls"]):
        named, own = alone[k][call]
        assert sorted(named["controlnet_block_samples"]) == [0, 2]
        torch.testing.assert_close(pred[k:k + 1], torch.stack(list(own)), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="residuals to the transformer's layers by position, placed among the "
                                        "original's 3"):
        lp.check_controlnet_fits(pipe)


def _tiny_flux2(tiny_sd_pipe):
    """A tiny Flux2KleinPipeline (a Qwen3 text encoder through a chat template, three of its layers' states stacked;
    two-stream then one-stream blocks sharing one modulation; 4-axis position ids; classifier-free guidance as a
    second call), sampling 16 px."""
    import copy

    import diffusers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tok = copy.deepcopy(tiny_sd_pipe.tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    te = Qwen3ForCausalLM(Qwen3Config(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=8)).eval()
    tr = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                           timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2),
                                           guidance_embeds=False).eval()
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                       layers_per_block=1, sample_size=16).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                      max_image_seq_len=64)
    pipe = diffusers.Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux2_is_layer_pruned_on_its_own_calls(tiny_sd_pipe, calls_alone, tmp_path):
    """Flux.2 (Klein here) was refused: no export for its transformer. Its blocks are scored on the pipeline's own
    calls (the guidance batch as a second call), removed, and exported as LayerPrunedFlux2Transformer2DModel or as a
    stock Flux2Transformer2DModel with fewer blocks (one modulation serves all its blocks); prompts alone are
    enough (its input image is optional); with a reference image the calibration keeps the generated tokens'
    outputs, which the pipeline keeps."""
    from diffslim.methods import layer_prune as lp
    from diffslim.train.data import pipeline_inputs

    pipe = _tiny_flux2(tiny_sd_pipe)
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    inputs = pipeline_inputs(pipe, str(tmp_path / "p.txt"), 0)
    kw = {"height": 16, "width": 16, "max_sequence_length": 8}
    calib = lp.sampling_calibration(pipe, n=2, steps=2, inputs=inputs, call_kwargs=kw)
    pred = calib.run(pipe.transformer)
    alone = calls_alone(pipe, calib.source["inputs"], calib.source["seeds"], 2, kw)
    for k, call in enumerate(calib.source["calls"]):
        # its guidance is a second call per step (the step's first, the prompt's, is the one recorded)
        _, out = alone[k][2 * call]
        torch.testing.assert_close(pred[k:k + 1], out, atol=1e-5, rtol=1e-5)
    res = lp.layer_prune(pipe.transformer, "output-loss", 0.3, calib=calib)
    assert res.params_removed >= 0.3 * res.params
    for blocks, count in (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers")):
        pruned = lp.prune_layers(pipe.transformer, [f"{blocks}.1"])
        stock = lp.stock_model(pruned)
        assert type(stock) is type(pipe.transformer) and stock.config[count] == 1
        stock.save_pretrained(str(tmp_path / blocks))
        again = type(stock).from_pretrained(str(tmp_path / blocks)).eval()
        torch.testing.assert_close(calib.run(again), calib.run(pruned), rtol=0, atol=0)
    # a reference image (at least 64 px for Flux.2; a PIL image, which the harness now hands it: a tensor was refused)
    ref = [{"prompt": "a cat", "image": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))}]
    rcalib = lp.sampling_calibration(pipe, n=1, steps=2, inputs=ref, call_kwargs=kw)
    assert rcalib.xt.shape[1] > 16 and rcalib.run(pipe.transformer).shape[1] == 16
    # it has no training task yet: the bench's +kd says so before anything samples
    from diffslim.bench import METHODS, BenchContext
    from diffslim.errors import UserError
    from diffslim.models.load import LoadedModel

    dry = BenchContext(loaded=LoadedModel("f2", "pipeline", pipe.transformer, pipe=pipe),
                       base_spec=SampleSpec(inputs=[{"prompt": "a"}], seeds=[0]), default_steps=2, dry_run=True)
    METHODS["layers"]("0.3", dry)
    with pytest.raises(UserError, match=r"layers:0.3\+kd: no distillation task for Flux2KleinPipeline"):
        METHODS["layers"]("0.3+kd", dry)
