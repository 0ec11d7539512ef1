"""GPU benchmark of the log-prob and fused GRPO-loss kernels (needs CUDA).

    python tools/bench_kernels.py                      # the full grid, table on stdout
    python tools/bench_kernels.py --check --out tools/bench_kernels_H100.md

For N in {4096, 16384, 65536} tokens x V in {32000, 128256, 151936}, bf16 logits:

- forward and forward+backward times (CUDA events, median of ``--iters`` after warm-up),
- achieved GB/s (logit bytes moved: forward reads N*V*2 bytes; forward+backward reads twice and
  writes grad_logits once) and its share of the device's copy bandwidth, measured here with a
  large device-to-device copy (bytes read + written per second),
- peak extra memory over the inputs (``torch.cuda.max_memory_allocated``), which for
  forward+backward includes the N*V bf16 ``grad_logits`` every method must produce,

side by side with torch eager (``log_softmax(logits.float() / T).gather``), ``torch.compile`` of
the same, and Liger-Kernel's ``triton_grpo_loss`` when ``liger_kernel`` is importable. ``--check``
first runs the correctness rule of the CPU tests at every shape (a 256-row subset against fp64).
Targets (issue 4): log-prob forward >= 80% of the copy bandwidth; fused loss forward+backward
>= 1.3x faster than Liger at the same shapes, with no N x V fp32 temporaries.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

TEMPERATURE = 0.9
LOSS_KW = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.04)  # as Liger takes them: plain k3
GiB = 1024**3


@dataclass
class Result:
    method: str
    n: int
    v: int
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_peak_gib: float | None = None
    fwdbwd_peak_gib: float | None = None
    note: str = ""


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit(
            "tools/bench_kernels.py needs a CUDA GPU and torch with CUDA "
            "(torch.cuda.is_available() is False here). The CPU memory benchmark "
            "is tools/bench_kernel_memory.py."
        )
    return torch.device("cuda")


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_gib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / GiB


def copy_bandwidth_gbs(nbytes: int = 4 * GiB, iters: int = 10) -> float:
    """Device copy bandwidth in GB/s counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_inputs(n: int, v: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=gen) * 2
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    old = -torch.rand(n, device="cuda", generator=gen) * 8
    ref = old + 0.1 * torch.randn(n, device="cuda", generator=gen)
    adv = torch.randn(n, device="cuda", generator=gen)
    mask = torch.rand(n, device="cuda", generator=gen) > 0.1
    return logits, targets, old, ref, adv, mask


def eager_logprobs(logits, targets):
    logq = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    return logq.gather(-1, targets[:, None])[:, 0]


def logprob_methods(compiled):
    from megagrpo_kernels import logprobs

    methods = {
        "megagrpo logprobs": lambda x, t: logprobs(
            x, t, TEMPERATURE, backend="triton", validate=False
        ),
        "torch eager logprobs": eager_logprobs,
    }
    if compiled is not None:
        methods["torch.compile logprobs"] = compiled
    return methods


def loss_methods(n: int, v: int):
    """``{name: (fn, make_args)}``; inputs are built per method so that only one set is alive."""
    from megagrpo_kernels import GRPOLossSpec, logprob_grpo_loss

    spec = GRPOLossSpec(temperature=TEMPERATURE, kl_bias_correction=False, **LOSS_KW)

    def ours(x, t, old, ref, adv, mask):
        return logprob_grpo_loss(
            x,
            t,
            old,
            ref,
            adv,
            mask,
            spec=spec,
            backend="triton",
            validate=False,
        ).loss

    methods = {"megagrpo fused loss": (ours, lambda: make_inputs(n, v))}
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as err:
        print(f"# Liger-Kernel not importable ({err}); its rows are skipped", file=sys.stderr)
        return methods
    seq = 512  # Liger takes logits [B, L+1, V] (it drops the last position) and advantages [B]

    def liger_args():
        logits, t, old, ref, adv, mask = make_inputs(n, v)
        b = n // seq
        logits3 = torch.empty(b, seq + 1, v, dtype=logits.dtype, device=logits.device)
        logits3[:, :seq] = logits.view(b, seq, v)
        logits3[:, seq] = logits3[:, seq - 1]
        del logits
        return (
            logits3,
            t.view(b, seq),
            old.view(b, seq),
            ref.view(b, seq),
            adv.view(b, seq)[:, 0].contiguous(),
            mask.view(b, seq),
        )

    def liger(x3, t, old, ref, adv, mask):
        out = triton_grpo_loss(
            x3,
            old,
            ref,
            t,
            adv,
            mask,
            TEMPERATURE,
            LOSS_KW["beta"],
            LOSS_KW["epsilon_low"],
            LOSS_KW["epsilon_high"],
            inplace=False,
        )
        return out[0] if isinstance(out, tuple) else out

    methods["Liger triton_grpo_loss"] = (liger, liger_args)
    return methods


