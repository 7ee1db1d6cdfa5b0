"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPU: a short distillation of a depth-skipped
digits U-Net (normalized, feature weight matched to the plain sum); every process reports a checksum of its
trained student weights and its feature scale, the main process writes them.

Then the same run again, where process 1 alone sends itself SIGTERM during step 2 (a preemption notice reaching one
machine): every process reports where it stopped, and the checksum after running it again to resume."""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from diffslim.errors import Interrupted
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

def config(run):
    return DistillConfig(steps=4, batch_size=4, lr=1e-3, out=out / run, checkpoint_every=3, log_every=2,
                         progress=False, warmup=0, match_plain_weight=True)


def digest(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


result = distill(pipe, student, ZooDigits(), config("run"))
state = PartialState()
digests = gather_object([(state.process_index, digest(student))])

stopped_student = depth_skip(pipe.denoiser, 7)
calls = []


def preempt(module, args, output):  # the student's second training forward on process 1: inside step 2
    if torch.is_grad_enabled():
        calls.append(1)
        if len(calls) == 2 and state.process_index == 1:
            os.kill(os.getpid(), signal.SIGTERM)


handle = stopped_student.register_forward_hook(preempt)
try:
    distill(pipe, stopped_student, ZooDigits(), config("stopped"))
    stop = None
except Interrupted as e:
    stop = {"step": e.step, "signum": e.signum, "checkpoint": str(e.checkpoint)}
handle.remove()
stops = gather_object([(state.process_index, stop)])
# what the stopped run left, before the resumed run replaces its checkpoints
left = sorted(str(p.relative_to(out)) for p in (out / "stopped" / "checkpoints").rglob("*") if p.is_file())
resumed_student = depth_skip(pipe.denoiser, 7)  # a fresh process builds the student again
distill(pipe, resumed_student, ZooDigits(), config("stopped"))
resumed = gather_object([(state.process_index, digest(resumed_student))])
scales = gather_object([result.feat_scale])
if state.is_main_process:
    (out / "mp.json").write_text(json.dumps({
        "num_processes": state.num_processes, "digests": digests, "steps": result.steps, "feat_scales": scales,
        "final_losses": result.final_losses, "stops": stops, "left": left, "resumed": resumed}))
shutdown_processes()
