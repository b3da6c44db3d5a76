"""Launching data-parallel training: torchrun started from train(), one worker per device.

The parent hands the workers one job folder: the folder its data stage wrote the tokenized
examples into (src/training/examples.py), with the config and which examples each set takes
as JSON. The data is read and checked once, in the parent, and each worker maps the same
files, so the page cache holds one copy of the tokens however many workers there are. Rank
0's output is relayed line by line to the parent's stdout, which Cog streams into the
training's logs. A failing
worker writes its error and traceback into the folder, and the parent raises them. When the
training is canceled, or the parent dies, every worker process is ended.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from src.base_model import BaseModel
from src.errors import UserInputError
from src.log import log
from src.prompt_format import TrainedSystemPrompt
from src.training import outputs
from src.training.batching import PackingStats, Rows
from src.training.config import TrainConfig
from src.training.continuation import LoraSettings, StartingAdapter
from src.training.data import TrainingData
from src.training.distributed import World
from src.training.examples import Examples
from src.training.job import TrainingJob
from src.training.tracking import KEY_FILE_VARIABLE, hand_over_key

PROCESSES_VARIABLE = "TRAIN_PROCESSES"  # overrides the number of processes (default: GPUs)
# workers end themselves when it is gone, and name their output after it
LAUNCHER_PID_VARIABLE = outputs.LAUNCHER_PID_VARIABLE
STOP_GRACE_S = 10
CANCELED = "canceled"  # in the job folder: the launcher is stopping the workers


def data_parallel_processes(rows_per_step: int, may_shard: bool = False) -> int:
    """One process per visible GPU (or TRAIN_PROCESSES), but no more than a step has rows:
    a rank without rows would only wait for the others. Unless the base may be sharded
    (src/training/parallelism.may_shard): then every process holds a share of it, rows or
    not (a rank without rows runs passes of zero weight with the others)."""
    gpus = torch.cuda.device_count()
    configured = os.environ.get(PROCESSES_VARIABLE)
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise UserInputError(f"{PROCESSES_VARIABLE} must be a positive whole number")
        wanted = int(configured)
        if gpus and wanted > gpus:
            raise UserInputError(
                f"{PROCESSES_VARIABLE}={wanted} asks for more processes than the {gpus} "
                f"visible GPU(s): one process per GPU at most"
            )
    else:
        wanted = max(1, gpus)
    if may_shard:
        return wanted
    if wanted > rows_per_step:
        log(
            f"data parallel: {rows_per_step} row(s) per optimizer step, so {rows_per_step} "
            f"process(es) instead of {wanted} (a process without rows would only wait)"
        )
    return max(1, min(wanted, rows_per_step))


def launch_workers(job: TrainingJob, processes: int, wandb_api_key: str | None = None) -> Path:
    """Train `job` in `processes` torchrun workers; return the weights archive that rank 0
    wrote. A Weights & Biases key goes to rank 0 in a file of its own
    (src/training/tracking.py), never into the job folder or an environment."""
    folder = job.data.folder
    write_job(folder, job)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "-m", "src.training.worker", str(folder),
    ]  # fmt: skip
    env = dict(os.environ)
    env[LAUNCHER_PID_VARIABLE] = str(os.getpid())
    env.pop(KEY_FILE_VARIABLE, None)
    key_file = hand_over_key(wandb_api_key) if wandb_api_key else None
    if key_file is not None:
        env[KEY_FILE_VARIABLE] = str(key_file)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    log(f"launching {processes} training processes")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=Path(__file__).resolve().parents[2], start_new_session=True,
    )  # fmt: skip
    try:
        _relay_output(process)
        if process.returncode != 0:
            raise _worker_failure(folder, process.returncode)
        return Path(json.loads((folder / "result.json").read_text())["weights"])
    finally:
        _stop(process, folder)
        for report in [*folder.glob("error-rank*.json"), folder / "result.json", folder / CANCELED]:
            report.unlink(missing_ok=True)
        if key_file is not None:
            key_file.unlink(missing_ok=True)  # if rank 0 never started to read and delete it


def _relay_output(process: subprocess.Popen[str]) -> None:
    """Print the workers' lines until they exit; wait in short slices so cancel gets through."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            break
        print(line, end="", flush=True)
    process.wait()


def _stop(process: subprocess.Popen[str], job: Path) -> None:
    """End torchrun and its workers: SIGTERM to the process group, SIGKILL after a grace time.
    The marker written first tells rank 0 that this is a cancel, not a failure."""
    if process.poll() is not None:
        return
    (job / CANCELED).touch()
    log("stopping the training processes")
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _worker_failure(job: Path, returncode: int) -> Exception:
    reports = sorted(job.glob("error-rank*.json"))
    if not reports:
        return RuntimeError(
            f"a training process died with exit code {returncode} and left no error "
            "(killed by the system, for example out of memory)"
        )
    error = json.loads(reports[0].read_text())
    if error["user_error"]:
        return UserInputError(error["message"])
    return RuntimeError(
        f"training process {error['rank']} failed: {error['message']}\n{error['traceback']}"
    )


def write_worker_error(job: Path, rank: int, error: BaseException) -> None:
    report = {
        "rank": rank,
        "user_error": isinstance(error, UserInputError),
        "message": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(error)),
    }
    if report["user_error"]:
        report["message"] = str(error)
    (job / f"error-rank{rank}.json").write_text(json.dumps(report))


def write_job(folder: Path, job: TrainingJob) -> None:
    """The config, the split, the packed rows, the LoRA and the adapter to continue into
    `folder`, the folder that already holds the examples (and the unpacked init_weights)."""
    config, data = job.config, job.data
    values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    (folder / "config.json").write_text(json.dumps(values))
    rows, stats = job.packed
    rows.save(folder)
    split = {"train": data.train.describe(), "validation": data.validation.describe()}
    split |= {"packing": asdict(stats), "lora": asdict(job.lora)}
    split |= {"init_weights": job.start.describe() if job.start else None}
    split |= {"system_prompt": data.system_prompt.as_json()}
    (folder / "data.json").write_text(json.dumps(split))


def read_job(folder: Path, base: BaseModel, tokenizer: Any, world: World) -> TrainingJob:
    """What `write_job` wrote, for the worker of rank `world.rank`."""
    values = json.loads((folder / "config.json").read_text())
    for field in fields(TrainConfig):
        if field.name in ("train_data", "validation_data") and values[field.name] is not None:
            values[field.name] = Path(values[field.name])
    split = json.loads((folder / "data.json").read_text())
    train, validation = (_open(folder, split[name]) for name in ("train", "validation"))
    start = StartingAdapter.open(split["init_weights"]) if split["init_weights"] else None
    packed = Rows.open(folder, train), PackingStats(**split["packing"])
    lora = split["lora"]
    lora = LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])})
    system_prompt = TrainedSystemPrompt.from_json(split["system_prompt"])
    assert system_prompt is not None
    data = TrainingData(train, validation, folder, system_prompt)
    return TrainingJob(TrainConfig(**values), base, tokenizer, data, packed, lora, start, world)


def _open(folder: Path, where: dict) -> Examples:
    first = where["first"]
    return Examples.open(folder, where["source"]).select(first, first + where["count"])
