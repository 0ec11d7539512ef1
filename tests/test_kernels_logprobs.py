"""Log-prob (+ entropy) kernels against an fp64 reference, forward and backward.

Both backends (the Triton kernels, under TRITON_INTERPRET=1 on CPU, and the chunked torch
reference) over bf16/fp32 x V in {1, 7, 1000, 4099} x temperature {1, 0.7}, with -inf rows and
+-1e4 logits; tolerance: error <= 2 x (plain torch error in the same dtype) + atol. Also: 64-bit
row offsets, bad input, gradcheck of the reference, and the cheap import.
"""

import mmap
import os
import subprocess
import sys

import megagrpo_kernels
import pytest
import torch
from _kernel_backends import (  # before triton is imported: its interpreter without CUDA
    BACKENDS,
    NO_TRITON,
    TRITON_OK,
    only_without_triton_here,
    run_triton_cases_in_fresh_process,
)
from megagrpo_kernels import logprobs
from megagrpo_kernels.reference import logprobs_eager
from megagrpo_kernels.testing import check_error_rule, max_error, special_logits

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

N_ROWS = 16
ATOL = 1e-6


def _run(logits_nv, targets_n, temperature, backend, g_n, gh_n, **kw):
    x = logits_nv.clone().requires_grad_()
    logp_n, entropy_n = logprobs(
        x, targets_n, temperature, return_entropy=True, backend=backend, **kw
    )
    # A -inf log-prob (target on a -inf logit) still has a finite gradient: let it flow.
    (logp_n * g_n + entropy_n * gh_n).sum().backward()
    return logp_n.detach(), entropy_n.detach(), x.grad


def _eager(logits_nv, targets_n, temperature, g_n, gh_n, keep_n):
    x = logits_nv.clone().requires_grad_()
    logp_n, entropy_n = logprobs_eager(x, targets_n, temperature, return_entropy=True)
    w_n = keep_n.to(logp_n.dtype)  # entirely -inf rows are NaN here; their gradient is dropped
    (
        logp_n * g_n.to(x.dtype) * w_n + entropy_n.nan_to_num() * gh_n.to(x.dtype) * w_n
    ).sum().backward()
    return logp_n.detach(), entropy_n.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_fp64_reference(backend, dtype, vocab, temperature):
    case = special_logits(N_ROWS, vocab, dtype, seed=vocab)
    gen = torch.Generator().manual_seed(1)
    g_n, gh_n = torch.randn(N_ROWS, generator=gen), torch.randn(N_ROWS, generator=gen)
    keep_n = ~case.dead_n
    logp, ent, grad = _run(case.logits_nv, case.targets_n, temperature, backend, g_n, gh_n)
    lp64, ent64, grad64 = _eager(
        case.logits_nv.double(), case.targets_n, temperature, g_n.double(), gh_n.double(), keep_n
    )
    lpb, entb, gradb = _eager(case.logits_nv, case.targets_n, temperature, g_n, gh_n, keep_n)
    assert logp.dtype == torch.float32 and grad.dtype == dtype
    check_error_rule("logp", logp, lpb, lp64, ATOL, keep_n)
    check_error_rule("entropy", ent, entb, ent64, ATOL, keep_n)
    check_error_rule("grad_logits", grad, gradb, grad64, ATOL, keep_n)
    # Entirely -inf rows: logp = -inf, entropy = 0, zero gradient (torch gives NaN there).
    dead = case.dead_n
    assert torch.isneginf(logp[dead]).all() and (ent[dead] == 0).all()
    assert (grad[dead] == 0).all()
    if vocab > 1:  # the row whose target logit is -inf
        assert torch.isneginf(logp[3]) and torch.isfinite(grad[3].float()).all()


