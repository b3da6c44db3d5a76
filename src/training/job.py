"""One training, prepared before any model loads: the object every training process runs.

The data stage (src/training/run.prepare_examples) builds it in the process that train()
runs in; data-parallel workers read it back from the job folder (src/training/launcher.py).
"""

from dataclasses import dataclass, field
from typing import Any

from src.base_model import BaseModel
from src.training.batching import PackingStats, Rows
from src.training.config import TrainConfig
from src.training.continuation import LoraSettings, StartingAdapter
from src.training.data import TrainingData
from src.training.distributed import World


@dataclass(frozen=True)
class TrainingJob:
    config: TrainConfig
    base: BaseModel
    tokenizer: Any
    data: TrainingData
    packed: tuple[Rows, PackingStats]  # the training rows and how well they pack
    lora: LoraSettings  # the LoRA trained: from the inputs, or the adapter continued
    start: StartingAdapter | None = None  # the adapter continued (init_weights)
    world: World = field(default_factory=World)  # this process's rank

    @property
    def train_rows(self) -> Rows:
        return self.packed[0]
