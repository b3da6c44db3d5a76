"""The training loop: exact global batches, token-normalised loss, validation and progress logs.

The loss of an optimizer step is the sum of the token losses of all its micro-batches divided by
the number of supervised tokens in the whole step, so the update does not depend on how the
step is split into micro-batches. Logits are computed only at supervised positions, in chunks,
so the 32,000-wide vocabulary projection is never materialised for prompt or padding tokens,
and only the gradient of the hidden states is kept for the backward (src/training/fused_loss).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from src.attention import PackedSegments
from src.errors import UserInputError
from src.log import Stopwatch, format_duration, log
from src.modeling import set_activation_checkpointing
from src.prompt_format import (
    TrainedSystemPrompt,
    choose_system_prompt,
    encode_user_prompt,
)
from src.training.batching import (
    MicroBatch,
    Rows,
    StepPlan,
    collate,
    epoch_order,
    forward_groups,
    optimizer_steps,
    steps_per_epoch,
)
from src.training.config import TrainConfig
from src.training.distributed import (
    World,
    broadcast_flag,
    most_over_ranks,
    sum_over_ranks,
    wait_for_all,
)
from src.training.fused_loss import training_loss_sum
from src.training.memory import ForwardPlan, out_of_memory
from src.training.tracking import Tracker

WARMUP_SHARE = 0.03
MIN_LR_SHARE = 0.1
MAX_GRAD_NORM = 1.0
VALIDATION_MAX_NEW_TOKENS = 128


@dataclass
class TrainResult:
    """What the loop measured, for the logs, the metadata and the loss curve."""

    steps: int = 0  # optimizer updates made
    skipped_steps: int = 0  # planned steps without a supervised token: no update
    tokens_trained: int = 0  # real (non-padding) tokens seen, all epochs
    targets_trained: int = 0  # supervised tokens, all epochs
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    validation_answers: list[str] = field(default_factory=list)
    step_timings: list[tuple[int, float]] = field(default_factory=list)  # (real tokens, seconds)
    seconds: float = 0.0
    epochs_run: int = 0
    best_epoch: int | None = None  # lowest validation loss, when epochs are chosen
    best_validation_loss: float | None = None
    kept_epoch: int | None = None  # the epoch whose adapter is the output, with keep_best_epoch
    stopped_after_epoch: int | None = None  # early stopping

    @property
    def planned_steps_done(self) -> int:
        return self.steps + self.skipped_steps

    def record_step(self, plan: StepPlan, loss: float, seconds: float) -> None:
        self.steps += 1
        self.tokens_trained += plan.num_tokens
        self.targets_trained += plan.num_targets
        self.train_losses.append((self.steps, loss))
        self.step_timings.append((plan.num_tokens, seconds))


def train_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: Rows,
    validation_rows: Rows,
    config: TrainConfig,
    forwards: ForwardPlan,
    device: torch.device,
    world: World,
    tracker: Tracker | None = None,
    prompt: "ValidationPrompt | None" = None,
) -> TrainResult:
    """Train the LoRA parameters of `model` in place; return the measured history; `prompt`
    is answered after each epoch.

    With several ranks, each runs this loop on its share of every step and validates its
    share of the validation rows; rank 0 logs, and decides (keep_best_epoch,
    early_stopping_patience) for every rank.
    """
    tracker = tracker or Tracker()
    total_steps = (
        steps_per_epoch(len(train_rows), config.train_batch_size) * config.num_train_epochs
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    # fused on a GPU: one kernel for the whole update; the CPU keeps the path its tests check
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=0.0, fused=fused
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps))
    if world.size > 1:
        _log_data_parallel_plan(config, world)
    log(
        f"training: {total_steps} optimizer steps over {config.num_train_epochs} epoch(s), "
        f"{sum(p.numel() for p in parameters):,} trainable parameters"
    )
    step = _Step(model, train_rows, optimizer, scheduler, forwards, device, world, tracker)
    progress = _Progress(total_steps)
    result = TrainResult()
    choice = EpochChoice(
        config.keep_best_epoch, config.early_stopping_patience, config.num_train_epochs
    )
    try:
        for epoch in range(config.num_train_epochs):
            skipped_before = result.skipped_steps
            order = epoch_order(len(train_rows), config.seed, epoch)
            for plan in optimizer_steps(
                train_rows,
                order,
                config.train_batch_size,
                config.micro_batch_size,
                world.rank,
                world.size,
            ):
                step.take(plan, result, progress, epoch)
            skipped = result.skipped_steps - skipped_before
            if skipped:
                log(
                    f"epoch {epoch + 1}: {skipped} optimizer step(s) had no supervised token "
                    f"(rows of prompt fragments only) and made no update"
                )
            result.epochs_run = epoch + 1
            stop = False
            loss = _end_of_epoch(
                model, tokenizer, validation_rows, config, step, result, epoch, prompt
            )
            wait_for_all(world)  # data parallel: rank 0 alone answered the validation_prompt
            if world.is_main:
                stop = config.chooses_epochs and choice.after_epoch(epoch + 1, loss, model)
            if config.chooses_epochs and broadcast_flag(stop, world, device):
                break
            progress.resume()
    except torch.cuda.OutOfMemoryError as error:
        raise out_of_memory(forwards, error) from None
    result.seconds = progress.clock.elapsed()
    if world.is_main and config.chooses_epochs:
        choice.finish(model, result, tracker)
    return result


@dataclass
class EpochChoice:
    """keep_best_epoch and early stopping, decided on rank 0 from the validation loss."""

    keep_best: bool
    patience: int  # 0: never stop early
    epochs: int  # planned
    best_loss: float = math.inf
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None  # the LoRA weights of the best epoch
    stopped_after: int | None = None

    def after_epoch(self, epoch: int, loss: float, model: PeftModel) -> bool:
        """Record `epoch`'s loss; True to stop training here."""
        if loss < self.best_loss:  # a NaN loss is never the best
            self.best_loss, self.best_epoch = loss, epoch
            if self.keep_best:
                self.best_state = {
                    name: parameter.detach().to("cpu", copy=True)
                    for name, parameter in model.named_parameters()
                    if parameter.requires_grad
                }
            log(f"epoch {epoch} is the best so far (validation loss {loss:.4f})")
        else:
            log(
                f"epoch {epoch}: validation loss {loss:.4f}, not better than epoch "
                f"{self.best_epoch}'s {self.best_loss:.4f}"
            )
        waited = epoch - (self.best_epoch or 0)
        if self.patience and waited >= self.patience and epoch < self.epochs:
            self.stopped_after = epoch
            log(f"stopping after epoch {epoch}: no improvement for {waited} epoch(s)")
            return True
        return False

    def finish(self, model: PeftModel, result: TrainResult, tracker: Tracker) -> None:
        """Put the best epoch's weights back (keep_best_epoch) and record the decisions."""
        result.best_epoch, result.stopped_after_epoch = self.best_epoch, self.stopped_after
        if self.best_epoch is not None:
            result.best_validation_loss = self.best_loss
        elif self.keep_best:
            log("keep_best_epoch: no epoch had a validation loss (all NaN); keeping the last")
        if self.keep_best and self.best_state is not None:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in self.best_state:
                        parameter.copy_(self.best_state[name])
            result.kept_epoch = self.best_epoch
            log(
                f"keeping epoch {self.best_epoch}, the best (validation loss "
                f"{self.best_loss:.4f}), not the last ({result.epochs_run})"
                if self.best_epoch != result.epochs_run
                else f"keeping epoch {self.best_epoch}, the last and the best"
            )
        tracker.note(
            {
                "best_epoch": self.best_epoch,
                "best_validation_loss": self.best_loss,
                "kept_epoch": result.kept_epoch,
                "stopped_after_epoch": self.stopped_after,
            }
        )


