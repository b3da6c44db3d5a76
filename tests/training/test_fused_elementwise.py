"""The decoder layer's fused elementwise work: its functions are transformers' arithmetic;
compiled (inductor, on this CPU) they agree with eager, forward and backward, trace whole
and compile once whatever the packing and the number of layers; a training step of the
tiny model through them equals transformers' layer; eval runs transformers' layer
exactly; the choice is logged, a compiler failure runs eager and says why; what the
compiled functions keep for the backward is no more than eager keeps."""

import dataclasses
import json
import os
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch._dynamo.utils import counters
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)

import src.training.fused_elementwise as fused_elementwise
from src.modeling import Placement, add_lora, load_base_model, set_activation_checkpointing
from src.prompt_format import encode_chat_examples
from src.training.batching import build_rows, collate
from src.training.examples import Examples
from src.training.fused_elementwise import (
    EAGER,
    TOKEN_DIMS,
    choose_elementwise,
    compiled_elementwise,
    install_elementwise,
    remove_elementwise,
)
from src.training.fused_lora import install_fused_lora
from src.training.loop import supervised_loss_sum
from tests.helpers import FACTS, FAST_LEARNING, OTHER_FACTS, call_train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def compiled():
    """One set of compiled functions for the module (compiling is the slow part)."""
    torch._dynamo.reset()
    counters.clear()
    return compiled_elementwise()


def inputs(tokens: int, dtype: torch.dtype, seed: int = 0) -> dict[str, tuple]:
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

    return {
        "rms_norm": (tensor(1, tokens, 64), tensor(64), 1e-5),
        "add_rms_norm": (tensor(1, tokens, 64), tensor(1, tokens, 64), tensor(64), 1e-6),
        "rotary": (
            tensor(1, 4, tokens, 16),
            tensor(1, 2, tokens, 16),
            tensor(1, tokens, 16),
            tensor(1, tokens, 16),
        ),
        "swiglu": (tensor(1, tokens, 48), tensor(1, tokens, 48)),
    }


def outputs_and_grads(function, args: tuple) -> tuple[list, list]:
    outputs = function(*args)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(
        sum((o.float() * (i + 1)).sum() for i, o in enumerate(outputs)), tensors
    )
    return [o.detach() for o in outputs], list(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_functions_are_transformers_arithmetic(dtype):
    args = inputs(6, dtype)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(args["rms_norm"][1])
    assert torch.equal(EAGER.rms_norm(*args["rms_norm"]), norm(args["rms_norm"][0]))
    q, k, cos, sin = args["rotary"]
    assert all(map(torch.equal, EAGER.rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)))
    gate, up = args["swiglu"]
    mlp = LlamaMLP(type("Config", (), {"hidden_size": 8, "intermediate_size": 48,
                                       "mlp_bias": False, "hidden_act": "silu"})())  # fmt: skip
    assert torch.equal(EAGER.swiglu(gate, up), mlp.act_fn(gate) * up)
    residual, update, weight, eps = args["add_rms_norm"]
    total, normed = EAGER.add_rms_norm(residual, update, weight, eps)
    assert torch.equal(total, residual + update)
    assert torch.equal(normed, EAGER.rms_norm(residual + update, weight, eps))


def widened(args: tuple) -> tuple:
    return tuple(a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a
                 for a in args)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_functions_agree_with_eager_and_compile_once_for_every_length(compiled, dtype):
    """fp32: within 1e-5. bf16: the fused kernel rounds once, at its end, where eager
    rounds after every operation; so against an fp64 reference it is never further off
    than eager is (and within one bf16 ulp of the result's scale)."""
    for tokens in (3, 8, 31, 64, 130):
        for name in TOKEN_DIMS:
            args = inputs(tokens, dtype, seed=tokens)[name]
            eager = outputs_and_grads(getattr(EAGER, name), args)
            fused = outputs_and_grads(getattr(compiled, name), args)
            exact = outputs_and_grads(getattr(EAGER, name), widened(args))
            for got, want, true in zip(*(r[0] + r[1] for r in (fused, eager, exact)), strict=True):
                assert got.dtype == want.dtype and got.shape == want.shape
                if dtype == torch.float32:
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                    continue
                error, eager_error = ((t.double() - true).abs().max() for t in (got, want))
                assert error <= max(eager_error, 2**-8 * true.abs().max()), name
    assert not counters["graph_break"]
    # one graph per function and dtype, whatever the number of tokens
    assert counters["stats"]["unique_graphs"] <= len(TOKEN_DIMS) * (
        2 if dtype == torch.bfloat16 else 1
    )


