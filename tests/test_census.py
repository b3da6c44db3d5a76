"""The operation census counts what the GPU would run: kernels, not views; attention as the
varlen flash kernel, once each way per layer; the training's dropout masks; and the fused
LoRA forward's saving against peft's."""

import pytest

from bench.census import NO_KERNEL, measure


@pytest.fixture(scope="module")
def censuses() -> dict:
    return {fused: measure("tiny", tokens=64, segments=2, fused=fused) for fused in (False, True)}


@pytest.mark.parametrize("fused", [False, True], ids=["peft", "fused"])
def test_the_census_of_a_layer_counts_the_gpu_path(censuses, fused):
    census = censuses[fused]
    layer, rest = census["decoder_layer"], census["embedding_head_loss"]
    operations = layer["operations"]
    assert not set(operations) & NO_KERNEL
    assert layer["kernels"] > 100 and rest["kernels"] > 10
    # per projection: the base matmul each way; LoRA's two forward, four backward (fused:
    # one of the forward two accumulates in place)
    assert operations["mm"] + operations.get("addmm_", 0) == 7 * 8
    assert operations["bernoulli_"] == 7  # one dropout mask per LoRA input
    assert operations["flash_attn_varlen_forward"] == operations["flash_attn_varlen_backward"] == 1
    assert "flash_attn_varlen_forward" not in rest["operations"]
    assert measure("tiny", tokens=64, segments=2, fused=fused)["decoder_layer"] == layer


def test_the_fused_lora_forward_moves_fewer_bytes_in_fewer_kernels(censuses):
    peft, fused = censuses[False]["decoder_layer"], censuses[True]["decoder_layer"]
    assert fused["kernels"] < peft["kernels"]
    assert fused["other_bytes_per_token"] < 0.75 * peft["other_bytes_per_token"]
    assert fused["operations"]["_to_copy"] < peft["operations"]["_to_copy"]
    assert fused["matmul_flops_per_token"] == pytest.approx(
        peft["matmul_flops_per_token"], rel=0.02
    )
