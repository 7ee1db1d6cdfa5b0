"""Loading every kind of MODEL, and the CLI's behaviour on bad input: one line, exit 2, no traceback."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffslim.cli import app
from diffslim.models.load import ModelLoadError, load

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "diffslim" / "configs"
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert text.startswith("error:"), text
    assert len(text.splitlines()) <= 2, text  # rich may wrap one long line at the terminal width
    for n in needles:
        assert n in " ".join(text.split()), text


def test_load_pipeline_folder_roundtrip(tiny_digits_pipe, tiny_digits_folder):
    loaded = load(str(tiny_digits_folder))
    assert loaded.kind == "pipeline" and loaded.has_weights
    for (k, a), b in zip(tiny_digits_pipe.denoiser.state_dict().items(), loaded.denoiser.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_model_folder_and_config_only(tiny_digits_folder, tmp_path):
    loaded = load(str(tiny_digits_folder / "denoiser"))
    assert loaded.kind == "model" and loaded.has_weights and loaded.pipe is None
    only_cfg = tmp_path / "cfg"
    only_cfg.mkdir()
    shutil.copy(tiny_digits_folder / "denoiser" / "config.json", only_cfg / "config.json")
    meta = load(str(only_cfg))
    assert meta.kind == "config" and not meta.has_weights
    assert next(meta.denoiser.parameters()).device.type == "meta"
    assert sum(p.numel() for p in meta.denoiser.parameters()) == sum(p.numel() for p in loaded.denoiser.parameters())


def test_sd15_config_is_latent():
    meta = load(str(CONFIGS / "sd15-unet"))
    assert meta.vae_scale_factor == 8 and type(meta.denoiser).__name__ == "UNet2DConditionModel"


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "nope", "no such file or folder"),
    (lambda d: "runwayml/stable-diffusion-v1-5", "looks like a Hugging Face Hub id, and the local Hugging Face cache has no copy of it"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has neither model_index.json nor config.json"),
    (lambda d: (d / "w.ckpt").write_bytes(b"x") and d / "w.ckpt", "pickle checkpoint"),
    (lambda d: (d / "v1-5.safetensors").write_bytes(b"x") and d / "v1-5.safetensors", "from_single_file(PATH)"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "is a single file"),
    (lambda d: _folder(d, {"_class_name": "VQModel"}), "model class 'VQModel' is not supported"),
    (lambda d: _folder(d, {"_class_name": "UNet2DModel"}, pickle=True), "pickle checkpoint"),
    (lambda d: _folder(d, None, text="{broken"), "is not valid JSON"),
])
def test_load_errors_are_one_line(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load(str(path))
    assert needle in str(e.value) and "\n" not in str(e.value)
    _one_line_error(_run("profile", path), needle)


def _folder(d, config, text=None, pickle=False):
    f = d / "m"
    f.mkdir()
    (f / "config.json").write_text(text if text is not None else json.dumps(config))
    if pickle:
        (f / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04junk")
    return f


def test_corrupt_safetensors_is_one_line(tiny_digits_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_digits_folder / "denoiser", bad)
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load(str(bad))
    _one_line_error(_run("profile", bad), "cannot load weights")


def test_unknown_zoo_name():
    _one_line_error(_run("profile", "zoo:nope"), "no zoo model 'nope'", "digits-sd")


def test_bad_bench_method_and_recipe(tmp_path):
    _one_line_error(_run("bench", "zoo:digits-sd", "--methods", "full,turbo:3"), "unknown bench method 'turbo'")
    _one_line_error(_run("bench", "zoo:digits-sd", "--methods", "steps:x"), "steps:N needs a positive integer")
    r = tmp_path / "r.json"
    r.write_text(json.dumps({"sampling": {"timesteps": [1, 2]}}))
    _one_line_error(_run("recipe", r), "sampling.timesteps")


def test_profile_json_on_config_only_folder():
    res = _run("profile", CONFIGS / "sd15-unet", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert {"params", "macs", "blocks", "latency_s"} <= set(d)
    assert d["params"] == 859_520_964
    assert d["latency_s"] is None  # no weights, no timing
    assert abs(d["macs_excl_attention"] / 338.7e9 - 1) < 0.01
    assert sum(b["params"] for b in d["blocks"]) < d["params"]
    assert [b["name"] for b in d["blocks"]][:2] == ["down_blocks.0", "down_blocks.1"]


def test_profile_height_width_scale_macs():
    a = json.loads(_run("profile", CONFIGS / "sd15-unet", "--json", "--height", "256", "--width", "256").output)
    b = json.loads(_run("profile", CONFIGS / "sd15-unet", "--json", "--height", "512", "--width", "512").output)
    assert a["sample_size"] == [32, 32] and b["sample_size"] == [64, 64]
    assert 3.5 < b["macs_excl_attention"] / a["macs_excl_attention"] < 4.5  # convs and linears scale with area
    _one_line_error(_run("profile", CONFIGS / "sd15-unet", "--height", "100"), "multiple of the VAE scale factor 8")


def test_profile_pipeline_with_weights_times_it(tiny_digits_folder):
    d = json.loads(_run("profile", tiny_digits_folder, "--json", "--repeats", "2").output)
    assert d["latency_s"] > 0 and d["peak_memory_bytes"] > 0
    assert d["params"] == 3_220_961
    # the table's rows add up to its total: what no block holds is a row of its own
    rest = d["params"] - sum(b["params"] for b in d["blocks"])
    other = [line for line in _run("profile", tiny_digits_folder, "--repeats", "1").output.splitlines()
             if "other (embeddings, stem, head)" in line]
    assert rest > 0 and len(other) == 1 and f"{rest:,}" in other[0]


def test_profile_takes_what_a_user_holds(tiny_digits_folder):
    """diffslim.profile on a path, the LoadedModel, its pipeline (after apply too) and its denoiser: the same
    counts where nothing changed, the pruned ones after apply; live objects take no device/dtype, bad input is
    refused in one line."""
    import diffslim
    from diffslim.errors import UserError

    by_path = diffslim.profile(str(tiny_digits_folder), repeats=1)
    loaded = diffslim.load(str(tiny_digits_folder))
    for obj in (loaded, loaded.pipe, loaded.denoiser):
        got = diffslim.profile(obj, repeats=1)
        assert (got["params"], got["macs"], got["sample_size"]) == (by_path["params"], by_path["macs"],
                                                                    by_path["sample_size"])
        assert got["latency_s"] > 0
    meta = diffslim.profile(diffslim.load(str(CONFIGS / "sd15-unet")).denoiser)
    assert meta["params"] == 859_520_964 and meta["sample_size"] == [64, 64] and meta["latency_s"] is None
    diffslim.apply(loaded.pipe, {"removed_layers": {"layers": ["up_blocks.3.resnets.1"]}})
    pruned = diffslim.profile(loaded.pipe, repeats=1)
    assert pruned["class"] == "LayerPrunedUNet2DConditionModel" and pruned["params"] < by_path["params"]
    for kwargs, says in (({"device": "cpu"}, "a live ZooClassPipeline is used where it lies"),
                         ({"repeats": 0}, "repeats 0: give a positive number"),
                         ({"batch": 0}, "batch size 0")):
        with pytest.raises(UserError, match=says):
            diffslim.profile(loaded.pipe, **kwargs)
    with pytest.raises(UserError, match="MODEL is a path, zoo:NAME, a diffusers pipeline or a denoiser"):
        diffslim.profile(3)


def test_profile_every_depth_of_a_unet():
    """--depth all: params and MACs of the depth-skipped U-Net at every depth, growing to the full model's; the
    table in the profile's units."""
    d = json.loads(_run("profile", "zoo:digits-sd", "--depth", "all", "--json").stdout)["depths"]
    full = json.loads(_run("profile", "zoo:digits-sd", "--json", "--repeats", "1").stdout)
    assert [r["depth"] for r in d] == list(range(1, len(d) + 1)) and len(d) > 5
    assert all(a["params"] < b["params"] and a["macs"] < b["macs"] for a, b in zip(d, d[1:]))
    assert (d[-1]["params"], d[-1]["macs"], d[-1]["params_ratio"], d[-1]["macs_ratio"]) == (
        full["params"], full["macs"], 1.0, 1.0)
    table = _run("profile", "zoo:digits-sd", "--depth", "all").output
    assert "MMACs excl. attention" in table and f"{full['macs'] / 1e6:.4g}" in table


