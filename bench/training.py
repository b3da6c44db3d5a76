"""Training throughput of one stack, in its own process (so its peak memory is its own).

    python -m bench.training {reference,core,core-packed} MODEL_DIR --rows N

`reference` is the way Replicate's implementation trains, in a few lines: the transformers
Trainer with peft LoRA, dynamic padding to the longest row of each batch, no packing. `core`
and `core-packed` are this project's training loop with pack_sequences off and on. All train
one epoch over the same rows with the same LoRA settings; the first step is warm-up and the
rest are timed.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import emit, mixed_lengths, peak_rss_mib, synthetic_examples
from src.training.examples import Examples

STACKS = ("reference", "core", "core-packed")
LORA = dict(rank=8, alpha=16, dropout=0.05)
BATCH_ROWS = 4  # rows per optimizer step without packing
PACKED_BATCH_ROWS = 2  # rows of CHUNK_SIZE tokens per step with packing
CHUNK_SIZE = 2048
LEARNING_RATE = 1e-4


def run_reference(model_dir: Path, examples: Examples) -> tuple[list[tuple[int, float]], int]:
    """transformers Trainer + peft, padded batches of 4: returns per-step (tokens, seconds)."""
    import time

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    rows = [{"input_ids": examples.tokens(i).input_ids} for i in range(len(examples))]
    batches: list[tuple[int, int]] = []  # (real tokens, padded slots) per batch

    def pad_to_longest(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), width, dtype=torch.long)
        mask = torch.zeros(len(features), width, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        batches.append((int(mask.sum()), ids.numel()))
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }

    timings: list[tuple[int, float]] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            timings.append((batches[len(timings)][0], time.perf_counter() - self.started))

    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH_ROWS, num_train_epochs=1,
            learning_rate=LEARNING_RATE, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0, seed=42,
        )  # fmt: skip
        Trainer(
            model=model,
            args=arguments,
            train_dataset=rows,
            data_collator=pad_to_longest,
            callbacks=[StepClock()],
        ).train()
    # on_step_begin fires after the batch is collated: the collation is not timed, a small
    # advantage to the reference.
    return timings, sum(slots for _, slots in batches)


def run_core(model_dir: Path, examples: Examples, packed: bool, chunk_size: int):
    """This project's loop (src.training.loop.train_adapter), as train() runs it."""
    from src.modeling import (
        add_lora,
        load_base_model,
        load_tokenizer,
        pick_placement,
        read_model_config,
    )
    from src.training.batching import build_rows
    from src.training.config import TrainConfig
    from src.training.distributed import World
    from src.training.fused_lora import choose_lora_forward
    from src.training.loop import train_adapter
    from src.training.memory import plan_for_device

    config = TrainConfig(
        train_data=Path("bench"), num_train_epochs=1,
        train_batch_size=PACKED_BATCH_ROWS if packed else BATCH_ROWS,
        micro_batch_size=1 if packed else BATCH_ROWS, num_validation_samples=1,
        validation_data=None, validation_batch_size=1, run_validation=False,
        validation_prompt=None, learning_rate=LEARNING_RATE, pack_sequences=packed,
        wrap_packed_sequences=False, chunk_size=chunk_size, peft_method="lora", seed=42,
        lora_rank=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
    )  # fmt: skip
    rows, _ = build_rows(examples, packed, False, chunk_size)
    placement = pick_placement()
    torch.manual_seed(0)
    model = add_lora(
        load_base_model(model_dir, False, placement),
        LORA["rank"],
        LORA["alpha"],
        LORA["dropout"],
        quantized=False,
    )
    choose_lora_forward(model)  # as the product trains: fused unless TRAIN_FUSED_LORA=0
    forwards = plan_for_device(
        placement, read_model_config(model_dir), False, LORA["rank"], rows.longest_segment
    )
    no_validation, _ = build_rows(examples.select(0, 0), False, False, chunk_size)
    result = train_adapter(
        model, load_tokenizer(model_dir), rows, no_validation, config, forwards,
        placement.device, World(),
    )  # fmt: skip
    # Micro-batches are rows laid end to end (src/training/batching.collate): no padded slot.
    return result.step_timings, int(rows.lengths.sum())


def measure(stack: str, model_dir: Path, rows: int, chunk_size: int = CHUNK_SIZE) -> dict:
    torch.manual_seed(0)
    examples = synthetic_examples(mixed_lengths(rows, longest=chunk_size))
    if stack == "reference":
        timings, slots = run_reference(model_dir, examples)
    else:
        timings, slots = run_core(model_dir, examples, stack == "core-packed", chunk_size)
    timed = timings[1:]  # the first step warms up
    real_tokens = examples.num_tokens
    return {
        "stack": stack,
        "steps": len(timings),
        "timed_steps": len(timed),
        "timed_tokens": sum(t for t, _ in timed),
        "timed_seconds": sum(s for _, s in timed),
        "tokens_per_second": sum(t for t, _ in timed) / sum(s for _, s in timed),
        "real_tokens": real_tokens,
        "padding_share": 1 - real_tokens / slots,
        # causal attention: a token at position i looks at i tokens, n/2 on average
        "mean_context": float((examples.lengths**2).sum()) / real_tokens / 2,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stack", choices=STACKS)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    args = parser.parse_args()
    emit(measure(args.stack, args.model_dir, args.rows, args.chunk_size))


if __name__ == "__main__":
    main()
