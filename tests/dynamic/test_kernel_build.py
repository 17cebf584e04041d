"""The fused decode kernel's build (CPU-keyed cache, recorded fallback) and its argument checks."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils import cpp_extension

from sparsetune.activations import build_activation
from sparsetune.dynamic import kernels
from sparsetune.dynamic.kernels import (
    DecodeWeights,
    build_flags,
    build_fused,
    build_key,
    cpu_description,
    kernel_in_use,
)
from sparsetune.paths import cache_dir
from sparsetune.recipe.schema import relufy_config

HAVE_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
needs_compiler = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler to build the fused kernel")

CPU_A = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6148\n"
         "flags\t\t: fpu sse2 avx avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6148\n")
CPU_B = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) E5-2680\nflags\t\t: fpu sse2 avx\n"


def weights(m: int = 64, d: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, up and transposed-down weights [m, d]."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(m, d, generator=gen) for _ in range(3))


def decode_weights(activation: str) -> DecodeWeights:
    """DecodeWeights over weights() (it takes down as [d, m], as in the model)."""
    w_gate, w_up, w_down_t = weights()
    act = build_activation(relufy_config(activation=activation)).elementwise()
    return DecodeWeights(w_gate, w_up, w_down_t.t(), act)


@pytest.fixture
def fresh_build():
    """Forget the process's cached build before and after (the next use reloads it from sparsetune's cache)."""
    kernels._default_build.cache_clear()
    yield
    kernels._default_build.cache_clear()


def test_build_key_is_keyed_by_the_cpu_model_and_flags():
    a, b = cpu_description(CPU_A), cpu_description(CPU_B)
    assert a == "vendor_id: GenuineIntel\nmodel name: Intel(R) Xeon(R) Gold 6148\nflags: fpu sse2 avx avx2 avx512f"
    assert "E5-2680" in b and "avx512f" not in b
    assert build_key(a, build_flags(a)) != build_key(b, build_flags(b))
    assert build_key(a, build_flags(a)) == build_key(cpu_description(CPU_A), build_flags(a))  # stable
    # Same model name, other feature flags (e.g. a VM hiding AVX-512): still another binary.
    c = cpu_description(CPU_A.replace(" avx512f", ""))
    assert build_key(c, build_flags(c)) != build_key(a, build_flags(a))
    assert "-march=native" in build_flags(a)


def test_an_unidentified_cpu_gets_a_portable_build(monkeypatch):
    monkeypatch.setattr(kernels.platform, "processor", lambda: "")
    assert cpu_description("") == ""
    assert "-march=native" not in build_flags("") and "-O3" in build_flags("")


def test_build_goes_to_a_cpu_keyed_directory_of_sparsetunes_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETUNE_CACHE", str(tmp_path))
    calls = []

    def fake_load_inline(**kwargs):  # only the compile step is faked: record what it was asked to build
        calls.append(kwargs)
        return object()

    monkeypatch.setattr(cpp_extension, "load_inline", fake_load_inline)
    (_, rec_a), (_, rec_b) = build_fused(CPU_A), build_fused(CPU_B)
    assert rec_a["kernel"] == rec_b["kernel"] == "fused" and rec_a["cpu_key"] != rec_b["cpu_key"]
    for call, rec in zip(calls, (rec_a, rec_b)):
        assert call["build_directory"] == str(tmp_path / "kernels" / rec["cpu_key"])
        assert call["name"] == f"sparsetune_sparse_mlp_{rec['cpu_key']}"  # module names differ per CPU too
        assert call["extra_cflags"] == rec["build_flags"] and "-march=native" in call["extra_cflags"]


@needs_compiler
def test_kernel_in_use_reports_the_fused_kernel_built_here(fresh_build):
    rec = kernel_in_use()
    cpu = cpu_description()
    assert rec["kernel"] == "fused", rec["reason"]
    assert rec["build_flags"] == build_flags(cpu) and rec["cpu_key"] == build_key(cpu, build_flags(cpu))
    assert any(p.suffix == ".so" for p in cache_dir("kernels", rec["cpu_key"]).iterdir())
    assert kernels.fused_module() is not None
    assert kernels._LDFLAGS == ["-fopenmp"]  # torch's in-place additions must not change the next load's hash
    # Inputs it does not handle are recorded as the gather kernel, with the reason.
    assert kernel_in_use("cpu", torch.bfloat16)["reason"] == "the fused kernel is float32-only (dtype torch.bfloat16)"
    assert kernel_in_use(activation="fatrelu") == {"kernel": "gather", "build_flags": [], "cpu_key": None,
                                                   "reason": "activation 'fatrelu' has no fused implementation"}


def test_a_failed_build_is_recorded_and_announced_in_one_line(monkeypatch, capsys, fresh_build):
    def failing_load_inline(**kwargs):
        raise RuntimeError("Error building extension 'sparsetune_sparse_mlp': c++ -c main.cpp\nFAILED: main.o\n"
                           "main.cpp:3:1: error: expected ';'\nmain.cpp:9:1: error: later error\nninja: stopped")

    monkeypatch.setattr(cpp_extension, "load_inline", failing_load_inline)
    rec = kernel_in_use()
    assert rec["kernel"] == "gather"
    assert rec["reason"] == ("build failed: RuntimeError: Error building extension 'sparsetune_sparse_mlp': c++ -c "
                             "main.cpp | main.cpp:3:1: error: expected ';'")
    assert rec["cpu_key"] and rec["build_flags"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and rec["reason"] in err
    # The decode path falls back to the (correct) gather kernel, and the checked entry says why it cannot run.
    w = decode_weights("relu")
    x, idx = torch.randn(32), torch.tensor([1, 5, 9])
    assert torch.equal(w.fused(x, idx), w.gather(x, idx))


@needs_compiler
def test_a_real_compiler_failure_falls_back_with_its_first_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SPARSETUNE_CACHE", str(tmp_path))
    module, rec = build_fused(extra_cflags=["-fno-such-option-sparsetune"])
    assert module is None and rec["kernel"] == "gather"
    first, compiler_error = rec["reason"].split(" | ")  # the compiler's own diagnostic follows torch's first line
    assert first.startswith("build failed: RuntimeError: Error building extension")
    assert "error:" in compiler_error and "-fno-such-option-sparsetune" in compiler_error
    assert "\n" not in rec["reason"] and "-fno-such-option-sparsetune" in rec["build_flags"]
    assert "fused sparse MLP kernel unavailable" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x": a["x"].double()}, r"^fused decode kernel: x must be float32, got torch.float64$"),
    (lambda a: {**a, "x": torch.randn(31)}, r"^fused decode kernel: x must be 1-D of length d=32, got shape \(31,\)$"),
    (lambda a: {**a, "x": torch.randn(1, 32)}, r"x must be 1-D of length d=32, got shape \(1, 32\)"),
    (lambda a: {**a, "idx": torch.tensor([3, 64])}, r"^fused decode kernel: idx values must lie in \[0, 64\), "
                                                     r"got min 3, max 64$"),
    (lambda a: {**a, "idx": torch.tensor([-1, 2])}, r"idx values must lie in \[0, 64\), got min -1, max 2"),
    (lambda a: {**a, "idx": a["idx"].int()}, r"^fused decode kernel: idx must be int64, got torch.int32$"),
    (lambda a: {**a, "idx": a["idx"].view(1, -1)}, r"^fused decode kernel: idx must be 1-D, got shape \(1, 3\)$"),
])
def test_bad_kernel_inputs_raise_a_clear_value_error(change, message):
    # the checks run in Python before the kernel is built or reads memory (kernels._check_inputs)
    w_gate, w_up, w_down_t = weights()
    good = {"x": torch.randn(32), "w_gate": w_gate, "w_up": w_up, "w_down_t": w_down_t,
            "idx": torch.tensor([0, 7, 63])}
    kernels._check_inputs(good["x"], good["idx"], 64, 32)  # the unchanged arguments pass
    bad = change(good)
    with pytest.raises(ValueError, match=message):
        kernels._check_inputs(bad["x"], bad["idx"], 64, 32)


def test_mismatched_layer_weights_raise_a_clear_value_error():
    w_gate, w_up, w_down_t = weights()
    with pytest.raises(ValueError, match=r"^fused decode kernel: w_up must have w_gate's shape \(64, 16\), got "
                                         r"\(64, 32\)$"):
        DecodeWeights(w_gate[:, :16], w_up, w_down_t.t(), build_activation(relufy_config(activation="relu")))


def test_an_empty_idx_is_valid_and_computes_nothing():
    w = decode_weights("relu")
    kernels._check_inputs(torch.randn(32), torch.empty(0, dtype=torch.long), 64, 32)
    assert torch.equal(w.fused(torch.randn(32), torch.empty(0, dtype=torch.long)), torch.zeros(32))


@needs_compiler
def test_the_decode_path_rejects_bad_indices_before_the_kernel_reads_memory(fresh_build):
    w = decode_weights("silu")
    x = torch.randn(32)
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, 64\), got min 0, max 1000000"):
        w.fused(x, torch.tensor([0, 1000000]))
    with pytest.raises(ValueError, match=r"x must be 1-D of length d=32"):
        w.fused(torch.randn(33), torch.tensor([0, 1]))
    # A strided x is made contiguous rather than rejected (its values are what the kernel must see).
    strided = torch.randn(64)[::2]
    idx = torch.tensor([0, 5])
    assert torch.allclose(w.fused(strided, idx), w.gather(strided.contiguous(), idx), atol=1e-5)
    # The C++ entry keeps its own O(1) guards for callers that bypass the Python checks.
    module = kernels.fused_module()
    with pytest.raises(RuntimeError, match="idx must be a contiguous 1-D int64 tensor"):
        module.sparse_mlp_decode(x, w.w_gate, w.w_up, w.w_down_t, torch.tensor([0, 1], dtype=torch.int32), 1)
    with pytest.raises(RuntimeError, match="w_up and w_down_t must have w_gate's shape"):
        module.sparse_mlp_decode(x, w.w_gate, w.w_up[:10].contiguous(), w.w_down_t, torch.tensor([0, 1]), 1)
