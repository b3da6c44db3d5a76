"""Training and inference core of the trainable Llama-2-chat Cog container."""

import logging


def _not_the_optional_cpu_kernel(record: logging.LogRecord) -> bool:
    """bitsandbytes' CPU backend, when imported on a CPU with AVX512-BF16, tries to fetch an
    optional inference kernel (the `kernels` package) and warns at every start that it
    cannot. The project never runs that kernel (src/modeling.keep_4bit_weights_trainable
    keeps 4-bit layers on the training path), so the warning is dropped; others pass."""
    return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_optional_cpu_kernel)
