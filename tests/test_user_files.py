"""Files users supply (session 30's sweep): text in other encodings, image files of unusual kinds, labelled folders,
.jsonl inputs, LoRA headers, IP-Adapters of another model, hand-edited recipes. Each case failed on the code before
the fix: a traceback, a run that never ended, an image read wrongly without a word, or a setting ignored."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffslim.errors import UserError
from diffslim.train import data


def _png(path, size=(16, 16), colour=(90, 20, 200)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_text_files_with_a_byte_order_mark_or_in_utf16_read_as_their_text(tmp_path):
    """Notepad writes UTF-8 with a byte-order mark, other Windows tools UTF-16: the mark was kept inside the first
    prompt (or refused a labels file and every .jsonl)."""
    for raw in (b"\xef\xbb\xbfa cat\r\n4\r\n", "a cat\r\n4\r\n".encode("utf-16")):
        (tmp_path / "p.txt").write_bytes(raw)
        assert data.read_text(tmp_path / "p.txt").splitlines() == ["a cat", "4"]
    (tmp_path / "latin1.txt").write_bytes(b"a\ncaf\xe9 au lait\n")
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8"):
        data.read_text(tmp_path / "latin1.txt")


def test_prompts_and_labels_files_with_a_byte_order_mark(tiny_sd_pipe, tiny_digits_pipe, tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"\xef\xbb\xbfa cat\n")
    assert data.pipeline_inputs(tiny_sd_pipe, str(tmp_path / "prompts.txt"), 0) == [{"prompt": "a cat"}]
    (tmp_path / "labels.txt").write_bytes(b"\xef\xbb\xbf3\r\n4\r\n")
    assert data.pipeline_inputs(tiny_digits_pipe, str(tmp_path / "labels.txt"), 0) == [{"class_label": 3},
                                                                                       {"class_label": 4}]
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a cat"}\n')
    assert data.pipeline_inputs(tiny_sd_pipe, str(tmp_path / "in.jsonl"), 0) == [{"prompt": "a cat"}]
    # an upper-case extension is still a .jsonl (it was read as prompts: the JSON text became the prompt)
    (tmp_path / "IN.JSONL").write_text('{"prompt": "a cat", "negative_prompt": "blurry"}\n')
    assert data.pipeline_inputs(tiny_sd_pipe, str(tmp_path / "IN.JSONL"), 0) == [
        {"prompt": "a cat", "negative_prompt": "blurry"}]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="bad.txt: not UTF-8 text"):
        data.pipeline_inputs(tiny_sd_pipe, str(tmp_path / "bad.txt"), 0)


def test_captions_in_other_encodings_keep_their_image(tmp_path, caplog):
    """A readable image whose .txt caption was Latin-1 or UTF-16 was skipped as an unreadable sample; now UTF-16 is
    read, and a caption that is not UTF-8 is read as Windows-1252 with one warning."""
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_bytes(b"caf\xe9")
    (tmp_path / "1.txt").write_text("a dog", encoding="utf-16")
    (tmp_path / "2.txt").write_bytes(b"\xef\xbb\xbfa cat")
    ds = data.ImageFolder(tmp_path, 8)
    with caplog.at_level(logging.WARNING, logger="diffslim.train.data"):
        texts = [ds[i]["text"] for i in range(3)] + [ds[0]["text"]]
    assert texts == ["café", "a dog", "a cat", "café"] and ds.skipped == 0
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "0.txt: not UTF-8 text" in warned[0] and "Windows-1252" in warned[0]


@pytest.mark.parametrize("line, what", [('["a.png", "a cat"]', "list"), ('"a.png"', "str"), ("3", "int")])
def test_a_captions_jsonl_line_that_is_not_an_object(tmp_path, line, what):
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(line + "\n")
    with pytest.raises(UserError, match=rf'metadata.jsonl:1: expected {{"file": ..., "text": ...}} \(a JSON {what}, '
                                        r"not an object\)"):
        data.ImageFolder(tmp_path, 8)


def test_a_labelled_folder_refuses_labels_outside_the_classes_before_training(tiny_digits_pipe, tmp_path):
    """A caption 11 in a digits folder trained 12 steps, then ended in torch's IndexError; -1 was taken (and is
    the null label's row of the label encoder)."""
    for i in range(4):
        _png(tmp_path / f"{i}.png", (8, 8))
        (tmp_path / f"{i}.txt").write_text(str(i))
    assert len(data.make_dataset(str(tmp_path), tiny_digits_pipe)) == 4
    for bad in ("11", "-1", "3\u00e9"):
        (tmp_path / "2.txt").write_text(bad)
        with pytest.raises(UserError, match=rf"2.png's caption '{bad}' is not a class label in 0..9, the classes "
                                            "of the model"):
            data.make_dataset(str(tmp_path), tiny_digits_pipe)
    assert data._num_classes(tiny_digits_pipe) == 10


