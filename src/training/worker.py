"""One data-parallel training process, started by torchrun: `python -m src.training.worker JOB`.

Rank 0 logs, validates and writes the weights archive; the others train silently. Errors are
written into the job folder for the parent to raise (see src/training/launcher.py).
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from src.base_model import resolve_base_model
from src.log import Stopwatch
from src.modeling import load_tokenizer
from src.training.distributed import init_from_torchrun
from src.training.launcher import CANCELED, LAUNCHER_PID_VARIABLE, read_job, write_worker_error
from src.training.run import train_and_save
from src.training.tracking import key_for_this_worker, watch_for_cancel


def main(job: Path) -> None:
    clock = Stopwatch()
    _end_with_the_launcher(int(os.environ[LAUNCHER_PID_VARIABLE]))
    # The launcher ends a canceled training with SIGTERM: unwind (rank 0 closes its Weights &
    # Biases run, as canceled if the launcher's marker is there) instead of dying on the spot.
    signal.signal(signal.SIGTERM, _stop)
    watch_for_cancel(job / CANCELED)
    world = init_from_torchrun()
    wandb_api_key = key_for_this_worker(world.is_main)
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    try:
        base = resolve_base_model()
        training = read_job(job, base, load_tokenizer(base.path), world)
        archive = train_and_save(training, clock, wandb_api_key)
        if archive is not None:
            (job / "result.json").write_text(json.dumps({"weights": str(archive)}))
    except Exception as error:
        write_worker_error(job, world.rank, error)
        raise SystemExit(1) from error
    finally:
        dist.destroy_process_group()


def _stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: torchrun may send it again
    raise SystemExit(128 + signum)


def _end_with_the_launcher(launcher_pid: int) -> None:
    """If the process that started torchrun dies, end this process group (torchrun included)."""

    def watch() -> None:
        while True:
            time.sleep(1)
            try:
                os.kill(launcher_pid, 0)
            except ProcessLookupError:
                os.killpg(os.getpgid(0), signal.SIGTERM)
                return

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
