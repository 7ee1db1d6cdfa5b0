"""Pipelines that sample from input images (ControlNet, img2img, InstructPix2Pix, the x4 upscaler) and
class-conditional DiT pipelines get their evaluation inputs from ``--prompts`` files (a ``.jsonl`` of pipeline
inputs, or class labels), read at the size each pipeline takes; without them a clear error, not diffusers' traceback."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffslim.errors import UserError
from diffslim.evaluate import eval_set_for
from diffslim.models.load import LoadedModel
from diffslim.sample import SampleSpec, sample


def _loaded(pipe):
    den = getattr(pipe, "unet", None) or getattr(pipe, "transformer")
    return LoadedModel("tiny", "pipeline", den, pipe=pipe)


def _inputs_file(folder, rows, size):
    """A .jsonl of pipeline inputs beside two PNGs of ``size`` px (paths relative to the file)."""
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    path = folder / "inputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_controlnet_samples_from_a_jsonl_of_inputs_and_refuses_to_guess(tiny_controlnet_pipe, tmp_path):
    loaded = _loaded(tiny_controlnet_pipe)
    with pytest.raises(UserError, match=r"samples from input images .* --prompts inputs.jsonl") as e:
        eval_set_for(loaded, 2)
    assert "\n" not in str(e.value)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png"}, {"prompt": "a dog", "image": "im1.png"}],
                        size=40)
    es = eval_set_for(loaded, 3, prompts_file=path)
    assert [i["prompt"] for i in es.inputs] == ["a cat", "a dog", "a cat"] and es.seeds == [0, 1, 2]
    # read at the size the pipeline takes (its U-Net's sample_size times the VAE factor), not the file's 40 px
    from diffslim.train.data import pipeline_image_size

    side = pipeline_image_size(tiny_controlnet_pipe)
    assert tuple(es.inputs[0]["image"].shape) == (3, side, side) != (3, 40, 40)
    out = sample(tiny_controlnet_pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=2, batch_size=3))
    assert out.shape == (3, 3, side, side)
    alone = sample(tiny_controlnet_pipe, SampleSpec(es.inputs[:1], [0], num_inference_steps=2))
    torch.testing.assert_close(out[:1], alone, atol=1e-4, rtol=0)


def test_the_x4_upscaler_reads_its_inputs_at_a_quarter_of_its_output(tiny_sd_pipe, tmp_path):
    from test_pipeline_families import tiny_upscaler

    from diffslim.train.data import pipeline_image_size, pipeline_input_size
    from diffslim.train.distill import task_for

    pipe = tiny_upscaler(tiny_sd_pipe)
    assert (pipeline_image_size(pipe), pipeline_input_size(pipe)) == (32, 8)
    path = _inputs_file(tmp_path, [{"prompt": "", "image": "im0.png", "noise_level": 20}], size=32)
    es = eval_set_for(_loaded(pipe), 2, prompts_file=path)
    assert tuple(es.inputs[0]["image"].shape) == (3, 8, 8)
    assert sample(pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=2)).shape == (2, 3, 32, 32)
    with pytest.raises(UserError, match="--calibration sampling"):  # its U-Net takes a noise level: no task
        task_for(pipe)


def test_per_call_settings_in_the_inputs_pass_as_one_value(tiny_sd_pipe, tmp_path):
    """img2img at strength 1.0 from the inputs file: one value per call, as the pipeline takes it (a list crashed
    in diffusers); inputs of one call that disagree are refused."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png", "strength": 1.0},
                                   {"prompt": "a dog", "image": "im1.png", "strength": 1.0}], size=16)
    es = eval_set_for(_loaded(pipe), 2, prompts_file=path)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))  # the session's shared U-Net: removed after
    try:
        out = sample(pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=4, batch_size=2))
    finally:
        handle.remove()
    assert out.shape[0] == 2 and len(calls) == 4  # strength 1.0: every one of the 4 steps runs
    es.inputs[1]["strength"] = 0.5
    with pytest.raises(UserError, match=r"strength: the inputs of one pipeline call give \[0.5, 1.0\]"):
        sample(pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=4, batch_size=2))