def test_folder_inputs_end_where_the_folder_does(tmp_path):
    """`dipgo --data FOLDER` listed the folder's inputs forever: indices past the end wrapped round."""
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    import itertools

    ds = data.ImageFolder(tmp_path, 8)
    inputs = data.FolderInputs(ds, with_prompt=True)
    assert len(list(itertools.islice(iter(inputs), 10))) == 3 and [x["prompt"] for x in inputs] == ["", "", ""]
    with pytest.raises(IndexError):
        ds[3]
    torch.testing.assert_close(ds[-1]["image"], ds[2]["image"])


def test_unusual_image_files_read_as_viewers_show_them(tmp_path):
    # 16-bit greyscale: scaled to 8 bits (PIL's own conversion clipped it: a ramp came out almost white)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "i16.png")
    got = data.load_image(tmp_path / "i16.png", None)
    assert got.shape == (3, 64, 64) and abs(float(got.mean()) - 0.5) < 0.01
    torch.testing.assert_close(got[0], torch.from_numpy(np.round(ramp / 65535 * 255) / 255).float())
    # EXIF orientation 6 (rotated 90 degrees): 64 x 32 stored, shown 32 wide and 64 high
    im = Image.new("RGB", (64, 32), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 32, 32))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "exif.jpg", exif=exif)
    got = data.load_image(tmp_path / "exif.jpg", None)
    assert got.shape == (3, 64, 32)
    assert float(got[2, :24].mean()) > 0.8 and float(got[0, -24:].mean()) > 0.8  # blue on top, red below
    # ordinary images read as before (resize, then the centre square)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        want = np.asarray(im.convert("RGB").resize((11, 8), Image.Resampling.BICUBIC).crop((1, 0, 9, 8)))
    torch.testing.assert_close(data.load_image(tmp_path / "x.png", 8), torch.from_numpy(want / 255).float().permute(
        2, 0, 1))


def test_an_absurdly_long_image_is_resized_without_its_full_size(tmp_path, monkeypatch):
    """A 321-byte PNG of 1 x 60000 px was resized to size x 60000 size before the crop (16.7 GB at 256 px); only
    the kept square is resized now, to the colour it has."""
    Image.new("RGB", (1, 60000), (10, 200, 30)).save(tmp_path / "tall.png")
    resize = Image.Image.resize

    def small(self, size, *args, **kwargs):
        assert size[0] * size[1] <= 256 * 256, f"resized to {size}"
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", small)
    got = data.load_image(tmp_path / "tall.png", 256)
    assert got.shape == (3, 256, 256)
    torch.testing.assert_close(got[:, 128, 128], torch.tensor([10, 200, 30]) / 255.0)


def test_hidden_files_and_name_twins_in_image_folders(tmp_path, caplog):
    _png(tmp_path / "a.png")
    _png(tmp_path / "._a.png")  # macOS's resource fork beside a copied image
    assert [p.name for p in data.ImageFolder(tmp_path, 8).files] == ["a.png"]
    for sub in ("input", "target"):
        (tmp_path / sub).mkdir()
        _png(tmp_path / sub / "a.png")
    _png(tmp_path / "input" / "a.jpg")
    with caplog.at_level(logging.WARNING, logger="diffslim.train.data"):
        pairs = data.ConditionPairs(tmp_path, 8, 8)
    assert [(i.name, t.name) for i, t in pairs.pairs] == [("a.jpg", "a.png")]
    assert any("a.jpg and a.png share a name; a.jpg is used" in r.getMessage() for r in caplog.records)


