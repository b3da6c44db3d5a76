"""Cog training entry point: the documented inputs of meta/llama-2-7b-chat's training.

The defaults, bounds and descriptions below are the single source for these inputs (Cog reads
them from this file to make the API schema); src/training/config.py coerces and cross-checks them.
"""

from cog import BaseModel, Input, Path, Secret

from src.training.config import build_train_config
from src.training.run import run_training


class TrainingOutput(BaseModel):
    weights: Path


def train(
    train_data: Path = Input(
        description='URL to a file of training data where each row is a JSON record in the format {"text": ...} or {"prompt": ..., "completion": ...}. Must be JSONL.',
    ),
    num_train_epochs: int = Input(
        description="Number of epochs (iterations over the entire training dataset) to train for.",
        default=3,
        ge=1,
        le=1000,
    ),
    train_batch_size: int = Input(
        description="Global batch size: the number of rows (packed rows when pack_sequences is true) in each optimizer step, over all GPUs.",
        default=4,
        ge=1,
        le=4096,
    ),
    micro_batch_size: int = Input(
        description="Micro batch size: the on-device batch. If it is less than train_batch_size, gradient accumulation makes up the difference.",
        default=4,
        ge=1,
        le=512,
    ),
    num_validation_samples: int = Input(
        description="Number of samples to use for validation. Without validation_data, this many rows are held out from the tail of the training data (at most a fifth of it); with validation_data, this many rows are taken from its head.",
        default=50,
        ge=1,
        le=100000,
    ),
    validation_data: Path | None = Input(
        description='URL to a file of eval data where each row is a JSON record in the format {"text": ...} or {"prompt": ..., "completion": ...}. Must be JSONL.',
        default=None,
    ),
    validation_batch_size: int = Input(
        description="Batch size for evaluation. For small validation sets, you should use the default batch size of 1.",
        default=1,
        ge=1,
        le=512,
    ),
    run_validation: bool = Input(
        description="Whether to run validation during training.",
        default=True,
    ),
    validation_prompt: str | None = Input(
        description="If provided, this prompt is answered by the model in the Llama-2 chat format after each validation, and the answer is logged. A prompt already in [INST] ... [/INST] form is used as is.",
        default=None,
    ),
    learning_rate: float = Input(
        description="Peak learning rate (linear warmup over the first 3% of steps, then cosine decay to a tenth of it).",
        default=1e-4,
        ge=0.0,
        le=1.0,
    ),
    pack_sequences: bool = Input(
        description="If true, whole examples are packed into rows of up to chunk_size tokens. Packed examples never attend to each other. This improves computational efficiency.",
        default=False,
    ),
    wrap_packed_sequences: bool = Input(
        description="If pack_sequences is true, cut the stream of all examples into rows of exactly chunk_size tokens, so an example may continue in the next row.",
        default=False,
    ),
    chunk_size: int = Input(
        description="If pack_sequences is true, the length of the packed rows, in tokens.",
        default=2048,
        ge=16,
        le=32768,
    ),
    peft_method: str = Input(
        description="Training method to use: lora, or qlora (LoRA on a 4-bit NF4 base).",
        default="lora",
        choices=["lora", "qlora"],
    ),
    seed: int = Input(
        description="Random seed to use for training: LoRA initialisation, dropout and data order. Any signed 64-bit integer.",
        default=42,
        ge=-9223372036854775808,
        le=9223372036854775807,
    ),
    lora_rank: int = Input(
        description="Rank of the LoRA matrices.",
        default=8,
        ge=1,
        le=1024,
    ),
    lora_alpha: int = Input(
        description="Alpha parameter for scaling LoRA weights; weights are scaled by alpha/rank.",
        default=16,
        ge=1,
        le=4096,
    ),
    lora_dropout: float = Input(
        description="Dropout for LoRA training.",
        default=0.05,
        ge=0.0,
        le=0.9,
    ),
    init_weights: str | None = Input(
        description="URL or path of the weights of an earlier training of this model (any archive the predictor accepts) to continue from: training starts from that adapter (weights only, no optimizer state), and its rank, alpha and target modules are used.",
        default=None,
    ),
    keep_best_epoch: bool = Input(
        description="If true, the output is the adapter of the epoch with the lowest validation loss, not of the last epoch. Needs validation.",
        default=False,
    ),
    early_stopping_patience: int = Input(
        description="Stop training when the validation loss has not improved for this many epochs (0: never stop early). Needs validation.",
        default=0,
        ge=0,
        le=1000,
    ),
    wandb_api_key: Secret | None = Input(
        description="Weights & Biases API key: with it, the run's inputs, losses, learning rate, speed, validation answers and loss curve are logged to Weights & Biases. Never logged or stored.",
        default=None,
    ),
    wandb_project: str | None = Input(
        description="Weights & Biases project to log to (with wandb_api_key).",
        default=None,
    ),
    wandb_run_name: str | None = Input(
        description="Weights & Biases run name (with wandb_api_key; default: one chosen by Weights & Biases).",
        default=None,
    ),
) -> TrainingOutput:
    inputs = dict(locals())
    key = inputs.pop("wandb_api_key")
    config = build_train_config(**inputs)
    secret = key.get_secret_value() if key is not None else None
    return TrainingOutput(weights=Path(run_training(config, wandb_api_key=secret)))
