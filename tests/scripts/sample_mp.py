"""Run under `accelerate launch --num_processes 2 --cpu`: each process samples half, all get every output."""

import sys

import torch
from accelerate import PartialState

from diffslim.sample import SampleSpec, sample, shutdown_processes
from diffslim.train.zoo import build_pipeline

torch.manual_seed(0)
pipe = build_pipeline("digits-sd")
pipe.set_progress_bar_config(disable=True)
spec = SampleSpec([{"class_label": i % 10} for i in range(5)], list(range(5)), num_inference_steps=3, batch_size=2)
out = sample(pipe, spec)
state = PartialState()
if state.is_main_process:
    from safetensors.torch import save_file

    save_file({"images": out.contiguous(), "num_processes": torch.tensor(state.num_processes)}, sys.argv[1])
shutdown_processes()
