"""Stopping a long run cleanly on a signal, so that no work is lost.

Inside ``with StopOnSignal() as stop:`` the first SIGINT (Ctrl-C, a notebook's interrupt) or SIGTERM (what job
schedulers such as Slurm or Kubernetes send before they preempt a job) only sets a flag: the training loop ends the
step it is in, writes a checkpoint at that step and raises :class:`~diffslim.errors.Interrupted`; running the same
command again resumes from it exactly. Under ``accelerate launch`` every process asks ``stop.requested(acc)`` after
each step, which reduces the flags across processes, so all of them stop after the same step even when only one was
signalled (a preemption notice reaches one machine first).

Launchers forward the signal they receive to their workers, so a worker in a terminal's process group sees a Ctrl-C
twice within a moment: repeats within ``REPEAT_GRACE_S`` of the first are the same request. A Ctrl-C after that
aborts at once without a checkpoint (Python's KeyboardInterrupt), for when a step takes too long to wait for;
further SIGTERMs are ignored (the stop is under way). Outside the main thread, where Python cannot install signal
handlers, the context does nothing and signals keep their usual effect.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

REPEAT_GRACE_S = 2.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step (see the module's docstring)."""

    def __init__(self, what: str = "training", enabled: bool = True):
        """``enabled=False``: install nothing (a run with no folder to checkpoint into keeps the usual signals)."""
        self.what, self.enabled = what, enabled
        self.signum: int | None = None
        self._first = 0.0
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._saved[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h)
        self._saved = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            again = "; press Ctrl-C again to abort without one" if signum == signal.SIGINT else ""
            if os.environ.get("RANK", "0").strip() not in ("0", ""):  # a launch's other processes: said once
                return
            sys.stderr.write(f"\n{signal.Signals(signum).name}: {self.what} stops after this step and writes a "
                             f"checkpoint{again}\n")
            sys.stderr.flush()
        elif signum == signal.SIGINT and now - self._first > REPEAT_GRACE_S:
            self._restore()
            raise KeyboardInterrupt

    def requested(self, accelerator=None) -> bool:
        """Whether this run should stop now: this process was signalled, or (with ``accelerator`` over several
        processes) any process of the run was. Every process must call it after the same steps."""
        local = self.signum is not None
        if accelerator is None or accelerator.num_processes == 1:
            return local
        if local:
            accelerator.set_trigger()
        return bool(accelerator.check_trigger())


def say(accelerator, message: str) -> None:
    """A long run's message to the user (a resume, a setting it changed), once, on the main process, on stderr:
    stdout stays for results (``bench --json`` prints its JSON there)."""
    if accelerator is None or accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)
