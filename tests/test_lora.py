"""LoRAs of the original model on pruned models (``diffslim.lora``, ``diffslim lora``, ``diffslim stock --lora``):
the LoRA of every kept module is kept under the name it has in the pruned (or stock) model, the removed layers'
LoRA is dropped, and the result gives the same outputs as the LoRA on the pruned model, without diffusers'
warnings, where the raw LoRA fails to load or silently lands on the wrong blocks."""

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from diffslim.errors import UserError
from diffslim.lora import adapt_lora, read_lora
from diffslim.methods import layer_prune as lp
from diffslim.methods.depth_skip import depth_skip

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "conv_shortcut"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out", "ff.net.2"]


def _lora(model, targets, seed=0):
    """A random LoRA of ``model`` (every B non-zero, two ranks: diffusers keeps both scales at 1), made on a copy
    (PEFT leaves the modules it wrapped wrapped)."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                                 rank_pattern={"to_k": 2}), adapter_name="make")
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="make").items()}
    model.delete_adapters("make")
    return sd


def _unet():
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    return build_pipeline("digits-sd").denoiser.eval()


def _unet_input(unet):
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, unet.config.in_channels, 8, 8, generator=g), timestep=torch.tensor([10, 600]),
                encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim, generator=g))


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def _flux_input():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g), timestep=torch.tensor([0.5]),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(5, 3))


@torch.no_grad()
def _out(model, inputs):
    return model(**inputs).sample


class _Warnings(logging.Handler):
    """diffusers' warnings while loading an adapter (its loggers do not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        from diffusers.utils import logging as dlog

        self.saved_verbosity = dlog.get_verbosity()  # other tests (and the CLI) set diffusers to errors only
        dlog.set_verbosity_warning()
        logging.getLogger("diffusers").addHandler(self)
        return self

    def __exit__(self, *exc):
        from diffusers.utils import logging as dlog

        logging.getLogger("diffusers").removeHandler(self)
        dlog.set_verbosity(self.saved_verbosity)


def _load(model, state_dict, config=None):
    """Load a LoRA; returns diffusers' warnings about keys the model has no place for, and PEFT's about config
    patterns that match no module."""
    import warnings

    with _Warnings() as w, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_lora_adapter(dict(state_dict), prefix=None, adapter_name="lora", metadata=config)
    return ([m for m in w.messages if "unexpected keys" in m]
            + [str(c.message) for c in caught if "did not match any targeted module" in str(c.message)])


def _modules(state_dict):
    return {k.split(".lora_")[0] for k in state_dict}


def test_layer_pruned_unet_keeps_the_kept_modules_lora_and_loads_without_warnings():
    sd = _lora(_unet(), UNET_TARGETS)
    names = lp.bk_sdm_layers(_unet(), "base")
    pruned = lp.prune_layers(_unet(), names)
    res = adapt_lora(pruned, sd)
    dropped = {m for ms in res.dropped.values() for m in ms}
    assert set(res.kept) | dropped == _modules(sd) and not set(res.kept) & dropped
    assert set(res.dropped) <= set(names) and all(m.startswith(k + ".") for k, ms in res.dropped.items() for m in ms)
    assert all(pruned.get_submodule(m) is not None for m in res.kept)
    assert all(res.state_dict[k] is sd[k] for k in res.state_dict)  # the same tensors, not copies
    assert res.config["rank_pattern"] and all(k.lstrip("^") in res.kept for k in res.config["rank_pattern"])
    # the raw LoRA loads too, with a warning naming every key of the removed layers; the adapted one is silent
    raw = lp.prune_layers(_unet(), names)
    raw_warnings = _load(raw, sd)
    assert raw_warnings and all(m in raw_warnings[0] for m in list(dropped)[:5])
    assert _load(pruned, res.state_dict, res.config) == []
    inputs = _unet_input(pruned)
    assert torch.equal(_out(pruned, inputs), _out(raw, inputs))
    assert not torch.equal(_out(pruned, inputs), _out(lp.prune_layers(_unet(), names), inputs))  # the LoRA acts


