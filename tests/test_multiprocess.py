"""Sampling under `accelerate launch` with two CPU processes equals sampling in one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffslim.sample import SampleSpec, sample
from diffslim.train.zoo import build_pipeline


@pytest.mark.xdist_group("accelerate-launch")  # one at a time: they share accelerate's port
def test_two_processes_agree_with_one(tmp_path):
    script = Path(__file__).parent / "scripts" / "sample_mp.py"
    out_file = tmp_path / "mp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", str(script), str(out_file)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(out_file))
    assert int(got["num_processes"]) == 2

    torch.manual_seed(0)
    pipe = build_pipeline("digits-sd")
    pipe.set_progress_bar_config(disable=True)
    spec = SampleSpec([{"class_label": i % 10} for i in range(5)], list(range(5)), num_inference_steps=3, batch_size=2)
    want = sample(pipe, spec)
    torch.testing.assert_close(got["images"], want, atol=1e-5, rtol=0)