@pytest.mark.parametrize(
    "backend,kw",
    [
        pytest.param(
            "triton", {"block_size": 128}, marks=pytest.mark.skipif(not TRITON_OK, reason=NO_TRITON)
        ),
        ("torch", {"chunk_size": 97}),
    ],
)
def test_many_blocks_and_chunks(backend, kw):
    """Online max / sum-exp merging across many blocks (Triton) or chunks (torch)."""
    case = special_logits(N_ROWS, 1000, torch.float32, seed=3)
    g_n, gh_n = torch.ones(N_ROWS), torch.full((N_ROWS,), 0.5)
    keep_n = ~case.dead_n
    logp, ent, grad = _run(case.logits_nv, case.targets_n, 0.7, backend, g_n, gh_n, **kw)
    lp64, ent64, grad64 = _eager(
        case.logits_nv.double(), case.targets_n, 0.7, g_n.double(), gh_n.double(), keep_n
    )
    lpb, entb, gradb = _eager(case.logits_nv, case.targets_n, 0.7, g_n, gh_n, keep_n)
    check_error_rule("logp", logp, lpb, lp64, ATOL, keep_n)
    check_error_rule("entropy", ent, entb, ent64, ATOL, keep_n)
    check_error_rule("grad_logits", grad, gradb, grad64, ATOL, keep_n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_fp16_and_no_entropy(backend):
    logits = torch.randn(2, 3, 50).to(torch.float16)
    targets = torch.randint(0, 50, (2, 3))
    x = logits.clone().requires_grad_()
    logp = logprobs(x, targets, backend=backend)
    assert logp.shape == (2, 3) and logp.dtype == torch.float32
    logp.sum().backward()
    x64 = logits.double().requires_grad_()
    ref = logprobs_eager(x64, targets)
    ref.sum().backward()
    assert max_error(logp, ref) < 1e-5
    assert max_error(x.grad, x64.grad) < 1e-3  # fp16 gradient rounding


def _noreserve_buffer(n_elements: int, dtype: torch.dtype):
    """A zero-filled tensor backed by untouched anonymous memory (pages are allocated on write)."""
    nbytes = n_elements * torch.empty((), dtype=dtype).element_size()
    map_noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_noreserve)
    return buf, torch.frombuffer(buf, dtype=dtype)


@pytest.mark.skipif(not TRITON_OK, reason=NO_TRITON)
def test_row_offsets_beyond_2_pow_31():
    """Rows whose element offset ``row * stride`` exceeds 2^31, without 4 GB of RAM.

    The logits are a strided view (row stride 2^30 + 64 elements) over a lazily allocated anonymous
    mapping, so row 2 starts at element 2^31 + 128 while only the touched pages exist. The
    interpreter evaluates ``program_id * stride`` in int32 exactly as a GPU would (numpy int32
    wraps), so a kernel without the 64-bit cast reads a wrapped address (a crash when tried).
    The gradient goes to a second such view, so the backward's stores are checked too.
    """
    stride, vocab, n_rows = 2**30 + 64, 300, 3
    assert (n_rows - 1) * stride > 2**31
    try:
        buf_in, flat_in = _noreserve_buffer((n_rows - 1) * stride + vocab, torch.bfloat16)
        buf_out, flat_out = _noreserve_buffer((n_rows - 1) * stride + vocab, torch.bfloat16)
    except (OSError, ValueError) as err:
        pytest.skip(f"cannot map 2 x 4.3 GB of lazily allocated address space here: {err}")
    from megagrpo_kernels import logprobs_triton

    logits_nv = flat_in.as_strided((n_rows, vocab), (stride, 1))
    grad_nv = flat_out.as_strided((n_rows, vocab), (stride, 1))
    small_nv = torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(0)) * 2
    logits_nv.copy_(small_nv.to(torch.bfloat16))
    targets_n = torch.tensor([5, 17, 299])
    logp_n, _, max_n, lse_n = logprobs_triton.logprobs_forward(
        logits_nv, targets_n, 0, 0.7, False, True
    )
    x64 = logits_nv.double().clone().requires_grad_()
    ref_n = logprobs_eager(x64, targets_n, 0.7)
    ref_n.sum().backward()
    assert max_error(logp_n, ref_n) < 1e-5
    logprobs_triton.logprobs_backward(
        logits_nv, targets_n, 0, 0.7, max_n, lse_n, torch.ones(n_rows), grad_out=grad_nv
    )
    assert max_error(grad_nv, x64.grad) < 4e-3  # bf16 rounding of the gradient
    assert grad_nv[2].abs().sum() > 0
    del logits_nv, grad_nv, flat_in, flat_out
    buf_in.close()
    buf_out.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named(backend):
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"targets: id 10 at row 2 .*\[0, 10\)"):
        logprobs(logits, torch.tensor([0, 1, 10, 3]), backend=backend)
    with pytest.raises(ValueError, match=r"targets: id -1"):
        logprobs(logits, torch.tensor([0, -1, 2, 3]), backend=backend)
    with pytest.raises(ValueError, match=r"targets: expected shape \(4,\)"):
        logprobs(logits, torch.tensor([0, 1]), backend=backend)
    with pytest.raises(TypeError, match="targets: expected an integer tensor"):
        logprobs(logits, torch.zeros(4), backend=backend)
    with pytest.raises(ValueError, match="temperature: expected a number > 0"):
        logprobs(logits, torch.zeros(4, dtype=torch.long), 0.0, backend=backend)
    with pytest.raises(TypeError, match="logits: expected one of"):
        logprobs(logits.to(torch.int32), torch.zeros(4, dtype=torch.long), backend=backend)


