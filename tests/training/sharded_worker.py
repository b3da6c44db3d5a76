"""A training process for tests/training/test_sharding.py, started by torchrun:

    python -m tests.training.sharded_worker DATA OUT

It trains one job with the base sharded (FSDP2), in fp32 and in bf16 (the CPU's placement
is fp32: a bf16 one is put in its place), through train_and_save as a worker runs it, and
rank 0 copies each archive to OUT/fsdp-{dtype}.tar. Each rank also writes the bytes its
sharded base holds (OUT/shard-bytes-{rank}.json). (Sharded against data parallel through
train()'s launcher: tests/training/test_data_parallel.py.)
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import src.training.run
from src.base_model import resolve_base_model
from src.log import Stopwatch
from src.modeling import Placement
from src.training.config import build_train_config
from src.training.distributed import init_from_torchrun
from src.training.job import TrainingJob
from tests.helpers import train_defaults

SETTINGS = dict(
    num_train_epochs=2,
    train_batch_size=2,  # one row per rank and step: the sum is one process's accumulation
    micro_batch_size=1,
    lora_dropout=0.0,
    learning_rate=3e-3,
    validation_prompt="What is the capital of Zorbia?",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def job_for(data: Path, world, folder: Path) -> TrainingJob:
    config = build_train_config(**{**train_defaults(), **SETTINGS, "train_data": str(data)})
    folder.mkdir(parents=True)
    job = src.training.run.prepare_job(config, resolve_base_model(), folder)
    return TrainingJob(job.config, job.base, job.tokenizer, job.data, job.packed, job.lora,
                       job.start, world)  # fmt: skip


def main(data: Path, out: Path) -> None:
    world = init_from_torchrun()
    folder = Path(tempfile.mkdtemp(prefix=f"sharded-worker-{world.rank}-"))
    try:
        for name, dtype in DTYPES.items():
            placement = Placement(torch.device("cpu"), dtype)
            src.training.run.pick_placement = lambda placement=placement: placement
            os.environ["TRAIN_PARALLELISM"] = "fsdp"
            archive = src.training.run.train_and_save(
                job_for(data, world, folder / name), Stopwatch()
            )
            if archive is not None:
                shutil.copy(archive, out / f"fsdp-{name}.tar")
        record_shard_bytes(data, world, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        dist.destroy_process_group()


def record_shard_bytes(data: Path, world, out: Path) -> None:
    """The bytes of this rank's shards, the fp32 base sharded over the ranks."""
    from src.training.continuation import lora_settings
    from src.training.sharding import load_sharded_model

    config = build_train_config(**{**train_defaults(), **SETTINGS, "train_data": str(data)})
    model = load_sharded_model(
        resolve_base_model().path, Placement(torch.device("cpu"), torch.float32),
        lora_settings(config, None), config.seed, world,
    )  # fmt: skip
    held = {"sharded": 0, "whole": 0}
    for parameter in model.parameters():
        if parameter.requires_grad:
            continue
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        held["sharded" if local is not parameter else "whole"] += local.numel() * 4
    (out / f"shard-bytes-{world.rank}.json").write_text(json.dumps(held))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
