"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPU: a short distillation of a depth-skipped
digits U-Net (normalized, feature weight matched to the plain sum); every process reports a checksum of its
trained student weights and its feature scale, the main process writes them."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from diffslim.methods.depth_skip import depth_skip
from diffslim.train.data import ZooDigits
from diffslim.train.distill import DistillConfig, distill
from diffslim.sample import shutdown_processes
from diffslim.train.zoo import build_pipeline

out = Path(sys.argv[1])
torch.manual_seed(0)
pipe = build_pipeline("digits-sd")
pipe.set_progress_bar_config(disable=True)
student = depth_skip(pipe.denoiser, 7)
result = distill(pipe, student, ZooDigits(), DistillConfig(
    steps=4, batch_size=4, lr=1e-3, out=out / "run", checkpoint_every=3, log_every=2, progress=False, warmup=0,
    match_plain_weight=True))

h = hashlib.sha256()
for name, tensor in sorted(student.state_dict().items()):
    h.update(name.encode())
    h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
state = PartialState()
digests = gather_object([(state.process_index, h.hexdigest())])
scales = gather_object([result.feat_scale])
if state.is_main_process:
    (out / "mp.json").write_text(json.dumps({
        "num_processes": state.num_processes, "digests": digests, "steps": result.steps, "feat_scales": scales,
        "final_losses": result.final_losses}))
shutdown_processes()