def test_keep_all_adapts_to_the_same_lora():
    unet = _unet()
    sd = _lora(unet, UNET_TARGETS)
    res = adapt_lora(unet, sd)
    assert res.dropped == {} and res.renamed == {}
    assert res.state_dict.keys() == sd.keys() and all(res.state_dict[k] is sd[k] for k in sd)
    # the keys as a pipeline LoRA file stores them ("unet." first) give the same; with a text encoder's, refused
    prefixed = adapt_lora(unet, {f"unet.{k}": v for k, v in sd.items()})
    assert prefixed.state_dict.keys() == sd.keys() and all(prefixed.state_dict[k] is sd[k] for k in sd)
    with pytest.raises(UserError, match=r"several pipeline components \(text_encoder, unet\).*the keys after 'unet.'"):
        adapt_lora(unet, {**{f"unet.{k}": v for k, v in sd.items()}, "text_encoder.x.lora_A.weight": torch.zeros(1)})


def test_depth_skipped_unet_drops_the_lora_inside_the_removed_depth():
    sd = _lora(_unet(), UNET_TARGETS)
    model = depth_skip(_unet(), 9)
    res = adapt_lora(model, sd)
    assert "mid_block" in res.dropped and res.dropped
    raw = depth_skip(_unet(), 9)
    assert _load(raw, sd)
    assert _load(model, res.state_dict, res.config) == []
    inputs = _unet_input(model)
    assert torch.equal(_out(model, inputs), _out(raw, inputs))


def test_stock_flux_needs_the_renaming_and_gets_it():
    sd = _lora(_flux(), FLUX_TARGETS)
    removed = ["single_transformer_blocks.0", "single_transformer_blocks.2"]
    pruned = lp.prune_layers(_flux(), removed)
    res = adapt_lora(pruned, sd, stock=True)
    assert {k.split(".")[1] for k in res.renamed} == {"1", "3"}  # kept single blocks 1 and 3 become 0 and 1
    assert all(v.startswith(("single_transformer_blocks.0.", "single_transformer_blocks.1.")) for v in res.renamed.values())
    assert all(res.renamed[k].split(".")[1] == {"1": "0", "3": "1"}[k.split(".")[1]] for k in res.renamed)
    assert set(res.dropped) == set(removed)
    on_pruned = adapt_lora(pruned, sd)
    assert _load(pruned, on_pruned.state_dict, on_pruned.config) == []
    stock = lp.stock_model(lp.prune_layers(_flux(), removed))
    assert _load(stock, res.state_dict, res.config) == []
    inputs = _flux_input()
    assert torch.equal(_out(stock, inputs), _out(pruned, inputs))
    # the raw LoRA loads into the stock Flux (same shapes): block 0's LoRA lands on what was block 1, wrong outputs
    wrong = lp.stock_model(lp.prune_layers(_flux(), removed))
    _load(wrong, sd)
    assert not torch.allclose(_out(wrong, inputs), _out(pruned, inputs), atol=1e-4)


def test_stock_bk_sdm_tiny_unet_loads_the_adapted_lora_where_the_raw_one_fails():
    sd = _lora(_unet(), UNET_TARGETS)
    names = lp.bk_sdm_layers(_unet(), "tiny")
    pruned = lp.prune_layers(_unet(), names)
    res = adapt_lora(pruned, sd, stock=True)
    assert res.renamed["up_blocks.1.resnets.0.conv1"] == "up_blocks.0.resnets.0.conv1"  # a level fewer
    with pytest.raises(RuntimeError, match="size mismatch"):
        _load(lp.stock_model(lp.prune_layers(_unet(), names)), sd)
    stock = lp.stock_model(lp.prune_layers(_unet(), names))
    assert _load(stock, res.state_dict, res.config) == []
    on_pruned = adapt_lora(pruned, sd)
    _load(pruned, on_pruned.state_dict, on_pruned.config)
    inputs = _unet_input(pruned)
    assert torch.equal(_out(stock, inputs), _out(pruned, inputs))


