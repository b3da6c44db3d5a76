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
    matmuls = operations["mm"] + operations.get("addmm_", 0)
    if fused:
        # the base's 7 each way; 4 shrinks (q/k/v and gate/up share one each), 7 in-place
        # expansions; backward: 2 per expansion, 2 per shrink
        assert matmuls == 14 + 4 + 7 + 2 * 7 + 2 * 4
        assert operations["bernoulli_"] == 4  # one dropout mask per input read by LoRA
    else:  # per projection: the base each way, LoRA's two forward and four backward
        assert matmuls == 7 * 8
        assert operations["bernoulli_"] == 7  # peft: a mask per projection
    assert operations["flash_attn_varlen_forward"] == operations["flash_attn_varlen_backward"] == 1
    assert "flash_attn_varlen_forward" not in rest["operations"]
    assert measure("tiny", tokens=64, segments=2, fused=fused)["decoder_layer"] == layer


def test_the_fused_lora_forward_moves_fewer_bytes_in_fewer_kernels(censuses):
    peft, fused = censuses[False]["decoder_layer"], censuses[True]["decoder_layer"]
    assert fused["kernels"] < 0.9 * peft["kernels"]
    assert fused["other_bytes_per_token"] < 0.6 * peft["other_bytes_per_token"]
    assert fused["operations"]["_to_copy"] < peft["operations"]["_to_copy"]
    assert fused["matmul_flops_per_token"] == pytest.approx(
        peft["matmul_flops_per_token"], rel=0.02
    )
