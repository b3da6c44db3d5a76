"""Random streams derived from the user's seed: every 64-bit seed works, streams differ."""

import pytest
import torch

from src.seeds import SEED_MAX, SEED_MIN, derive_seed
from src.training.batching import epoch_order
from src.training.run import dropout_seed


@pytest.mark.parametrize("seed", [SEED_MIN, -1, 0, 42, SEED_MAX])
def test_every_64_bit_seed_gives_a_generator_seed(seed):
    derived = derive_seed(seed, "data order", 7)
    assert 0 <= derived < 2**63 and derived == derive_seed(seed, "data order", 7)
    torch.Generator().manual_seed(derived)
    assert sorted(epoch_order(10, seed, 3)) == list(range(10))


def test_streams_of_one_seed_differ():
    assert derive_seed(42, "data order", 0) != derive_seed(42, "data order", 1)
    assert derive_seed(42, "lora init") != derive_seed(43, "lora init")


def test_each_rank_draws_its_own_dropout_masks_and_repeats_them():
    def masks(rank: int) -> torch.Tensor:
        torch.manual_seed(dropout_seed(42, rank))
        return torch.nn.functional.dropout(torch.ones(1000), p=0.5)

    assert torch.equal(masks(0), masks(0))
    assert not torch.equal(masks(0), masks(1))