def test_a_dit_pipeline_samples_class_labels_by_default_and_from_a_labels_file(tiny_sd_pipe, tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    pipe = DiTPipeline(transformer=transformer, vae=tiny_sd_pipe.vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    es = eval_set_for(_loaded(pipe), 12)
    assert [i["class_label"] for i in es.inputs] == list(range(10)) + [0, 1]
    labels = tmp_path / "labels.txt"
    labels.write_text("3\n1\n")
    es = eval_set_for(_loaded(pipe), 3, prompts_file=labels)
    assert [i["class_label"] for i in es.inputs] == [3, 1, 3]
    out = sample(pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=2, batch_size=3))
    assert out.shape[:2] == (3, 3) and not torch.equal(out[0], out[1])


def test_layer_prune_stock_on_a_controlnet_pipeline_writes_the_layer_pruned_model_and_says_why(
        tiny_sd_pipe, tmp_path):
    """A stock U-Net with a resnet fewer per down block has fewer skip connections than the ControlNet's residuals:
    layer-prune --stock keeps the layer-pruned model (which takes the original ControlNet) and says so, as
    ``diffslim stock`` refuses (it used to write a stock pipeline that failed on a shape in diffusers)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
    from typer.testing import CliRunner

    from diffslim.cli import app

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # two resnets per down block, so that a stock config can drop one
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    parts = {k: v for k, v in tiny_sd_pipe.components.items() if k != "unet"}
    pipe = StableDiffusionControlNetPipeline(
        unet=unet, controlnet=ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)), **parts)
    folder = tmp_path / "cn"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    r = CliRunner().invoke(app, ["layer-prune", str(folder), "--ratio", "0.5", "--criterion", "magnitude", "--stock",
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "ControlNet adds" in r.output and "Wrote the LayerPruned model" in r.output
    config = json.loads((tmp_path / "out" / "pipeline" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "LayerPrunedUNet2DConditionModel" or config.get("removed_layers")


def test_applying_a_workflow_recipe_to_its_original_warns(tiny_digits_pipe, tmp_path, caplog):
    """A workflow's recipe names its pruned stage as ``model`` and the unpruned pipeline as ``original``; applied
    to the original it installs only the schedule: a warning says so and names from_recipe."""
    import copy

    from diffslim import apply

    original = tmp_path / "original"
    tiny_digits_pipe.save_pretrained(str(original), safe_serialization=True)
    pipe = copy.deepcopy(tiny_digits_pipe)
    pipe.register_to_config(_name_or_path=str(original))
    recipe = {"model": str(tmp_path / "stages" / "1-layers"), "original": str(original),
              "sampling": {"num_inference_steps": 3}}
    with caplog.at_level(logging.WARNING, logger="diffslim.apply"):
        apply(pipe, recipe)
        apply(copy.deepcopy(tiny_digits_pipe), recipe)  # loaded from elsewhere: no warning
    assert len(caplog.records) == 1
    assert "the recipe's original" in caplog.records[0].getMessage()
    assert "from_recipe" in caplog.records[0].getMessage()


def test_the_commands_take_an_inputs_file_on_an_img2img_folder(tiny_sd_pipe, tmp_path):
    """sample, profile --pipeline and layer-prune (sampling calibration, MACs of the call the pipeline makes) on a
    saved img2img pipeline with a .jsonl of inputs; without one, sample says what to give in one line."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from typer.testing import CliRunner

    from diffslim.cli import app

    folder = tmp_path / "i2i"
    StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components).save_pretrained(str(folder), safe_serialization=True)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png", "strength": 1.0},
                                   {"prompt": "a dog", "image": "im1.png", "strength": 1.0}], size=16)
    run = CliRunner().invoke
    r = run(app, ["sample", str(folder), "--n", "3", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "samples from input images" in r.output and "--prompts inputs.jsonl" in r.output
    r = run(app, ["sample", str(folder), "--prompts", str(path), "--n", "3", "--steps", "2", "--device", "cpu",
                  "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "s").glob("[0-9]*.png"))) == 3
    r = run(app, ["profile", str(folder), "--pipeline", "--prompts", str(path), "--n", "2", "--steps", "2",
                  "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    r = run(app, ["layer-prune", str(folder), "--ratio", "0.3", "--by", "macs", "--calibration", "sampling", "--data",
                  str(path), "--n", "2", "--calib-steps", "2", "--device", "cpu", "--out", str(tmp_path / "lp"),
                  "--json"])
    assert r.exit_code == 0, r.output
    scores = json.loads((tmp_path / "lp" / "scores.json").read_text())
    assert scores["calibration"]["kind"] == "sampling" and scores["removed"]


def test_a_pixart_of_a_size_without_resolution_bins_samples_unbinned(tiny_sd_pipe):
    """PixArt's resolution binning raises for a sample_size other than its released ones: the eval set asks such a
    pipeline for unbinned sampling (and leaves a released size alone)."""
    from test_pipeline_families import _tiny_pixart

    pipe = _tiny_pixart(tiny_sd_pipe, 1)
    es = eval_set_for(_loaded(pipe), 2)
    assert es.call_kwargs == {"use_resolution_binning": False}
    out = sample(pipe, SampleSpec(es.inputs, es.seeds, num_inference_steps=2, call_kwargs={
        **es.call_kwargs, "max_sequence_length": 16, "clean_caption": False}))
    assert out.shape == (2, 3, 16, 16)
    pipe.transformer.register_to_config(sample_size=32)
    assert eval_set_for(_loaded(pipe), 2).call_kwargs == {}


def test_an_img2img_pipeline_with_a_pinned_schedule_must_be_called_with_its_steps(tiny_sd_pipe):
    """img2img keeps int(num_inference_steps * strength) of the schedule counted with the steps it was called with:
    with a recipe's 2 pinned steps and the default 50 it kept none and failed in the VAE. It is refused in one line
    naming the count to call it with; called with that count it runs those steps."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffslim import apply

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    apply(pipe, {"sampling": {"num_inference_steps": 2}})
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(UserError, match=r"call it with num_inference_steps=2$"):
        pipe("a cat", image=image, strength=1.0, output_type="np")
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = pipe("a cat", image=image, strength=1.0, num_inference_steps=2, output_type="np").images
    finally:
        handle.remove()
    assert out.shape == (1, 16, 16, 3) and len(calls) == 2


def test_inputs_files_that_do_not_fit_the_pipeline_are_refused_in_one_line(tiny_controlnet_pipe, tiny_sd_pipe,
                                                                          tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(UserError, match="a text file gives only prompts; give a .jsonl file"):
        eval_set_for(_loaded(tiny_controlnet_pipe), 2, prompts_file=prompts)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a cat", "image": "im0.png"}\n{"prompt": "a dog", "image": "nope.png"}\n')
    _inputs_file(tmp_path, [{"prompt": "x", "image": "im0.png"}], size=16)
    with pytest.raises(UserError, match=r"missing.jsonl:2: image 'nope.png' cannot be read .*relative to") as e:
        eval_set_for(_loaded(tiny_controlnet_pipe), 2, prompts_file=missing)
    assert "\n" not in str(e.value)
    torch.manual_seed(0)
    dit = DiTPipeline(transformer=DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=4,
        patch_size=2, num_embeds_ada_norm=1000), vae=tiny_sd_pipe.vae, scheduler=DDIMScheduler())
    labels = tmp_path / "labels.txt"
    labels.write_text("3\n1000\n")
    with pytest.raises(UserError, match="class label 1000 is outside 0..999"):
        eval_set_for(_loaded(dit), 2, prompts_file=labels)
    plural = tmp_path / "labels.jsonl"  # diffusers' own argument name, one label per input
    plural.write_text('{"class_labels": 1}\n{"class_labels": 2}\n')
    from diffslim.sample import _call_kwargs

    es = eval_set_for(_loaded(dit), 2, prompts_file=plural)
    assert _call_kwargs(dit, es.inputs) == {"class_labels": [1, 2]}  # one per input, not one per call


def test_sampling_calibration_of_img2img_below_strength_one_scores_the_calls_it_makes(tiny_sd_pipe, tmp_path,
                                                                                      calls_alone):
    """An img2img run at strength 0.5 of 8 steps makes 4 denoiser calls: the calibration is stratified over those
    (it asked for calls up to 7 and failed), and each recorded call is the one the pipeline makes sampling alone."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffslim.methods import layer_prune as lp

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png", "strength": 0.5},
                                   {"prompt": "a dog", "image": "im1.png", "strength": 0.5}], size=16)
    calib = lp.sampling_calibration(pipe, n=4, seed=0, steps=8, data=str(path), sample_batch=2)
    src = calib.source
    assert sorted(src["calls"]) == [0, 1, 2, 3] and src["steps"] == 8  # one call in each quarter of the 4 made
    alone = calls_alone(pipe, src["inputs"], src["seeds"], 8)
    assert all(len(run) == 4 for run in alone)
    pred = calib.run(pipe.unet)
    for k, call in enumerate(src["calls"]):
        named, out = alone[k][call]
        assert torch.equal(calib.t[2 * k:2 * k + 2], named["timestep"].reshape(-1).expand(2).to(calib.t.dtype))
        torch.testing.assert_close(pred[2 * k:2 * k + 2], out, atol=1e-5, rtol=0)
    res = lp.layer_prune(pipe.unet, "output-loss", 0.3, calib=calib)
    assert res.params_removed >= 0.3 * res.params


def test_a_skip_plan_recipe_starts_every_pipeline_call_at_its_first_row(tiny_sd_pipe):
    """The plan runtime tells a new run by a timestep that does not fall; an img2img call at strength 0.25 (one
    call, at the schedule's last timestep) right after a call that ended on that timestep ran on as its next row,
    with the last image's caches, and so did any call after an interrupted one. A recipe's pinned scheduler now
    starts the plan afresh whenever a pipeline call sets its timesteps."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from diffslim import apply
    from diffslim.methods.skip_plan import deepcache_plan, plan_units, remove_skip_plan

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run(strength, **kw):
        return pipe("a cat", image=image, strength=strength, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kw).images

    full = run(0.25)
    units = plan_units(pipe.unet, "fine")
    plan = deepcache_plan(units, 4, 4, 0)  # row 0 runs every unit, rows 1-3 reuse the deep ones
    apply(pipe, {"skip_plan": {"granularity": "fine", "units": list(units.names), "plan": plan.tolist()}})
    try:
        fresh = run(0.25)
        assert np.array_equal(fresh, full)  # one call: the plan's row 0, which runs every unit
        half = run(0.5)
        run(0.8)  # 3 calls, ending on the last timestep
        assert np.array_equal(run(0.25), fresh)

        def stop(p, i, t, kw):
            p._interrupt = i == 1
            return kw

        run(1.0, callback_on_step_end=stop)  # stops after the second of 4 calls
        assert np.array_equal(run(0.5), half)  # its 2 calls start below where that one stopped
        apply(pipe, {"sampling": {"scheduler": "ddim"}})  # a scheduler swapped in later keeps the restart
        run(0.8)
        assert np.array_equal(run(0.25), fresh)
        # a pipeline that passes sigmas of its own (Flux always does) restarts the plan too
        apply(pipe, {"sampling": {"scheduler": "euler"}})
        ref = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        ref.set_timesteps(4)
        sigmas = ref.sigmas[:-1].tolist()
        half = run(0.5, sigmas=sigmas)
        run(1.0, sigmas=sigmas, callback_on_step_end=stop)
        assert np.array_equal(run(0.5, sigmas=sigmas), half)
    finally:
        remove_skip_plan(pipe.unet)  # the session's shared U-Net


def test_layer_prune_by_macs_of_a_pipeline_that_takes_images_asks_for_its_data_option(tiny_controlnet_pipe, tmp_path):
    """It asked for `--prompts inputs.jsonl`, which layer-prune does not have (its inputs are `--data`)."""
    from typer.testing import CliRunner

    from diffslim.cli import app

    tiny_controlnet_pipe.save_pretrained(str(tmp_path / "cn"))
    res = CliRunner().invoke(app, ["layer-prune", str(tmp_path / "cn"), "--ratio", "0.3", "--by", "macs",
                                   "--criterion", "magnitude", "--out", str(tmp_path / "lp")])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "give --data inputs.jsonl" in said and "--prompts" not in said, res.output


def test_inpainting_reads_its_mask_from_the_jsonl_and_asks_for_one(tiny_sd_pipe, tmp_path):
    """An inpainting pipeline samples from a .jsonl's image and mask_image (a one-channel mask, white where it
    repaints); its path used to reach diffusers as text, which failed in its preprocessing. A line without a mask,
    or a folder of images, is refused in one line."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from diffslim.train.data import pipeline_inputs

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_sd_pipe.unet.config, in_channels=9)
    pipe = StableDiffusionInpaintPipeline(**{**tiny_sd_pipe.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    for name, value in (("black", 0), ("white", 255)):
        Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(tmp_path / f"{name}.png")
    rows = [{"prompt": "a cat", "image": "im0.png", "mask_image": "black.png"},
            {"prompt": "a dog", "image": "im1.png", "mask_image": "white.png"}]
    path = _inputs_file(tmp_path, rows, 16)
    inputs = pipeline_inputs(pipe, str(path), seed=0)
    assert [tuple(r["mask_image"].shape) for r in inputs] == [(1, 16, 16)] * 2
    assert inputs[0]["mask_image"].max() == 0 and inputs[1]["mask_image"].min() == 1
    es = eval_set_for(_loaded(pipe), 2, prompts_file=path)
    out = sample(pipe, SampleSpec(inputs=es.inputs, seeds=[0, 0], num_inference_steps=3, batch_size=2))
    assert out.shape == (2, 3, 16, 16)
    # the mask decides what is repainted: the same prompt and image under the other mask samples otherwise
    swapped = [{**es.inputs[0], "mask_image": es.inputs[1]["mask_image"]}]
    again = sample(pipe, SampleSpec(inputs=swapped, seeds=[0], num_inference_steps=3, batch_size=1))
    assert not torch.allclose(again[0], out[0])
    path.write_text(json.dumps({"prompt": "a cat", "image": "im0.png"}) + "\n")
    with pytest.raises(UserError, match=r'inputs.jsonl:1: StableDiffusionInpaintPipeline repaints .* "mask_image"'):
        pipeline_inputs(pipe, str(path), seed=0)
    with pytest.raises(UserError, match=r"a folder gives no masks: give a .jsonl"):
        pipeline_inputs(pipe, str(tmp_path), seed=0)
    # no distillation task: it used to ask for input/ and target/ pairs, which would train on the wrong conditioning
    from diffslim.train.distill import task_for

    with pytest.raises(UserError, match="no distillation task for StableDiffusionInpaintPipeline .* mask_image"):
        task_for(pipe)


def test_image_size_takes_the_pipelines_vae_factor_where_the_vae_has_no_levels():
    """Sana's AutoencoderDC has no ``block_out_channels``: the size comes from the pipeline's ``vae_scale_factor``
    (32), which the fallback used to be evaluated before (an AttributeError in every command that samples Sana)."""
    from types import SimpleNamespace

    from diffslim.train.data import pipeline_image_size, size_multiple

    transformer = SimpleNamespace(config=SimpleNamespace(sample_size=32, patch_size=1))
    vae = SimpleNamespace(config=SimpleNamespace(encoder_block_out_channels=(8,) * 6))
    pipe = SimpleNamespace(transformer=transformer, vae=vae, vae_scale_factor=32)
    assert pipeline_image_size(pipe) == 1024 and size_multiple(pipe) == 32
    del pipe.vae_scale_factor
    with pytest.raises(UserError, match="states no vae_scale_factor and its SimpleNamespace no block_out_channels"):
        pipeline_image_size(pipe)


def test_an_image_to_image_run_of_no_denoising_steps_is_refused(tiny_sd_pipe, tmp_path):
    """At strength s a run makes int(steps x s) denoising steps; at 0 diffusers failed in its scheduler (SDXL's
    refiner at its default strength 0.3 and 3 steps)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png", "strength": 0.3}], 16)
    es = eval_set_for(_loaded(pipe), 1, prompts_file=path)
    with pytest.raises(UserError, match=r"strength 0.3 makes int\(3 x 0.3\) = 0 denoising steps .* at least 4 steps"):
        sample(pipe, SampleSpec(inputs=es.inputs, seeds=[0], num_inference_steps=3))
    assert sample(pipe, SampleSpec(inputs=es.inputs, seeds=[0], num_inference_steps=4)).shape == (1, 3, 16, 16)


def test_a_text_file_for_a_pipeline_without_prompts_asks_for_its_inputs(tmp_path):
    """Kandinsky 2.2's decoder takes image embeddings, no prompt: the error asked for 'a .txt file (class labels or
    prompts)', the very file it refused; it names the .jsonl format and the inputs the pipeline takes."""
    from types import SimpleNamespace

    from diffslim.train.data import pipeline_inputs

    class Decoder:
        unet = SimpleNamespace(config=SimpleNamespace(sample_size=8))

        def __call__(self, image_embeds, negative_image_embeds, num_inference_steps=50):
            pass

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(UserError, match=r"prompts.txt: Decoder takes no prompt, .* give a .jsonl file .* \(it takes: "
                                        r"image_embeds, negative_image_embeds, num_inference_steps\)"):
        pipeline_inputs(Decoder(), str(prompts), seed=0)


def test_controlnet_image_to_image_reads_its_control_image(tiny_controlnet_pipe, tmp_path):
    """ControlNet's image-to-image pipeline takes the image to start from and a control_image: both are read from
    the .jsonl (the control image used to reach diffusers as text); a line without it is refused in one line."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from diffslim.train.data import pipeline_inputs

    pipe = StableDiffusionControlNetImg2ImgPipeline(**tiny_controlnet_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png", "control_image": "im1.png",
                                    "strength": 1.0}], 16)
    (row,) = pipeline_inputs(pipe, str(path), seed=0)
    assert tuple(row["control_image"].shape) == (3, 16, 16)
    out = sample(pipe, SampleSpec(inputs=[row], seeds=[0], num_inference_steps=2))
    assert out.shape == (1, 3, 16, 16)
    path.write_text(json.dumps({"prompt": "a cat", "image": "im0.png"}) + "\n")
    with pytest.raises(UserError, match=r'inputs.jsonl:1: StableDiffusionControlNetImg2ImgPipeline is steered by a '
                                        r'control image: give "control_image": PATH \(relative to'):
        pipeline_inputs(pipe, str(path), seed=0)


def test_the_bench_says_where_fewer_img2img_steps_make_as_many_denoiser_calls(tiny_sd_pipe, tmp_path):
    """At strength 0.6 a 3-step and a 2-step img2img run both make int(N x 0.6) = 1 denoiser call: steps:2 costs what
    the full run costs, and its row says so; steps:5 (3 calls) is not remarked on."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionImg2ImgPipeline

    from diffslim.bench import run_bench
    from diffslim.train.data import pipeline_inputs

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    path = _inputs_file(tmp_path, [{"prompt": "a cat", "image": "im0.png", "strength": 0.6},
                                   {"prompt": "a dog", "image": "im1.png", "strength": 0.6}], size=16)
    evalset = SimpleNamespace(inputs=pipeline_inputs(pipe, str(path), 0), seeds=[0, 1], call_kwargs={})
    res = run_bench(_loaded(pipe), "full,steps:2,steps:5", evalset, default_steps=3, batch_size=2, progress=False)
    rows = {r["method"]: r for r in res.rows}
    assert rows["steps:2"]["macs_ratio"] == pytest.approx(1.0)
    assert "1 denoiser call per sample, as many as the full run's 3 steps make" in rows["steps:2"]["notes"]
    assert rows["steps:5"]["macs_ratio"] > 2, rows["steps:5"]
    assert "notes" not in rows["steps:5"], rows["steps:5"]["notes"]
    assert "notes" not in rows["full"]
