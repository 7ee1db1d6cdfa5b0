"""--device and --dtype on sample, evaluate and bench: where and in which precision the pipeline runs."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffslim.errors import UserError
from diffslim.models.load import resolve_device, resolve_dtype


def _cli(*args):
    from diffslim.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


def test_resolve_dtype_and_device():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    assert resolve_dtype("fp16") is torch.float16
    with pytest.raises(UserError, match="unknown dtype 'float64'; accepted: float32, bfloat16, float16"):
        resolve_dtype("float64")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else
                                           "mps" if torch.backends.mps.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device 'gpu0'; accepted here: auto, cpu"):
        resolve_device("gpu0")
    with pytest.raises(UserError, match="device 'cuda:99': this machine has"):
        resolve_device("cuda:99")


def test_sample_in_bfloat16_is_close_to_float32_but_not_equal(tmp_path):
    for dtype in ("float32", "bfloat16"):
        res = _cli("sample", "zoo:digits-dit", "--n", "4", "--steps", "8", "--device", "cpu", "--dtype", dtype,
                   "--out", tmp_path / dtype)
        assert res.exit_code == 0, res.output
    a, b = (np.asarray(Image.open(tmp_path / d / "grid.png"), dtype=np.float64) for d in ("float32", "bfloat16"))
    mse = ((a - b) ** 2).mean()
    assert 0 < mse  # the weights did run in bfloat16
    assert 10 * np.log10(255 ** 2 / mse) > 30  # and still draw the same digits, nearly (45.5 dB here)


def test_bench_refuses_training_methods_outside_float32_and_bad_values(tmp_path):
    res = _cli("bench", "zoo:digits-sd", "--dtype", "bf16", "--methods", "full,dipgo:0.5,layers:0.5+kd,dipgo:@r.json")
    assert res.exit_code == 2
    assert "--dtype bf16: dipgo:0.5, layers:0.5+kd train the model, which diffslim does in float32" in res.output
    for args, needle in ((("--dtype", "half"), "unknown dtype 'half'"), (("--device", "tpu"), "unknown device 'tpu'")):
        res = _cli("sample", "zoo:digits-sd", *args, "--out", tmp_path / "x")
        assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "x").exists()
    from diffslim.cli import _check_training_methods
    from diffslim.bench import parse_methods

    methods = parse_methods("full,dipgo:0.5,dipgo:@r.json,layers:0.5+kd,depth:3+ft@d")
    _check_training_methods(methods, "float32", torch.float32)  # float32 trains anything
    with pytest.raises(UserError, match="--dtype fp16: dipgo:0.5, layers:0.5\\+kd train the model"):
        _check_training_methods(methods, "fp16", torch.float16)


def test_the_reference_cache_keeps_precisions_apart():
    from diffslim.cli import _placed_id
    from diffslim.sample import model_fingerprint

    fp = model_fingerprint("zoo:digits-sd")
    assert _placed_id("zoo:digits-sd", torch.device("cpu"), torch.float32) == fp  # earlier caches stay valid
    ids = {_placed_id("zoo:digits-sd", torch.device(d), t) for d, t in
           (("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.float32), ("cuda", torch.float16))}
    assert len(ids) == 4


def test_load_takes_names_and_evaluate_compiled_matches_eager(tmp_path):
    import json

    import diffslim

    loaded = diffslim.load("zoo:digits-dit", dtype="bf16", device="auto")
    p = next(loaded.denoiser.parameters())
    assert p.dtype is torch.bfloat16 and p.device == resolve_device("auto")
    with pytest.raises(UserError, match="unknown dtype"):
        diffslim.load("zoo:digits-dit", dtype="double")
    args = ["evaluate", "zoo:digits-dit", "--n", "2", "--steps", "3", "--recipe"]
    rec = {"sampling": {"scheduler": "ddim", "num_inference_steps": 3}, "removed_layers": {"layers": ["transformer_blocks.3"]}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    runs = []
    for extra in ([], ["--compile", "--compile-backend", "eager"]):
        res = _cli(*args, path, "--json", *extra)
        assert res.exit_code == 0, res.output
        runs.append(json.loads(res.stdout))
    assert runs[0] == runs[1] and runs[0]["psnr"] < 100  # the pruned model, compiled, scores as it does eagerly


def test_profile_times_at_a_batch_size_in_a_dtype_and_compiled():
    import json

    runs = {}
    for name, extra in (("b1", []), ("b4", ["--batch-size", "4"]), ("bf16", ["--dtype", "bf16"]),
                        ("compiled", ["--compile", "--compile-backend", "eager"])):
        res = _cli("profile", "zoo:digits-dit", "--json", "--repeats", "2", "--device", "cpu", *extra)
        assert res.exit_code == 0, res.output
        runs[name] = json.loads(res.stdout)
    b1, b4, bf16, comp = runs["b1"], runs["b4"], runs["bf16"], runs["compiled"]
    assert b1["macs"] == b4["macs"] == bf16["macs"]  # the MACs stay those of one call at batch 1
    assert (b1["batch"], b4["batch"]) == (1, 4)
    assert b4["samples_per_s"] == pytest.approx(4 / b4["latency_s"])
    assert b1["first_call_s"] > 0 and b1["device"] == "cpu" and b1["dtype"] == "float32"
    assert b1["weights_bytes"] == 4 * b1["params"] and bf16["weights_bytes"] == 2 * b1["params"]
    assert bf16["dtype"] == "bfloat16" and (b1["compiled"], comp["compiled"]) == (False, True)
    res = _cli("profile", "zoo:digits-dit", "--depth", "all", "--compile")
    assert res.exit_code == 2 and "--depth all counts params and MACs at every depth and times nothing" in res.output


def test_random_weights_time_a_config_only_architecture(tmp_path):
    import json

    import diffslim

    real = diffslim.load("zoo:digits-dit").denoiser
    folder = tmp_path / "dit-config"
    real.save_config(str(folder))  # config.json only
    assert diffslim.load(str(folder)).denoiser.device.type == "meta"
    built = diffslim.load(str(folder), random_weights=True, dtype="bf16")
    den = built.denoiser
    assert not built.has_weights and built.extra["random_weights"]
    assert {p.device.type for p in den.parameters()} == {"cpu"} and den.dtype is torch.bfloat16
    assert sum(p.numel() for p in den.parameters()) == sum(p.numel() for p in real.parameters())
    assert not all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(den.parameters(), real.parameters()))
    res = _cli("profile", folder, "--json", "--repeats", "1", "--random-weights")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["random_weights"] and not d["weights"] and d["latency_s"] > 0
    plain = json.loads(_cli("profile", folder, "--json").output)
    assert plain["latency_s"] is None and plain["macs"] == d["macs"]  # config only: counted, not timed
    for model in ("zoo:digits-dit", str(tmp_path / "nothing")):
        res = _cli("profile", model, "--random-weights")
        assert res.exit_code == 2 and "random weights are for a config-only model folder" in res.output


def test_commands_that_run_a_model_take_a_device(tmp_path):
    """--device on the scoring and search commands: refused before any work when the machine lacks it."""
    import types

    from diffslim.workflow import _placement_key

    missing = "cuda" if not torch.cuda.is_available() else "cuda:99"
    for args in (("layer-prune", "zoo:digits-dit", "--ratio", "0.5", "--out", tmp_path / "lp"),
                 ("layer-compare", "zoo:digits-dit", "--out", tmp_path / "lc"),
                 ("depth-search", "zoo:digits-sd"), ("timesteps", "zoo:sr", "--steps", "4"),
                 ("workflow", "zoo:digits-sd", "--stages", "steps:5", "--out", tmp_path / "wf"),
                 ("profile", "zoo:digits-dit")):
        res = _cli(*args, "--device", missing)
        assert res.exit_code == 2 and f"device '{missing}'" in res.output, (args, res.output)
        assert not list(tmp_path.iterdir())  # nothing written
    # the workflow's sampled runs are keyed by where they ran, except on the CPU (earlier caches stay valid)
    on = lambda dev: types.SimpleNamespace(denoiser=torch.nn.Linear(2, 2, device=dev))  # noqa: E731
    assert _placement_key(on("cpu")) == {} and _placement_key(on("meta")) == {"device": "meta"}


def test_search_references_are_cached_per_dtype(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache"))
    found = {}
    for dtype in ("float32", "bf16"):
        res = _cli("timesteps", "zoo:digits-dit", "--steps", "3", "--full-steps", "6", "--n", "2", "--method",
                   "greedy", "--dtype", dtype, "--json")
        assert res.exit_code == 0, res.output
        found[dtype] = json.loads(res.stdout)
    refs = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(refs) == 2  # one full-step reference per dtype, none shared
    assert found["float32"] != found["bf16"]  # the bfloat16 search ran in bfloat16


def test_time_components_attributes_every_call_of_a_stable_diffusion_pipeline(tiny_sd_pipe):
    from diffslim.measure.profile import time_components

    pipe = tiny_sd_pipe

    def run():
        return pipe("a cat", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain = run()
    with time_components(pipe) as tc:
        timed = run()
    assert np.array_equal(plain, timed)  # the hooks only watch
    assert tc.entries["unet"] == 3  # one call per step (guidance batched into it)
    assert tc.entries["text_encoder"] == 2  # the prompt and the empty negative prompt
    assert tc.entries["vae"] == 2  # decoding enters post_quant_conv, then the decoder (never vae.forward)
    assert tc.calls == {**{k: 0 for k in tc.calls}, "unet": 3, "text_encoder": 2, "vae": 1}  # one decode is 1 call
    assert all(tc.seconds[k] > 0 for k in ("unet", "text_encoder", "vae"))
    assert sum(tc.seconds.values()) <= tc.total
    rows = tc.rows(denoiser="unet")
    assert [r["component"] for r in rows] == ["text_encoder", "unet", "vae", "other"]  # only what ran, then the rest
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["component"] for r in rows if r["denoiser"]] == ["unet"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for c in (pipe.unet, pipe.vae, pipe.text_encoder)
               for m in [c, *c.children()])  # removed afterwards
    pipe.unet.compile(backend="eager")  # a compiled component is hooked at its own call only: its graph stays whole
    try:
        with time_components(pipe) as tc:
            assert pipe.unet._forward_pre_hooks and not any(m._forward_pre_hooks for m in pipe.unet.children())
            compiled = run()
    finally:
        pipe.unet._compiled_call_impl = None
    assert tc.entries["unet"] == 3 and np.array_equal(compiled, plain)


def test_profile_pipeline_breaks_sampling_time_down(tmp_path):
    import json

    res = _cli("profile", "zoo:digits-dit", "--pipeline", "--n", "2", "--steps", "3", "--repeats", "1", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    rows = {r["component"]: r for r in d["components"]}
    assert rows["denoiser"]["entries"] == rows["denoiser"]["calls"] == 6 and rows["denoiser"]["denoiser"]  # 2 runs of batch 1, 3 steps each
    assert 0 < d["denoiser_share"] < 1 and d["max_speedup_from_the_denoiser"] == pytest.approx(1 / (1 - d["denoiser_share"]))
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps({"sampling": {"num_inference_steps": 2}}))
    d2 = json.loads(_cli("profile", "zoo:digits-dit", "--pipeline", "--n", "2", "--batch-size", "2", "--recipe", rec,
                         "--repeats", "1", "--json").output)
    assert d2["steps"] == 2 and {r["component"]: r["entries"] for r in d2["components"]}["denoiser"] == 2
    res = _cli("profile", "zoo:digits-dit", "--pipeline", "--n", "2", "--steps", "3", "--repeats", "2", "--compile",
               "--compile-backend", "eager", "--json")
    assert res.exit_code == 0, res.output
    d3 = json.loads(res.stdout)
    assert d3["compiled"] and {r["component"]: r["entries"] for r in d3["components"]}["denoiser"] == 6
    for args, needle in ((("--pipeline", "--depth", "3"), "--pipeline samples the pipeline as it is, at its own size"),
                         (("--n", "2"), "--n sets the sampling runs of --pipeline"),
                         (("--pipeline", "--steps", "4", "--recipe", rec), "--steps 4: the recipe")):
        res = _cli("profile", "zoo:digits-dit", *args)
        assert res.exit_code == 2 and needle in res.output, res.output


def test_layer_scoring_and_the_workflow_run_in_bfloat16(tmp_path, monkeypatch):
    import json

    import diffslim
    from diffslim.methods.layer_prune import calibration, candidates, score_layers
    from diffslim.workflow import _placement_key

    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path / "cache"))
    full = diffslim.load("zoo:digits-dit")
    half = diffslim.load("zoo:digits-dit", dtype="bf16")
    calib = calibration(full.pipe, n=4, seed=0)
    a, b = calib.run(full.denoiser), calib.run(half.denoiser)  # float32 triples fed to a bfloat16 model
    assert b.dtype is torch.float32 and not torch.equal(a, b)
    assert ((a - b) ** 2).mean() < 1e-2 * (a ** 2).mean()  # the same predictions, to bfloat16's precision
    layers = candidates(half.denoiser)
    assert set(score_layers(half.denoiser, layers, "taylor", calib)) == {l.name for l in layers}
    res = _cli("workflow", "zoo:digits-dit", "--stages", "layers:0.3+kd", "--dtype", "bf16", "--out", tmp_path / "w0")
    assert res.exit_code == 2 and "--dtype bf16: layers:0.3+kd trains the model" in res.output
    res = _cli("workflow", "zoo:digits-dit", "--stages", "layers:0.2,layers:0.2,steps:5", "--dtype", "bf16", "--n",
               "2", "--out", tmp_path / "w", "--json")
    assert res.exit_code == 0, res.output
    assert [r["stage"] for r in json.loads(res.stdout)["rows"]] == ["original", "layers:0.2", "layers:0.2", "steps:5"]
    from safetensors.torch import load_file

    # the second stage pruned the first one's saved pipeline, reloaded in bfloat16: its weights are bfloat16 too
    saved = sorted((tmp_path / "w" / "stages").iterdir())
    assert len(saved) == 2
    for folder in saved:
        weights = load_file(str(next((folder / "pipeline" / "denoiser").glob("*.safetensors"))))
        assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert _placement_key(half) == {"dtype": "bfloat16"} and _placement_key(full) == {}


def test_a_trained_student_joins_a_bfloat16_pipeline_in_bfloat16(tmp_path, tiny_sd_pipe):
    """bench depth:N+ft@FOLDER: the student is cast to the pipeline's dtype (it stayed float32 and a diffusers
    pipeline, whose latents and prompt embeddings follow the text encoder's dtype, failed in its first matmul)."""
    import json

    from diffslim.methods.depth_skip import depth_skip

    tiny_sd_pipe.save_pretrained(tmp_path / "sd")
    depth_skip(tiny_sd_pipe.unet, 1).save_pretrained(tmp_path / "student")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    rows = {}
    for dtype in ("float32", "bfloat16"):
        res = _cli("bench", tmp_path / "sd", "--methods", f"full,depth:1+ft@{tmp_path / 'student'}", "--prompts",
                   tmp_path / "prompts.txt", "--n", "2", "--steps", "4", "--dtype", dtype, "--json")
        assert res.exit_code == 0, res.output
        rows[dtype] = {r["method"]: r for r in json.loads(res.stdout)["rows"]}
    # the student is the full model less one level: its outputs differ from the full model's in either dtype,
    # and the bfloat16 rows are not the float32 ones (the whole pipeline ran in bfloat16)
    assert rows["float32"]["depth:1+ft"]["psnr"] != rows["bfloat16"]["depth:1+ft"]["psnr"]
    assert rows["bfloat16"]["depth:1+ft"]["params"] == rows["float32"]["depth:1+ft"]["params"]


