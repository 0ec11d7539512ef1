"""Vocab-parallel log-probs and fused loss over two real gloo processes equal the unsharded result.

Two spawned processes (torch.distributed, gloo, 127.0.0.1 and a free port) each hold half of the
vocab. Every rank checks, for both backends, forward (log-prob, entropy, loss, metrics) and
backward (its shard of grad_logits) against the unsharded computation on the full logits, that
a forward makes exactly one collective and a backward none, that uneven shards work with an
explicit ``vocab_start_index``, and that an out-of-range target is reported on every rank.
"""

import os
import socket
import traceback

from megagrpo_kernels.backend import prefer_interpreter_if_no_cuda

TRITON_OK = prefer_interpreter_if_no_cuda()  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

WORLD = 2
N_ROWS = 6


class CollectiveCounter:
    """Counts calls of the collectives a merge could use (patched on torch.distributed)."""

    NAMES = (
        "all_gather_single",
        "all_gather_into_tensor",
        "all_gather",
        "all_reduce",
        "reduce_scatter_tensor",
        "broadcast",
    )

    def __init__(self):
        self.calls = []
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _full_case(vocab, dtype, seed):
    from megagrpo_kernels.testing import special_logits

    case = special_logits(N_ROWS, vocab, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    g_n, gh_n = torch.randn(N_ROWS, generator=gen), torch.randn(N_ROWS, generator=gen)
    return case, g_n, gh_n


def _logprob_pass(logits_nv, targets, g_n, gh_n, backend, **kw):
    from megagrpo_kernels import logprobs

    x = logits_nv.clone().requires_grad_()
    logp, ent = logprobs(x, targets, 0.7, return_entropy=True, backend=backend, **kw)
    (logp * g_n + ent * gh_n).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def _check_logprobs(rank, backend, vocab, dtype, counter, explicit_start):
    from megagrpo_kernels.testing import max_error

    case, g_n, gh_n = _full_case(vocab, dtype, seed=vocab)
    bounds = [0, (vocab + 1) // 2, vocab]  # uneven when vocab is odd
    lo, hi = bounds[rank], bounds[rank + 1]
    start = {"vocab_start_index": lo} if explicit_start else {}
    shard = case.logits_nv[:, lo:hi]
    counter.take()
    x = shard.clone().requires_grad_()
    from megagrpo_kernels import logprobs

    logp, ent = logprobs(
        x,
        case.targets_n,
        0.7,
        tp_group=dist.group.WORLD,
        return_entropy=True,
        backend=backend,
        **start,
    )
    forward_calls = counter.take()
    (logp * g_n + ent * gh_n).sum().backward()
    backward_calls = counter.take()
    full_logp, full_ent, full_grad = _logprob_pass(
        case.logits_nv, case.targets_n, g_n, gh_n, backend
    )
    tol = 1e-5 * (1 + float(full_logp[torch.isfinite(full_logp)].abs().max()))
    return {
        "forward collectives": (
            len(forward_calls) == 1 and forward_calls[0].startswith("all_gather_"),
            forward_calls,
        ),
        "backward collectives": (backward_calls == [], backward_calls),
        "logp": (max_error(logp, full_logp) <= tol, max_error(logp, full_logp)),
        "entropy": (max_error(ent, full_ent) <= 1e-5, max_error(ent, full_ent)),
        "grad": (
            max_error(x.grad, full_grad[:, lo:hi]) <= (1e-6 if dtype == torch.float32 else 4e-3),
            max_error(x.grad, full_grad[:, lo:hi]),
        ),
        "grad dtype": (x.grad.dtype == dtype, str(x.grad.dtype)),
    }


#: Loss specs checked vocab-parallel against the full vocab: (name, spec kwargs, entropy_grad).
FUSED_CASES = (
    ("clip token", dict(delta=1.5, epsilon_high=0.28), False),
    (
        "clip sequence",
        dict(delta=1.5, epsilon_high=0.28, importance_sampling_level="sequence"),
        False,
    ),
    (
        "cispo top-entropy bonus",
        dict(objective="cispo", epsilon_high=2.0, top_entropy_quantile=0.5),
        True,
    ),
    (
        "sapo off-policy",
        dict(objective="sapo", off_policy_mask_threshold=0.1, kl_bias_correction=True),
        False,
    ),
    ("vespo", dict(objective="vespo"), False),
)


def _check_fused(rank, backend, spec_kw, entropy_grad):
    from megagrpo_kernels import GRPOLossSpec, logprob_grpo_loss
    from megagrpo_kernels.testing import max_error

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 64, generator=gen) * 2
    targets = torch.randint(0, 64, (2, 5), generator=gen)
    old = -torch.rand(2, 5, generator=gen) * 5
    ref = old + 0.1 * torch.randn(2, 5, generator=gen)
    sampler = old + 0.1 * torch.randn(2, 5, generator=gen)
    adv = torch.randn(2, generator=gen)
    mask = torch.rand(2, 5, generator=gen) > 0.2
    spec = GRPOLossSpec(temperature=0.7, beta=0.04, **spec_kw)
    kw = dict(spec=spec, sampler_logp=sampler, entropy_grad=entropy_grad, backend=backend)

    def objective(out):
        return out.loss.sum() + (out.entropy.sum() if entropy_grad else 0.0)

    x = logits[..., rank * 32 : (rank + 1) * 32].clone().requires_grad_()
    out = logprob_grpo_loss(x, targets, old, ref, adv, mask, tp_group=dist.group.WORLD, **kw)
    objective(out).backward()
    y = logits.clone().requires_grad_()
    full = logprob_grpo_loss(y, targets, old, ref, adv, mask, **kw)
    objective(full).backward()
    full_grad = y.grad[..., rank * 32 : (rank + 1) * 32]
    loss_tol = 1e-6 * (1 + float(full.loss.abs().max()))
    grad_tol = 1e-6 * (1 + float(full_grad.abs().max()))
    keys = [k for k in ("clip_low", "clip_high", "clip_region", "kl_mean", "phi_mean")]
    return {
        "loss": (max_error(out.loss, full.loss) < loss_tol, max_error(out.loss, full.loss)),
        "loss is not zero": (float(full.loss.abs().sum()) > 1e-3, None),
        "grad": (max_error(x.grad, full_grad) < grad_tol, max_error(x.grad, full_grad)),
        "metrics": (
            all(
                getattr(full, k) is None
                or abs(float(getattr(out, k)) - float(getattr(full, k))) < 1e-5
                for k in keys
            ),
            None,
        ),
    }


def _check_bad_target(rank, backend):
    from megagrpo_kernels import logprobs

    shard = torch.randn(3, 10)
    try:
        logprobs(shard, torch.tensor([0, 19, 20]), tp_group=dist.group.WORLD, backend=backend)
    except ValueError as err:
        return {
            "out-of-range target": (
                "targets: 1 target ids lie outside" in str(err)
                and f"[{rank * 10}, {rank * 10 + 10})" in str(err),
                str(err),
            )
        }
    return {"out-of-range target": (False, "no error raised")}


def _worker(rank, port, backends, queue):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        counter = CollectiveCounter()
        results = {}
        for backend in backends:
            for vocab, dtype, explicit in [
                (1000, torch.float32, False),
                (1001, torch.float32, True),
                (1000, torch.bfloat16, False),
            ]:
                checks = _check_logprobs(rank, backend, vocab, dtype, counter, explicit)
                for name, res in checks.items():
                    results[f"{backend} V={vocab} {dtype} {name}"] = res
            for case, spec_kw, entropy_grad in FUSED_CASES:
                for name, res in _check_fused(rank, backend, spec_kw, entropy_grad).items():
                    results[f"{backend} fused {case} {name}"] = res
            for name, res in _check_bad_target(rank, backend).items():
                results[f"{backend} {name}"] = res
        queue.put((rank, results))
        dist.destroy_process_group()
    except BaseException:  # report, do not hang the parent
        queue.put((rank, {"worker crashed": (False, traceback.format_exc())}))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vocab_parallel_matches_unsharded():
    backends = ["torch"] + (["triton"] if TRITON_OK or not torch.cuda.is_available() else [])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, backends, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failures = [
        f"rank {r}: {name}: {detail}"
        for r, res in sorted(results.items())
        for name, (ok, detail) in res.items()
        if not ok
    ]
    assert not failures, "\n".join(failures)
    assert all(len(res) > 20 for res in results.values())
    assert any(name.startswith("triton") for name in results[0]) == ("triton" in backends)
