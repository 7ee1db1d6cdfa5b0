"""Training datasets for the distillation trainer: map-style datasets that yield dicts of tensors.

Every dataset is indexable (``ds[i]``) and deterministic: the same index gives the same sample. The
trainer picks indices as a function of (seed, step), so a resumed run sees exactly the same batches
without saving data-loader iterators. Images are float32 in [0, 1], channels first.

A sample that cannot be read (a corrupt or truncated file) is skipped: a warning is logged, the
dataset's ``skipped`` count grows, and the next index is returned in its place. A long run never
dies on one bad file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from diffslim.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ZooDigits(torch.utils.data.Dataset):
    """scikit-learn's digits (the zoo's class-conditional data).

    Sample: ``{"image": (1, size, size) float32 in [0, 1], "label": int in 0..9}``.
    ``split``: "all", "train" or "test" (see ``diffslim.zoo.data.digits``).
    """

    def __init__(self, split: str = "all", size: int = 8):
        from diffslim.zoo import data as zdata

        self.images, self.labels = zdata.digits(split, size=size)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


class ZooSRPatches(torch.utils.data.Dataset):
    """High-resolution patches of scikit-image's photos (the zoo's super-resolution data).

    Sample: ``{"image": (3, patch, patch) float32 in [0, 1]}`` (the HR target; the trainer makes the
    low-resolution input by box downscaling, as zoo training does). ``count`` crops, fixed by ``seed``.
    """

    def __init__(self, count: int, patch: int = 16, seed: int = 0):
        from diffslim.zoo import data as zdata

        self.patches = zdata.photo_patches(zdata.SR_TRAIN_PHOTOS, patch, count, seed=seed)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.patches[i]}


def load_image(path: Union[str, Path], size: Optional[int]) -> torch.Tensor:
    """Read an image file as RGB ``(3, size, size)`` float32 in [0, 1].

    The shorter side is resized to ``size`` (bicubic) and the centre cropped square; ``size=None``
    keeps the file's own ``(3, H, W)``. Raises ``OSError``/``ValueError`` for unreadable files.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        im = _to_rgb(ImageOps.exif_transpose(im))  # as viewers and diffusers' load_image show it
    if size is not None:
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        if nw * nh > 2 ** 24:  # an absurdly long image (1 x 60000 px: size x 60000 size at full size, 16 GB at 256
            # px): resize the kept square alone (within a grey level of the full resize on smooth images)
            box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
            im = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
        else:
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _to_rgb(im):
    """An opened image as 8-bit RGB. 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``) is scaled to 8 bits
    (PIL's own conversion clips it, so a 16-bit PNG came out almost white); the rest as PIL converts it (transparent
    pixels keep the colour they hold, as in diffusers' ``load_image``)."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":  # PIL opens 16-bit PNGs as I;16 or I, 0..65535
        arr = np.asarray(im, dtype=np.float64)
        peak = 1.0 if im.mode == "F" and arr.max(initial=0) <= 1 else 65535.0  # float images in [0, 1], or 16 bits
        im = Image.fromarray(np.clip(np.round(arr / peak * 255), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def read_text(path: Union[str, Path]) -> str:
    """A text file the user gave (prompts, class labels, JSONL): UTF-8, with or without the byte-order mark Windows
    tools write, or UTF-16 with its mark; else a :class:`UserError` naming the first byte that is not UTF-8."""
    import codecs

    raw = Path(path).read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as UTF-8") from None


_CP1252_WARNED: set = set()


def _read_caption(path: Path) -> str:
    """An image's ``.txt`` caption, read while training: one in another encoding than UTF-8 is read as Windows-1252
    (Latin-1's superset, what Windows editors write), with a warning once per file, rather than losing its image."""
    try:
        return read_text(path).strip()
    except UserError as e:
        if path not in _CP1252_WARNED:
            _CP1252_WARNED.add(path)
            logger.warning("%s; read as Windows-1252 meanwhile", e)
        return path.read_bytes().decode("cp1252", errors="replace").strip()


def _list_images(folder: Path) -> list[Path]:
    """The images in ``folder`` by name; hidden files (macOS's ``._x.png`` resource forks) are not images."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def check_image_folder(folder: Union[str, Path], option: str = "--data") -> Path:
    """Before any work: ``folder`` is a folder with images, or with ``input/`` and ``target/`` subfolders (image to
    image pairs); else a :class:`UserError` saying what it takes."""
    root = Path(folder)
    if not root.is_dir():
        what = "a file" if root.is_file() else "no such folder"
        raise UserError(f"{option} {str(folder)!r} is {what}; give 'zoo' or a folder of images (captions optional, "
                        "or input/ and target/ subfolders for image to image)")
    if not _list_images(root) and not ((root / "input").is_dir() and (root / "target").is_dir()):
        raise UserError(f"{option} {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no input/ and "
                        "target/ subfolders")
    return root


def _read_jsonl_captions(path: Path) -> dict[str, str]:
    """``{"file": NAME, "text": CAPTION}`` per line (``file_name`` accepted as in HF imagefolder)."""
    out = {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise TypeError(f"a JSON {type(rec).__name__}, not an object")
            name = rec.get("file", rec.get("file_name"))
            out[Path(name).name] = str(rec["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: expected {{\"file\": ..., \"text\": ...}} ({e})") from None
    return out


def _unreadable_errors() -> tuple:
    from PIL import Image

    # what PIL raises for corrupt, truncated, unsupported or absurdly large files
    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


_UNREADABLE = _unreadable_errors()


class _SkippingDataset(torch.utils.data.Dataset):
    """Index access that skips unreadable samples: tries ``i``, ``i+1``, ... and counts what it skipped."""

    def __init__(self):
        self._bad: set[int] = set()

    @property
    def skipped(self) -> int:
        """How many distinct samples were found unreadable so far."""
        return len(self._bad)

    def _read(self, i: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _describe(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:  # skipping wraps round to the start; an index past the end does not
            raise IndexError(f"sample {i} of {n}")
        i %= n
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            try:
                return self._read(j)
            except _UNREADABLE as e:
                self._bad.add(j)
                logger.warning("skipping unreadable sample %s: %s (%d skipped so far)", self._describe(j), e,
                               len(self._bad))
        where = getattr(self, "root", None)
        raise UserError(f"every sample of {type(self).__name__}{f' {where}' if where else ''} is unreadable ({n} files): "
                        "give images PIL can open (PNG, JPEG, ...)")


class ImageFolder(_SkippingDataset):
    """The images of a folder (png, jpg, jpeg, webp, bmp; not recursive), sorted by name.

    Sample: ``{"image": (3, size, size) float32 in [0, 1], "text": str}``; resized so the shorter side
    is ``size`` and centre-cropped (``size=None``: the file's own size). Captions: from ``captions``,
    a JSONL file of ``{"file": NAME, "text": CAPTION}``; else from ``captions.jsonl`` or
    ``metadata.jsonl`` in the folder; else from a ``.txt`` file with the image's stem; ``""`` when none.
    """

    def __init__(self, path: Union[str, Path], size: Optional[int], captions: Optional[Union[str, Path]] = None):
        super().__init__()
        self.root = Path(path)
        if not self.root.is_dir():
            raise UserError(f"{self.root} is not a folder of images")
        self.files = _list_images(self.root)
        if not self.files:
            raise UserError(f"{self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.size = size
        if captions is None:
            captions = next((self.root / n for n in ("captions.jsonl", "metadata.jsonl")
                             if (self.root / n).is_file()), None)
        self._captions = _read_jsonl_captions(Path(captions)) if captions is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, i: int) -> str:
        """The caption of image ``i`` (``""`` when it has none)."""
        f = self.files[i]
        if self._captions is not None:
            return self._captions.get(f.name, "")
        txt = f.with_suffix(".txt")
        return _read_caption(txt) if txt.is_file() else ""

    def _describe(self, i: int) -> str:
        return str(self.files[i])

    def _read(self, i: int) -> dict:
        return {"image": load_image(self.files[i], self.size), "text": self.caption(i)}


class LabelledFolder(ImageFolder):
    """A folder of images with an integer class label as each one's caption (``00000.png`` + ``00000.txt`` holding
    ``7``), for class-conditional pipelines: what ``distill --data LABELS.txt`` has the teacher sample.

    Sample: ``{"image": (channels, size, size) float32 in [0, 1], "label": int}`` (one channel: the grey level)."""

    def __init__(self, path: Union[str, Path], size: Optional[int], channels: int = 3,
                 classes: Optional[int] = None):
        super().__init__(path, size)
        self.channels = channels
        for i, f in enumerate(self.files):  # all of them now: a bad label would end a long run at its first batch
            label = self.caption(i)
            if not label.isdigit() or classes is not None and int(label) >= classes:
                raise UserError(f"{self.root}: {f.name}'s caption {label!r} is not a class label"
                                + (f" in 0..{classes - 1}, the classes of the model" if classes else " (an integer "
                                   ">= 0)") + "; a class-conditional pipeline trains on labelled images")

    def _read(self, i: int) -> dict:
        image = load_image(self.files[i], self.size)
        if self.channels == 1:
            image = image.mean(0, keepdim=True)
        return {"image": image, "label": int(self.caption(i))}


def _by_stem(files: list[Path]) -> dict[str, Path]:
    """Files by stem, for pairing; of two with one stem (``a.png`` and ``a.jpg``) the first by name, with a warning."""
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            logger.warning("%s: %s and %s share a name; %s is used", p.parent, out[p.stem].name, p.name,
                           out[p.stem].name)
            continue
        out[p.stem] = p
    return out


class ConditionPairs(_SkippingDataset):
    """Image-to-image pairs: ``folder/input/NAME`` (the condition) and ``folder/target/NAME`` (the output).

    Files are matched by stem (``a.png`` pairs with ``a.jpg``); unmatched files are ignored with a
    warning. Sample: ``{"image": (3, size, size) target, "cond": (3, cond_size, cond_size) input,
    "text": str}``, float32 in [0, 1]; a size of None keeps the file's own size. Captions as in
    ``ImageFolder``, for the target images (``.txt`` files in ``target/`` or a JSONL in ``folder``).
    """

    def __init__(self, folder: Union[str, Path], size: Optional[int] = None, cond_size: Optional[int] = None,
                 captions: Optional[Union[str, Path]] = None):
        super().__init__()
        self.root = Path(folder)
        inp, tgt = self.root / "input", self.root / "target"
        if not (inp.is_dir() and tgt.is_dir()):
            raise UserError(f"{self.root} needs input/ and target/ subfolders with matching file names")
        inputs, targets = _by_stem(_list_images(inp)), _by_stem(_list_images(tgt))
        common = sorted(set(inputs) & set(targets))
        lonely = sorted(set(inputs) ^ set(targets))
        if lonely:
            logger.warning("%s: %d files have no partner in input/ or target/ and are ignored (e.g. %s)",
                           self.root, len(lonely), lonely[0])
        if not common:
            raise UserError(f"{self.root}: no file name appears in both input/ and target/")
        self.pairs = [(inputs[s], targets[s]) for s in common]
        self.size, self.cond_size = size, cond_size
        if captions is None:
            captions = next((self.root / n for n in ("captions.jsonl", "metadata.jsonl")
                             if (self.root / n).is_file()), None)
        self._captions = _read_jsonl_captions(Path(captions)) if captions is not None else None

    def __len__(self) -> int:
        return len(self.pairs)

    def _describe(self, i: int) -> str:
        return f"{self.pairs[i][0]} / {self.pairs[i][1]}"

    def _read(self, i: int) -> dict:
        src, dst = self.pairs[i]
        if self._captions is not None:
            text = self._captions.get(dst.name, self._captions.get(src.name, ""))
        else:
            txt = dst.with_suffix(".txt")
            text = _read_caption(txt) if txt.is_file() else ""
        return {"image": load_image(dst, self.size), "cond": load_image(src, self.cond_size), "text": text}


def collate(samples: Sequence[dict]) -> dict:
    """Stack a list of samples: tensors -> ``(B, ...)``, ints -> ``(B,)`` int64, floats -> ``(B,)``, strings -> list."""
    out = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(v0, (int, np.integer)):
            out[key] = torch.tensor([int(v) for v in vals], dtype=torch.long)
        elif isinstance(v0, (float, np.floating)):
            out[key] = torch.tensor([float(v) for v in vals], dtype=torch.float32)
        else:
            out[key] = list(vals)
    return out


def pipeline_image_size(pipe) -> int:
    """The pixel size a pipeline's denoiser trains at: ``sample_size`` (x the VAE factor for latent models)."""
    den = next((getattr(pipe, n) for n in ("unet", "transformer", "denoiser") if getattr(pipe, n, None) is not None),
               None)
    if den is None:
        raise UserError(f"{type(pipe).__name__} has no unet, transformer or denoiser")
    size = getattr(den.config, "sample_size", None)
    if size is None:  # Flux's transformer has none: its pipeline's default (128 latents: 1024 px)
        latent = pipeline_default_latent_size(pipe)
        if latent is None:
            raise UserError(f"{type(den).__name__} has no sample_size and {type(pipe).__name__} no default_sample_size: "
                             "the training image size is unknown")
        size = latent
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        size *= _vae_factor(pipe, vae)
    return int(size)


# pipelines whose __call__ falls back to a fixed pixel size (``height = height or 1024``) that neither the pipeline
# (``default_sample_size``) nor its denoiser (``sample_size``) states
CALL_DEFAULT_PX = {"ZImagePipeline": 1024, "ZImageImg2ImgPipeline": 1024}


def pipeline_default_latent_size(pipe) -> Optional[int]:
    """The latent side a pipeline samples at when given no height or width, where its denoiser states no
    ``sample_size``: the pipeline's ``default_sample_size`` (Flux), else its call's fixed default in pixels
    (:data:`CALL_DEFAULT_PX`: Z-Image's 1024 px) over its VAE's factor; None if neither is known."""
    size = getattr(pipe, "default_sample_size", None)
    if size is not None:
        return int(size)
    px = next((v for c in type(pipe).__mro__ for k, v in CALL_DEFAULT_PX.items() if c.__name__ == k), None)
    vae = getattr(pipe, "vae", None)
    if px is None:
        return None
    return px // (_vae_factor(pipe, vae) if vae is not None else 1)


def _vae_factor(pipe, vae) -> int:
    """The pipeline's ``vae_scale_factor``, else the VAE's from its levels (Sana's AutoencoderDC has no
    ``block_out_channels``: its pipeline states the factor)."""
    factor = getattr(pipe, "vae_scale_factor", None)
    if factor is None:
        levels = getattr(vae.config, "block_out_channels", None)
        if levels is None:
            raise UserError(f"{type(pipe).__name__} states no vae_scale_factor and its {type(vae).__name__} no "
                            "block_out_channels: the pixel size of its latents is unknown")
        factor = 2 ** (len(levels) - 1)
    return int(factor)


def size_multiple(pipe) -> int:
    """The pixel sizes a pipeline's denoiser takes are multiples of this: the VAE factor times the latent
    size step (a transformer's patch, 2 for Flux's packed patches; 1 for a U-Net, which diffusers
    upsamples to the skip connection's size when a latent side does not halve evenly)."""
    den = next((getattr(pipe, n) for n in ("unet", "transformer", "denoiser") if getattr(pipe, n, None) is not None),
               None)
    vae = getattr(pipe, "vae", None)
    factor = _vae_factor(pipe, vae) if vae is not None else 1
    cfg = getattr(den, "config", None)
    if "Flux" in type(pipe).__name__ or type(pipe).__name__.startswith("Chroma"):  # 2x2 packed patches
        step = 2
    elif getattr(cfg, "down_block_types", None):
        step = 1
    else:
        step = int(getattr(cfg, "patch_size", None) or 1)
    return int(factor) * step


def make_dataset(spec: str, pipe, size: Optional[int] = None) -> torch.utils.data.Dataset:
    """The training data named by ``spec`` for ``pipe``; ``size``: the image size in pixels for an image
    folder (default the pipeline's own, :func:`pipeline_image_size`; a multiple of :func:`size_multiple`).

    ``"zoo"``: the zoo's own data for a zoo pipeline (``ZooClassPipeline`` -> ``ZooDigits`` at the
    denoiser's size; ``ZooSRPipeline`` -> ``ZooSRPatches`` of the denoiser's size). A folder with
    ``input/`` and ``target/`` -> ``ConditionPairs``; another folder -> ``ImageFolder``; both at the
    pipeline's image size (for SR the input is at that size divided by the upscale factor).
    Raises ``UserError`` (a ``ValueError``) with what to do otherwise.
    """
    from diffslim.zoo.pipelines import ZooClassPipeline, ZooSRPipeline

    is_class, is_sr = isinstance(pipe, ZooClassPipeline), isinstance(pipe, ZooSRPipeline)
    if spec == "zoo":
        if size is not None:
            raise UserError("a resolution applies to image folders; the zoo's data has its model's own size")
        if is_class:
            return ZooDigits("all", size=int(pipe.denoiser.config.sample_size))
        if is_sr:
            return ZooSRPatches(20000, patch=int(pipe.denoiser.config.sample_size), seed=0)
        raise UserError(f"data 'zoo' is only for zoo pipelines, not {type(pipe).__name__}; give a folder of images "
                         "(optionally with captions), or, to score layers without images, layer-prune --calibration "
                         "sampling --data prompts.txt")
    folder = Path(spec)
    if not folder.is_dir():
        hint = (" (prompts or pipeline inputs calibrate layer-prune with --calibration sampling)"
                if folder.suffix.lower() in (".txt", ".jsonl") else "")
        raise UserError(f"data {spec!r} is neither 'zoo' nor an existing folder of images{hint}")
    if is_class:  # images labelled by their captions (e.g. the teacher's own samples of class labels)
        den = pipe.denoiser
        return LabelledFolder(folder, size=size or int(den.config.sample_size),
                              channels=int(getattr(den.config, "out_channels", None) or den.config.in_channels),
                              classes=_num_classes(pipe))
    if size is None:
        size = pipeline_image_size(pipe)
    elif size < 1 or size % size_multiple(pipe):
        raise UserError(f"resolution {size}: {type(pipe).__name__} takes images whose sides are positive multiples "
                         f"of {size_multiple(pipe)} px")
    if type(pipe).__name__ == "DiTPipeline":  # class-conditional in latent space: RGB images labelled by captions
        return LabelledFolder(folder, size=size, channels=3, classes=_num_classes(pipe))
    if (folder / "input").is_dir() and (folder / "target").is_dir():
        cond_size = size // int(pipe.config.upscale) if is_sr else size
        return ConditionPairs(folder, size=size, cond_size=cond_size)
    return ImageFolder(folder, size)


class FolderInputs:
    """Pipeline inputs from an image folder (``ImageFolder``/``ConditionPairs``), read when a batch needs them."""

    def __init__(self, ds, with_prompt: bool, key: str = "image"):
        self.ds, self.with_prompt, self.key = ds, with_prompt, key  # key: the pipeline's (control_image: Flux's, SD3's)

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> dict:
        item = self.ds[i]
        out = {self.key: item.get("cond", item["image"])}
        if self.with_prompt:
            out["prompt"] = item.get("text", "")
        return out


def pipeline_input_size(pipe) -> int:
    """The pixel size of the images a pipeline takes as input: its output size (:func:`pipeline_image_size`), except
    for upscalers, whose inputs are smaller by their factor (the zoo's SR by its ``upscale``; diffusers' x4 upscaler
    concatenates the low-resolution image with its latents, so by the VAE factor)."""
    from diffslim.zoo.pipelines import ZooSRPipeline

    size = pipeline_image_size(pipe)
    if isinstance(pipe, ZooSRPipeline):
        return size // int(pipe.config.upscale)
    if getattr(pipe, "low_res_scheduler", None) is not None:
        return size // int(getattr(pipe, "vae_scale_factor", 4))
    return size


def _num_classes(pipe) -> Optional[int]:
    """The classes a class-conditional pipeline has (DiT's label embedding, the zoo's label encoder), else None."""
    den = getattr(pipe, "transformer", None) or getattr(pipe, "denoiser", None)
    classes = getattr(getattr(den, "config", None), "num_embeds_ada_norm", None)
    if not classes:  # the zoo's U-Net models: a label encoder whose last row is the null label
        classes = getattr(getattr(getattr(pipe, "cond_encoder", None), "config", None), "num_labels", None)
    return int(classes) if classes else None


# the pipeline arguments the sampling harness sets itself (diffslim.sample.run_pipeline), with what sets them
_SET_BY_DIFFSLIM = {"num_inference_steps": "--steps, or the recipe's", "timesteps": "the recipe's schedule",
                    "sigmas": "the scheduler", "generator": "--seed: input i samples with seed + i",
                    "latents": "the seeds", "output_type": "images come back as tensors",
                    "return_dict": "images come back as tensors", "num_images_per_prompt": "one sample per input"}


def _check_input_values(row: dict, where: str, pipe) -> None:
    """The types and ranges of the pipeline inputs every pipeline reads alike, checked before any sampling: a
    prompt that is not text, a strength outside (0, 1] or a class label that is not one of the model's classes
    otherwise ends in diffusers' traceback, or (a label of 1.7) samples another class without a word."""
    import math

    def number(key):
        v = row[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{where}: {key} must be a finite number, got {json.dumps(v)}")
        return v

    set_here = [k for k in _SET_BY_DIFFSLIM if k in row]
    if set_here:
        raise UserError(f"{where}: {set_here[0]} is set for every call by diffslim ({_SET_BY_DIFFSLIM[set_here[0]]}), "
                        "so this one would be ignored: remove it from the inputs")
    for key in ("prompt", "negative_prompt"):
        v = row.get(key)
        if v is not None and not (isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise UserError(f"{where}: {key} must be text (or a list of texts), got {json.dumps(v)}")
    if "strength" in row and not 0 < number("strength") <= 1:
        raise UserError(f"{where}: strength must lie in (0, 1] (the share of the schedule an image-to-image run "
                        f"makes), got {row['strength']}")
    for key in ("guidance_scale", "image_guidance_scale", "controlnet_conditioning_scale", "eta"):
        if key in row:
            number(key)
    if "class_label" in row:
        v, classes = row["class_label"], _num_classes(pipe)
        if isinstance(v, bool) or not isinstance(v, int) or classes and not 0 <= v < classes:
            raise UserError(f"{where}: class_label must be an integer" + (f" in 0..{classes - 1}, the classes "
                            f"{type(pipe).__name__} has" if classes else "") + f", got {json.dumps(v)}")


# pipelines whose input image is optional: Flux Kontext and Flux.2 edit an image (Flux.2: reference images), or
# without one generate from the prompt
IMAGE_OPTIONAL = ("FluxKontextPipeline", "Flux2Pipeline", "Flux2KleinPipeline")


def needs_image(pipe) -> bool:
    """Whether ``pipe`` samples from an input image it cannot do without (img2img, ControlNet, inpainting, ...): an
    ``image``, or a ``control_image`` (the Flux, SD3 and other transformer ControlNet pipelines take no ``image``)."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    return ("image" in params or "control_image" in params) and type(pipe).__name__ not in IMAGE_OPTIONAL


# pipeline inputs that are images, read from the paths a .jsonl file gives: the input image, an inpainting mask (one
# channel, white where the pipeline repaints) and the control image of ControlNet's image-to-image and inpainting
IMAGE_INPUTS = ("image", "mask_image", "control_image")


def _input_image(p: Path, k: int, name: str, size: int) -> torch.Tensor:
    """The image a .jsonl file's line ``k`` names (relative to the file), at ``size``."""
    try:
        return load_image(p.parent / name, size)
    except _UNREADABLE as e:
        raise UserError(f"{p}:{k}: image {name!r} cannot be read ({getattr(e, 'strerror', None) or e}); image paths "
                        f"are relative to {p.parent}") from None


def pipeline_inputs(pipe, data: str, seed: int, n: int = 64, option: str = "--data"):
    """Pipeline inputs to sample with, indexable (one dict of pipeline inputs per sample): what DiP-GO trains on
    and what calibration on the sampling trajectories (``layer-prune --calibration sampling``) samples.

    ``"zoo"``: the zoo task's own inputs (other seeds than evaluation's). A ``.txt`` file, one input per
    line: class labels (integers) for class-conditional pipelines, prompts for the others. A ``.jsonl``
    file: one JSON object of pipeline inputs per line (``{"prompt": ..., "image": PATH}``; an image path
    is relative to the file). A folder of images (``diffslim.train.data.ImageFolder``, captions as there;
    a folder with ``input/`` and ``target/`` gives its input images): ``image``, plus the caption as
    ``prompt`` when the pipeline takes one. Images are read at the size the pipeline takes
    (:func:`pipeline_input_size`). ``option``: the command-line option that gave ``data``, for the errors.
    """
    import inspect

    from diffslim.zoo.evalsets import pipeline_eval_set
    from diffslim.zoo.pipelines import ZooClassPipeline

    params = inspect.signature(pipe.__call__).parameters
    is_class = isinstance(pipe, ZooClassPipeline) or "class_labels" in params
    files = "a .txt file (class labels or prompts, one per line), a .jsonl file of pipeline inputs, or a folder of images"
    accepted = f"'zoo', {files}"
    if data == "zoo":
        es = pipeline_eval_set(pipe, n, seed=50_000 + seed)
        if es is None:
            raise UserError(f"{option} zoo needs a zoo pipeline, not {type(pipe).__name__}; give {files}")
        rng = np.random.default_rng(seed)
        inputs = list(es.inputs)
        if "class_label" in inputs[0]:
            inputs = [{"class_label": int(v)} for v in rng.integers(0, 10, size=n)]
        return inputs
    p = Path(data)
    size = pipeline_input_size(pipe)
    if p.is_dir():
        if is_class:
            raise UserError(f"{type(pipe).__name__} is class-conditional: give a .txt file of class labels")
        if "mask_image" in params:
            raise UserError(f"{type(pipe).__name__} repaints the masked region of an input image, and a folder gives "
                            "no masks: give a .jsonl file of pipeline inputs, e.g. {\"prompt\": \"a cat\", \"image\": "
                            "\"room.png\", \"mask_image\": \"mask.png\"} per line")
        both = (p / "input").is_dir() and (p / "target").is_dir()
        ds = ConditionPairs(p, size=size, cond_size=size) if both else ImageFolder(p, size)
        if "image" not in params and "control_image" not in params:
            raise UserError(f"{type(pipe).__name__} takes no image input; give a .txt file of prompts")
        return FolderInputs(ds, "prompt" in params, "image" if "image" in params else "control_image")
    if not p.is_file():
        raise UserError(f"{option} {data!r} does not exist; give {accepted}")
    if p.suffix.lower() == ".jsonl":
        rows = []
        for k, line in enumerate(read_text(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{k}: not JSON ({e.msg}); give one JSON object of pipeline inputs per line, "
                                "e.g. {\"prompt\": \"a cat\", \"image\": \"cat.png\"}") from None
            if not isinstance(row, dict):
                raise UserError(f"{p}:{k}: give an object of pipeline inputs, e.g. {{\"prompt\": \"a cat\"}}")
            _check_input_values(row, f"{p}:{k}", pipe)
            image = row.get("image")
            if "image" in params and needs_image(pipe) and image is None:  # else diffusers' traceback mid-run
                raise UserError(f"{p}:{k}: {type(pipe).__name__} samples from an input image: give \"image\": "
                                f"PATH (relative to {p.parent})" + (", not null" if "image" in row else ""))
            if "image" in row:
                many = isinstance(image, list) and image and all(isinstance(x, str) for x in image)
                if not (isinstance(image, str) or many):  # (a list: one per ControlNet of a multi-ControlNet)
                    raise UserError(f"{p}:{k}: image must be the path of an image file, relative to {p.parent} (or "
                                    f"a list of paths, one per ControlNet), got {json.dumps(image)}")
                row["image"] = [_input_image(p, k, x, size) for x in image] if many else _input_image(p, k, image, size)
            for key in IMAGE_INPUTS[1:]:  # an inpainting mask, a ControlNet image-to-image's control image
                if key in params and key not in row:
                    what = ("repaints the masked region of its input image: give \"mask_image\": PATH (white where "
                            "it repaints; " if key == "mask_image" else
                            "is steered by a control image: give \"control_image\": PATH (")
                    raise UserError(f"{p}:{k}: {type(pipe).__name__} {what}relative to {p.parent})")
                if key in row:
                    if not isinstance(row[key], str):
                        raise UserError(f"{p}:{k}: {key} must be the path of an image file, relative to {p.parent}, "
                                        f"got {json.dumps(row[key])}")
                    value = _input_image(p, k, row[key], size)
                    row[key] = value[:1] if key == "mask_image" else value  # a mask: one channel
            rows.append(row)
        if not rows:
            raise UserError(f"{p} holds no inputs")
        return rows
    lines = [ln.strip() for ln in read_text(p).splitlines() if ln.strip()]
    if not lines:
        raise UserError(f"{p} holds no inputs (one per line)")
    if is_class:
        try:
            labels = [int(x) for x in lines]
        except ValueError:
            raise UserError(f"{p}: every line must be an integer class label for {type(pipe).__name__}") from None
        classes = _num_classes(pipe)
        bad = [y for y in labels if classes and not 0 <= y < classes]
        if bad:
            raise UserError(f"{p}: class label {bad[0]} is outside 0..{classes - 1}, the classes "
                            f"{type(pipe).__name__} has")
        return [{"class_label": y} for y in labels]
    if "prompt" not in params:
        takes = ", ".join(k for k in params if k not in ("self", "kwargs"))
        raise UserError(f"{p}: {type(pipe).__name__} takes no prompt, and a text file gives only prompts (or class "
                        f"labels); give a .jsonl file of its pipeline inputs, one JSON object per line (it takes: "
                        f"{takes})")
    if needs_image(pipe):
        raise UserError(f"{p}: {type(pipe).__name__} samples from input images, and a text file gives only prompts; "
                        "give a .jsonl file of pipeline inputs, e.g. {\"prompt\": \"make it red\", \"image\": "
                        "\"cat.png\"} per line")
    return [{"prompt": x} for x in lines]