@dataclass
class _Step:
    """One optimizer step: forward passes as planned, gradients summed over ranks, update."""

    model: PeftModel
    rows: Rows
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    forwards: ForwardPlan
    device: torch.device
    world: World
    tracker: Tracker

    def take(self, plan: StepPlan, result: TrainResult, progress: "_Progress", epoch: int) -> None:
        if plan.num_targets == 0:
            # Possible in wrap mode, where a row can hold only prompt tokens: an update from
            # nothing would be a loss of 0 and a step of pure weight decay.
            result.skipped_steps += 1
            progress.step(result, self.scheduler.get_last_lr()[0], epoch, skipped=True)
            self.scheduler.step()  # the schedule stays on its plan
            return
        started = time.perf_counter()
        batches = [
            collate(self.rows, group)
            for rows in plan.micro_batches
            for group in forward_groups(self.rows, rows, self.forwards.tokens)
        ]
        lr = self.scheduler.get_last_lr()[0]
        loss, grad_norm = self._update(batches, plan.num_targets)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise non_finite_step(result.planned_steps_done + 1, epoch, loss, grad_norm, lr)
        self.scheduler.step()
        seconds = time.perf_counter() - started
        result.record_step(plan, loss, seconds)
        progress.step(result, lr, epoch)
        self.tracker.log_step(
            result.steps,
            {"loss": loss, "learning_rate": lr, "tokens_per_second": plan.num_tokens / seconds,
             "epoch": epoch + 1},
        )  # fmt: skip

    def _update(self, batches: list[MicroBatch], step_targets: int) -> tuple[float, float]:
        """One update from this rank's passes; returns the step's loss over all ranks and the
        gradient norm before clipping, read from the device together, the step's one host
        sync. A non-finite one makes no update (the caller stops)."""
        self.model.train()
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        fillers = self._fillers(batches)
        loss = accumulate_gradients(
            self.model, batches, step_targets, self.device, self.forwards, fillers
        )
        if self.world.size > 1:
            for parameter in parameters:  # a rank with no rows in this step adds zeros
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
            loss = loss.reshape(1)
            sum_over_ranks([p.grad for p in parameters] + [loss], self.world)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        loss_value, norm_value = torch.stack([loss.reshape(()), grad_norm.float()]).tolist()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value

    def _fillers(self, batches: list[MicroBatch]) -> list[MicroBatch]:
        """In lockstep, the passes of zero weight that bring this rank to as many passes as
        the rank with the most in this step (one host sync, on the count)."""
        if not self.forwards.lockstep or self.world.size == 1:
            return []
        passes = sum(1 for batch in batches if batch.num_targets)
        most = most_over_ranks(passes, self.world, self.device)
        return [filler_batch(self.rows)] * (most - passes)


