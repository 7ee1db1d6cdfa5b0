"""torch.compile of compressed pipelines (diffslim.compile): every recipe compiles in full graphs without
recompiling, the compiled pipeline gives the eager one's outputs, and what cannot work is refused.

The checks compile with Dynamo's ``eager`` backend: it traces and guards exactly as inductor does (graph
breaks, recompilations, the recompile limit) but runs the captured graphs with the same kernels, so the
outputs must match bit for bit and no test waits for code generation. Inductor's speed is measured by
``bench/compile_bench.py``.
"""

import json

import numpy as np
import pytest
import torch
import torch._dynamo

import diffslim
from diffslim.compiling import compile_denoiser, compiled_info, uncompile
from diffslim.errors import UserError
from diffslim.methods.layer_prune import bk_sdm_layers
from diffslim.methods.skip_plan import deepcache_plan, plan_units

STEPS = 6


def _gen(pipe, labels=(3, 7), steps=STEPS):
    g = [torch.Generator().manual_seed(i) for i in range(len(labels))]
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=g, output_type="pt").images


def _pipe(name):
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(name)
    pipe.denoiser.eval()  # built for training: DiT's label embedding would drop labels at random
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plan_recipe(den, plan):
    units = plan_units(den, "fine", count_macs=False)
    return {"skip_plan": {"granularity": "fine", "units": list(units.names), "plan": np.asarray(plan).tolist()}}


def _recipes(name):
    den = _pipe(name).denoiser
    units = plan_units(den, "fine", count_macs=False)
    if name == "digits-dit":
        # every other block at odd steps: blocks hand on their caches between consecutive steps
        plan = (np.arange(STEPS)[:, None] % 2 == 0) | (np.arange(len(units))[None, :] % 2 == 0)
        return {"plan": _plan_recipe(den, plan), "layers": {"removed_layers": {"layers": ["transformer_blocks.2",
                                                                                          "transformer_blocks.4"]}}}
    return {
        "plan": _plan_recipe(den, deepcache_plan(units, STEPS, 2)),
        "multi-depth": {"depth": {"schedule": [{"t_min": 500, "depth": 9}, {"t_min": 0, "depth": 11}]}},
        "depth": {"depth": {"depth": 9}},
        "layers": {"removed_layers": {"layers": bk_sdm_layers(den, "base")}},
    }


CASES = [(m, k) for m in ("digits-sd", "digits-dit") for k in _recipes(m)]


