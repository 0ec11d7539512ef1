"""CPU benchmark: peak memory of the chunked log-prob reference vs eager log_softmax + gather.

    python tools/bench_kernel_memory.py                 # N=4096, V=151936, bf16 logits
    python tools/bench_kernel_memory.py --n 1024 --v 32000

Each variant runs in a fresh subprocess, which allocates and fills the bf16 logits, records its
resident set (VmRSS), resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``),
runs the variant once and reads VmHWM. "Peak extra" is VmHWM minus the RSS before the call, i.e.
the memory the computation needs on top of its inputs (for forward+backward it includes the
N x V bf16 ``grad_logits``, which every method must return). Target (issue 4): the chunked
reference's forward peak extra <= 15% of eager's (log_softmax over the fp32 upcast + gather).
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "chunked reference, forward": "chunked_fwd",
    "eager log_softmax(fp32 upcast) + gather, forward": "eager_fwd",
    "eager log_softmax(bf16) + gather, forward": "eager_bf16_fwd",
    "chunked reference, forward+backward": "chunked_fwdbwd",
    "eager log_softmax(fp32 upcast) + gather, forward+backward": "eager_fwdbwd",
}
MiB = 1024**2


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(kind: str, n: int, v: int, temperature: float) -> dict:
    """Runs in the child: returns peak extra MiB and seconds for one variant."""
    import torch
    from megagrpo_kernels import logprobs

    torch.manual_seed(0)
    logits = torch.empty(n, v, dtype=torch.bfloat16)
    for r0 in range(0, n, 256):  # fill without an N x V fp32 temporary
        logits[r0 : r0 + 256] = torch.randn(min(256, n - r0), v) * 2
    targets = torch.randint(0, v, (n,))
    grad_in = torch.randn(n)

    def eager(x):
        return torch.log_softmax(x.float() / temperature, -1).gather(-1, targets[:, None])[:, 0]

    def eager_bf16(x):
        return torch.log_softmax(x / temperature, -1).gather(-1, targets[:, None])[:, 0].float()

    def chunked(x):
        return logprobs(x, targets, temperature, backend="torch")

    fn = {"chunked": chunked, "eager": eager, "eager_bf16": eager_bf16}[kind.rsplit("_", 1)[0]]
    backward = kind.endswith("fwdbwd")
    x = logits.requires_grad_() if backward else logits
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    if backward:
        (fn(x) * grad_in).sum().backward()
    else:
        with torch.no_grad():
            fn(x)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "peak_extra_mib": (peak - rss_before) / 1024,
        "seconds": seconds,
        "inputs_mib": rss_before / 1024,
        "threads": torch.get_num_threads(),
    }


def spawn(kind: str, n: int, v: int, temperature: float) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        kind,
        "--n",
        str(n),
        "--v",
        str(v),
        "--temperature",
        str(temperature),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args.n, args.v, args.temperature)))
        return 0
    print(
        f"N={args.n} V={args.v} bf16 logits ({args.n * args.v * 2 / MiB:.0f} MiB), "
        f"temperature {args.temperature}; peak extra = VmHWM - VmRSS before the call"
    )
    results = {}
    for label, kind in VARIANTS.items():
        results[kind] = res = spawn(kind, args.n, args.v, args.temperature)
        if "error" in res:
            print(f"{label:58s} failed: {res['error']}")
        else:
            print(
                f"{label:58s} peak extra {res['peak_extra_mib']:8.0f} MiB   "
                f"{res['seconds']:6.1f} s   ({res['threads']} threads)",
                flush=True,
            )
    for what in ("fwd", "fwdbwd"):
        ours, eager = results[f"chunked_{what}"], results[f"eager_{what}"]
        if "error" not in ours and "error" not in eager:
            ratio = ours["peak_extra_mib"] / eager["peak_extra_mib"]
            print(f"{what}: chunked / eager(fp32 upcast) peak extra = {100 * ratio:.1f}%")
    ours = results["chunked_fwdbwd"]
    if "error" not in ours:
        grad_mib = args.n * args.v * 2 / MiB
        print(
            f"fwdbwd: chunked peak extra beyond the {grad_mib:.0f} MiB bf16 grad_logits output "
            f"= {ours['peak_extra_mib'] - grad_mib:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
