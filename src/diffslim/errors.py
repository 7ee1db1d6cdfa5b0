"""The error a person caused: caught at the CLI boundary and shown as one line, exit code 2."""


class UserError(ValueError):
    """A mistake in what the user gave (a path, a recipe, an option); the message says what to do."""


class Interrupted(Exception):
    """A long run stopped on a signal (Ctrl-C, a scheduler's SIGTERM) after writing a checkpoint.

    ``signum`` is the signal this process received (None on a process that stopped because another one of the
    run was signalled), ``step`` the last completed step, ``checkpoint`` the checkpoint that resumes it. The CLI
    shows the message as one line and exits with 128 + the signal's number, as a shell does for a killed command.
    """

    def __init__(self, what: str, signum, step: int, total: int, checkpoint):
        import signal as _signal

        self.signum, self.step, self.total, self.checkpoint = signum, step, total, checkpoint
        by = _signal.Signals(signum).name if signum is not None else "a signal to another process of the run"
        super().__init__(f"{what} stopped by {by} after step {step} of {total}; checkpoint {checkpoint}: "
                         f"run the same command again to resume")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum if self.signum is not None else 2)