def filler_batch(rows: Rows) -> MicroBatch:
    """A pass for a rank short of passes: the shortest row with a supervised token."""
    supervised = np.flatnonzero(rows.num_targets > 0)
    shortest = supervised[np.argmin(rows.lengths[supervised])]
    return collate(rows, np.array([shortest], np.int64))


def non_finite_step(
    step: int, epoch: int, loss: float, grad_norm: float, lr: float
) -> UserInputError:
    """The error that stops a training whose loss or gradients overflowed: the adapter it
    would return is broken, so none is. Every rank sees the same summed figures."""
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    return UserInputError(
        f"training stopped at optimizer step {step} (epoch {epoch + 1}): {what}, so the "
        f"adapter would be broken and none is returned. Lower learning_rate (this step's was "
        f"{lr:.3g}); if init_weights were given, check that they are a good training's"
    )


def accumulate_gradients(
    model: PeftModel,
    batches: list[MicroBatch],
    step_targets: int,
    device: torch.device,
    forwards: ForwardPlan | None = None,
    fillers: list[MicroBatch] = (),  # type: ignore[assignment]
) -> torch.Tensor:
    """Backward over the forward passes of one step; return their share of the step's mean loss,
    on the device (read once per step, not once per pass: each read waits for the GPU).

    Each pass's loss sum is divided by the supervised tokens of the whole step (over all passes
    and ranks), so the accumulated gradient is that of the mean over the step's tokens, however
    the step is split. A pass longer than the plan's limit runs with activation checkpointing.
    `fillers` run forward and backward with weight zero (lockstep): they add exact zeros to
    the gradients and leave the random state (dropout) as it was.
    """
    total = torch.zeros((), dtype=torch.float32, device=device)
    for batch in batches:
        if batch.num_targets == 0:
            continue
        if forwards is not None:
            set_activation_checkpointing(model, forwards.checkpoint(batch.num_real_tokens))
        loss = supervised_loss_sum(model, batch, device) / step_targets
        loss.backward()
        total += loss.detach()
    for batch in fillers:
        if forwards is not None:
            set_activation_checkpointing(model, forwards.checkpoint(batch.num_real_tokens))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            (supervised_loss_sum(model, batch, device) * 0.0).backward()
    return total


