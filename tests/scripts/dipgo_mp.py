"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPU: a short DiP-GO training on a random-weight
digits U-Net, data parallel over the batch; every process reports a checksum of its pruner scores and plan."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from diffslim.methods.dipgo import DipgoConfig, train_dipgo
from diffslim.sample import shutdown_processes
from diffslim.train.zoo import build_pipeline

out = Path(sys.argv[1])
torch.manual_seed(0)
pipe = build_pipeline("digits-sd")
pipe.set_progress_bar_config(disable=True)
res = train_dipgo(pipe, DipgoConfig(ratio=0.5, num_inference_steps=3, iters=2, batch_size=2, width=16, heads=2,
                                    progress=False))
h = hashlib.sha256(np.ascontiguousarray(res.scores).tobytes() + np.ascontiguousarray(res.plan).tobytes())
state = PartialState()
digests = gather_object([(state.process_index, h.hexdigest())])
if state.is_main_process:
    (out / "dipgo_mp.json").write_text(json.dumps({"num_processes": state.num_processes, "digests": digests,
                                                   "steps": [r["step"] for r in res.log]}))
shutdown_processes()
