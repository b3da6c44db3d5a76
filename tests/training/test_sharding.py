"""FSDP2 on CPU with gloo: the base sharded over 2 ranks trains exactly as one process
accumulating the same passes, in fp32 and bf16, from a checkpoint in several files whose
weights do not split evenly over the ranks (sharded = data parallel, bit for bit, through
train()'s launcher: test_data_parallel.py)."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load

from src.modeling import Placement
from tests.helpers import FACTS, one_thread, write_jsonl
from tests.training.sharded_worker import DTYPES, SETTINGS, job_for
from tools.tiny_model import build_tiny_llama

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the gloo runs of a CPU; a GPU runs NCCL"
)


def results(archive) -> tuple[dict, dict[str, torch.Tensor]]:
    with tarfile.open(archive) as tar:
        metadata = json.load(tar.extractfile("training_metadata.json"))
        weights = load(tar.extractfile("adapter_model.safetensors").read())
    return metadata, weights


@pytest.fixture(scope="module")
def uneven_model(tmp_path_factory):
    """gate/up of 353 rows (177 + 176 over 2 ranks), the weights in 3 files and an index."""
    out = tmp_path_factory.mktemp("uneven")
    return build_tiny_llama(out, "micro", max_shard_size="8MB", intermediate_size=353)


@pytest.fixture(scope="module")
def runs(uneven_model, tmp_path_factory):
    """The worker's archives (2 ranks, sharded, fp32 and bf16) and one process's."""
    out = tmp_path_factory.mktemp("sharded-runs")
    pairs = [{"prompt": p, "completion": c} for p, c in FACTS] * 3
    data = write_jsonl(out / "facts.jsonl", pairs)
    env = {**os.environ, "BASE_MODEL": str(uneven_model), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "tests.training.sharded_worker", str(data), str(out),
    ]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    archives = {name: out / name for name in os.listdir(out) if name.endswith(".tar")}
    return archives, out, one_process(data, uneven_model, out)


def one_process(data, model_dir, out) -> dict:
    """The same jobs in this process: each step's two passes accumulated, one thread (as
    each rank's), the placement replaced as in the worker."""
    import src.training.run
    from src.log import Stopwatch
    from src.training.distributed import World

    archives = {}
    with pytest.MonkeyPatch.context() as patch, one_thread():
        patch.setenv("BASE_MODEL", str(model_dir))
        for name, dtype in DTYPES.items():
            placement = Placement(torch.device("cpu"), dtype)
            patch.setattr(src.training.run, "pick_placement", lambda p=placement: p)
            job = job_for(data, World(), out / f"one-{name}")
            archives[name] = src.training.run.train_and_save(job, Stopwatch())
    return archives


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_training_is_one_process_accumulating_bit_for_bit(runs, dtype):
    archives, _, one = runs
    fsdp, fsdp_weights = results(archives[f"fsdp-{dtype}.tar"])
    alone, one_weights = results(one[dtype])
    assert fsdp_weights.keys() == one_weights.keys() and fsdp_weights
    for name, tensor in one_weights.items():  # 2 ranks = the 2 passes accumulated
        assert torch.equal(fsdp_weights[name], tensor), name
    assert fsdp["results"]["train_losses"] == alone["results"]["train_losses"]
    computed = [run["results"]["computed"] for run in (fsdp, alone)]
    assert computed[0].pop("parallelism") == "fsdp" and computed[1].pop("parallelism") == "ddp"
    assert computed[0] == computed[1]  # the same speed levers
    # validation: each rank its share of the rows, sums and counts summed
    losses = [[loss for _, loss in run["results"]["validation_losses"]] for run in (fsdp, alone)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert fsdp["results"]["validation_answers"] == alone["results"]["validation_answers"]
    assert len(fsdp["results"]["validation_answers"]) == SETTINGS["num_train_epochs"]


def test_each_rank_holds_its_share_of_the_base(runs, uneven_model):
    """What the memory plan counts: about half the sharded weights per rank (uneven rows
    split as torch.chunk splits them), the output head whole on each."""
    from src.modeling import read_model_config
    from src.training.memory import ModelShape

    _, out, _ = runs
    held = [json.loads((out / f"shard-bytes-{rank}.json").read_text()) for rank in (0, 1)]
    shape = ModelShape.of(read_model_config(uneven_model))
    sharded = 4 * (
        shape.layers * shape.layer_parameters + shape.vocab * shape.hidden + shape.hidden
    )
    assert held[0]["sharded"] + held[1]["sharded"] == sharded
    assert held[0]["sharded"] >= held[1]["sharded"] > 0.49 * sharded
    assert held[0]["whole"] == held[1]["whole"] == 4 * shape.vocab * shape.hidden  # the head
