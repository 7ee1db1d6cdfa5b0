"""Shared fixtures: tiny random-weight pipelines of each family, saved as real diffusers folders."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# under pytest-xdist (make test runs 2 workers) each worker takes one core; alone, the tests take up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIFFSLIM_CACHE", str(tmp_path_factory.mktemp("cache")))
    # nor does a test read the machine's Hugging Face cache (where a Hub id MODEL is looked up)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_hub")))


def _quiet():
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_digits_pipe():
    """A random-weight pipeline with zoo:digits-sd's architecture."""
    _quiet()
    from diffslim.train.zoo import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline("digits-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_digits_folder(tiny_digits_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits") / "pipe"
    tiny_digits_pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_pipe():
    """A tiny random-weight StableDiffusionPipeline (CLIP text encoder, VAE, U-Net) built offline."""
    _quiet()
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    tok = _tiny_tokenizer()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_controlnet_pipe(tiny_sd_pipe):
    """tiny_sd_pipe's parts with a ControlNet made from its U-Net, its output convolutions not zero (as training
    leaves them)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(tiny_sd_pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    for p in list(controlnet.controlnet_down_blocks.parameters()) + list(controlnet.controlnet_mid_block.parameters()):
        torch.nn.init.normal_(p, std=0.1)
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_sd_pipe.vae, text_encoder=tiny_sd_pipe.text_encoder, tokenizer=tiny_sd_pipe.tokenizer,
        unet=tiny_sd_pipe.unet, controlnet=controlnet, scheduler=tiny_sd_pipe.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_tokenizer():
    """A CLIP tokenizer with a tiny made-up vocabulary (no download)."""
    import json
    import tempfile

    from transformers import CLIPTokenizer

    d = tempfile.mkdtemp()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for t in letters + [l + "</w>" for l in letters]:
        vocab[t] = len(vocab)
    with open(f"{d}/vocab.json", "w") as f:
        json.dump(vocab, f)
    with open(f"{d}/merges.txt", "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", model_max_length=77)


@pytest.fixture(scope="session")
def sdxl_shaped_unet():
    """A builder of a tiny U-Net with SDXL's layout (attention layers of 1, 2 and 3 transformer blocks), the same
    random weights on every call."""
    from diffusers import UNet2DConditionModel

    def build():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3), cross_attention_dim=16, attention_head_dim=4,
            norm_num_groups=4).eval()

    return build


def _calls_alone(pipe, inputs, seeds, steps, call_kwargs=None):
    """Every denoiser call's (named arguments, output) when each input is sampled alone, by hooks."""
    import inspect

    from diffslim.models.load import denoiser_of
    from diffslim.sample import SampleSpec, run_pipeline

    den = denoiser_of(pipe)
    sig = inspect.signature(den.forward)
    runs = []
    for inp, seed in zip(inputs, seeds):
        calls = []
        pre = den.register_forward_pre_hook(lambda m, a, k: calls.append([dict(sig.bind(*a, **k).arguments)]),
                                            with_kwargs=True)
        post = den.register_forward_hook(lambda m, a, o: calls[-1].append(o[0] if isinstance(o, tuple) else o.sample))
        try:
            run_pipeline(pipe, SampleSpec([inp], [seed], num_inference_steps=steps, batch_size=1,
                                          call_kwargs=dict(call_kwargs or {})), [0])
        finally:
            pre.remove()
            post.remove()
        runs.append(calls)
    return runs


@pytest.fixture
def calls_alone():
    """``calls_alone(pipe, inputs, seeds, steps, call_kwargs=None)``: each input's denoiser calls when sampled alone (see
    :func:`_calls_alone`), to check what is recorded from a batched run against."""
    return _calls_alone


def own_memory(model):
    """``model`` with every weight in memory of its own. Weights read from safetensors are views at any byte offset,
    and on some CPUs (AMD EPYC, one thread) a convolution rounds differently on weights that are not 64-byte aligned
    (7e-7 here): what is compared is then the model, not where its weights happen to lie."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        t.data = t.data.clone()
    return model