@pytest.fixture(scope="module")
def batches(tokenizer) -> list:
    """Micro-batches of different packings (segment layouts and lengths)."""
    out = []
    for facts, chunk in ((FACTS, 128), (OTHER_FACTS, 96), (FACTS + OTHER_FACTS, 160)):
        chat = encode_chat_examples(
            tokenizer, *map(list, zip(*facts, strict=True)), [None] * len(facts)
        )
        rows, _ = build_rows(Examples.from_tokenized(chat), pack=True, wrap=False, chunk_size=chunk)
        out.append(collate(rows, rows.segments(np.arange(len(rows)))))
    return out


def lora_model(model_dir):
    torch.manual_seed(0)
    base = load_base_model(model_dir, False, Placement(CPU, torch.float32))
    model = add_lora(base, rank=8, alpha=16, dropout=0.0, quantized=False)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter matter
            torch.nn.init.normal_(parameter, std=0.02)
    install_fused_lora(model)
    return model


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, dict]:
    model.train()
    loss = supervised_loss_sum(model, batch, CPU)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def forward_saved_bytes(model, batch) -> int:
    """What a training forward keeps for its backward (through saved-tensor hooks)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        supervised_loss_sum(model, batch, CPU)
    return total


def compilations() -> int:
    """Graphs dynamo captured, and inductor's compilations of them (a backward is compiled
    at its first run, a forward graph at its capture)."""
    inductor = sum(n for key, n in counters["inductor"].items() if key.startswith("fxgraph_"))
    return counters["stats"]["unique_graphs"] + inductor


def counting(kernels):
    """The functions of `kernels`, each call counted (by name)."""
    calls = Counter()

    def counted(name):
        function = getattr(kernels, name)

        def call(*args):
            calls[name] += 1
            return function(*args)

        return call

    return dataclasses.replace(kernels, **{n: counted(n) for n in TOKEN_DIMS}), calls


def test_a_training_step_through_compiled_layers_equals_transformers_layers(
    tiny_model_dir, batches, compiled
):
    """Forward and backward, with activation checkpointing off and on; the probe compiles
    every graph the steps use (so a compiler failure cannot wait for the training); every
    layer calls each compiled function once a forward, and a checkpointed layer again in
    backward."""
    model = lora_model(tiny_model_dir)
    eager = [loss_and_gradients(model, batch) for batch in batches]
    eager_checkpointed_bytes = _checkpointed(model, forward_saved_bytes, batches[0])
    kernels, calls = counting(compiled)
    assert install_elementwise(model, kernels) == model.config.num_hidden_layers == 4
    fused_elementwise.probe(model, CPU, 64)
    assert all(p.grad is None for p in model.parameters())
    graphs = compilations()
    for batch, (loss, grads) in zip(batches, eager, strict=True):
        for checkpointed in (False, True):
            set_activation_checkpointing(model, checkpointed)
            calls.clear()
            got_loss, got_grads = loss_and_gradients(model, batch)
            assert calls == dict.fromkeys(TOKEN_DIMS, 4 * (2 if checkpointed else 1))
            torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=0)
            assert got_grads.keys() == grads.keys() and len(grads) == 4 * 7 * 2
            errors = [float((got_grads[n] - grads[n]).norm() / grads[n].norm()) for n in grads]
            assert max(errors) < 1e-5  # fp32 sums in another order
    set_activation_checkpointing(model, False)
    assert not counters["graph_break"]
    # Four layers, three packings, checkpointing on and off: nothing compiled after the probe.
    assert compilations() == graphs
    # Checkpointed, compiled layers keep only their inputs, as transformers' layers do.
    kept = forward_saved_bytes(model, batches[0])
    checkpointed_bytes = _checkpointed(model, forward_saved_bytes, batches[0])
    assert checkpointed_bytes <= eager_checkpointed_bytes < kept / 3
    remove_elementwise(model)
    assert torch.equal(loss_and_gradients(model, batches[0])[0], eager[0][0])


def test_the_probe_compiles_what_an_adapter_on_some_projections_steps_through(
    tiny_model_dir, batches, monkeypatch
):
    """LoRA on q and v only (a continued adapter's targets): the first layer's k and its
    MLP's inputs carry no gradient, q does; the probe, a real pass through the model as it
    trains, compiles those graphs too, and leaves no gradient and the random state as was."""
    torch.manual_seed(0)
    base = load_base_model(tiny_model_dir, False, Placement(CPU, torch.float32))
    model = add_lora(base, 8, 16, 0.05, False, ["q_proj", "v_proj"])
    install_fused_lora(model)
    monkeypatch.setenv("TRAIN_COMPILE", "1")
    state = torch.random.get_rng_state()
    assert choose_elementwise(model, CPU, 64) == "compiled"
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    graphs = compilations()
    for batch in batches:
        loss_and_gradients(model, batch)
    assert compilations() == graphs
    assert not counters["graph_break"]


def _checkpointed(model, function, *args):
    set_activation_checkpointing(model, True)
    try:
        return function(model, *args)
    finally:
        set_activation_checkpointing(model, False)


def test_each_set_of_compiled_functions_has_the_whole_recompile_limit():
    """torch.compile keeps at most `recompile_limit` compilations per code object; past it a
    fullgraph function raises: a new set (a new training in this process, another dtype or
    base) does not inherit an old set's compilations."""
    gate = up = torch.randn(1, 8, 48)
    with torch._dynamo.config.patch(recompile_limit=1):
        old = compiled_elementwise()
        old.swiglu(gate, up)
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            old.swiglu(gate.double(), up.double())  # a second dtype: past the limit
        graphs = counters["stats"]["unique_graphs"]
        compiled_elementwise().swiglu(gate.double(), up.double())
        assert counters["stats"]["unique_graphs"] == graphs + 1


def test_eval_and_no_grad_run_transformers_layer_exactly(tiny_model_dir, batches, compiled):
    model = lora_model(tiny_model_dir)
    ids = batches[0].input_ids
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        install_elementwise(model, compiled)
        assert torch.equal(model(input_ids=ids).logits, want)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)  # dropout 0: same arithmetic