def test_timing_waits_on_the_models_own_gpu_and_reads_macos_rss_in_bytes(monkeypatch):
    """``torch.cuda.synchronize()`` without a device waits on the current GPU, not on the ``cuda:1`` a model runs
    on (profile --device cuda:1 timed kernel launches only); MPS has its own; macOS's ru_maxrss is in bytes."""
    import resource
    import sys

    from diffslim.measure import profile

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(("mps", None)))
    ran = []
    for device in ("cuda:1", "mps", "cpu"):
        assert profile.timed_call(ran.append, (device,), {}, torch.device(device)) >= 0
    assert ran == ["cuda:1", "mps", "cpu"]
    assert waited == [("cuda", torch.device("cuda:1"))] * 2 + [("mps", None)] * 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monkeypatch.setattr(sys, "platform", "darwin")
    assert peak <= profile._peak_rss_bytes() < 2 * peak + 2 ** 20  # bytes, not 1024 times them
    monkeypatch.setattr(sys, "platform", "linux")
    assert profile._peak_rss_bytes() >= 1024 * peak


def test_one_named_gpu_under_a_launch_is_refused(monkeypatch):
    """Under ``accelerate launch`` ``--device cuda:1`` put every process on GPU 1; ``cuda`` gives each its own."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # one process: the GPU it names
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"device 'cuda:1' under accelerate launch \(2 processes\) puts every process "
                                        "on that one GPU; give cuda or auto"):
        resolve_device("cuda:1")


def test_zoo_sr_keeps_its_fitted_upsampler_in_float32_in_half_precision():
    """zoo:sr's fitted 9x9 upsampling filters amplify bfloat16's rounding (1 dB against the ground truth): they stay
    float32 when the pipeline loads in half precision, and upsample exactly as the float32 pipeline does."""
    import torch

    from diffslim.models.load import load

    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    full = load("zoo:sr").pipe
    for dtype in (torch.bfloat16, torch.float16):
        half = load("zoo:sr", dtype=dtype)
        assert half.denoiser.dtype == dtype and half.pipe.upsampler.weight.dtype == torch.float32
        assert torch.equal(half.pipe.upsample(lr), full.upsample(lr))
