"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPU: a short DiP-GO training on a random-weight
digits U-Net, data parallel over the batch; every process reports a checksum of its pruner scores and plan.

Then 3 steps again with a checkpoint folder, where process 1 alone sends itself SIGTERM during step 2: every process
reports where it stopped and the checksum after running it again to resume; the main process, the checkpoints the
stopped run left, and the checksum of an uninterrupted run."""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from diffslim.errors import Interrupted
from diffslim.methods.dipgo import DipgoConfig, train_dipgo
from diffslim.sample import shutdown_processes
from diffslim.train.zoo import build_pipeline

out = Path(sys.argv[1])
torch.manual_seed(0)
pipe = build_pipeline("digits-sd")
pipe.set_progress_bar_config(disable=True)


def config(iters, run=None):
    return DipgoConfig(ratio=0.5, num_inference_steps=3, iters=iters, batch_size=2, width=16, heads=2, progress=False,
                       checkpoint_every=10, out=None if run is None else str(out / run))


def digest(res):
    return hashlib.sha256(np.ascontiguousarray(res.scores).tobytes()
                          + np.ascontiguousarray(res.plan).tobytes()).hexdigest()


res = train_dipgo(pipe, config(2))
state = PartialState()
digests = gather_object([(state.process_index, digest(res))])

straight = digest(train_dipgo(pipe, config(3, "straight")))


def preempt(step, rec):
    if step == 2 and state.process_index == 1:
        os.kill(os.getpid(), signal.SIGTERM)


try:
    train_dipgo(pipe, config(3, "stopped"), callback=preempt)
    stop = None
except Interrupted as e:
    stop = {"step": e.step, "signum": e.signum}
stops = gather_object([(state.process_index, stop)])
left = sorted(p.name for p in (out / "stopped" / "checkpoints").iterdir())
resumed = gather_object([(state.process_index, digest(train_dipgo(pipe, config(3, "stopped"))))])
if state.is_main_process:
    (out / "dipgo_mp.json").write_text(json.dumps({"num_processes": state.num_processes, "digests": digests,
                                                   "steps": [r["step"] for r in res.log], "straight": straight,
                                                   "stops": stops, "left": left, "resumed": resumed}))
shutdown_processes()
