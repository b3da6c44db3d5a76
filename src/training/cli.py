"""The training outside Cog, alone or on many machines under torchrun.

    python -m src.training --inputs inputs.json --output weights.tar
    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m src.training --inputs inputs.json --output weights.tar

The JSON holds train.py's inputs, checked as Cog checks them (train.py's declared bounds and
choices, then src/training/config.py); an input left out takes train.py's default. train_data,
validation_data and init_weights may be URLs or the operator's own local paths. The Weights
& Biases key comes from WANDB_API_KEY, never from the file.

Without torchrun this is train() without Cog (several GPUs: torchrun workers on this machine,
src/training/launcher.py). Under torchrun every process runs this: on each node the process
of local rank 0 reads and prepares the data into a job folder of its own (two nodes on one
machine do not collide) while the node's other processes wait, then all train; global rank
0, on whichever node c10d placed it, writes the archive to its own --output, and no other
process writes one. A failure on one rank ends the others within the collectives' timeout
(src/training/distributed.py); each failing rank prints its traceback.
"""

import argparse
import inspect
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from src.base_model import keep_compiler_caches_out_of_tmp, resolve_base_model
from src.errors import UserInputError, raise_all
from src.fetch import download, public_url
from src.log import Stopwatch, log
from src.modeling import load_tokenizer
from src.training.config import SECRET_INPUTS, build_train_config
from src.training.distributed import World, init_from_torchrun, wait_for_all
from src.training.launcher import read_job, write_job
from src.training.parallelism import refuse_sharded_qlora, wanted_parallelism
from src.training.run import make_data_folder, prepare_job, run_training, train_and_save

KEY_VARIABLE = "WANDB_API_KEY"
FETCHED_INPUTS = ("train_data", "validation_data")  # Cog downloads these before train()


def declared_inputs() -> dict[str, Any]:
    """train.py's inputs: name -> cog's declaration (default, bounds, choices)."""
    import train  # the single source of the inputs' defaults and bounds

    return dict(inspect.signature(train.train).parameters)


