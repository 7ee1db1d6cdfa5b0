"""IP-Adapters of the original model on pruned models (``diffslim.models.adapters``, ``diffslim.ip_adapter``,
``diffslim stock --ip-adapter``).

An IP-Adapter file numbers its weights by the position of each attention processor in the original model. On a
pruned model diffusers' own loader reads those numbers against fewer processors: it fails on a shape, or loads a
layer's weights into the next one (Flux: same widths, no error). The pruned classes renumber before loading, a
model pruned with an IP-Adapter loaded keeps it, and the stock export gets an adapted file. Every check compares
outputs bit for bit with the full model running its removed layers' stand-ins (``layers_removed``)."""

import copy
import warnings

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from typer.testing import CliRunner

from diffslim.errors import UserError
from diffslim.ip_adapter import adapt_ip_adapter, read_ip_adapter, write_ip_adapter
from diffslim.methods import layer_prune as lp
from diffslim.methods.depth_skip import depth_skip

from conftest import own_memory
from diffslim.models.adapters import ip_adapter_loaded, original_processor_names

EMBED = 12  # the image embedding's width (a CLIP image encoder's projection)


def _unet():
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    return build_pipeline("digits-sd").denoiser.eval()


def _flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def _ip_adapter(model, seed=0):
    """A random IP-Adapter of ``model`` in diffusers' nested form, numbered as diffusers numbers it: a U-Net's
    cross-attention processors at their positions (odd), Flux's double-stream blocks (with biases)."""
    g = torch.Generator().manual_seed(seed)
    flux = isinstance(model, FluxTransformer2DModel)
    c = model.config.joint_attention_dim if flux else model.config.cross_attention_dim
    ip = {}
    for i, name in enumerate(model.attn_processors):
        if name.endswith("attn1.processor") or name.startswith("single_transformer_blocks"):
            continue
        width = model.get_submodule(name[: -len(".processor")]).to_k.weight.shape[0]
        for part in ("to_k_ip", "to_v_ip"):
            ip[f"{i}.{part}.weight"] = torch.randn(width, c, generator=g) * 0.3
            if flux:
                ip[f"{i}.{part}.bias"] = torch.randn(width, generator=g) * 0.1
    image_proj = {"proj.weight": torch.randn(4 * c, EMBED, generator=g) * 0.1, "proj.bias": torch.zeros(4 * c),
                  "norm.weight": torch.ones(c), "norm.bias": torch.zeros(c)}
    return {"image_proj": image_proj, "ip_adapter": ip}


def _unet_input(image=True):
    g = torch.Generator().manual_seed(1)
    x = dict(sample=torch.randn(2, 1, 8, 8, generator=g), timestep=torch.tensor([10, 600]),
             encoder_hidden_states=torch.randn(2, 1, 32, generator=g))
    if image:
        x["added_cond_kwargs"] = {"image_embeds": [torch.randn(2, 1, EMBED, generator=g)]}
    return x


