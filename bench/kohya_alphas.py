"""Does diffusers give each module of a Kohya LoRA the scale its alpha asks for? (session 23)

Builds the tests' tiny random-weight SD pipeline and a random LoRA of its U-Net, writes it in Kohya's format with
per-module alphas 1..5 (cycled, so not all alike), loads the file with diffusers' ``load_lora_weights``, and compares
each wrapped module's scaling with the Kohya file's ``alpha / rank``. Until session 24 ``diffslim lora --original``
took the scales diffusers gives; it now takes the file's alphas (the last line counts the modules that get them).

    .venv/bin/python bench/kohya_alphas.py > bench/results/kohya_alphas.txt
"""
import copy, sys, warnings
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
import tempfile
from pathlib import Path

import torch
import conftest
out = Path(tempfile.mkdtemp()) / "kohya.safetensors"
fn = getattr(conftest.tiny_sd_pipe, "__wrapped__", None) or conftest.tiny_sd_pipe._get_wrapped_function()
pipe = fn()
from test_lora import _lora, UNET_TARGETS
from diffusers.utils import convert_state_dict_to_kohya
from safetensors.torch import save_file
kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in _lora(pipe.unet, UNET_TARGETS).items()})
alphas = sorted(k for k in kohya if k.endswith(".alpha"))
for i, k in enumerate(alphas):
    kohya[k] = torch.tensor(float(1 + i % 5))
save_file({k: v.contiguous() for k, v in kohya.items()}, str(out))
p = copy.deepcopy(pipe)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    p.load_lora_weights(str(out), adapter_name="k")
print("warnings:", [str(x.message)[:120] for x in w if "pattern" in str(x.message)])
# compare each wrapped module's scaling with the Kohya alpha / rank
bad = good = 0
for name, mod in p.unet.named_modules():
    if hasattr(mod, "scaling") and "k" in getattr(mod, "scaling", {}):
        kname = "lora_unet_" + name.replace(".", "_") + ".alpha"
        r = mod.r["k"]
        want = float(kohya[kname]) / r if kname in kohya else None
        got = mod.scaling["k"]
        if want is None or abs(got - want) > 1e-6:
            bad += 1
            print("differs:", name, "rank", r, "scaling", got, "Kohya alpha/rank", want)
        else:
            good += 1
            print("same:   ", name, "rank", r, "scaling", got)
print(f"{good} modules scaled as the Kohya file asks, {bad} not")

# diffslim lora --original (session 24): the alphas it writes for the adapted LoRA, taken from the file itself
from diffslim.lora import lora_via_pipeline
_, meta = lora_via_pipeline(copy.deepcopy(pipe), out)
base, pattern = meta["unet.lora_alpha"], meta["unet.alpha_pattern"]
right = sum(abs(pattern.get(f"^{m}", base) - float(kohya["lora_unet_" + m.replace(".", "_") + ".alpha"])) < 1e-6
            for m in meta["unet.target_modules"])
print(f"diffslim lora --original: {right} of {len(meta['unet.target_modules'])} modules with the Kohya file's alpha")
