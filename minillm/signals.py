"""SIGINT / SIGTERM for a whole command outside the training loop (`callbacks/interrupt.py` takes them inside it):
the first stops the command at once, and whatever the interrupted library code turns the KeyboardInterrupt into
(OmegaConf wraps it in a ValueError, Lightning exits 1, Hydra reports an error) the command exits 128 + N with one
line saying what happened, never a traceback or a "bad input" exit code. No torch or Lightning here: the command
line installs it before either loads."""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CommandSignals:
    """SIGINT/SIGTERM for a whole command, outside the training loop (which `InterruptCallback` takes over).

    with CommandSignals():
        main()
    The first signal raises KeyboardInterrupt where the program is; on the way out, any exception or exit that
    follows a signal is reported as the interruption (exit code 128 + N) instead of as what the interrupted code
    turned it into. After the block the command is done and the process is only shutting down (library
    finalizers, threads): a signal then ends it at once, without a traceback from whatever finalizer it hit.
    A SIGINT inherited as ignored (a job started with `nohup` or `&`) stays ignored.
    """

    training_started = False  # set by InterruptCallback: the message after an interrupt depends on it

    def __init__(self) -> None:
        self.received: int | None = None
        self._installed: list[int] = []

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            raise KeyboardInterrupt
        os.write(2, b"\nsecond signal: exiting now\n")  # the first one's unwinding hangs (a worker, a lock)
        os._exit(128 + signum)

    def __enter__(self) -> CommandSignals:
        CommandSignals.training_started = False
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handle)
                self._installed.append(sig)
        return self

    @staticmethod
    def _exit_now(signum: int, frame) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    def __exit__(self, kind, error, traceback) -> bool:
        for sig in self._installed:
            signal.signal(sig, self._exit_now)
        if self.received is None:
            return False  # no signal: exceptions and exit codes are the command's own
        if CommandSignals.training_started:
            what = "interrupted after training started; the checkpoints on disk are intact (rerun with resume=auto)"
        else:
            what = "interrupted before training started; no checkpoint was written"
        print(f"\n{signal.Signals(self.received).name}: {what}", file=sys.stderr)
        raise SystemExit(128 + self.received)