def supervised_loss_sum(model: PeftModel, batch: MicroBatch, device: torch.device) -> torch.Tensor:
    """Sum of the cross-entropy over the supervised positions of a micro-batch. Every input
    goes to the device without a host sync: copies from pinned memory, and the supervised
    positions gathered by the host-built indices of collate."""
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(
        input_ids=batch.input_ids.to(device, non_blocking=True),
        position_ids=batch.position_ids.to(device, non_blocking=True),
        packed_segments=PackedSegments.of(batch.segment_lengths, device),
        use_cache=False,
    ).last_hidden_state  # (1, N, H)
    positions = batch.supervised_positions.to(device, non_blocking=True)
    labels = batch.supervised_targets.to(device, non_blocking=True)
    states = hidden[0].index_select(0, positions)  # (T, H)
    return training_loss_sum(states, causal_lm.get_output_embeddings(), labels)


@torch.no_grad()
def validation_loss(
    model: PeftModel,
    rows: Rows,
    batch_size: int,
    device: torch.device,
    forward_tokens: int | None = None,
    world: World | None = None,
    lockstep: bool = False,
) -> float:
    """Token-weighted mean loss over the validation rows, masked as in training; a batch of
    rows runs in passes of at most `forward_tokens` tokens (whole rows). With several ranks
    each takes every world.size-th batch, and the loss sums and token counts are summed: the
    same figure as one process's. In `lockstep` a rank short of passes runs more, unused."""
    model.eval()
    world = world or World()
    passes = validation_passes(rows, batch_size, forward_tokens, world.size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for group in passes[world.rank]:
        batch = collate(rows, group)
        loss_sum += supervised_loss_sum(model, batch, device).double()
        count += batch.num_targets
    if lockstep:
        for _ in range(max(map(len, passes)) - len(passes[world.rank])):
            supervised_loss_sum(model, filler_batch(rows), device)
    totals = torch.stack([loss_sum, torch.tensor(float(count), device=device).double()])
    sum_over_ranks([totals], world)
    total_loss, total_count = totals.tolist()
    return total_loss / max(total_count, 1.0)


def validation_passes(
    rows: Rows, batch_size: int, forward_tokens: int | None, ranks: int
) -> list[list[np.ndarray]]:
    """Each rank's validation passes (those with a supervised token): batch b to rank
    b % ranks. Every rank computes all of them, so each knows how many the others run."""
    passes: list[list[np.ndarray]] = [[] for _ in range(ranks)]
    for index, start in enumerate(range(0, len(rows), batch_size)):
        batch_rows = np.arange(start, min(start + batch_size, len(rows)))
        for group in forward_groups(rows, batch_rows, forward_tokens):
            if rows.num_targets[group].sum():
                passes[index % ranks].append(group)
    return passes


@dataclass(frozen=True)
class ValidationPrompt:
    """The validation_prompt, encoded as predict.py would encode it for this adapter: with
    the system prompt its training rows used (src/prompt_format.choose_system_prompt)."""

    text: str
    ids: list[int]
    system: str | None
    reason: str  # why that system prompt, for the log

    @property
    def most_tokens(self) -> int:
        """Tokens an answer holds in its KV cache, at most."""
        return len(self.ids) + VALIDATION_MAX_NEW_TOKENS


def validation_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str | None, trained: TrainedSystemPrompt
) -> ValidationPrompt | None:
    if not prompt:
        return None
    system, reason = choose_system_prompt(None, trained, adapter=True)
    return ValidationPrompt(prompt, encode_user_prompt(tokenizer, prompt, system), system, reason)


