"""The kernel tests' backends: Triton (under TRITON_INTERPRET=1 without CUDA) and torch.

Import this before anything imports triton: it switches Triton's interpreter on when there is no
CUDA device (``prefer_interpreter_if_no_cuda``).
"""

from __future__ import annotations

import os
import subprocess
import sys

from megagrpo_kernels.backend import prefer_interpreter_if_no_cuda

TRITON_OK = prefer_interpreter_if_no_cuda()  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

NO_TRITON = (
    "triton kernels need CUDA or TRITON_INTERPRET=1 set before triton's first import "
    "(covered by test_triton_cases_in_fresh_process)"
)
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason=NO_TRITON)),
    "torch",
]


#: Marks a module's fresh-process test: needed only where this process could not run Triton.
only_without_triton_here = pytest.mark.skipif(
    TRITON_OK or torch.cuda.is_available(), reason="the Triton cases ran in this process"
)


def run_triton_cases_in_fresh_process(test_file: str, selection: str = "triton") -> None:
    """Something imported triton before the test module could enable its interpreter
    (transformers and megatron-core do): run the file's ``-k selection`` cases in a fresh
    interpreter-mode process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            selection,
            test_file,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