@pytest.mark.parametrize("model,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_compiled_recipe_matches_eager_in_full_graphs(model, kind):
    recipe = _recipes(model)[kind]
    eager = _gen(diffslim.apply(_pipe(model), recipe))
    pipe = diffslim.apply(_pipe(model), recipe)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # fullgraph: a graph break raises, and so does passing the recompile limit in any compiled region
    assert diffslim.compile(pipe, backend="eager", fullgraph=True) is pipe
    info = compiled_info(pipe.denoiser)
    expected = {"plan": "skip-plan units", "multi-depth": "multi-depth"}.get(kind, "whole")
    assert info.how == expected
    out = _gen(pipe)
    assert torch.equal(out, eager)
    stats = torch._dynamo.utils.counters["stats"]
    assert not torch._dynamo.utils.counters["graph_break"]
    if kind == "plan":
        rt = pipe.denoiser._diffslim_skip_plan
        assert info.regions == len(rt.hooked)
        # one graph per region that ran, each compiled once: a later step recompiles nothing
        assert stats["unique_graphs"] <= info.regions
        before = stats["unique_graphs"]
        assert torch.equal(_gen(pipe), eager) and stats["unique_graphs"] == before
    elif kind == "multi-depth":
        assert info.regions == 3 and stats["unique_graphs"] == 2  # depths 9 and 11; the full depth never runs
    else:
        assert info.regions == 1 and stats["unique_graphs"] == 1


def test_whole_model_compile_of_a_skip_plan_breaks_where_ours_does_not():
    # the reason for regional compilation: the plan's step index comes from the timestep's value
    pipe = diffslim.apply(_pipe("digits-dit"), _recipes("digits-dit")["plan"])
    torch._dynamo.reset()
    pipe.denoiser.compile(backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="data-dependent|Unsupported|graph break"):
        _gen(pipe)


def test_uncompile_and_recompile():
    pipe = diffslim.apply(_pipe("digits-sd"), _recipes("digits-sd")["plan"])
    den = pipe.denoiser
    eager = _gen(pipe)
    compile_denoiser(den, backend="eager")
    hooks = [den.get_submodule(m)._diffusers_hook.get_hook("diffslim_skip_plan_unit") for m in den._diffslim_skip_plan.hooked]
    assert all(h.compiled is not None for h in hooks)
    # compiling again replaces the first compilation's options
    assert compile_denoiser(den, backend="aot_eager").options == {"backend": "aot_eager"}
    uncompile(den)
    assert compiled_info(den) is None and all(h.compiled is None for h in hooks)
    assert torch.equal(_gen(pipe), eager)
    plain = _pipe("digits-sd")
    compile_denoiser(plain.denoiser, backend="eager")
    assert plain.denoiser._compiled_call_impl is not None
    uncompile(plain.denoiser)
    assert plain.denoiser._compiled_call_impl is None
    uncompile(plain.denoiser)  # no-op


def test_apply_refuses_a_compiled_denoiser():
    recipe = _recipes("digits-sd")["depth"]
    pipe = diffslim.compile(_pipe("digits-sd"), backend="eager")
    with pytest.raises(UserError, match="apply the recipe to the eager pipeline, then compile"):
        diffslim.apply(pipe, recipe)
    pipe = _pipe("digits-sd")
    pipe.denoiser = torch.compile(pipe.denoiser, backend="eager")  # the user's own torch.compile
    with pytest.raises(UserError, match="denoiser is compiled"):
        diffslim.apply(pipe, _recipes("digits-sd")["plan"])
    pipe = _pipe("digits-sd")
    pipe.denoiser.compile(backend="eager")
    with pytest.raises(UserError, match="denoiser is compiled"):
        diffslim.apply(pipe, recipe)
    # a recipe that only changes the schedule does not touch the denoiser
    diffslim.apply(pipe, {"sampling": {"scheduler": "ddim", "num_inference_steps": 4}})


@pytest.mark.parametrize("kwargs,needle", [
    ({"mode": "reduce-overhead"}, "captures CUDA graphs"),
    ({"mode": "max-autotune"}, "max-autotune-no-cudagraphs"),
    ({"mode": "fastest"}, "unknown torch.compile mode 'fastest'; accepted: default"),
    ({"backend": "nope"}, "unknown torch.compile backend 'nope'; accepted:"),
])
def test_refusals(kwargs, needle):
    pipe = diffslim.apply(_pipe("digits-sd"), _recipes("digits-sd")["plan"])
    with pytest.raises(UserError, match=needle):
        diffslim.compile(pipe, **kwargs)
    assert compiled_info(pipe.denoiser) is None
    with pytest.raises(UserError, match="takes a diffusers pipeline"):
        diffslim.compile(pipe.denoiser)


def test_cli_bench_and_sample_compiled_give_the_eager_outputs(tmp_path):
    from typer.testing import CliRunner

    from diffslim.cli import app

    def run(*args):
        res = CliRunner().invoke(app, list(map(str, args)))
        assert res.exit_code == 0, res.output
        return res.output

    # 3 inputs in batches of 2: the warm-up compiles both batch sizes the timed run uses
    common = ["bench", "zoo:digits-dit", "--methods", "full,random:0.5", "--n", "3", "--batch-size", "2",
              "--steps", "4", "--json"]
    eager = json.loads(run(*common))["rows"]
    compiled = json.loads(run(*common, "--compile", "--compile-backend", "eager", "--html", tmp_path / "rep"))["rows"]
    assert [r["compiled"] for r in compiled] == ["whole", "skip-plan units"]
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "compile_seconds" in html and "skip-plan units" in html
    assert all(r["compile_seconds"] > 0 for r in compiled)
    for e, c in zip(eager, compiled):
        assert e["method"] == c["method"] and e["macs_per_sample"] == c["macs_per_sample"]
        assert e["psnr"] == c["psnr"] and e["digit_accuracy"] == c["digit_accuracy"]
    run("sample", "zoo:digits-dit", "--n", "2", "--steps", "3", "--out", tmp_path / "a")
    run("sample", "zoo:digits-dit", "--n", "2", "--steps", "3", "--out", tmp_path / "b", "--compile",
        "--compile-backend", "eager")
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    res = CliRunner().invoke(app, ["sample", "zoo:digits-sd", "--compile-mode", "default", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--compile-mode would be ignored without --compile" in res.output
    assert not (tmp_path / "c").exists()