def _flux_input(image=True):
    g = torch.Generator().manual_seed(1)
    x = dict(hidden_states=torch.randn(1, 16, 16, generator=g), timestep=torch.tensor([0.5]),
             encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
             pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    if image:
        x["joint_attention_kwargs"] = {"ip_adapter_image_embeds": [torch.randn(1, 1, EMBED, generator=g)]}
    return x


@torch.no_grad()
def _out(model, inputs):
    return model(**copy.deepcopy(inputs)).sample


def _loaded(model, state):
    model._load_ip_adapter_weights([copy.deepcopy(state)])  # what pipe.load_ip_adapter calls
    return model


def _reference(build, removed, state, inputs):
    """The full model with the IP-Adapter, its ``removed`` layers running their stand-ins."""
    full = _loaded(build(), state)
    with lp.layers_removed(full, removed):
        return _out(full, inputs)


def _nested(flat):
    return {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
            for part in ("image_proj", "ip_adapter")}


ATTENTION = ["down_blocks.0.attentions.0", "down_blocks.1.attentions.1", "up_blocks.3.attentions.2"]


@pytest.mark.parametrize("removed", [[ATTENTION[0]], [ATTENTION[1]], [ATTENTION[2]], "tiny", ["up_blocks.1.resnets.0"]],
                         ids=["first-attention", "mid-level-attention", "last-attention", "bk-sdm-tiny", "resnet"])
def test_a_pruned_unet_loads_the_original_ip_adapter_where_diffusers_numbering_fails(removed):
    removed = lp.bk_sdm_layers(_unet(), "tiny") if removed == "tiny" else removed
    state = _ip_adapter(_unet())
    reference = _reference(_unet, removed, state, _unet_input())
    pruned = _loaded(lp.prune_layers(_unet(), removed), state)
    assert ip_adapter_loaded(pruned)
    assert torch.equal(_out(pruned, _unet_input()), reference)
    assert not torch.equal(_out(lp.prune_layers(_unet(), removed), _unet_input(image=False)), reference)
    raw = lp.prune_layers(_unet(), removed)
    if any(".attentions." in n for n in removed):
        # diffusers' own loader on the same model: the numbers name the wrong layers (here a wider one)
        with pytest.raises(ValueError, match="expected shape"):
            UNet2DConditionModel._load_ip_adapter_weights(raw, [copy.deepcopy(state)])
    else:  # nothing with attention removed: the numbering is the original's
        assert torch.equal(_out(UNet2DConditionModel._load_ip_adapter_weights(raw, [copy.deepcopy(state)]) or raw,
                                _unet_input()), reference)


@pytest.mark.parametrize("prune", ["layers", "depth", "both"])
def test_pruning_a_model_with_an_ip_adapter_loaded_keeps_it(prune):
    """Load first, then compress (what diffslim.apply does to a pipeline with an IP-Adapter loaded): the pruned
    model keeps the kept layers' IP-Adapter processors (the same objects) and the image projection. Before, it
    silently dropped them and ignored the image."""
    removed = lp.bk_sdm_layers(_unet(), "base")
    build = {"layers": lambda u: lp.prune_layers(u, removed), "depth": lambda u: depth_skip(u, 7),
             "both": lambda u: depth_skip(lp.prune_layers(u, removed[:4]), 9)}[prune]
    state = _ip_adapter(_unet())
    loaded = _loaded(_unet(), state)
    pruned = build(loaded)
    after = _loaded(build(_unet()), state)  # pruned first, then the original IP-Adapter loaded (renumbered)
    assert ip_adapter_loaded(pruned)
    assert torch.equal(_out(pruned, _unet_input()), _out(after, _unet_input()))
    assert not torch.equal(_out(pruned, _unet_input()), _out(build(_unet()), _unet_input(image=False)))
    procs = loaded.attn_processors
    assert all(p is procs[n] for n, p in pruned.attn_processors.items())
    assert pruned.encoder_hid_proj is loaded.encoder_hid_proj
    if prune == "layers":
        assert torch.equal(_out(pruned, _unet_input()), _reference(_unet, removed, state, _unet_input()))


def test_flux_stock_export_takes_the_raw_ip_adapter_silently_wrong_and_the_adapted_one_right(tmp_path):
    removed = ["transformer_blocks.1"]
    state = _ip_adapter(_flux())
    reference = _reference(_flux, removed, state, _flux_input())
    assert torch.equal(_out(_loaded(lp.prune_layers(_flux(), removed), state), _flux_input()), reference)
    # the stock Flux numbers its two double-stream blocks 0 and 1: the raw file gives block 2 block 1's weights
    # (the same shapes, so no error and no warning)
    raw = _loaded(lp.stock_model(lp.prune_layers(_flux(), removed)), state)
    assert not torch.equal(_out(raw, _flux_input()), reference)
    res = adapt_ip_adapter(lp.prune_layers(_flux(), removed), state)
    assert res.summary() == {"kept_processors": 2, "dropped_processors": 1, "renumbered_processors": 1}
    assert res.dropped == ["transformer_blocks.1.attn.processor"]
    path = write_ip_adapter(res, tmp_path / "ip.safetensors")
    stock = _loaded(lp.stock_model(lp.prune_layers(_flux(), removed)), _nested(read_ip_adapter(path)))
    assert torch.equal(_out(stock, _flux_input()), reference)
    assert all(res.state_dict[f"image_proj.{k}"] is v for k, v in state["image_proj"].items())


def test_stock_bk_sdm_unets_take_the_adapted_ip_adapter():
    state = _ip_adapter(_unet())
    for variant, kept, dropped in (("base", 10, 6), ("small", 9, 7)):
        removed = lp.bk_sdm_layers(_unet(), variant)
        reference = _reference(_unet, removed, state, _unet_input())
        with pytest.raises(ValueError, match="expected shape"):  # diffusers' loader on the stock U-Net
            _loaded(lp.stock_model(lp.prune_layers(_unet(), removed)), state)
        res = adapt_ip_adapter(lp.prune_layers(_unet(), removed), state)
        assert (res.summary()["kept_processors"], res.summary()["dropped_processors"]) == (kept, dropped)
        # the removed attention layers are exactly the dropped processors' owners
        assert {n.split(".transformer_blocks")[0] for n in res.dropped} == {n for n in removed if ".attentions." in n
                                                                            or n.startswith("mid_block.attentions")}
        stock = _loaded(lp.stock_model(lp.prune_layers(_unet(), removed)), _nested(res.state_dict))
        assert torch.equal(_out(stock, _unet_input()), reference)


def test_ip_adapter_pipeline_round_trip(tiny_sd_pipe, tmp_path):
    """pipe.load_ip_adapter with the original file on a pipeline pruned by a recipe, and a recipe applied to a
    pipeline with the IP-Adapter loaded: the same images, and the image prompt changes them."""
    import diffslim

    from diffslim.ip_adapter import IPAdapterAdaptation

    state = _ip_adapter(tiny_sd_pipe.unet)
    flat = {f"{part}.{k}": v for part in state for k, v in state[part].items()}
    write_ip_adapter(IPAdapterAdaptation(flat, []), tmp_path / "ip.safetensors")
    recipe = {"removed_layers": {"layers": ["down_blocks.0.attentions.0", "mid_block.attentions.0"]}}

    def ip_loaded(pipe):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
        return pipe

    loaded_then_pruned = ip_loaded(copy.deepcopy(tiny_sd_pipe))
    diffslim.apply(loaded_then_pruned, recipe)
    pruned_then_loaded = copy.deepcopy(tiny_sd_pipe)
    diffslim.apply(pruned_then_loaded, recipe)
    ip_loaded(pruned_then_loaded)
    embeds = [torch.randn(2, 1, EMBED, generator=torch.Generator().manual_seed(3))]  # negative, then positive

    def images(pipe, **kw):
        return pipe(prompt="a b", num_inference_steps=3, output_type="pt", height=16, width=16,
                    generator=torch.Generator().manual_seed(0), **kw).images

    a = images(loaded_then_pruned, ip_adapter_image_embeds=embeds)
    assert torch.equal(a, images(pruned_then_loaded, ip_adapter_image_embeds=embeds))
    loaded_then_pruned.set_ip_adapter_scale(0.0)  # diffusers' scale works on the pruned pipeline
    assert not torch.equal(a, images(loaded_then_pruned, ip_adapter_image_embeds=embeds))


def test_original_processor_names_and_refusals(tmp_path):
    pruned = lp.prune_layers(_unet(), lp.bk_sdm_layers(_unet(), "small"))
    assert original_processor_names(pruned) == list(_unet().attn_processors)
    assert len(pruned.attn_processors) < len(original_processor_names(pruned))
    state = _ip_adapter(_unet())
    with pytest.raises(UserError, match="has an IP-Adapter loaded"):
        lp.stock_model(_loaded(lp.prune_layers(_unet(), lp.bk_sdm_layers(_unet(), "small")), state))
    with pytest.raises(UserError, match="not an IP-Adapter"):
        adapt_ip_adapter(pruned, {"down_blocks.0.lora_A.weight": torch.zeros(1)})
    far = {"image_proj": state["image_proj"], "ip_adapter": {"99.to_k_ip.weight": torch.zeros(1)}}
    with pytest.raises(UserError, match="an IP-Adapter of another model"):
        adapt_ip_adapter(pruned, far)
    (tmp_path / "ip.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="pickles are refused"):
        read_ip_adapter(tmp_path / "ip.bin")
    with pytest.raises(UserError, match="in pairs"):  # a lone resnet removed: no stock U-Net describes it
        adapt_ip_adapter(lp.prune_layers(_unet(), ["down_blocks.0.resnets.0"]), state)


def test_distillation_refuses_a_model_with_an_ip_adapter_loaded(tiny_digits_pipe, tmp_path):
    from diffslim.train.distill import DistillConfig, distill

    teacher = copy.deepcopy(tiny_digits_pipe)
    student = lp.prune_layers(teacher.denoiser, ["up_blocks.3.resnets.1"])
    _loaded(student, _ip_adapter(teacher.denoiser))
    with pytest.raises(UserError, match="the student has an IP-Adapter loaded"):
        distill(teacher, student, None, DistillConfig(steps=1, batch_size=2, lr=1e-4, out=tmp_path / "kd"))


def test_cli_stock_writes_the_adapted_ip_adapter_beside_the_stock_model(tmp_path):
    from safetensors.torch import save_file

    from diffslim.cli import app

    removed = lp.bk_sdm_layers(_unet(), "small")
    lp.prune_layers(_unet(), removed).save_pretrained(tmp_path / "pruned")
    state = _ip_adapter(_unet())
    save_file({f"{part}.{k}": v.contiguous() for part in state for k, v in state[part].items()},
              str(tmp_path / "style.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "notes.safetensors"))
    runner = CliRunner()
    bad = runner.invoke(app, ["stock", str(tmp_path / "pruned"), "--out", str(tmp_path / "bad"),
                              "--ip-adapter", str(tmp_path / "notes.safetensors")])
    assert bad.exit_code == 2 and "not an IP-Adapter" in bad.output and not (tmp_path / "bad").exists()
    res = runner.invoke(app, ["stock", str(tmp_path / "pruned"), "--out", str(tmp_path / "stock"),
                              "--ip-adapter", str(tmp_path / "style.safetensors")])
    assert res.exit_code == 0, res.output
    assert "9 attention processors kept" in res.output and "7 dropped" in res.output
    stock = own_memory(UNet2DConditionModel.from_pretrained(tmp_path / "stock").eval())  # diffusers alone
    _loaded(stock, _nested(read_ip_adapter(tmp_path / "stock" / "ip_adapters" / "style.safetensors")))
    assert torch.equal(_out(stock, _unet_input()), _reference(_unet, removed, state, _unet_input()))


def test_sdxl_shaped_unet_pruned_inside_its_attention_layers_and_its_stock_export(sdxl_shaped_unet):
    """SDXL's deep attention layers hold several transformer blocks (self- and cross-attention alternate in each):
    pruning some of them (--inner) shifts the numbers inside a level, where every layer has one width."""
    unet = sdxl_shaped_unet
    names = ["down_blocks.1.attentions.0.transformer_blocks.0", "up_blocks.0.attentions.2.transformer_blocks.0",
             "up_blocks.0.attentions.2.transformer_blocks.2"]
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([400]),
                  encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                  added_cond_kwargs={"image_embeds": [torch.randn(1, 1, EMBED, generator=g)]})
    state = _ip_adapter(unet())
    reference = _reference(unet, names, state, inputs)
    assert torch.equal(_out(_loaded(lp.prune_layers(unet(), names), state), inputs), reference)
    # diffusers' own loader: no shape error inside a level, the weights one block off
    raw = lp.prune_layers(unet(), names)
    UNet2DConditionModel._load_ip_adapter_weights(raw, [copy.deepcopy(state)])
    assert not torch.equal(_out(raw, inputs), reference)
    res = adapt_ip_adapter(lp.prune_layers(unet(), names), state)
    stock = _loaded(lp.stock_model(lp.prune_layers(unet(), names)), _nested(res.state_dict))
    assert torch.equal(_out(stock, inputs), reference)


def test_faceid_lora_weights_follow_their_attention_layers():
    """IP-Adapter FaceID adds LoRA weights for every attention processor (``{i}.to_q_lora.down.weight``, i over all
    processors); on a pruned U-Net each kept processor gets its own."""
    full = _unet()
    names = list(full.attn_processors)
    state = {"image_proj": {}, "ip_adapter": {f"{i}.{p}_lora.{d}.weight": torch.full((1,), float(i))
                                              for i in range(len(names)) for p in ("to_q", "to_k", "to_v", "to_out")
                                              for d in ("down", "up")}}
    removed = lp.bk_sdm_layers(_unet(), "small")
    pruned = lp.prune_layers(_unet(), removed)
    loras = pruned._load_ip_adapter_loras([state])[0]
    kept = list(pruned.attn_processors)
    assert len(loras) == 8 * len(kept) < 8 * len(names)
    for name in kept:  # the unet.<processor>.to_k_lora.down.weight of every kept processor is its own original tensor
        assert loras[f"unet.{name}.to_k_lora.down.weight"].item() == names.index(name)


def test_sd3_pruned_and_stock_take_the_ip_adapter_renumbered():
    """SD3's IP-Adapter (InstantX's layout) has weights for every attention processor: the stock SD3 with a block
    removed fails on the missing number (KeyError), the pruned class and the adapted file load it right."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    def sd3():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()

    torch.manual_seed(5)
    proj = IPAdapterTimeImageProjection(embed_dim=EMBED, output_dim=16, hidden_dim=64, depth=4, dim_head=64, heads=1,
                                        num_queries=4, timestep_in_dim=32)
    ip = {}
    for i, _ in enumerate(sd3().attn_processors):
        proc = SD3IPAdapterJointAttnProcessor2_0(hidden_size=16, ip_hidden_states_dim=16, head_dim=8,
                                                 timesteps_emb_dim=64)
        ip.update({f"{i}.{k}": torch.randn_like(v) * 0.2 for k, v in proc.state_dict().items()})
    state = {"image_proj": dict(proj.state_dict()), "ip_adapter": ip}
    g = torch.Generator().manual_seed(1)
    plain = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                 encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                 pooled_projections=torch.randn(1, 16, generator=g))
    inputs = {**plain, "joint_attention_kwargs": {"ip_adapter_image_embeds": torch.randn(1, 1, EMBED, generator=g)}}

    def load(model, st):  # diffusers' default (low_cpu_mem_usage) leaves a meta tensor in SD3's image projection
        model._load_ip_adapter_weights(copy.deepcopy(st), low_cpu_mem_usage=False)
        return model

    removed = ["transformer_blocks.1"]
    full = load(sd3(), state)
    with lp.layers_removed(full, removed):
        reference = _out(full, inputs)
    assert torch.equal(_out(load(lp.prune_layers(sd3(), removed), state), inputs), reference)
    assert not torch.equal(_out(lp.prune_layers(sd3(), removed), plain), reference)
    with pytest.raises(KeyError):
        load(lp.stock_model(lp.prune_layers(sd3(), removed)), state)
    res = adapt_ip_adapter(lp.prune_layers(sd3(), removed), state)
    assert res.dropped == ["transformer_blocks.1.attn.processor"]
    stock = load(lp.stock_model(lp.prune_layers(sd3(), removed)), _nested(res.state_dict))
    assert torch.equal(_out(stock, inputs), reference)


def test_zoo_pipeline_samples_with_image_prompts_through_the_harness(tiny_digits_pipe):
    """The zoo's class pipeline takes ``image_embeds`` for a loaded IP-Adapter (the bench's IP-Adapter measurement
    uses it): per-sample inputs batch like the others, the unconditional half of CFG gets zero embeddings, and the
    image prompt changes the samples; a pruned pipeline with the original file equals the stand-in reference."""
    from diffslim.sample import SampleSpec, sample

    pipe = copy.deepcopy(tiny_digits_pipe)
    state = _ip_adapter(pipe.denoiser)
    _loaded(pipe.denoiser, state)
    g = torch.Generator().manual_seed(4)
    embeds = [torch.randn(EMBED, generator=g) for _ in range(3)]
    inputs = [{"class_label": y, "image_embeds": e} for y, e in zip((3, 1, 4), embeds)]
    together = sample(pipe, SampleSpec(inputs, [0, 1, 2], num_inference_steps=3, batch_size=3))
    alone = torch.cat([sample(pipe, SampleSpec([x], [i], num_inference_steps=3, batch_size=1))
                       for i, x in enumerate(inputs)])
    assert torch.allclose(together, alone, atol=1e-6)
    zero = [{**x, "image_embeds": torch.zeros(EMBED)} for x in inputs]
    assert not torch.allclose(sample(pipe, SampleSpec(zero, [0, 1, 2], num_inference_steps=3, batch_size=3)), together)
    removed = ["down_blocks.1.attentions.1", "up_blocks.2.attentions.0"]
    pruned = copy.deepcopy(tiny_digits_pipe)
    pruned.denoiser = _loaded(lp.prune_layers(pruned.denoiser, removed), state)
    spec = SampleSpec(inputs, [0, 1, 2], num_inference_steps=3, batch_size=3)
    with lp.layers_removed(pipe.denoiser, removed):
        reference = sample(pipe, spec)
    assert torch.equal(sample(pruned, spec), reference)