def test_weights_saved_as_a_variant_load_and_two_variants_are_refused(tiny_sd_pipe, tmp_path):
    """`from_pretrained(..., variant="fp16")` downloads and `save_pretrained(..., variant=...)` leave only
    `*.fp16.safetensors`: diffusers then needs `variant=` (it said "no file named diffusion_pytorch_model.safetensors")."""
    from diffslim.models.load import ModelLoadError, weights_variant

    folder = tmp_path / "sd"
    tiny_sd_pipe.save_pretrained(str(folder), variant="fp16")
    assert weights_variant(folder) == "fp16" and weights_variant(folder / "unet") == "fp16"
    loaded = load(str(folder))
    want = tiny_sd_pipe.unet.state_dict()
    for part in (loaded.denoiser, load(str(folder / "unet")).denoiser):
        got = part.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tiny_sd_pipe.save_pretrained(str(tmp_path / "plain"))
    assert weights_variant(tmp_path / "plain") is None
    # sharded: diffusers names them diffusion_pytorch_model.fp16-00001-of-0000N.safetensors
    tiny_sd_pipe.save_pretrained(str(tmp_path / "shards"), variant="fp16", max_shard_size="40KB")
    assert any("fp16-00001-of-" in p.name for p in (tmp_path / "shards" / "unet").iterdir())
    got = load(str(tmp_path / "shards")).denoiser.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tiny_sd_pipe.unet.save_pretrained(str(folder / "unet"), variant="bf16")  # beside the fp16 one
    with pytest.raises(ModelLoadError, match=r"several variants \(bf16, fp16\)"):
        load(str(folder / "unet"))
