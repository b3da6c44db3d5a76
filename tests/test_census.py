"""The operation census counts what the GPU would run: kernels, not views; attention as the
varlen flash kernel, once each way per layer; each compiled elementwise function as one
kernel each way; the training's dropout masks; and what the default (fused LoRA, compiled
elementwise work) saves against peft's LoRA in transformers' eager layers."""

import pytest

from bench.census import NO_KERNEL, measure

CONFIGURATIONS = {"peft": (False, False), "fused lora": (True, False), "default": (True, True)}


@pytest.fixture(scope="module")
def censuses() -> dict:
    return {
        name: measure("tiny", tokens=64, segments=2, fused=fused, compiled=compiled)
        for name, (fused, compiled) in CONFIGURATIONS.items()
    }


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_the_census_of_a_layer_counts_the_gpu_path(censuses, name):
    census = censuses[name]
    fused, compiled = CONFIGURATIONS[name]
    layer, rest = census["decoder_layer"], census["embedding_head_loss"]
    operations = layer["operations"]
    assert not set(operations) & NO_KERNEL
    assert layer["kernels"] > 100 and rest["kernels"] > 10
    matmuls = operations["mm"] + operations.get("addmm", 0) + operations.get("addmm_", 0)
    if fused:
        # the base's 7 each way; 4 shrinks (q/k/v and gate/up share one each), 7 in-place
        # expansions; backward: 2 per expansion (the scale in the GEMM), 2 per shrink
        assert matmuls == 14 + 4 + 7 + 2 * 7 + 2 * 4
        assert operations["addmm"] == 2 * 7  # the backward scales ride in the GEMM
        assert operations["mul_"] == 4  # left: the dropout masks on the inputs' gradients
        assert operations["bernoulli_"] == 4  # one dropout mask per input read by LoRA
    else:  # per projection: the base each way, LoRA's two forward and four backward
        assert matmuls == 7 * 8
        assert operations["bernoulli_"] == 7  # peft: a mask per projection
    assert operations["flash_attn_varlen_forward"] == operations["flash_attn_varlen_backward"] == 1
    assert "flash_attn_varlen_forward" not in rest["operations"]
    fused_kernels = {k: v for k, v in operations.items() if k.startswith("fused_")}
    if compiled:  # two norms, the rotary embedding and SwiGLU: one kernel each way
        assert fused_kernels == {
            f"fused_{f}{way}": 1
            for f in ("rms_norm", "add_rms_norm", "rotary", "swiglu")
            for way in ("", "_backward")
        }
        assert not {"pow", "rsqrt", "neg", "silu", "silu_backward"} & set(operations)
    else:
        assert not fused_kernels and operations["rsqrt"] == 2 and operations["silu"] == 1
    assert (
        measure("tiny", tokens=64, segments=2, fused=fused, compiled=compiled)["decoder_layer"]
        == layer
    )


def test_the_fused_lora_forward_moves_fewer_bytes_in_fewer_kernels(censuses):
    peft, fused = censuses["peft"]["decoder_layer"], censuses["fused lora"]["decoder_layer"]
    assert fused["kernels"] < 0.8 * peft["kernels"]
    assert fused["other_bytes_per_token"] < 0.6 * peft["other_bytes_per_token"]
    assert fused["operations"]["_to_copy"] < peft["operations"]["_to_copy"]
    assert fused["matmul_flops_per_token"] == pytest.approx(
        peft["matmul_flops_per_token"], rel=0.02
    )


def test_the_default_halves_the_kernels_and_the_other_bytes_of_a_layer(censuses):
    peft, default = censuses["peft"]["decoder_layer"], censuses["default"]["decoder_layer"]
    fused = censuses["fused lora"]["decoder_layer"]
    assert default["kernels"] <= 0.5 * peft["kernels"]
    assert default["other_bytes_per_token"] <= 0.5 * peft["other_bytes_per_token"]
    assert default["other_bytes_per_token"] < 0.6 * fused["other_bytes_per_token"]
    assert default["matmul_flops_per_token"] == fused["matmul_flops_per_token"]
    assert (
        censuses["default"]["embedding_head_loss"] == censuses["fused lora"]["embedding_head_loss"]
    )


def test_the_decode_step_never_waits_for_the_host_and_shares_its_shrinks():
    """bench/decode_census.py: one decode step of one row with an adapter, sampling
    included, as a captured step runs it: no operation that reads a value back to the host
    (a CUDA graph could not hold it), one LoRA shrink per input (4 a layer: q/k/v, o,
    gate/up, down) and one expand per projection, and no more kernels a layer than the
    census counted when this was built."""
    from bench.decode_census import eager

    census = eager("tiny")
    syncs = {"item", "_local_scalar_dense", "is_nonzero", "tolist", "nonzero"}
    for part in ("decoder_layer", "rest"):
        assert not syncs & set(census[part])
    layer = census["decoder_layer"]
    assert layer["linear"] == 7  # the base projections
    assert layer["matmul"] == 4 + 7  # the shared shrinks, the expands
    assert census["decoder_layer_kernels"] <= 67
    assert census["rest"]["sort"] == 1 and census["rest"]["searchsorted"] == 1