def test_the_choice_follows_the_setting_and_the_log_says_which(tiny_model_dir, monkeypatch, capsys):
    model = lora_model(tiny_model_dir)
    monkeypatch.delenv("TRAIN_COMPILE", raising=False)
    assert choose_elementwise(model, CPU, 64) == "eager"
    assert (
        "Elementwise: eager on cpu (TRAIN_COMPILE=1 compiles there too)" in capsys.readouterr().out
    )
    monkeypatch.setenv("TRAIN_COMPILE", "0")
    assert choose_elementwise(model, CPU, 64) == "eager"
    assert "transformers' eager decoder layers (TRAIN_COMPILE=0)" in capsys.readouterr().out
    assert "forward" not in vars(model.base_model.model.model.layers[0])
    monkeypatch.setenv("TRAIN_COMPILE", "1")
    assert choose_elementwise(model, CPU, 64) == "compiled"
    assert "compiled (torch.compile) on 4 decoder layers" in capsys.readouterr().out
    assert "forward" in vars(model.base_model.model.model.layers[0])
    model.config.hidden_act = "gelu"  # not the SwiGLU the fused layer computes
    assert choose_elementwise(model, CPU, 64) == "eager"
    assert (
        "Elementwise: eager, the base's activation is 'gelu', not silu" in capsys.readouterr().out
    )
    monkeypatch.setenv("TRAIN_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="TRAIN_COMPILE must be auto, 1 or 0, got 'sometimes'"):
        choose_elementwise(model, CPU, 64)


def test_auto_compiles_on_a_gpu(tiny_model_dir, monkeypatch, capsys):
    """The default on CUDA is the compiled layers (the probe, which would run there, is
    stood in for: this machine has no GPU)."""
    model = lora_model(tiny_model_dir)
    monkeypatch.delenv("TRAIN_COMPILE", raising=False)
    probed = []
    monkeypatch.setattr(fused_elementwise, "probe", lambda *args: probed.append(args[1:]))
    assert choose_elementwise(model, torch.device("cuda"), 5000) == "compiled"
    assert probed == [(torch.device("cuda"), fused_elementwise.PROBE_TOKENS)]
    assert "compiled (torch.compile) on 4 decoder layers" in capsys.readouterr().out
    fused_elementwise.remove_elementwise(model)


def test_a_probe_out_of_gpu_memory_is_named_as_such(tiny_model_dir, monkeypatch, capsys):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fused_elementwise, "probe", out_of_memory)
    monkeypatch.setenv("TRAIN_COMPILE", "1")
    model = lora_model(tiny_model_dir)
    assert choose_elementwise(model, CPU, 5000) == "eager"
    out = capsys.readouterr().out
    assert "the GPU ran out of memory in the compiled layers' probe pass of 2,048 tokens" in out
    assert "torch.compile failed" not in out
    assert "forward" not in vars(model.base_model.model.model.layers[0])


def test_a_compiler_failure_runs_eager_and_says_why(tiny_model_dir, monkeypatch, capsys):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler for this device")

    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": no_compiler})
    )
    monkeypatch.setenv("TRAIN_COMPILE", "1")
    model = lora_model(tiny_model_dir)
    assert choose_elementwise(model, CPU, 64) == "eager"
    out = capsys.readouterr().out
    assert "Elementwise: eager, torch.compile failed on cpu:" in out
    assert "RuntimeError: no C++ compiler for this device" in out
    assert "forward" not in vars(model.base_model.model.model.layers[0])


def saved_bytes(function, args: tuple) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function(*args)
    return total


