"""Experiment tracking in Weights & Biases: rank 0 reports a training when the user gave a key.

Without a key nothing is imported or contacted (`Tracker` does nothing). With one, the run
gets the inputs (never the key), the training loss, learning rate and tokens/s of every step,
the validation loss and answer of every epoch, the epoch decisions, the loss curve, and an
end: finished, failed or canceled. The key goes to wandb in its settings, not through the
environment or a login (which would write it to ~/.netrc); to a data-parallel rank 0 it goes
in a file readable by the user alone, outside the job folder, deleted once read. Reporting
never fails a training: an error of wandb's is logged (the key masked) and reporting stops,
and closing a run waits a bounded time.
"""

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from src.errors import UserInputError
from src.log import log

KEY_FILE_VARIABLE = "TRAIN_WANDB_KEY_FILE"  # where the launcher left the key for rank 0
DEFAULT_PROJECT = "llama-2-chat-fine-tuning"
FINISH_TIMEOUT_S = {"finished": 60.0, "failed": 5.0, "canceled": 5.0}  # within the grace
_cancel_marker: Path | None = None  # a worker's: the launcher writes it before stopping it


def watch_for_cancel(marker: Path) -> None:
    """In a data-parallel worker: the run was canceled if `marker` exists when it fails
    (whether SIGTERM or a collective whose peer has gone ends it first)."""
    global _cancel_marker
    _cancel_marker = marker


class Tracker:
    """Reports nothing: the tracker of a run without a key, and of every rank but 0."""

    def log_step(self, step: int, values: dict[str, float]) -> None:
        pass

    def log_epoch(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        pass

    def note(self, values: dict[str, Any]) -> None:
        """Facts for the run's summary (the best epoch, where it stopped)."""

    def finish(self, loss_curve: Path | None = None) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, key: str, project: str | None, name: str | None, inputs: dict) -> None:
        import wandb  # only with a key

        self.wandb = wandb
        self.key = key
        self.run = wandb.init(
            project=project or DEFAULT_PROJECT,
            name=name,
            config=inputs,
            reinit="finish_previous",
            settings=wandb.Settings(api_key=key, console="off", silent=True),
        )
        where = self.run.url or f"offline, in {self.run.dir}"
        log(f"Weights & Biases: run {self.run.name!r} ({where})")

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_epoch(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        entries: dict[str, Any] = {"epoch": epoch}
        if "loss" in values:
            entries["validation/loss"] = values["loss"]
        if "answer" in values:
            # A string, not a wandb.Table: each Table leaves a temporary folder behind for
            # the life of the process (a long-running train server's TMPDIR would fill).
            entries["validation/answer"] = values["answer"]
        self.run.log(entries, step=step)

    def note(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, loss_curve: Path | None = None) -> None:
        if loss_curve is not None:
            self.run.log({"loss_curve": self.wandb.Image(str(loss_curve))})
        self._close("finished", None)

    def fail(self, error: BaseException) -> None:
        canceled = not isinstance(error, Exception)  # Cog's cancel, SIGTERM, Ctrl-C
        canceled |= _cancel_marker is not None and _cancel_marker.exists()
        self._close("canceled" if canceled else "failed", error)

    def _close(self, status: str, error: BaseException | None) -> None:
        """Record how the run ended and close it, waiting at most FINISH_TIMEOUT_S."""
        self.run.summary["status"] = status
        if error is not None:
            self.run.summary["error"] = self.redact(f"{type(error).__name__}: {error}")[:1000]
        closing = threading.Thread(
            target=self.run.finish, kwargs={"exit_code": 0 if error is None else 1}, daemon=True
        )
        closing.start()
        closing.join(FINISH_TIMEOUT_S[status])
        if closing.is_alive():
            log(f"Weights & Biases: the run did not close within {FINISH_TIMEOUT_S[status]:.0f} s")
        os.environ.pop("WANDB_SERVICE", None)  # not for the next training in this process

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text


class _Guarded(Tracker):
    """A tracker whose failures are logged, never raised: reporting must not fail a
    training. After its first error it reports nothing more."""

    def __init__(self, tracker: WandbTracker) -> None:
        self.tracker: WandbTracker | None = tracker

    def _call(self, method: str, *args: Any) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as error:
            log(f"Weights & Biases: reporting stopped ({self.tracker.redact(str(error))})")
            self.tracker = None

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._call("log_step", step, values)

    def log_epoch(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        self._call("log_epoch", step, epoch, values)

    def note(self, values: dict[str, Any]) -> None:
        self._call("note", values)

    def finish(self, loss_curve: Path | None = None) -> None:
        self._call("finish", loss_curve)
        self.tracker = None

    def fail(self, error: BaseException) -> None:
        self._call("fail", error)
        self.tracker = None


def start_tracking(key: str | None, project: str | None, name: str | None, inputs: dict) -> Tracker:
    """A Weights & Biases run when there is a key; else a tracker that does nothing."""
    if not key:
        if project or name:
            log("note: wandb_project and wandb_run_name are not used without wandb_api_key")
        return Tracker()
    try:
        return _Guarded(WandbTracker(key, project, name, inputs))
    except Exception as error:
        message = str(error).replace(key, "***")
        raise UserInputError(f"Weights & Biases could not start a run: {message}") from None


def hand_over_key(key: str) -> Path:
    """A file holding the key, readable by this user alone, outside any job folder: for the
    launcher to name to rank 0 (environments are readable in /proc for the process's life)."""
    descriptor, name = tempfile.mkstemp(prefix="llama2-wandb-")  # created 0600
    with os.fdopen(descriptor, "w") as file:
        file.write(key)
    return Path(name)


@contextmanager
def reporting(
    key: str | None, project: str | None, name: str | None, inputs: dict
) -> Iterator[Tracker]:
    """A tracker for the block (see `start_tracking`); the run is closed as failed or canceled
    if the block raises. A successful block closes it itself, with the loss curve."""
    tracker = start_tracking(key, project, name, inputs)
    try:
        yield tracker
    except BaseException as error:
        tracker.fail(error)
        raise


def key_for_this_worker(is_main: bool) -> str | None:
    """Rank 0 reads the key the launcher left and deletes the file; other ranks never read it."""
    name = os.environ.pop(KEY_FILE_VARIABLE, None)
    if not name or not is_main:
        return None
    path = Path(name)
    try:
        return path.read_text()
    finally:
        path.unlink(missing_ok=True)
