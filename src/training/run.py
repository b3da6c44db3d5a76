"""One training run, top to bottom: data -> base model -> LoRA -> train -> weights archive."""

import gc
import json
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

from src.artifact import (
    ADAPTER_CONFIG,
    ARCHIVE_NAME,
    LOSS_CURVE,
    MAX_ARCHIVE_BYTES,
    base_model_fingerprint,
    plot_losses,
    portable_adapter_config,
    write_archive,
)
from src.base_model import BaseModel, keep_compiler_caches_out_of_tmp, resolve_base_model
from src.errors import UserInputError
from src.log import Stopwatch, log
from src.modeling import (
    Placement,
    add_lora,
    context_window,
    init_lora_weights,
    load_base_model,
    load_tokenizer,
    lora_parameters,
    pick_placement,
    read_model_config,
)
from src.prompt_format import (
    FORMAT_NAME,
    SystemPromptTally,
    TrainedSystemPrompt,
    describe_system_prompt,
    render_user_turn,
)
from src.seeds import derive_seed
from src.training.batching import PackingStats, Rows, build_rows
from src.training.config import TrainConfig
from src.training.continuation import (
    fetch_starting_adapter,
    load_starting_weights,
    lora_settings,
)
from src.training.data import (
    TrainingData,
    check_lengths,
    check_supervised,
    prepare_file,
    split_validation,
)
from src.training.distributed import wait_for_all
from src.training.examples import Examples
from src.training.fused_elementwise import choose_elementwise
from src.training.fused_lora import choose_lora_forward
from src.training.fused_loss import describe_loss
from src.training.job import TrainingJob
from src.training.launcher import data_parallel_processes, launch_workers
from src.training.loop import TrainResult, train_adapter, validation_prompt
from src.training.outputs import clear_earlier_outputs, new_output_folder
from src.training.parallelism import may_shard, plan_training, refuse_sharded_qlora
from src.training.sharding import load_sharded_model
from src.training.tracking import reporting


def run_training(config: TrainConfig, wandb_api_key: str | None = None) -> Path:
    """Train a LoRA/QLoRA adapter as configured and return the path of the weights archive.

    The data is read, checked and tokenized here, before any model is loaded. With several
    devices (or TRAIN_PROCESSES), torchrun workers train on it data-parallel.
    """
    clock = Stopwatch()
    refuse_sharded_qlora(config.quantize_4bit)
    clear_earlier_outputs([config.train_data, config.validation_data])
    keep_compiler_caches_out_of_tmp()
    base = resolve_base_model()
    log(f"base model: {base.public_name} ({base.path})")
    folder = make_data_folder()
    try:
        job = prepare_job(config, base, folder)
        rows_per_step = min(config.train_batch_size, len(job.train_rows))
        shardable = may_shard(
            read_model_config(base.path), config.quantize_4bit, job.lora.rank,
            job.train_rows.longest_segment,
        )  # fmt: skip
        processes = data_parallel_processes(rows_per_step, shardable)
        if processes > 1:
            return launch_workers(job, processes, wandb_api_key)
        archive = train_and_save(job, clock, wandb_api_key)
        assert archive is not None  # a single process is rank 0
        return archive
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare_job(config: TrainConfig, base: BaseModel, folder: Path) -> TrainingJob:
    """Everything before a model loads, into `folder`: the adapter to continue, the data
    read, checked, tokenized, split and packed. Every input error is raised here."""
    start = None
    if config.init_weights:
        start = fetch_starting_adapter(config.init_weights, base, folder / "init_weights")
    lora = lora_settings(config, start)
    check_adapter_size(lora.rank, read_model_config(base.path))
    tokenizer = load_tokenizer(base.path)
    data = prepare_examples(config, tokenizer, context_window(base.path), folder)
    return TrainingJob(config, base, tokenizer, data, pack(config, data), lora, start)


