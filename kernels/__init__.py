"""megagrpo_kernels: Triton kernels for GRPO (fused log-prob gathering, GRPO clipped-KL loss).

Installed under the import name ``megagrpo_kernels``. This package imports nothing from
``megagrpo``. The kernels themselves are built in their own issue; this module is the package
root they will live under.
"""