def bench_one(name, fn, args, iters, n, v) -> Result:
    res = Result(name, n, v)
    x0 = args[0]
    try:
        with torch.no_grad():
            res.fwd_ms = time_ms(lambda: fn(*args), iters)
            res.fwd_peak_gib = peak_extra_gib(lambda: fn(*args))

        def fwd_bwd():
            x = x0.detach().requires_grad_()
            fn(x, *args[1:]).float().sum().backward()
            return x.grad

        res.fwdbwd_ms = time_ms(fwd_bwd, iters)
        res.fwdbwd_peak_gib = peak_extra_gib(fwd_bwd)
    except torch.cuda.OutOfMemoryError:
        res.note = "out of memory"
    finally:
        torch.cuda.empty_cache()
    return res


def correctness_check(n: int, v: int) -> str:
    """The CPU tests' rule at the benchmark shape, on a 256-row subset against fp64."""
    from megagrpo_kernels import logprobs
    from megagrpo_kernels.reference import logprobs_eager
    from megagrpo_kernels.testing import check_error_rule

    logits, targets = make_inputs(n, v, seed=1)[:2]
    rows = torch.randperm(n, device="cuda")[:256]
    g = torch.randn(n, device="cuda")
    x = logits.detach().requires_grad_()
    logp, ent = logprobs(x, targets, TEMPERATURE, return_entropy=True, backend="triton")
    (logp * g).sum().backward()
    sub, tsub = logits[rows], targets[rows]
    outs = []
    for dtype in (torch.float64, torch.bfloat16):
        y = sub.to(dtype).detach().requires_grad_()
        lp, h = logprobs_eager(y, tsub, TEMPERATURE, return_entropy=True)
        (lp * g[rows].to(dtype)).sum().backward()
        outs.append((lp.detach(), h.detach(), y.grad))
    (lp64, h64, g64), (lpb, hb, gb) = outs
    check_error_rule("logp", logp[rows], lpb, lp64, 1e-6)
    check_error_rule("entropy", ent[rows], hb, h64, 1e-6)
    check_error_rule("grad_logits", x.grad[rows], gb, g64, 1e-6)
    return "ok"


def format_table(results, copy_gbs, elem=2) -> str:
    lines = [
        "| method | N | V | fwd ms | fwd GB/s (% copy) | fwd+bwd ms | fwd+bwd GB/s (% copy) "
        "| peak extra fwd GiB | peak extra fwd+bwd GiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        logit_bytes = r.n * r.v * elem
        cells = []
        for ms, passes in ((r.fwd_ms, 1), (r.fwdbwd_ms, 3)):
            if ms is None:
                cells += ["-", "-"]
                continue
            gbs = passes * logit_bytes / (ms * 1e-3) / 1e9
            cells += [f"{ms:.3f}", f"{gbs:.0f} ({100 * gbs / copy_gbs:.0f}%)"]
        peaks = [("-" if p is None else f"{p:.2f}") for p in (r.fwd_peak_gib, r.fwdbwd_peak_gib)]
        lines.append(
            f"| {r.method} | {r.n} | {r.v} | {cells[0]} | {cells[1]} | {cells[2]} | "
            f"{cells[3]} | {peaks[0]} | {peaks[1]} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--v", type=int, nargs="+", default=[32000, 128256, 151936])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--check", action="store_true", help="correctness rule at each shape")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    require_cuda()
    name = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    header = (
        f"# megagrpo kernel benchmark\n\ndevice: {name}; torch {torch.__version__}; "
        f"date: {datetime.date.today().isoformat()}; bf16 logits, temperature "
        f"{TEMPERATURE}\nmeasured copy bandwidth (read + write): {copy_gbs:.0f} GB/s\n"
    )
    print(header, flush=True)
    compiled = None
    if not args.no_compile:
        from torch import _dynamo

        for knob in ("recompile_limit", "cache_size_limit"):  # one compilation per shape
            if hasattr(_dynamo.config, knob):
                setattr(_dynamo.config, knob, 64)
        compiled = torch.compile(eager_logprobs, dynamic=False)
    results, checks = [], []
    for n in args.n:
        for v in args.v:
            if args.check:
                checks.append(f"- N={n} V={v}: {correctness_check(n, v)}")
                print(checks[-1], flush=True)
            first = len(results)
            inputs = make_inputs(n, v)
            for method, fn in logprob_methods(compiled).items():
                results.append(bench_one(method, fn, inputs[:2], args.iters, n, v))
            del inputs
            for method, (fn, make_args) in loss_methods(n, v).items():
                method_args = make_args()
                results.append(bench_one(method, fn, method_args, args.iters, n, v))
                del method_args
                torch.cuda.empty_cache()
            print(format_table(results[first:], copy_gbs), flush=True)
    table = format_table(results, copy_gbs)
    text = (
        header
        + ("\ncorrectness (fp64 rule, 256 rows):\n" + "\n".join(checks) + "\n" if checks else "")
        + "\n"
        + table
        + "\n"
    )
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