def make_data_folder() -> Path:
    """The run's temporary folder: the tokenized data (5 bytes per token), the unpacked
    init_weights, the data-parallel job. Under TMPDIR, as every temporary file."""
    try:
        return Path(tempfile.mkdtemp(prefix="llama2-data-"))
    except OSError as error:
        raise RuntimeError(
            f"cannot create the training's data folder in {tempfile.gettempdir()} ({error}): "
            f"set TMPDIR to a writable folder with room for 5 bytes per token of the data"
        ) from error


def train_and_save(
    job: TrainingJob, clock: Stopwatch, wandb_api_key: str | None = None
) -> Path | None:
    """Load the base, add LoRA (or continue `job.start`), train; rank 0 reports to Weights
    & Biases with a key, and returns the weights archive."""
    config, base, world, lora = job.config, job.base, job.world, job.lora
    train_rows, stats = job.packed
    log_packing(config, stats)
    validation_rows, _ = build_rows(job.data.validation, pack=False, wrap=False, chunk_size=0)
    prompt = validation_prompt(job.tokenizer, config.validation_prompt, job.data.system_prompt)
    if prompt is not None and world.is_main:
        log(f"validation_prompt: system prompt {describe_system_prompt(prompt.system)}, "
            f"{prompt.reason}")  # fmt: skip
    placement = pick_placement()
    parallelism = plan_training(
        placement,
        read_model_config(base.path),
        config.quantize_4bit,
        lora.rank,
        longest=train_rows.longest_segment,
        longest_validation=max(
            validation_rows.longest_segment, prompt.most_tokens if prompt else 0
        ),
        world=world,
    )
    forwards = parallelism.forwards
    if world.is_main:
        log(parallelism.describe(world.size))
        log(forwards.describe())

    inputs = {**config.as_json(), "lora": lora.as_json(), "base_model": base.public_name}
    key = wandb_api_key if world.is_main else None
    model = None
    with reporting(key, config.wandb_project, config.wandb_run_name, inputs) as tracker:
        try:
            model = load_model(job, placement, parallelism.sharded)
            wait_for_all(world)  # the ranks load at their own pace; training keeps them together
            if job.start is not None:
                load_starting_weights(model, job.start)
            computed = {  # what ran: parallelism and speed levers (the log says why)
                "parallelism": "fsdp" if parallelism.sharded else "ddp",
                "lora_forward": choose_lora_forward(model),
                "loss": describe_loss(),
                "elementwise": choose_elementwise(
                    model, placement.device, forwards.tokens or train_rows.longest_segment
                ),
            }
            torch.manual_seed(dropout_seed(config.seed, world.rank))
            result = train_adapter(
                model, job.tokenizer, train_rows, validation_rows, config, forwards,
                placement.device, world, tracker, prompt,
            )  # fmt: skip
            if not world.is_main:
                return None
            archive, curve = save_weights(model, job, result, clock.elapsed(), computed)
            tracker.finish(curve)
            return archive
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def load_model(job: TrainingJob, placement: Placement, sharded: bool) -> peft.PeftModel:
    """The frozen base, whole or this rank's shard of it, with a fresh LoRA adapter (the
    same initial values either way: src/modeling.init_lora_weights)."""
    config, lora, path = job.config, job.lora, job.base.path
    loading = Stopwatch()
    if sharded:
        model = load_sharded_model(path, placement, lora, config.seed, job.world)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        what = f"{frozen:,} (sharded over {job.world.local_size} processes)"
    else:
        base = load_base_model(path, config.quantize_4bit, placement)
        what = f"{base.num_parameters():,}"
        model = add_lora(
            base, lora.rank, lora.alpha, lora.dropout, config.quantize_4bit,
            lora.target_modules, lora.use_rslora,
        )  # fmt: skip
        init_lora_weights(model, config.seed)
    log(
        f"loaded {what} base parameters on {placement.device} "
        f"({'4-bit NF4' if config.quantize_4bit else placement.dtype}) in "
        f"{loading.elapsed():.1f} s"
    )
    return model


