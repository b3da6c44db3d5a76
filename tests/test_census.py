"""The operation census counts what the GPU would run: kernels, not views; attention as the
varlen flash kernel, once each way per layer; the training's dropout masks."""

from bench.census import NO_KERNEL, measure


def test_the_census_of_a_layer_counts_the_gpu_path():
    census = measure("tiny", tokens=64, segments=2)
    layer, rest = census["decoder_layer"], census["embedding_head_loss"]
    operations = layer["operations"]
    assert not set(operations) & NO_KERNEL
    assert layer["kernels"] > 100 and rest["kernels"] > 10
    assert operations["mm"] == 56  # 7 projections: base and LoRA's two, forward and backward
    assert operations["bernoulli_"] == 7  # one dropout mask per LoRA input (peft)
    assert operations["flash_attn_varlen_forward"] == operations["flash_attn_varlen_backward"] == 1
    assert "flash_attn_varlen_forward" not in rest["operations"]
    assert measure("tiny", tokens=64, segments=2)["decoder_layer"] == layer  # a gate compares runs
