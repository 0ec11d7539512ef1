"""Run megatron-core on a machine without CUDA.

megatron-core 0.16 assumes a CUDA device in a few dozen places: it allocates buffers on
``torch.cuda.current_device()``, moves tensors with ``.cuda()``, and saves and restores the CUDA
RNG state around dropout and activation recompute. On a CPU-only machine (the 2-core laptop and
CI) this module redirects exactly those assumptions to the CPU:

- a ``TorchFunctionMode`` that rewrites ``device="cuda"`` (also ``cuda:N``, bare integers and
  ``torch.device("cuda")``) to ``"cpu"`` in tensor factories, and makes ``Tensor.cuda()`` and
  ``Tensor.to("cuda")`` stay on the CPU; pinned memory (``pin_memory=True`` in factories, as
  megatron's context-parallel RoPE asks, and ``Tensor.pin_memory()``) is plain CPU memory;
- ``torch.cuda.current_device`` / ``synchronize`` / ``get_rng_state`` / ``set_rng_state`` /
  ``manual_seed`` / ``empty_cache`` and megatron's ``_get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` replaced by their CPU meanings;
- megatron's ``clip_grad_by_total_norm_fp32`` without its assert that gradients are
  ``torch.cuda.FloatTensor``, so megatron's fp32 optimizer (FP32Optimizer over torch AdamW)
  runs on the CPU unchanged. Its bf16 and distributed optimizers insist on CUDA tensors
  throughout: the CPU path trains in fp32 with the plain (non-distributed) optimizer.

``enable()`` refuses to run when a CUDA device exists, so the redirection can never be active on
a GPU. It is process-wide and idempotent; the mode is pushed on the calling thread, and megatron
runs on the thread that called ``enable()`` (autograd runs CPU backward on the calling thread).
"""

from __future__ import annotations

import inspect
import threading

import torch
from torch.overrides import TorchFunctionMode

_STATE = threading.local()
_ORIGINALS: list[tuple[object, str, object]] = []


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer means "CUDA device N" for torch's factories.
    return isinstance(device, int) and not isinstance(device, bool)


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """``Tensor.backward`` / ``torch.autograd.backward`` straight on the autograd engine."""
    from torch.autograd.variable import Variable

    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    if grad_tensors is None:
        grad_tensors = [None] * len(tensors)
    elif torch.is_tensor(grad_tensors):
        grad_tensors = [grad_tensors]
    grads = tuple(
        torch.ones_like(t) if g is None and t.numel() == 1 else g
        for t, g in zip(tensors, grad_tensors)
    )
    if any(g is None for g in grads):
        raise RuntimeError("grad can be implicitly created only for scalar outputs")
    inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs or ())
    keep = create_graph if retain_graph is None else retain_graph
    Variable._execution_engine.run_backward(
        tensors, grads, keep, create_graph, inputs, allow_unreachable=True, accumulate_grad=True
    )


# Backward runs user Python code (autograd Functions, megatron's activation recompute), and
# torch disables a mode while it handles a call: these run on the engine with the mode active.
_BACKWARD = {torch.Tensor.backward, torch.autograd.backward}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _BACKWARD:
            a = inspect.signature(func).bind(*args, **kwargs).arguments
            with self:
                return _run_backward(
                    a.get("self", a.get("tensors")),
                    a.get("gradient", a.get("grad_tensors")),
                    a.get("retain_graph"),
                    a.get("create_graph", False),
                    a.get("inputs"),
                )
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # no pinned allocator without an accelerator
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and args:  # t.to("cuda") / t.to(0); new_*'s ints are sizes
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


def _cpu_get_rng_state(device=None, *a, **k):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=None, *a, **k):
    torch.set_rng_state(new_state)


@torch.no_grad()
def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without its CUDA tensor-type assert."""
    if torch.is_tensor(parameters):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def _replacements() -> list[tuple[object, str, object]]:
    """(owner, attribute, CPU replacement) for every CUDA assumption megatron-core makes."""
    cuda = torch.cuda
    table = [
        (cuda, "current_device", lambda: "cpu"),
        (cuda, "synchronize", lambda *a, **k: None),
        (cuda, "empty_cache", lambda *a, **k: None),
        (cuda, "get_rng_state", _cpu_get_rng_state),
        (cuda, "set_rng_state", _cpu_set_rng_state),
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator.
        (cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed))),
        (cuda, "manual_seed_all", lambda seed: None),
        (cuda.random, "get_rng_state", _cpu_get_rng_state),
        (cuda.random, "set_rng_state", _cpu_set_rng_state),
    ]
    try:  # megatron keeps its own copies of the CUDA RNG helpers
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer import optimizer as moptimizer
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return table
    return table + [
        (mrandom, "_get_cuda_rng_state", _cpu_get_rng_state),
        (mrandom, "_set_cuda_rng_state", _cpu_set_rng_state),
        # the only CUDA assumption of megatron's fp32 optimizer: an assert on the grad type
        (clip_grads, "clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32),
        (moptimizer, "clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32),
    ]


def _patch_torch_cuda() -> None:
    if _ORIGINALS:
        return
    for owner, name, replacement in _replacements():
        _ORIGINALS.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)


def enable() -> None:
    """Activate the CPU redirection on this thread (and the torch.cuda patches process-wide)."""
    if torch.cuda.is_available():
        raise RuntimeError(
            "megagrpo.distributed.cpu_shim.enable() was called on a machine with a CUDA device; "
            "the CPU redirection must never be active on a GPU"
        )
    _patch_torch_cuda()
    if getattr(_STATE, "mode", None) is None:
        mode = _CudaToCpuMode()
        mode.__enter__()
        _STATE.mode = mode


def disable() -> None:
    """Undo ``enable()``: pop the mode from this thread and restore the torch.cuda functions."""
    mode = getattr(_STATE, "mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        _STATE.mode = None
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)


def is_enabled() -> bool:
    """Whether the redirection is active on the calling thread."""
    return getattr(_STATE, "mode", None) is not None


def enable_if_no_cuda() -> bool:
    """Enable the redirection only where no CUDA device exists; returns whether it is active."""
    if torch.cuda.is_available():
        return False
    enable()
    return True
