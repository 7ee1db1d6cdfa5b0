import pytest
import torch

from diffslim.sample import ReferenceCache, SampleSpec, model_fingerprint, run_pipeline, sample


def _spec(n=5, steps=4, **kw):
    return SampleSpec([{"class_label": i % 10} for i in range(n)], [100 + i for i in range(n)],
                      num_inference_steps=steps, **kw)


def test_outputs_do_not_depend_on_batching(tiny_digits_pipe):
    a = sample(tiny_digits_pipe, _spec(batch_size=5))
    b = sample(tiny_digits_pipe, _spec(batch_size=2))
    assert a.shape == (5, 1, 8, 8)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_same_seed_same_sample_and_different_seed_differs(tiny_digits_pipe):
    a = sample(tiny_digits_pipe, _spec(n=2))
    b = sample(tiny_digits_pipe, _spec(n=2))
    assert torch.equal(a, b)
    c = sample(tiny_digits_pipe, _spec(n=2).replace(seeds=[7, 8]))
    assert not torch.allclose(a, c)


def test_scheduler_choice_changes_outputs_and_restores_pipeline(tiny_digits_pipe):
    sched = tiny_digits_pipe.scheduler
    a = sample(tiny_digits_pipe, _spec(n=1))
    b = sample(tiny_digits_pipe, _spec(n=1, scheduler="dpm++"))
    assert tiny_digits_pipe.scheduler is sched
    assert not torch.equal(a, b)


def test_explicit_timesteps_are_used(tiny_digits_pipe):
    spec = _spec(n=1, scheduler="euler").replace(timesteps=[999, 500, 10], num_inference_steps=None)
    a = sample(tiny_digits_pipe, spec)
    b = sample(tiny_digits_pipe, spec.replace(timesteps=[999, 300, 10]))
    assert a.shape == (1, 1, 8, 8) and not torch.equal(a, b)


def test_reference_cache_roundtrip_and_keying(tiny_digits_pipe, tmp_path):
    cache = ReferenceCache(tmp_path)
    spec = _spec(n=2)
    assert cache.get("m", spec) is None
    out = sample(tiny_digits_pipe, spec, cache=cache, model_id="m")
    assert torch.equal(cache.get("m", spec), out)
    # a cache hit returns what was stored, without sampling: prove it by storing something else
    cache.put("m", spec, torch.zeros_like(out))
    assert torch.equal(sample(tiny_digits_pipe, spec, cache=cache, model_id="m"), torch.zeros_like(out))
    # the key changes with model, steps, scheduler, seeds and inputs
    paths = {cache.path("m", spec), cache.path("m2", spec), cache.path("m", spec.replace(num_inference_steps=9)),
             cache.path("m", spec.replace(scheduler="euler")), cache.path("m", spec.replace(seeds=[1, 2])),
             cache.path("m", spec.replace(inputs=[{"class_label": 3}, {"class_label": 3}]))}
    assert len(paths) == 6


def test_fingerprint_tracks_weights(tiny_digits_folder, tmp_path):
    import shutil

    a = model_fingerprint(str(tiny_digits_folder))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_digits_folder, copy)
    (copy / "denoiser" / "extra.safetensors").write_bytes(b"0" * 10)
    assert model_fingerprint(str(copy)) != a
    assert model_fingerprint(str(tiny_digits_folder)) == a
    # retrained weights of the same size change the key too (a stale reference would be silently wrong)
    weights = copy / "denoiser" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    (copy / "denoiser" / "extra.safetensors").unlink()
    before = model_fingerprint(str(copy))
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(copy)) != before


def test_one_seed_per_input():
    with pytest.raises(ValueError, match="one seed per input"):
        SampleSpec([{"class_label": 1}], [1, 2])