def pack(config: TrainConfig, data: TrainingData) -> tuple[Rows, PackingStats]:
    return build_rows(
        data.train, config.pack_sequences, config.wrap_packed_sequences, config.chunk_size
    )


def check_adapter_size(rank: int, model_config: dict) -> None:
    """The adapter (fp32) must fit in a weights archive that predict.py accepts; one too large
    to pass back as a data: URI is worth knowing before the training starts."""
    per_rank = 4 * lora_parameters(model_config, 1)
    size = per_rank * rank
    if size > MAX_ARCHIVE_BYTES:
        raise UserInputError(
            f"lora_rank {rank}: the adapter would be {size / 2**30:.1f} GiB, over "
            f"the {MAX_ARCHIVE_BYTES / 2**30:.0f} GiB limit of a weights archive; this base "
            f"model allows lora_rank up to {MAX_ARCHIVE_BYTES // per_rank}"
        )
    if size * 4 / 3 > COG_BODY_LIMIT:
        log(
            f"note: the weights will be about {size / 1e6:,.0f} MB, {size * 4 / 3 / 1e6:,.0f} MB "
            f"as a data: URI, over Cog's {COG_BODY_LIMIT / 2**20:.0f} MiB request limit: pass "
            f"them to a predictor by URL or path, not as a data: URI"
        )


COG_BODY_LIMIT = 100 * 2**20  # what Cog's server accepts in one request


def dropout_seed(seed: int, rank: int) -> int:
    """Each rank draws its own dropout masks (the same on every rank would correlate them),
    and a run with the same seed and number of processes draws the same ones again."""
    return derive_seed(seed, "dropout", rank)


def prepare_examples(
    config: TrainConfig, tokenizer: Any, max_tokens: int, folder: Path
) -> TrainingData:
    """Read, check, tokenize and split both files into `folder`; every data error is raised
    here, before a model is loaded."""
    if config.pack_sequences and config.chunk_size > max_tokens:
        raise UserInputError(
            f"chunk_size {config.chunk_size} is larger than the model's context window of "
            f"{max_tokens} tokens"
        )
    systems = SystemPromptTally()
    train = prepare_file(config.train_data, "train_data", tokenizer, folder, systems)
    validation_file = None
    if config.validation_data is not None:
        if config.run_validation:
            validation_file = prepare_file(
                config.validation_data, "validation_data", tokenizer, folder
            )
        else:
            log("validation_data is not used: run_validation is false")
    if config.run_validation:
        train, validation = split_validation(train, validation_file, config.num_validation_samples)
    else:
        validation = train.select(len(train), len(train))
    context = f"the model's context window of {max_tokens:,} tokens"
    if not config.pack_sequences:
        check_lengths(
            train,
            max_tokens,
            f"{context}: shorten it, or set pack_sequences and wrap_packed_sequences to train "
            f"it in pieces",
        )
    elif not config.wrap_packed_sequences:
        check_lengths(
            train,
            config.chunk_size,
            f"chunk_size {config.chunk_size}: raise chunk_size (up to the model's "
            f"{max_tokens:,}) or set wrap_packed_sequences",
        )
    check_lengths(validation, max_tokens, context)
    check_supervised(train, "train_data")
    check_supervised(validation, "the validation rows")
    if config.chooses_epochs and not len(validation):
        chosen = "keep_best_epoch" if config.keep_best_epoch else "early_stopping_patience"
        raise UserInputError(
            f"{chosen} decides on the validation loss, and there are no validation rows "
            f"(train_data has {len(train)} rows, too few to hold any out): give "
            f"validation_data, or more rows"
        )
    _log_counts("train", train)
    _log_counts("validation", validation)
    system_prompt = systems.result()
    _log_system_prompt(system_prompt)
    return TrainingData(train, validation, folder, system_prompt)