def test_a_lora_of_another_model_is_refused():
    unet = _unet()
    with pytest.raises(UserError, match="never had"):
        adapt_lora(unet, _lora(_flux(), FLUX_TARGETS))
    sd = _lora(_unet(), UNET_TARGETS)
    key = next(k for k in sd if k.endswith("conv1.lora_A.weight"))
    bad = dict(sd, **{key: torch.zeros(4, 3, 3, 3)})
    with pytest.raises(UserError, match="does not fit"):
        adapt_lora(unet, bad)
    with pytest.raises(UserError, match="not a key of a LoRA"):
        adapt_lora(unet, {"conv_in.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="stock"):  # a depth-skipped U-Net has no stock export
        adapt_lora(depth_skip(_unet(), 9), sd, stock=True)


def test_cli_adapts_a_pipeline_lora_and_keeps_the_text_encoders(tiny_sd_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from diffslim.cli import app
    from diffslim.models.load import load

    pipe = tiny_sd_pipe
    unet_sd = _lora(pipe.unet, UNET_TARGETS)
    text_encoder = copy.deepcopy(pipe.text_encoder)
    text_encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                             adapter_name="make")
    te_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(text_encoder, adapter_name="make").items()}
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=unet_sd,
                                              text_encoder_lora_layers=te_sd, safe_serialization=True)
    full_unet = pipe.unet
    pipe.unet = lp.prune_layers(full_unet, ["down_blocks.0.attentions.0", "up_blocks.1.resnets.1"])
    try:
        pipe.save_pretrained(str(tmp_path / "pruned"), safe_serialization=True)
    finally:
        pipe.unet = full_unet
    runner = CliRunner()
    out = tmp_path / "adapted" / "lora.safetensors"
    r = runner.invoke(app, ["lora", str(tmp_path / "pruned"), str(tmp_path / "lora"), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["dropped_by_layer"] == {"down_blocks.0.attentions.0": 9, "up_blocks.1.resnets.1": 3}
    tensors, meta = read_lora(out)
    original, original_meta = read_lora(tmp_path / "lora")
    assert meta is None and original_meta is None  # no config in, none out: diffusers gives every module scale 1
    assert all(torch.equal(tensors[k], v) for k, v in original.items() if k.startswith("text_encoder."))
    assert sum(k.startswith("text_encoder.") for k in tensors) == len(te_sd)
    # diffusers' own loader takes the adapted file without a warning, and the U-Net gets the raw LoRA's outputs
    adapted = load(str(tmp_path / "pruned")).pipe
    with _Warnings() as w:
        adapted.load_lora_weights(str(out))
    assert not [m for m in w.messages if "unexpected keys" in m]
    raw = load(str(tmp_path / "pruned")).pipe
    raw.load_lora_weights(str(tmp_path / "lora"))
    inputs = _unet_input(adapted.unet)
    assert torch.equal(_out(adapted.unet, inputs), _out(raw.unet, inputs))
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(adapted.text_encoder(ids)[0], raw.text_encoder(ids)[0])

    # mistakes: one line, exit code 2, before the model loads
    for args, says in [
        ([str(tmp_path / "pruned"), str(tmp_path / "missing.safetensors"), "--out", str(out)], "no such file"),
        ([str(tmp_path / "pruned"), str(tmp_path / "lora"), "--out", str(tmp_path / "x.json")], ".safetensors"),
        ([str(tmp_path / "pruned"), str(tmp_path / "lora"), "--out", str(out), "--stock"], "stock"),
        (["zoo:digits-dit", str(tmp_path / "lora"), "--out", str(out)], "takes no LoRA"),
    ]:
        r = runner.invoke(app, ["lora", *args])
        assert r.exit_code == 2 and says in r.output, r.output
    (tmp_path / "pickled.bin").write_bytes(b"0")
    r = runner.invoke(app, ["lora", str(tmp_path / "pruned"), str(tmp_path / "pickled.bin"), "--out", str(out)])
    assert r.exit_code == 2 and "pickles are refused" in r.output


def test_cli_stock_writes_the_adapted_loras_beside_the_stock_model(tmp_path):
    from diffusers import FluxPipeline

    from diffslim.cli import app
    from diffslim.models.load import load

    full = _flux()
    # a LoRA config whose scales are not 1 and differ by module: the renaming must carry them to the right blocks
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_k": 2}, "target_modules": FLUX_TARGETS,
              "alpha_pattern": {"^single_transformer_blocks.3.proj_mlp": 32, "^single_transformer_blocks.1.proj_mlp": 1}}
    FluxPipeline.save_lora_weights(str(tmp_path / "style"), transformer_lora_layers=_lora(full, FLUX_TARGETS),
                                   transformer_lora_adapter_metadata=config, safe_serialization=True)
    lp.prune_layers(full, ["transformer_blocks.0", "single_transformer_blocks.1"]).save_pretrained(
        str(tmp_path / "pruned"), safe_serialization=True)
    r = CliRunner().invoke(app, ["stock", str(tmp_path / "pruned"), "--out", str(tmp_path / "stock"),
                                 "--lora", str(tmp_path / "style")])
    assert r.exit_code == 0, r.output
    written = tmp_path / "stock" / "loras" / "style.safetensors"
    with safe_open(str(written), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    # two double- and four single-stream blocks, one of each removed: the stock model has 1 and 3
    assert not any(k.startswith(("transformer.transformer_blocks.1.", "transformer.single_transformer_blocks.3."))
                   for k in keys)
    assert "single_transformer_blocks.2.proj_mlp" in meta["transformer.target_modules"]
    assert meta["transformer.alpha_pattern"] == {"^single_transformer_blocks.2.proj_mlp": 32}
    assert meta["transformer.rank_pattern"] == {"to_k": 2} and meta["transformer.lora_alpha"] == 8
    stock = load(str(tmp_path / "stock")).denoiser
    assert type(stock).__name__ == "FluxTransformer2DModel"
    with _Warnings() as w:
        stock.load_lora_adapter(str(written), prefix="transformer", adapter_name="lora")
    assert not [m for m in w.messages if "unexpected keys" in m]
    # against diffusers' own loading of the original file into the layer-pruned model (with its warnings)
    pruned = load(str(tmp_path / "pruned")).denoiser
    pruned.load_lora_adapter(str(tmp_path / "style" / "pytorch_lora_weights.safetensors"), prefix="transformer",
                             adapter_name="lora")
    inputs = _flux_input()
    assert torch.equal(_out(stock, inputs), _out(pruned, inputs))


def test_cli_reads_a_kohya_lora_through_the_original_pipeline(tiny_sd_pipe, tmp_path):
    """A Kohya/A1111 LoRA of the U-Net and the text encoder (what most shared SD LoRAs are) with alphas that are not
    the ranks: read through --original's diffusers loader and adapted, every module with the scale its own alpha
    in the file gives it. diffusers' own loading gives the attention projections the file's most common alpha
    instead (bench/kohya_alphas.py): the adapted LoRA equals it once those scales are set right."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from diffslim.cli import app
    from diffslim.models.load import load

    pipe = copy.deepcopy(tiny_sd_pipe)
    text_encoder = copy.deepcopy(pipe.text_encoder)
    text_encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "v_proj", "out_proj", "fc1"],
                                        init_lora_weights=False), adapter_name="make")
    peft_sd = {f"unet.{k}": v for k, v in _lora(pipe.unet, UNET_TARGETS).items()}
    peft_sd.update({f"text_encoder.{k}": v.detach().clone()
                    for k, v in get_peft_model_state_dict(text_encoder, adapter_name="make").items()})
    # sd-scripts' names: lora_te_text_model_..., a level that transformers 5's CLIPTextModel no longer has
    kohya = {k.replace("lora_te1_", "lora_te_text_model_"): v for k, v in convert_state_dict_to_kohya(peft_sd).items()}
    alphas = sorted(k for k in kohya if k.endswith(".alpha"))
    assert {k.split("_")[1] for k in kohya} == {"unet", "te"}
    for i, k in enumerate(alphas):  # scales other than 1, and not all alike
        kohya[k] = torch.tensor(float(1 + i % 5))

    def file_scale(component, name, rank):  # what the Kohya file asks for: the module's alpha over its rank
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[component]
        return float(kohya[prefix + name.replace(".", "_") + ".alpha"]) / rank

    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "kohya.safetensors"))
    pipe.save_pretrained(str(tmp_path / "original"), safe_serialization=True)
    pipe.unet = lp.prune_layers(pipe.unet, ["down_blocks.0.attentions.0", "up_blocks.1.resnets.1"])
    pipe.save_pretrained(str(tmp_path / "pruned"), safe_serialization=True)

    runner = CliRunner()
    out = tmp_path / "adapted.safetensors"
    r = runner.invoke(app, ["lora", str(tmp_path / "pruned"), str(tmp_path / "kohya.safetensors"), "--out", str(out)])
    assert r.exit_code == 2 and "--original" in r.output  # not diffusers' format: the original pipeline reads it
    r = runner.invoke(app, ["lora", str(tmp_path / "pruned"), str(tmp_path / "kohya.safetensors"), "--out", str(out),
                            "--original", str(tmp_path / "original"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["dropped_by_layer"] == {"down_blocks.0.attentions.0": 9, "up_blocks.1.resnets.1": 3}
    tensors, meta = read_lora(out)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder"} and all(".lora_" in k for k in tensors)
    assert meta["unet.alpha_pattern"] and all(k.startswith("^") for k in meta["unet.alpha_pattern"])
    adapted = load(str(tmp_path / "pruned")).pipe
    with _Warnings() as w:
        adapted.load_lora_weights(str(out))
    assert not [m for m in w.messages if "unexpected keys" in m or "alpha_pattern" in m]
    wrapped = {(c, n): m for c in ("unet", "text_encoder") for n, m in getattr(adapted, c).named_modules()
               if hasattr(m, "scaling") and m.scaling}
    assert len(wrapped) == len(alphas) - sum(info["dropped_by_layer"].values())  # the removed layers' dropped
    for (component, name), m in wrapped.items():
        (scaling,), (rank,) = m.scaling.values(), m.r.values()
        assert scaling == pytest.approx(file_scale(component, name, rank)), name
    raw = load(str(tmp_path / "pruned")).pipe
    raw.load_lora_weights(str(tmp_path / "kohya.safetensors"))  # diffusers' own conversion, on the pruned model
    inputs, ids = _unet_input(adapted.unet), torch.tensor([[1, 5, 9, 2]])

    def outputs(p):
        with torch.no_grad():
            return _out(p.unet, inputs), p.text_encoder(ids)[0]

    assert not any(torch.equal(a, b) for a, b in zip(outputs(adapted), outputs(raw)))  # attention scales differ
    for component in ("unet", "text_encoder"):
        for name, m in getattr(raw, component).named_modules():
            if hasattr(m, "scaling") and m.scaling:
                (adapter,), (rank,) = m.scaling.keys(), m.r.values()
                m.scaling[adapter] = file_scale(component, name, rank)
    assert all(torch.equal(a, b) for a, b in zip(outputs(adapted), outputs(raw)))
    assert not torch.equal(_out(adapted.unet, inputs), _out(load(str(tmp_path / "pruned")).pipe.unet, inputs))
    r = runner.invoke(app, ["lora", str(tmp_path / "pruned"), str(tmp_path / "kohya.safetensors"), "--out", str(out),
                            "--original", str(tmp_path / "pruned" / "unet")])
    assert r.exit_code == 2 and "not a pipeline" in r.output


def _with_lora(model, sd, weight=None):
    model.load_lora_adapter(dict(sd), prefix=None, adapter_name="style")
    if weight is not None:
        model.set_adapters(["style"], weights=[weight])
    return model


@pytest.mark.parametrize("prune", ["layers", "depth"])
def test_pruning_a_model_with_a_lora_loaded_keeps_the_lora_on_the_kept_modules(prune):
    """diffusers users load LoRAs first, then compress: the pruned model keeps the loaded LoRA layers (same
    objects, same weight from set_adapters), as if the LoRA had been adapted and loaded after pruning."""
    names = lp.bk_sdm_layers(_unet(), "base")
    build = (lambda u: lp.prune_layers(u, names)) if prune == "layers" else (lambda u: depth_skip(u, 9))
    sd = _lora(_unet(), UNET_TARGETS)
    with_lora = _with_lora(_unet(), sd, weight=0.7)
    pruned = build(with_lora)
    after = build(_unet())
    res = adapt_lora(after, sd)
    after.load_lora_adapter(res.state_dict, prefix=None, adapter_name="style", metadata=res.config)
    after.set_adapters(["style"], weights=[0.7])
    inputs = _unet_input(pruned)
    assert torch.equal(_out(pruned, inputs), _out(after, inputs))
    assert not torch.equal(_out(pruned, inputs), _out(build(_unet()), inputs))
    # the LoRA layers are the loaded model's own, and diffusers' adapter calls work on the pruned model
    layers = dict(pruned.named_modules())
    assert all(layers[n] is m for n, m in with_lora.named_modules() if n in layers and "lora" in type(m).__module__)
    pruned.disable_lora()
    assert torch.equal(_out(pruned, inputs), _out(build(_unet()), inputs))


def test_a_recipe_applied_to_a_pipeline_with_a_lora_keeps_it(tiny_digits_pipe, tmp_path):
    import diffslim

    pipe = copy.deepcopy(tiny_digits_pipe)
    sd = _lora(pipe.denoiser, UNET_TARGETS)
    _with_lora(pipe.denoiser, sd)
    diffslim.apply(pipe, {"depth": {"depth": 9}, "removed_layers": {"layers": ["up_blocks.3.resnets.1"]}})
    reference = copy.deepcopy(tiny_digits_pipe)
    diffslim.apply(reference, {"depth": {"depth": 9}, "removed_layers": {"layers": ["up_blocks.3.resnets.1"]}})
    res = adapt_lora(reference.denoiser, sd)
    reference.denoiser.load_lora_adapter(res.state_dict, prefix=None, adapter_name="style", metadata=res.config)
    kw = dict(class_labels=[3, 1], num_inference_steps=4, output_type="pt")
    out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(out, reference(generator=torch.Generator().manual_seed(0), **kw).images)
    with pytest.raises(UserError, match="LoRAs loaded"):
        lp.stock_model(lp.prune_layers(_with_lora(_unet(), sd), lp.bk_sdm_layers(_unet(), "base")))
    # distillation would train the LoRA layers that the pruned student shares with its teacher: refused
    from diffslim.train.distill import DistillConfig, distill

    teacher = copy.deepcopy(tiny_digits_pipe)
    _with_lora(teacher.denoiser, sd)
    with pytest.raises(UserError, match="the teacher has LoRAs loaded"):
        distill(teacher, lp.prune_layers(teacher.denoiser, ["up_blocks.3.resnets.1"]), None,
                DistillConfig(steps=1, batch_size=2, lr=1e-4, out=tmp_path / "kd"))


def test_sd15_bk_sdm_small_stock_renaming_on_the_meta_device():
    """SD-1.5's real structure (config only): a LoRA over every attention projection and resnet conv, adapted to
    BK-SDM Small's stock U-Net, names modules the stock model has, with the shapes of the original's."""
    from diffslim.models.load import load

    CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "src" / "diffslim" / "configs"
    full = load(str(CONFIGS / "sd15-unet")).denoiser
    names = lp.bk_sdm_layers(full, "small")
    pruned = lp.prune_layers(full, names)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in full.named_modules():
        if name.endswith(("to_q", "to_v", "conv1", "conv2")):
            w = m.weight
            sd[f"{name}.lora_A.weight"] = torch.randn(2, w.shape[1], *w.shape[2:], generator=g)
            sd[f"{name}.lora_B.weight"] = torch.randn(w.shape[0], 2, *([1] * (w.dim() - 2)), generator=g)
    res = adapt_lora(pruned, sd, stock=True)
    stock = lp.stock_model(pruned)
    modules = dict(stock.named_modules())
    assert res.kept and all(n in modules for n in res.kept)
    for old, new in res.renamed.items():
        assert modules[new].weight.shape == dict(full.named_modules())[old].weight.shape
    assert "mid_block" not in " ".join(res.kept) and any(k.startswith("mid_block") for k in res.dropped)
    assert res.renamed and all(old.startswith("up_blocks.") for old in res.renamed)  # up blocks keep 2 of 3 pairs
    assert len(res.kept) + sum(len(v) for v in res.dropped.values()) == len(sd) // 2


def test_sdxl_shaped_unet_pruned_inside_its_attention_layers(sdxl_shaped_unet):
    """SDXL's deep attention layers hold several transformer blocks; pruning inside them (--inner) renumbers the
    kept blocks in the stock model: an SDXL LoRA must follow them."""
    unet = sdxl_shaped_unet
    names = ["down_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.0.attentions.2.transformer_blocks.0",
             "up_blocks.0.attentions.2.transformer_blocks.2"]
    sd = _lora(unet(), ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1"])
    pruned = lp.prune_layers(unet(), names)
    res = adapt_lora(pruned, sd, stock=True)
    assert res.renamed["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert res.renamed["up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_k"] == \
        "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k"
    on_pruned = adapt_lora(pruned, sd)
    assert _load(pruned, on_pruned.state_dict, on_pruned.config) == []
    stock = lp.stock_model(lp.prune_layers(unet(), names))
    assert _load(stock, res.state_dict, res.config) == []
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([400]),
                  encoder_hidden_states=torch.randn(1, 3, 16, generator=g))
    assert torch.equal(_out(stock, inputs), _out(pruned, inputs))


def test_stock_sd3_gets_the_renaming_too():
    from diffusers import SD3Transformer2DModel

    def sd3():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                     dual_attention_layers=(0, 1)).eval()

    sd = _lora(sd3(), ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.2"])
    pruned = lp.prune_layers(sd3(), ["transformer_blocks.0"])
    res = adapt_lora(pruned, sd, stock=True)
    assert res.renamed["transformer_blocks.2.attn.to_q"] == "transformer_blocks.1.attn.to_q"
    on_pruned = adapt_lora(pruned, sd)
    assert _load(pruned, on_pruned.state_dict, on_pruned.config) == []
    stock = lp.stock_model(lp.prune_layers(sd3(), ["transformer_blocks.0"]))
    assert _load(stock, res.state_dict, res.config) == []
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g), pooled_projections=torch.randn(1, 16, generator=g))
    assert torch.equal(_out(stock, inputs), _out(pruned, inputs))
    wrong = lp.stock_model(lp.prune_layers(sd3(), ["transformer_blocks.0"]))
    _load(wrong, sd)  # the raw LoRA: block 0's LoRA on what was block 1
    assert not torch.allclose(_out(wrong, inputs), _out(pruned, inputs), atol=1e-4)