def test_txt2img_pipeline_through_harness(tiny_sd_pipe):
    spec = SampleSpec([{"prompt": "a cat"}, {"prompt": "a dog"}, {"prompt": "a cat"}], [0, 1, 0],
                      num_inference_steps=3, batch_size=2)
    out = sample(tiny_sd_pipe, spec)
    assert out.shape == (3, 3, 16, 16)
    torch.testing.assert_close(out[0], out[2], atol=1e-5, rtol=0)  # same prompt, same seed, other batch
    assert not torch.allclose(out[0], out[1])


def test_unknown_input_key_is_a_clear_error(tiny_digits_pipe):
    spec = SampleSpec([{"prompt": "x"}], [0], num_inference_steps=2)
    with pytest.raises(ValueError, match="takes no 'prompt' input"):
        run_pipeline(tiny_digits_pipe, spec, [0])


def test_dit_pipeline_through_harness():
    """diffusers' own DiTPipeline (class labels, VAE) runs in the harness."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    spec = SampleSpec([{"class_label": 1}, {"class_label": 2}], [0, 1], num_inference_steps=2,
                      call_kwargs={"guidance_scale": 1.0})
    out = sample(pipe, spec)
    assert out.shape == (2, 3, 8, 8) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_instruct_pix2pix_pipeline_through_harness(tiny_sd_pipe):
    """Image + prompt inputs (InstructPix2Pix: 8 input channels) run in the harness."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    cfg = dict(tiny_sd_pipe.unet.config)
    cfg["in_channels"] = 8
    unet = UNet2DConditionModel.from_config(cfg)
    pipe = StableDiffusionInstructPix2PixPipeline(
        unet=unet, vae=tiny_sd_pipe.vae, text_encoder=tiny_sd_pipe.text_encoder, tokenizer=tiny_sd_pipe.tokenizer,
        scheduler=tiny_sd_pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    img = torch.rand(3, 16, 16)
    spec = SampleSpec([{"prompt": "make it red", "image": img}, {"prompt": "make it blue", "image": img}], [0, 1],
                      num_inference_steps=2, scheduler="euler_a")
    out = sample(pipe, spec)
    assert out.shape == (2, 3, 16, 16)


def test_zoo_pipelines_take_what_diffusers_users_pass_and_refuse_the_rest(tiny_digits_pipe):
    """Digit strings and num_images_per_prompt (each label repeated in a row, as diffusers orders them), PIL and
    unbatched inputs for SR; out-of-range or non-digit labels and misshapen images get one-line errors."""
    import numpy as np
    from PIL import Image

    from diffslim.errors import UserError
    from diffslim.train.zoo import build_pipeline
    from diffslim.zoo.pipelines import ZooSRPipeline

    def run(pipe, inp, seed=0, **kw):
        return pipe(inp, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="pt",
                    **kw).images

    p = tiny_digits_pipe
    assert torch.equal(run(p, "3"), run(p, 3))
    many = run(p, [1, "2"], num_images_per_prompt=2)
    labels = torch.tensor([1, 1, 2, 2])
    assert many.shape[0] == 4 and torch.equal(many, run(p, labels))
    for bad in ("a 3", 11, [1.5], True):
        with pytest.raises(UserError, match="class_labels: give classes 0..9, or 10 for none"):
            run(p, bad)
    lr = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    pil = Image.fromarray((lr.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    torch.manual_seed(0)
    sr = build_pipeline("sr")
    sr.set_progress_bar_config(disable=True)
    assert isinstance(sr, ZooSRPipeline)
    quantized = torch.from_numpy(np.asarray(pil, dtype="float32") / 255).permute(2, 0, 1)
    assert torch.equal(run(sr, pil), run(sr, quantized[None]))
    assert torch.equal(run(sr, lr, num_images_per_prompt=2), run(sr, lr[None].repeat(2, 1, 1, 1)))
    with pytest.raises(UserError, match=r"image: give low-resolution RGB images .* got \(4, 4\)"):
        run(sr, lr[0])


def test_progress_off_the_terminal_is_a_line_now_and_then_on_stderr(capsys):
    """In a log file a rich bar is off, and an SD-sized layer scoring or calibration ran for minutes without a
    word; off the terminal a long phase now says how far it is on stderr (stdout stays a command's output, e.g.
    JSON), a short one stays silent."""
    from diffslim.sample import _progress

    with _progress("phase", 4, every=0.0) as advance:
        advance(1)
        advance(3)
    out, err = capsys.readouterr()
    assert out == "" and [line.split(" (")[0] for line in err.splitlines()] == ["phase: 1/4", "phase: 4/4"]
    with _progress("quick", 4) as advance:  # done within the 30 s between lines
        advance(4)
    assert capsys.readouterr() == ("", "")


def test_height_and_width_set_every_sample_and_bad_sizes_are_refused(tiny_sd_pipe, tiny_digits_folder, tmp_path):
    """`--height`/`--width` sample (and bench, evaluate, workflow) every input at that size; a size the pipeline's
    latents cannot take, or a pipeline whose call takes no size, is refused in one line before anything samples.
    Resolution binning, which would move the size to a trained one, is turned off where the pipeline has it."""
    from types import SimpleNamespace

    from PIL import Image
    from typer.testing import CliRunner

    from diffslim.cli import app
    from diffslim.errors import UserError
    from diffslim.evaluate import sized
    from diffslim.models.load import LoadedModel
    from diffslim.zoo.evalsets import EvalSet

    tiny_sd_pipe.save_pretrained(str(tmp_path / "sd"))
    (tmp_path / "p.txt").write_text("a cat\n")
    run = ["sample", str(tmp_path / "sd"), "--prompts", str(tmp_path / "p.txt"), "--n", "2", "--steps", "2"]
    r = CliRunner().invoke(app, [*run, "--height", "24", "--width", "32", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert {Image.open(tmp_path / "s" / f"000{i}.png").size for i in range(2)} == {(32, 24)}
    r = CliRunner().invoke(app, [*run, "--height", "24", "--out", str(tmp_path / "s2")])  # the width: its own, 16 px
    assert r.exit_code == 0 and Image.open(tmp_path / "s2" / "0000.png").size == (16, 24), r.output
    for extra, needle in ((["--height", "23"], "--height 23: StableDiffusionPipeline takes sizes in multiples of 2 px"),):
        r = CliRunner().invoke(app, [*run, *extra, "--out", str(tmp_path / "bad")])
        assert r.exit_code == 2 and needle in " ".join(r.output.split()), r.output
        assert not (tmp_path / "bad").exists()
    r = CliRunner().invoke(app, ["bench", str(tiny_digits_folder), "--methods", "steps:2", "--n", "1", "--width", "8"])
    assert r.exit_code == 2 and "ZooClassPipeline takes no height and width" in " ".join(r.output.split()), r.output

    class Binned:  # PixArt-like: a transformer of 16 latents and a 2x VAE, binning by default
        transformer = SimpleNamespace(config=SimpleNamespace(sample_size=16, patch_size=2))
        vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(8, 16)))
        vae_scale_factor = 2

        def __call__(self, prompt=None, height=None, width=None, use_resolution_binning=True):
            pass

    loaded = LoadedModel("binned", "pipeline", Binned.transformer, pipe=Binned())
    es = sized(EvalSet(inputs=[{"prompt": "a"}], seeds=[0]), loaded, 64, None)
    assert es.call_kwargs == {"height": 64, "width": 32, "use_resolution_binning": False}
    assert sized(EvalSet(inputs=[{"prompt": "a"}], seeds=[0]), loaded, None, None).call_kwargs == {}
    with pytest.raises(UserError, match="--width 30: Binned takes sizes in multiples of 4 px, e.g. 28"):
        sized(EvalSet(inputs=[{"prompt": "a"}], seeds=[0]), loaded, None, 30)