def read_inputs(path: Path) -> dict[str, Any]:
    """The JSON's inputs over train.py's defaults, checked against train.py's declarations;
    one UserInputError names every problem, with the file."""
    try:
        given = json.loads(path.read_text())
    except OSError as error:
        raise UserInputError(f"--inputs {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UserInputError(f"--inputs {path}: not JSON ({error})") from None
    if not isinstance(given, dict):
        raise UserInputError(f"--inputs {path}: a JSON object of train.py's inputs, please")
    declared = declared_inputs()
    problems = [f"unknown input {name!r}" for name in given if name not in declared]
    for name in SECRET_INPUTS & set(given):
        problems.append(f"{name} is not read from a file: set {KEY_VARIABLE} instead")
    inputs: dict[str, Any] = {}
    for name, parameter in declared.items():
        if name in SECRET_INPUTS:
            continue
        declaration = parameter.default
        value = given.get(name, declaration.default)
        if value is None and name == "train_data":
            problems.append("missing input 'train_data' (a URL or a path)")
        problems += _bound_problems(name, value, declaration)
        inputs[name] = value
    raise_all(problems, f"Invalid training inputs in {path}:")
    return inputs


def _bound_problems(name: str, value: Any, declaration: Any) -> list[str]:
    """What Cog checks before calling train(): the declared ge, le and choices."""
    if value is None:
        return []
    if declaration.choices is not None and value not in declaration.choices:
        return [f"{name} must be one of {', '.join(map(str, declaration.choices))}, got {value!r}"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return []  # types are src/training/config.py's to check
    if declaration.ge is not None and value < declaration.ge:
        return [f"{name} must be at least {declaration.ge}, got {value}"]
    if declaration.le is not None and value > declaration.le:
        return [f"{name} must be at most {declaration.le}, got {value}"]
    return []


def fetch_inputs(inputs: dict[str, Any], folder: Path) -> dict[str, Any]:
    """train_data and validation_data given by URL, downloaded into `folder` (as Cog does)."""
    fetched = dict(inputs)
    for name in FETCHED_INPUTS:
        value = inputs[name]
        if isinstance(value, str) and value.startswith(("https://", "http://")):
            destination = folder / f"{name}.jsonl"
            log(f"{name}: downloading {public_url(value)}")
            download(value, destination, name)
            fetched[name] = destination
    return fetched


def check_output(output: Path) -> None:
    if output.is_dir():
        raise UserInputError(f"--output {output} is a folder: give the archive's file path")
    if not output.parent.is_dir():
        raise UserInputError(f"--output {output}: no such folder {output.parent}")
    if not os.access(output.parent, os.W_OK):
        raise UserInputError(f"--output {output}: {output.parent} is not writable")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.training", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--inputs", type=Path, required=True, help="JSON of train.py's inputs")
    parser.add_argument("--output", type=Path, required=True, help="the weights archive to write")
    return parser.parse_args(argv)


@record  # torchrun's agent prints a failed rank's traceback
def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    # SIGTERM (a cancel, Slurm's scancel, a pod's end) unwinds: the job folder is removed
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        inputs = read_inputs(arguments.inputs)
        check_output(arguments.output)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return train_under_torchrun(inputs, arguments.output)
        return train_alone(inputs, arguments.output)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_alone(inputs: dict[str, Any], output: Path) -> int:
    """train() without Cog: one process, or this machine's GPUs through torchrun workers."""
    folder = make_data_folder()
    try:
        config = build_train_config(**fetch_inputs(inputs, folder))
        archive = run_training(config, wandb_api_key=os.environ.get(KEY_VARIABLE))
        _deliver(archive, output)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def train_under_torchrun(inputs: dict[str, Any], output: Path) -> int:
    clock = Stopwatch()
    _end_with_the_agent()
    world = init_from_torchrun()
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    keep_compiler_caches_out_of_tmp()
    folder: Path | None = None
    try:
        base = _resolve_once_per_node(world)
        if world.is_main:
            log(f"base model: {base.public_name} ({base.path})")
        prepared = _prepare_on_local_rank_0(inputs, base, world)
        if world.local_rank == 0:
            folder = prepared.folder
        reports = wait_for_all(world, prepared)
        folder = _node_folder(reports, world)
        training = read_job(folder, base, load_tokenizer(base.path), world)
        key = os.environ.get(KEY_VARIABLE) if world.is_main else None
        archive = train_and_save(training, clock, key)
        if archive is not None:
            _deliver(archive, output)
        wait_for_all(world)  # the node's data stays until every rank is done with it
        return 0
    finally:
        if folder is not None and world.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        dist.destroy_process_group()


def _end_with_the_agent() -> None:
    """A worker whose torchrun agent died (SIGKILL: no chance to end its workers) ends too,
    instead of training on with the other nodes' orphans."""
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _resolve_once_per_node(world: World) -> Any:
    """BASE_MODEL resolved (downloaded, where it is a Hub id or URL) by each node's local
    rank 0 first; its other processes then find it in the cache."""
    base = resolve_base_model() if world.local_rank == 0 else None
    wait_for_all(world)
    return base or resolve_base_model()


@dataclass(frozen=True)
class NodeReport:
    """What a node's local rank 0 prepared (the others report nothing)."""

    node: int
    folder: Path | None = None
    summary: dict | None = None  # what every node must agree on
    problem: str | None = None
    user_error: bool = False


def _prepare_on_local_rank_0(inputs: dict[str, Any], base: Any, world: World) -> NodeReport:
    """The node's job folder, prepared by its local rank 0 (the node's other processes wait
    in the next `wait_for_all`). A failure is reported to every rank, then raised here."""
    if world.local_rank != 0:
        return NodeReport(world.node)
    folder = make_data_folder()
    try:
        config = build_train_config(**fetch_inputs(inputs, folder))
        refuse_sharded_qlora(config.quantize_4bit)
        job = prepare_job(config, base, folder)
        write_job(folder, job)
    except Exception as error:
        shutil.rmtree(folder, ignore_errors=True)
        user = isinstance(error, UserInputError)
        problem = str(error) if user else repr(error)
        wait_for_all(world, NodeReport(world.node, problem=problem, user_error=user))
        raise  # this rank's own error, with its traceback
    summary = {
        "inputs": config.as_json(),
        "base model": base.public_name,
        "parallelism": wanted_parallelism(),
        "training rows": len(job.train_rows),
        "training tokens": job.packed[1].real_tokens,
        "validation rows": len(job.data.validation),
    }
    return NodeReport(world.node, folder, summary)


def _node_folder(reports: list[NodeReport], world: World) -> Path:
    """This node's job folder, once every node prepared the same training; else the error,
    on every rank (so that none waits for the others)."""
    for report in reports:
        if report.problem is not None and report.user_error:
            raise UserInputError(report.problem)
        if report.problem is not None:
            raise RuntimeError(f"node {report.node} failed to prepare the data: {report.problem}")
    prepared = [report for report in reports if report.folder is not None]
    first = prepared[0]
    for report in prepared[1:]:
        differing = [k for k in first.summary if first.summary[k] != report.summary[k]]
        if differing:
            raise UserInputError(
                f"the nodes do not prepare the same training: node {report.node}'s "
                f"{', '.join(differing)} differ from node {first.node}'s (every node must "
                f"run the same inputs, data, BASE_MODEL and TRAIN_PARALLELISM)"
            )
    return next(report.folder for report in prepared if report.node == world.node)


def _deliver(archive: Path, output: Path) -> None:
    """The archive to --output; its temporary folder goes."""
    shutil.move(archive, output)
    shutil.rmtree(archive.parent, ignore_errors=True)
    log(f"weights: {output}")


def _stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: torchrun may send it again
    raise SystemExit(128 + signum)
