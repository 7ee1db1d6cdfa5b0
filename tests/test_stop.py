"""Stopping long runs on a signal: the step ends, a checkpoint is written, and running again resumes exactly.

The distillation trainer's and DiP-GO's cases are in test_distill.py (one process, and two processes where only one
is signalled) and test_dipgo.py; here the signal handling itself, the zoo trainer, and the CLI's exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from diffslim.errors import Interrupted
from diffslim.train import stop as stop_mod
from diffslim.train.stop import StopOnSignal


def _trip(*_):
    raise AssertionError("the signal reached the handler the test installed")


@pytest.fixture
def tripwires():
    """SIGINT and SIGTERM handlers that fail the test if a signal reaches them; restored afterwards."""
    saved = {s: signal.signal(s, _trip) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_first_signal_requests_a_stop_and_repeats_within_the_grace_are_the_same_request(tripwires, capsys):
    with StopOnSignal("distill") as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # a launcher forwarding the Ctrl-C it got too
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is _trip and signal.getsignal(signal.SIGTERM) is _trip
    err = capsys.readouterr().err
    assert err.count("SIGINT: distill stops after this step and writes a checkpoint") == 1
    assert "press Ctrl-C again to abort" in err


def test_under_a_launch_the_notice_comes_from_the_first_process_only(tripwires, capsys, monkeypatch):
    """Each process of `accelerate launch` gets the Ctrl-C; the notice was printed once per process."""
    monkeypatch.setenv("RANK", "1")
    with StopOnSignal("finetune") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.signum == signal.SIGINT  # it stops all the same
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with StopOnSignal("finetune") as stop:
        os.kill(os.getpid(), signal.SIGINT)
    assert capsys.readouterr().err.count("SIGINT: finetune stops after this step") == 1


def test_a_later_ctrl_c_aborts_without_waiting_and_sigterm_repeats_are_ignored(tripwires, monkeypatch):
    monkeypatch.setattr(stop_mod, "REPEAT_GRACE_S", 0.0)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # the stop is under way
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises at the next bytecode, well before this ends
        assert signal.getsignal(signal.SIGINT) is _trip  # the abort gave the process its handlers back
    assert signal.getsignal(signal.SIGTERM) is _trip


def test_outside_the_main_thread_or_disabled_nothing_is_installed(tripwires):
    seen = []

    def worker():
        with StopOnSignal():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    with StopOnSignal(enabled=False) as stop:
        seen.append(signal.getsignal(signal.SIGINT))
        assert not stop.requested()
    assert seen == [_trip, _trip]


def test_zoo_training_stops_with_a_checkpoint_and_resumes_exactly(tripwires, tmp_path, monkeypatch):
    """SIGTERM during step 2 of 4 of zoo-train (checkpoints every 100): checkpoint and exported pipeline at
    step 2; running again gives the uninterrupted run's weights and EMA, to the bit."""
    from diffslim.train import zoo as ztrain

    def run(out):
        # log_every=3: the row at step 3 averages steps 1-3, across the stop after step 2
        ztrain.train("digits-sd", out, steps=4, batch_size=2, lr=1e-3, checkpoint_every=100, log_every=3)

    run(tmp_path / "a")
    loss, calls = ztrain._loss, []

    def preempted_loss(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args)

    monkeypatch.setattr(ztrain, "_loss", preempted_loss)
    with pytest.raises(Interrupted) as e:
        run(tmp_path / "b")
    assert signal.getsignal(signal.SIGTERM) is _trip
    assert (e.value.step, e.value.total, e.value.exit_code) == (2, 4, 143)
    assert "zoo-train digits-sd stopped by SIGTERM after step 2 of 4" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_2"]
    assert (tmp_path / "b" / "pipeline" / "model_index.json").is_file()
    monkeypatch.setattr(ztrain, "_loss", loss)
    run(tmp_path / "b")
    for name in ("model.safetensors",):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "step_4" / name)) for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = (torch.load(tmp_path / r / "checkpoints" / "step_4" / "custom_checkpoint_0.pkl",
                               weights_only=True) for r in "ab")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    rows = [(tmp_path / r / "train_log.csv").read_text().splitlines() for r in "ab"]
    assert [x.split(",")[:2] for x in rows[0]] == [x.split(",")[:2] for x in rows[1]]  # step and loss, not time
    assert [x.split(",")[0] for x in rows[1]] == ["step", "3"]

    # a checkpoint cut short (killed while saving) is passed over: the run resumes from the complete one before it
    cut = tmp_path / "b" / "checkpoints" / "step_5"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"")
    ztrain.train("digits-sd", tmp_path / "b", steps=6, batch_size=2, lr=1e-3, checkpoint_every=100, log_every=1)
    assert not cut.exists()  # removed once a later checkpoint is complete
    assert json.loads((tmp_path / "b" / "checkpoints" / "step_6" / "complete.json").read_text())["step"] == 6
    assert ztrain._checkpoints(tmp_path / "b" / "checkpoints")[-2:] == [tmp_path / "b" / "checkpoints" / "step_4",
                                                                       tmp_path / "b" / "checkpoints" / "step_6"]


def test_cli_ctrl_c_exits_130_with_one_line_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "diffslim.cli", "zoo-train", "digits-sd", "--out", str(out), "--steps", "100000",
           "--batch-size", "2", "--checkpoint-every", "100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "digits-sd" / "train_log.csv"
    deadline = time.monotonic() + 120
    while not log.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the log is opened a few lines before the training loop takes over the signals
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = [x for x in stderr.splitlines() if x.startswith("stopped:")]
    assert len(lines) == 1 and "zoo-train digits-sd stopped by SIGINT after step" in lines[0], stderr[-2000:]
    step = int(lines[0].split("after step ")[1].split()[0])
    ckpts = out / "digits-sd" / "checkpoints"
    assert 1 <= step < 100000 and [p.name for p in ckpts.iterdir()] == [f"step_{step}"]

    r = subprocess.run(cmd[:8] + [str(step + 2)] + cmd[9:], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # on stderr: stdout is for results (bench --json's JSON after a resumed cached training stayed JSON)
    assert f"resumed from {ckpts / f'step_{step}'} at step {step}" in r.stderr and "resumed from" not in r.stdout
    assert {p.name for p in ckpts.iterdir()} == {f"step_{step}", f"step_{step + 2}"}


def test_ctrl_c_in_a_command_without_checkpoints_is_one_line_and_exit_130(monkeypatch, tmp_path):
    """A KeyboardInterrupt in the middle of a command's work (here the layer scoring's calibration) ends it with
    one line and the shell's exit code for SIGINT, not a traceback."""
    from typer.testing import CliRunner

    from diffslim.cli import app
    from diffslim.methods import layer_prune as lp

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lp, "calibration", interrupted)
    r = CliRunner().invoke(app, ["layer-prune", "zoo:digits-sd", "--ratio", "0.3", "--out", str(tmp_path / "o")])
    assert r.exit_code == 130 and "interrupted (Ctrl-C)" in r.output and "Traceback" not in r.output, r.output