def test_jsonl_inputs_of_an_image_pipeline_need_an_image_path(tiny_sd_pipe, tmp_path):
    """A missing, null, numeric image ended in diffusers' traceback mid-run."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    _png(tmp_path / "x.png")
    cases = [({"prompt": "a"}, r'samples from an input image: give "image": PATH \(relative to .*\)$'),
             ({"prompt": "a", "image": None}, r'give "image": PATH \(relative to .*\), not null'),
             ({"prompt": "a", "image": 5}, r"image must be the path of an image file, relative to .*got 5"),
             ({"prompt": "a", "image": "gone.png"}, r"image 'gone.png' cannot be read")]
    for row, message in cases:
        (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(UserError, match=rf"in.jsonl:1: .*{message}"):
            data.pipeline_inputs(pipe, str(tmp_path / "in.jsonl"), 0)
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "a", "image": ["x.png", "x.png"]}) + "\n")
    row = data.pipeline_inputs(pipe, str(tmp_path / "in.jsonl"), 0)[0]
    side = data.pipeline_input_size(pipe)
    assert [tuple(x.shape) for x in row["image"]] == [(3, side, side)] * 2  # one per ControlNet of a multi-ControlNet


@pytest.mark.parametrize("key", ["num_inference_steps", "generator", "output_type", "num_images_per_prompt"])
def test_jsonl_inputs_may_not_set_what_the_harness_sets(tiny_sd_pipe, tmp_path, key):
    """A line asking for 2 steps sampled with --steps 3, without a word."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "a", key: 2}) + "\n")
    with pytest.raises(UserError, match=rf"in.jsonl:1: {key} is set for every call by diffslim .* remove it"):
        data.pipeline_inputs(tiny_sd_pipe, str(tmp_path / "in.jsonl"), 0)


def test_a_lora_whose_metadata_header_is_not_a_json_object(tmp_path):
    from safetensors.torch import save_file

    from diffslim.lora import read_lora

    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {f"{name}.lora_A.weight": torch.zeros(2, 32), f"{name}.lora_B.weight": torch.zeros(32, 2)}
    for meta in ("{not json", "[1, 2]"):
        save_file(sd, str(tmp_path / "l.safetensors"), metadata={"format": "pt", "lora_adapter_metadata": meta})
        with pytest.raises(UserError, match="its lora_adapter_metadata header is not a JSON object of LoRA configs"):
            read_lora(tmp_path / "l.safetensors")
    save_file(sd, str(tmp_path / "l.safetensors"), metadata={"format": "pt", "lora_adapter_metadata": '{"unet.r": 2}'})
    assert read_lora(tmp_path / "l.safetensors")[1] == {"unet.r": 2}


def test_an_ip_adapter_of_other_widths_or_for_self_attention_is_refused():
    """`diffslim stock --ip-adapter` wrote an IP-Adapter of another model; diffusers failed on it only at load."""
    from diffslim import adapt_ip_adapter
    from diffslim.methods.layer_prune import bk_sdm_layers, prune_layers
    from diffslim.train.zoo import build_pipeline

    unet = build_pipeline("digits-sd").denoiser  # SD's layout
    pruned = prune_layers(unet, bk_sdm_layers(unet, "small"))
    procs = list(unet.attn_processors)
    cross = [i for i, n in enumerate(procs) if "attn2" in n]

    def ip(shape, at):
        sd = {"image_proj.proj.weight": torch.zeros(64, 16), "image_proj.norm.weight": torch.ones(32)}
        for i in at:
            sd[f"ip_adapter.{i}.to_k_ip.weight"] = torch.zeros(shape)
            sd[f"ip_adapter.{i}.to_v_ip.weight"] = torch.zeros(shape)
        return sd

    width = tuple(unet.get_submodule(procs[cross[0]][: -len(".processor")]).to_k.weight.shape)
    fits = [i for i in cross if tuple(unet.get_submodule(procs[i][: -len(".processor")]).to_k.weight.shape) == width]
    assert adapt_ip_adapter(pruned, ip(width, fits)).kept
    with pytest.raises(UserError, match=r"to_k_ip weight for .*attn2.processor is \(48, 24\), the layer's to_k is "
                                        r".*: an IP-Adapter of another model"):
        adapt_ip_adapter(pruned, ip((48, 24), cross))
    with pytest.raises(UserError, match=r"to_k_ip weights for .*attn1.processor, a self-attention layer"):
        adapt_ip_adapter(pruned, ip(width, [cross[0] - 1]))


