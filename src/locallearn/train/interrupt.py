"""Ctrl-C and SIGTERM (a batch system's notice) end a run at the current step with a checkpoint, not with lost
work: the handlers only note the signal; the trainer checks it after every step, saves, and raises
:class:`Interrupted` naming the command that continues the run (docs/configuration.md, "What a run writes").
A second signal while the checkpoint is written falls back to Python's default (an immediate KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving its state at ``step``; ``str()`` is the one line to print."""

    def __init__(self, how: str, run_dir: Path, epoch: int, step: int) -> None:
        self.how, self.run_dir, self.epoch, self.step = how, run_dir, epoch, step
        super().__init__(
            f"interrupted by {how} at epoch {epoch}, step {step}; checkpoint saved in {run_dir}; "
            f"continue with: locallearn train --resume {run_dir}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class StopSignals:
    """While active (in the main thread only, where Python delivers signals), SIGINT and SIGTERM set
    ``received`` to the signal's name instead of stopping the process; leaving restores the old handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: str | None = None
        self.previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second one: stop now
            self.restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            self.previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