def test_bad_backend_choices(monkeypatch):
    logits, targets = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="backend must be one of"):
        logprobs(logits, targets, backend="cuda")
    if TRITON_OK:
        with pytest.raises(TypeError, match="triton backend computes in fp32"):
            logprobs(logits.double(), targets, backend="triton")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            logprobs(logits, targets, backend="triton")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_chunked_reference(temperature):
    """The torch backend's hand-written chunked backward (logp, entropy) vs finite differences."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 5, 10])

    def fn(x):
        lp, ent = logprobs(
            x, targets, temperature, return_entropy=True, backend="torch", chunk_size=4
        )
        return lp, ent

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_default_backend_is_torch_on_cpu_and_import_is_cheap():
    assert megagrpo_kernels.backend.resolve_backend(None, torch.zeros(1)) == "torch"
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(megagrpo_kernels.__file__)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")])
    )
    code = (
        "import sys, megagrpo_kernels, megagrpo_kernels.logprobs, megagrpo_kernels.grpo_loss; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert not any(m == 'megagrpo' or m.startswith('megagrpo.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


@only_without_triton_here
def test_triton_cases_in_fresh_process():
    """This file's Triton and 64-bit offset cases in a fresh process (see _kernel_backends)."""
    run_triton_cases_in_fresh_process(__file__, "triton or offsets or rounds")


@pytest.mark.skipif(not TRITON_OK, reason=NO_TRITON)
def test_bf16_gradient_rounds_to_nearest_like_the_reference():
    """The bf16 gradient is the fp32 gradient rounded to nearest even (as on a GPU), not truncated:
    it agrees with the torch backend's (which rounds in torch) element for element, up to the odd
    element whose fp32 value differs in the last bits (and the subnormal ones, which the torch
    backend flushes to 0)."""
    case = special_logits(N_ROWS, 1000, torch.bfloat16, seed=8)
    g = torch.Generator().manual_seed(8)
    g_n, gh_n = torch.randn(N_ROWS, generator=g), torch.randn(N_ROWS, generator=g)
    _, _, grad_triton = _run(case.logits_nv, case.targets_n, 0.7, "triton", g_n, gh_n)
    _, _, grad_torch = _run(case.logits_nv, case.targets_n, 0.7, "torch", g_n, gh_n)
    normal = grad_triton.float().abs() >= torch.finfo(torch.bfloat16).tiny
    differ = (grad_triton != grad_torch) & normal
    assert differ.float().mean() < 0.01, f"{int(differ.sum())} of {differ.numel()} differ"


def test_torch_backward_flushes_subnormal_gradients():
    """The CPU backward writes no subnormal values (an x86 matmul over them runs ~100x slower):
    those become 0 and every other element is the unflushed gradient."""
    from megagrpo_kernels.reference import flush_subnormal_

    logits = torch.full((4, 2048), -90.0)  # p ~ e^-90 / 2048 for all but one column
    logits[:, 0] = 0.0
    targets = torch.zeros(4, dtype=torch.long)
    grad = torch.full((4,), 1e-3)
    _, _, got = _run(logits, targets, 1.0, "torch", grad, torch.zeros(4))
    tiny = torch.finfo(torch.float32).tiny
    want = torch.softmax(logits.double(), -1).mul(-1e-3)
    want[:, 0] += 1e-3
    assert (want[:, 1:].abs() < tiny).all()  # the case has subnormal gradients to flush
    assert (got[:, 1:] == 0).all()
    torch.testing.assert_close(got[:, 0].double(), want[:, 0], rtol=1e-6, atol=0)
    x = torch.tensor([1e-39, -1e-39, tiny, -tiny, 0.5])
    assert flush_subnormal_(x).tolist() == [0.0, 0.0, tiny, -tiny, 0.5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_at_minus_inf_logits_is_zero_for_any_weight(backend):
    """A -inf logit (a masked vocabulary row) has p = 0 and a zero gradient, also when the
    entropy's upstream gradient is large (|gh| > 1 once made -inf * 0 = NaN on the CPU)."""
    logits = torch.tensor([[0.0, 1.0, -float("inf"), 2.0], [3.0, -float("inf"), 0.5, -1.0]])
    targets = torch.tensor([1, 0])
    g_n, gh_n = torch.tensor([0.5, -2.0]), torch.tensor([3.0, -7.0])
    _, _, got = _run(logits, targets, 1.0, backend, g_n, gh_n)
    ref = logits.double().masked_fill(torch.isinf(logits), -1e30).requires_grad_()
    logq = torch.log_softmax(ref, -1)
    entropy = -(logq.exp() * logq).sum(-1)
    logp = logq.gather(1, targets[:, None])[:, 0]
    (logp * g_n.double() + entropy * gh_n.double()).sum().backward()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref.grad, rtol=1e-5, atol=1e-6)
    assert (got[torch.isinf(logits)] == 0).all()
