"""The benchmark harness's own arithmetic (the harness itself runs in CI as `make bench-smoke`)."""

from bench.common import mixed_lengths, training_flops_per_token
from tools.tiny_model import SIZES


def test_mixed_lengths_are_a_fixed_spread_within_bounds():
    lengths = mixed_lengths(2000)
    assert lengths == mixed_lengths(2000)
    assert min(lengths) == 20 and max(lengths) == 2000
    assert 200 < sorted(lengths)[1000] < 300  # median about 250


def test_flops_per_token_of_the_100m_model():
    config = {**SIZES["100m"], "vocab_size": 32000}
    # 8 layers x (4 x 768^2 + 3 x 768 x 2048) + the 768 x 32000 head, times 4
    assert training_flops_per_token(config, mean_context=0) == 4 * (8 * 7_077_888 + 24_576_000)


def test_gpu_script_imports_without_a_gpu():
    import bench.gpu

    assert bench.gpu.LLAMA_2_7B["hidden_size"] == 4096
