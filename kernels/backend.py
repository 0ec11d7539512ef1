"""Choosing between the Triton kernels and the chunked PyTorch references.

The Triton kernels run on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1``, numpy emulation: correct but slow, for tests). Triton reads that variable
when it is first imported and when a kernel is decorated, so it has to be set before anything
imports ``triton``; transformers and megatron-core both do at import time. The kernel modules
(``*_triton.py``) are therefore imported lazily, through :func:`triton_module`, and only when a
Triton kernel is about to run.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("triton", "torch")

_TRUE = ("1", "true", "yes", "on")


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def interpreter_active() -> bool:
    """Whether Triton kernels defined from now on run in the interpreter.

    True when ``TRITON_INTERPRET`` is set and ``triton`` either is not imported yet or was
    imported with it set (its own library functions, such as ``tl.sum``, are then interpreted).
    """
    if not _interpret_env():
        return False
    if "triton" not in sys.modules:
        return True
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - broken triton install
        return False
    return isinstance(standard.sum, InterpretedFunction)


def prefer_interpreter_if_no_cuda() -> bool:
    """Sets ``TRITON_INTERPRET=1`` when no CUDA device exists and ``triton`` is not imported yet.

    Call it first thing (tests, CPU scripts). Returns whether CPU tensors can now use the
    Triton backend, i.e. :func:`interpreter_active`.
    """
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    return interpreter_active()


def triton_available() -> bool:
    """Whether ``triton`` can be imported at all (it has wheels for Linux x86-64/aarch64 only)."""
    if "triton" in sys.modules:
        return True
    return importlib.util.find_spec("triton") is not None


def check_triton_usable(tensor: torch.Tensor) -> None:
    """Raises a clear error when the Triton kernels cannot run on ``tensor``'s device."""
    if not triton_available():
        raise RuntimeError(
            "backend='triton' needs the triton package, which is not installed; "
            "use backend='torch' (the chunked PyTorch reference)"
        )
    if tensor.is_cuda:
        return
    if tensor.device.type != "cpu":
        raise RuntimeError(
            f"backend='triton' supports CUDA tensors (and CPU tensors under the "
            f"Triton interpreter), got a tensor on {tensor.device}"
        )
    if not interpreter_active():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before anything imports triton (transformers and megatron-core "
            "import it), e.g. call megagrpo_kernels.backend.prefer_interpreter_if_no_cuda() "
            "first; or use backend='torch'"
        )


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """``None`` picks Triton for CUDA tensors and the torch reference otherwise."""
    if backend is None:
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        check_triton_usable(tensor)
    return backend


def triton_module(name: str) -> ModuleType:
    """Imports ``megagrpo_kernels.<name>`` (a module holding ``@triton.jit`` kernels) lazily."""
    return importlib.import_module(f"{__package__}.{name}")