def test_a_recipe_whose_steps_differ_from_its_skip_plan(tiny_digits_pipe):
    """The recipe validated, and sampling blamed DDIM ("use a scheduler with one denoiser timestep per step")."""
    from diffslim.methods.skip_plan import check_scheduler
    from diffslim.recipe import RecipeError, parse_recipe

    plan = {"units": ["a", "b"], "plan": [[True, True], [True, False], [False, True], [True, True]]}
    assert parse_recipe({"sampling": {"num_inference_steps": 4}, "skip_plan": plan}).skip_plan is not None
    with pytest.raises(RecipeError, match="sampling gives 10 steps but skip_plan.plan has 4 rows, one per step"):
        parse_recipe({"sampling": {"num_inference_steps": 10}, "skip_plan": plan})
    with pytest.raises(RecipeError, match="sampling gives 3 steps but skip_plan.plan has 4 rows"):
        parse_recipe({"sampling": {"timesteps": [900, 500, 100]}, "skip_plan": plan})
    with pytest.raises(UserError, match="the skip plan has 4 steps .* but the run samples 10: sample with 4 steps"):
        check_scheduler(tiny_digits_pipe.scheduler, 10, 4)


def test_a_recipe_whose_model_is_not_there_says_where_it_looked(tmp_path, monkeypatch):
    """A workflow's recipe moved without its stages/ said only `no such file or folder: stages/...`."""
    from typer.testing import CliRunner

    from diffslim.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wf").mkdir()
    (tmp_path / "wf" / "recipe.json").write_text(json.dumps({"schema_version": 1, "model": "stages/1/pipeline",
                                                             "sampling": {"num_inference_steps": 3}}))
    res = CliRunner().invoke(app, ["sample", "--recipe", "wf/recipe.json", "--n", "1", "--out", "s"])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert ("wf/recipe.json names the model stages/1/pipeline, which is not there (nor beside the recipe, at "
            "wf/stages/1/pipeline): move or copy the recipe with its folder") in " ".join(res.output.split())


def test_a_multi_controlnet_samples_one_image_per_controlnet_from_a_jsonl(tiny_controlnet_pipe, tmp_path):
    """A .jsonl line's list of image paths is one image per ControlNet (it was passed on as path strings): diffusers
    takes the batch's lists and regroups them per ControlNet; each sample equals the one sampled alone."""
    from diffusers import StableDiffusionControlNetPipeline

    from diffslim.sample import SampleSpec, sample

    import copy

    torch.manual_seed(0)
    cn, other = copy.deepcopy(tiny_controlnet_pipe.controlnet), copy.deepcopy(tiny_controlnet_pipe.controlnet)
    with torch.no_grad():  # the images reach the residuals (a new ControlNet's conditioning output is zero), and
        for net in (cn, other):  # the second ControlNet is one of its own, so that which image reaches which shows
            torch.nn.init.normal_(net.controlnet_cond_embedding.conv_out.weight, std=0.3)
        for p in other.controlnet_down_blocks.parameters():
            p.mul_(-2.0)
    multi = StableDiffusionControlNetPipeline(**{**tiny_controlnet_pipe.components, "controlnet": [cn, other]})
    multi.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"im{k}.png")
    pairs = [("im0.png", "im1.png"), ("im1.png", "im0.png"), ("im2.png", "im0.png")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": "a", "image": list(p)}) + "\n" for p in pairs))
    rows = data.pipeline_inputs(multi, str(tmp_path / "in.jsonl"), 0)
    batch = sample(multi, SampleSpec(rows, [0, 0, 0], num_inference_steps=2, batch_size=3))
    for i in range(3):
        alone = sample(multi, SampleSpec(rows[i:i + 1], [0], num_inference_steps=2, batch_size=1))
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-4, rtol=0)
    assert float((batch[0] - batch[1]).abs().max()) > 1e-3  # the images reach their own ControlNet
