"""Experiment tracking in Weights & Biases: rank 0 reports a training when the user gave a key.

Without a key nothing is imported or contacted (`Tracker` does nothing). With one, the run
gets the inputs (never the key), the training loss, learning rate and tokens/s of every step,
the validation loss and answer of every epoch, the epoch decisions, the loss curve, and an
end: finished, failed or canceled. The key goes to wandb in its settings, not through the
environment or a login (which would write it to ~/.netrc); to data-parallel workers it goes
in their environment only, never in the job folder.
"""

import os
from pathlib import Path
from typing import Any

from src.errors import UserInputError
from src.log import log

KEY_VARIABLE = "WANDB_API_KEY"  # how the launcher hands the key to rank 0's process
DEFAULT_PROJECT = "llama-2-chat-fine-tuning"
_canceled = False  # set by a worker told to stop: what fails next is the cancel's doing


def note_canceled() -> None:
    """This process is being stopped (a data-parallel worker got SIGTERM): a run that fails
    from now on was canceled, even if what raises is a collective whose peer has gone."""
    global _canceled
    _canceled = True


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
        self.answers: list[list[Any]] = []
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
            self.answers.append([epoch, values["prompt"], values["answer"]])
            entries["validation/answers"] = self.wandb.Table(
                columns=["epoch", "prompt", "answer"], data=list(self.answers)
            )
        self.run.log(entries, step=step)

    def note(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, loss_curve: Path | None = None) -> None:
        if loss_curve is not None:
            self.run.log({"loss_curve": self.wandb.Image(str(loss_curve))})
        self.run.summary["status"] = "finished"
        self.run.finish(exit_code=0)

    def fail(self, error: BaseException) -> None:
        canceled = _canceled or not isinstance(error, Exception)  # Cog's cancel, SIGTERM
        self.run.summary["status"] = "canceled" if canceled else "failed"
        self.run.summary["error"] = self.redact(f"{type(error).__name__}: {error}")[:1000]
        self.run.finish(exit_code=1)

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text


def start_tracking(key: str | None, project: str | None, name: str | None, inputs: dict) -> Tracker:
    """A Weights & Biases run when there is a key; else a tracker that does nothing."""
    if not key:
        if project or name:
            log("note: wandb_project and wandb_run_name are not used without wandb_api_key")
        return Tracker()
    try:
        return WandbTracker(key, project, name, inputs)
    except Exception as error:
        message = str(error).replace(key, "***")
        raise UserInputError(f"Weights & Biases could not start a run: {message}") from None


def key_from_environment() -> str | None:
    """The key the launcher handed to this worker, removed from the environment at once so
    that nothing this process starts inherits it."""
    return os.environ.pop(KEY_VARIABLE, None)