@torch.no_grad()
def answer_prompt(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    device: torch.device,
    lockstep: bool = False,
) -> str:
    """Greedy answer to a prompt's token ids (BOS and the chat format included). In
    `lockstep` every rank generates it, steps kept together until all have ended
    (transformers' synced_gpus, made for sharded models)."""
    model.eval()
    output = model.generate(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=VALIDATION_MAX_NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.eos_token_id,
        synced_gpus=lockstep,
    )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()


def _end_of_epoch(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    validation_rows: Rows,
    config: TrainConfig,
    step: _Step,
    result: TrainResult,
    epoch: int,
    prompt: ValidationPrompt | None,
) -> float:
    """Validation loss (NaN without validation rows) and the validation prompt's answer, on
    every rank (each its share of the rows; the answer on rank 0, or on all in lockstep)."""
    device, world, lockstep = step.device, step.world, step.forwards.lockstep
    loss = math.nan
    if len(validation_rows):
        loss = validation_loss(
            model,
            validation_rows,
            config.validation_batch_size,
            device,
            step.forwards.validation_tokens,
            world,
            lockstep,
        )
        result.validation_losses.append((result.steps, loss))
        log(
            f"validation: epoch {epoch + 1} | loss {loss:.4f} | "
            f"perplexity {math.exp(min(loss, 50)):.2f}"
        )
    reported: dict = {} if math.isnan(loss) else {"loss": loss}
    if prompt is not None and (world.is_main or lockstep):
        answer = answer_prompt(model, tokenizer, prompt.ids, device, lockstep and world.size > 1)
        result.validation_answers.append(answer)
        log(f"validation prompt: {prompt.text!r}\nmodel answer: {answer!r}")
        reported |= {"prompt": prompt.text, "answer": answer}
    step.tracker.log_epoch(result.steps, epoch + 1, reported)
    return loss


def _log_data_parallel_plan(config: TrainConfig, world: World) -> None:
    per_rank = -(-config.train_batch_size // world.size)
    log(
        f"data parallel: {world.size} processes share each step's {config.train_batch_size} "
        f"rows (up to {per_rank} each), at most {config.micro_batch_size} per forward pass"
    )
    if config.train_batch_size % world.size:
        log(
            f"note: train_batch_size {config.train_batch_size} is not a multiple of "
            f"{world.size} processes: some take one row less per step (the update is still "
            f"exact); a multiple uses every device fully"
        )


def _warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Linear warmup over the first 3% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, round(WARMUP_SHARE * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (
            1 + math.cos(math.pi * min(progress, 1.0))
        )

    return factor


class _Progress:
    """Step, loss, learning rate, real tokens per second and ETA, about 40 lines a run."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.every = max(1, total_steps // 40)
        self.clock = Stopwatch()
        self.last_time = 0.0
        self.last_tokens = 0

    def step(self, result: TrainResult, lr: float, epoch: int, skipped: bool = False) -> None:
        done = result.planned_steps_done
        if done % self.every and done != self.total_steps and done != 1:
            return
        now = self.clock.elapsed()
        rate = (result.tokens_trained - self.last_tokens) / max(now - self.last_time, 1e-9)
        eta = now / done * (self.total_steps - done)
        loss = "skipped (no supervised token)" if skipped else f"{result.train_losses[-1][1]:.4f}"
        log(
            f"step {done}/{self.total_steps} | epoch {epoch + 1} | loss {loss} | "
            f"lr {lr:.2e} | {rate:,.0f} tokens/s | eta {format_duration(eta)}"
        )
        self.last_time, self.last_tokens = now, result.tokens_trained

    def resume(self) -> None:
        """Leave time spent outside training steps (validation) out of the next rate."""
        self.last_time = self.clock.elapsed()