def _log_system_prompt(trained: TrainedSystemPrompt) -> None:
    """What predict.py will prompt this adapter with when a request gives no system_prompt."""
    if not trained.chat_rows:
        return
    share = (
        f"all {trained.chat_rows} chat rows"
        if trained.rows == trained.chat_rows
        else f"the most frequent, {trained.rows:,} of {trained.chat_rows:,} chat rows "
        f"({trained.distinct:,} different)"
    )
    log(
        f"system prompt: {describe_system_prompt(trained.text)} ({share}); recorded in the "
        f"weights, so that predict.py prompts the adapter with it by default"
    )


def _log_counts(name: str, examples: Examples) -> None:
    if not len(examples):
        return
    log(
        f"{name}: {len(examples)} rows, {examples.num_tokens:,} tokens "
        f"({int(examples.supervised.sum()):,} trained on), "
        f"longest {int(examples.lengths.max())}"
    )


def log_packing(config: TrainConfig, stats: PackingStats) -> None:
    if not config.pack_sequences:
        return
    mode = "wrapped" if config.wrap_packed_sequences else "packed"
    log(
        f"packing: {mode} into {stats.rows} rows of up to {config.chunk_size} tokens, "
        f"efficiency {stats.efficiency:.1%} (real tokens / row slots); no padding is computed"
    )


def save_weights(
    model: peft.PeftModel,
    job: TrainingJob,
    result: TrainResult,
    runtime: float,
    computed: dict[str, str],
) -> tuple[Path, Path]:
    """The weights archive (in a folder of its own, which outlives the training: Cog reads
    it after train() returns) and the loss curve in it (in the data folder, which does not)."""
    config, base, start = job.config, job.base, job.start
    adapter_dir = job.data.folder / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    write_portable_config(adapter_dir / ADAPTER_CONFIG, base.public_name)
    metadata = {
        "inputs": config.as_json(),
        "peft_method": config.peft_method,
        "lora": job.lora.as_json(),
        "lineage": start.lineage() if start else [],
        "base_model": {"source": base.public_name, **base_model_fingerprint(base.path)},
        "prompt_format": {
            "name": FORMAT_NAME,
            "user_turn": render_user_turn("{prompt}", "{system}"),
            "system_prompt": job.data.system_prompt.as_json(),
        },
        "results": {
            **_results(result, job.packed[1]),
            "runtime_seconds": runtime,
            "computed": computed,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
    }
    curve = plot_losses(result.train_losses, result.validation_losses, adapter_dir / LOSS_CURVE)
    out_dir = new_output_folder()
    try:
        archive = write_archive(adapter_dir, metadata, curve, out_dir / ARCHIVE_NAME)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # a full disk leaves no half archive
        raise
    log(f"weights: {archive.stat().st_size / 2**20:.1f} MiB archive, runtime {runtime:.1f} s")
    return archive, curve


def write_portable_config(adapter_config: Path, base_model: str) -> None:
    """adapter_config.json as src/artifact.portable_adapter_config makes it: the base's
    public name (Hub id, URL or the folder the user gave, not a cache path), and what every
    peft since 0.10 reads; sorted keys, so that the same training writes the same bytes."""
    values = json.loads(adapter_config.read_text())
    portable = portable_adapter_config(values, base_model)
    adapter_config.write_text(json.dumps(portable, indent=2, sort_keys=True))


def _results(result: TrainResult, stats: PackingStats) -> dict[str, Any]:
    return {
        "optimizer_steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "final_train_loss": result.train_losses[-1][1] if result.train_losses else None,
        "final_validation_loss": result.validation_losses[-1][1]
        if result.validation_losses
        else None,
        "train_losses": result.train_losses,
        "validation_losses": result.validation_losses,
        "validation_answers": result.validation_answers,
        "train_rows": stats.rows,
        "tokens_per_epoch": stats.real_tokens,
        "tokens_trained": result.tokens_trained,
        "supervised_tokens_trained": result.targets_trained,
        "training_seconds": result.seconds,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_validation_loss": result.best_validation_loss,
        "kept_epoch": result.kept_epoch,
        "stopped_after_epoch": result.stopped_after_epoch,
    }
