"""Test entry points shared by the kernel tests and the GPU benchmark's correctness pass.

- :func:`special_logits`: logits with the awkward rows (partly -inf, all -inf, +-1e4, a target
  sitting on a -inf column) next to ordinary ones.
- :func:`check_error_rule`: the tolerance rule of the kernel tests: the kernel's error against an
  fp64 reference is at most twice the error of the plain PyTorch computation in the same dtype,
  plus a small absolute term.

Shapes: ``_n`` rows, ``_v`` vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BIG_LOGIT = 1.0e4


@dataclass
class LogitCase:
    """Logits ``[N, V]`` with targets ``[N]``; ``dead_n`` marks rows that are entirely -inf."""

    logits_nv: torch.Tensor
    targets_n: torch.Tensor
    dead_n: torch.Tensor


def special_logits(
    n_rows: int, vocab: int, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu"
) -> LogitCase:
    """Random logits (std 3) whose first rows are: half -inf (target in the finite half), all -inf,
    +-1e4 extremes, and a row whose target column is -inf (logp = -inf). Needs ``n_rows >= 5``."""
    gen = torch.Generator().manual_seed(seed)
    logits_nv = torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64) * 3.0
    targets_n = torch.randint(0, vocab, (n_rows,), generator=gen)
    dead_n = torch.zeros(n_rows, dtype=torch.bool)
    if vocab > 1:
        half = vocab // 2
        logits_nv[0, :half] = -torch.inf
        targets_n[0] = half + int(targets_n[0]) % (vocab - half)
    logits_nv[1] = -torch.inf
    dead_n[1] = True
    logits_nv[2, 0] = BIG_LOGIT
    if vocab > 1:
        logits_nv[2, -1] = -BIG_LOGIT
        logits_nv[2, vocab // 3] = BIG_LOGIT - 3.0
        logits_nv[3, int(targets_n[3])] = -torch.inf
    return LogitCase(logits_nv.to(dtype).to(device), targets_n.to(device), dead_n.to(device))


def max_error(x: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Max ``|x - ref|`` where ``ref`` is finite; non-finite ``ref`` entries must match exactly."""
    x = x.detach().double()
    ref = ref.detach().double()
    if keep is not None:
        x, ref = x[keep], ref[keep]
    finite = torch.isfinite(ref)
    if not torch.equal(x[~finite].nan_to_num(nan=7.0), ref[~finite].nan_to_num(nan=7.0)):
        raise AssertionError(
            f"non-finite entries differ: got {x[~finite][:8].tolist()}, "
            f"expected {ref[~finite][:8].tolist()}"
        )
    if not bool(finite.any()):
        return 0.0
    err = (x[finite] - ref[finite]).abs()
    if bool(err.isnan().any()):
        raise AssertionError("NaN where the reference is finite")
    return float(err.max())


def fp32_ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of ``x`` stored in fp32 (elementwise, as float64)."""
    a = x.detach().abs().float()
    return (torch.nextafter(a, torch.full_like(a, torch.inf)) - a).double()


def check_error_rule(
    name: str,
    kernel: torch.Tensor,
    baseline: torch.Tensor,
    ref64: torch.Tensor,
    atol: float,
    keep: torch.Tensor | None = None,
    slack: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Asserts ``|kernel - ref64| <= 2 * err(baseline) + atol (+ slack)`` elementwise.

    ``err(baseline)`` is the max error of the plain PyTorch computation in the same dtype.
    ``slack`` (elementwise, optional) is the rounding no implementation can avoid when the output
    is stored in fp32: one fp32 ulp of a log-prob of magnitude 1e4 is ~1e-3, and a loss computed
    from such a log-prob inherits ``|d loss / d logp|`` times that. Returns both max errors.
    """
    err_kernel = max_error(kernel, ref64, keep)
    err_base = max_error(baseline, ref64, keep) if baseline is not None else 0.0
    bound = 2.0 * err_base + atol
    if slack is None or err_kernel <= bound:
        if not err_kernel <= bound:
            raise AssertionError(
                f"{name}: kernel error {err_kernel:.3e} > 2 x torch error "
                f"{err_base:.3e} + {atol:.1e}"
            )
        return err_kernel, err_base
    x, ref, slack = kernel.detach().double(), ref64.detach().double(), slack.double()
    if keep is not None:
        x, ref, slack = x[keep], ref[keep], slack[keep]
    finite = torch.isfinite(ref)
    excess = (x[finite] - ref[finite]).abs() - (bound + slack[finite])
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        raise AssertionError(
            f"{name}: kernel error {err_kernel:.3e} > 2 x torch error "
            f"{err_base:.3e} + {atol:.1e} + fp32 rounding slack "
            f"{float(slack[finite][i]):.3e} (worst element {i})"
        )
    return err_kernel, err_base