@pytest.mark.parametrize("name", list(TOKEN_DIMS))
def test_compiled_functions_keep_no_more_for_the_backward_than_eager(compiled, name):
    """The memory model (src/training/memory.py) is measured through eager layers: it stays
    an upper bound when the layers are compiled."""
    args = inputs(64, torch.bfloat16)[name]
    assert saved_bytes(getattr(compiled, name), args) <= saved_bytes(getattr(EAGER, name), args)


def test_setting_names(monkeypatch):
    for value, want in (("", "auto"), ("AUTO", "auto"), ("on", "1"), ("false", "0")):
        monkeypatch.setenv("TRAIN_COMPILE", value)
        assert fused_elementwise.compile_setting() == want


def adapter_tensors(archive) -> dict[str, torch.Tensor]:
    with tarfile.open(archive) as tar:
        return load_safetensors(tar.extractfile("adapter_model.safetensors").read())


def computed(archive) -> dict[str, str]:
    with tarfile.open(archive) as tar:
        metadata = json.loads(tar.extractfile("training_metadata.json").read())
    return metadata["results"]["computed"]


def step_losses(log: str) -> list[float]:
    return [float(loss) for loss in re.findall(r"^step \d+/\d+ .*\| loss ([0-9.]+)", log, re.M)]


def test_a_training_with_compiled_layers_trains_as_eager_layers_train(
    base_model_env, facts_file, monkeypatch, capfd
):
    """Through train(), with dropout on: the compiled functions draw no random numbers, so
    the dropout masks are the same, and the losses agree step by step to fp32 rounding (Adam,
    whose first steps are nearly sign(gradient), moves the weights that rounding tips the
    other way by the whole learning rate: the adapters agree to a percent, not to 1e-5)."""
    settings = dict(
        FAST_LEARNING, num_train_epochs=2, lora_dropout=0.05, train_data=str(facts_file)
    )
    monkeypatch.setenv("TRAIN_COMPILE", "0")
    eager_archive = call_train(**settings)
    eager, eager_log = adapter_tensors(eager_archive), capfd.readouterr().out
    monkeypatch.setenv("TRAIN_COMPILE", "1")
    compiled_archive = call_train(**settings)
    compiled, compiled_log = adapter_tensors(compiled_archive), capfd.readouterr().out
    # the weights say how they were computed (a fallback to eager shows there too)
    assert computed(compiled_archive) == {"parallelism": "ddp", "lora_forward": "fused",
                                          "loss": "fused", "elementwise": "compiled"}  # fmt: skip
    assert computed(eager_archive)["elementwise"] == "eager"
    assert "compiled (torch.compile) on 4 decoder layers" in compiled_log
    assert "Elementwise: transformers' eager decoder layers" in eager_log
    losses, eager_losses = step_losses(compiled_log), step_losses(eager_log)
    assert len(losses) == len(eager_losses) == 8
    for loss, want in zip(losses, eager_losses, strict=True):
        assert loss == pytest.approx(want, rel=2e-4, abs=2e-4)
    assert compiled.keys() == eager.keys() and len(eager) == 4 * 7 * 2
    errors = [float((compiled[n] - eager[n]).norm() / eager[n].norm()) for n in eager]
    assert max(errors) < 0.02


def test_compiling_keeps_its_caches_in_the_cache_folder_not_tmpdir(monkeypatch, tmp_path):
    """TMPDIR is emptied of what a request left; the compiler's caches outlive requests. An
    operator's own setting wins."""
    monkeypatch.setenv("BASE_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(os.environ, "TORCHINDUCTOR_CACHE_DIR", "")  # restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/operator/triton")
    compiled_elementwise()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "torchinductor")
    assert os.environ["TRITON_CACHE_DIR"] == "/operator/triton"


PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_compiler_cache_leaves_tmpdir_though_transformers_set_it_there(tmp_path):
    """In a fresh process, as training and serving start: importing transformers already
    wrote inductor's TMPDIR default into TORCHINDUCTOR_CACHE_DIR; where inductor then
    writes is the cache folder."""
    import subprocess
    import sys

    script = (
        "import os, transformers, peft\n"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
        "assert os.environ['TORCHINDUCTOR_CACHE_DIR'].startswith(os.environ['TMPDIR'])\n"
        "from src.base_model import keep_compiler_caches_out_of_tmp\n"
        "keep_compiler_caches_out_of_tmp()\n"
        "print(cache_dir())\n"
        "print(sorted(os.listdir(os.environ['TMPDIR'])))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR",
                                                             "TRITON_CACHE_DIR")}  # fmt: skip
    (tmp_path / "tmp").mkdir()
    env |= {"BASE_MODEL_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, cwd=PROJECT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    where, left = done.stdout.splitlines()[-2:]
    assert where == str(tmp_path / "cache" / "torchinductor")
    assert left == "[]"  # nothing of inductor's left in TMPDIR
