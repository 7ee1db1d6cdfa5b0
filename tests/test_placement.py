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
        runs.append(json.loads(res.output))
    assert runs[0] == runs[1] and runs[0]["psnr"] < 100  # the pruned model, compiled, scores as it does eagerly
