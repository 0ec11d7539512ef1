"""RMSNorm for megatron-core's local layer spec (no Transformer Engine, no apex).

megatron-core's fallback (``WrappedTorchNorm``: ``torch.nn.RMSNorm``) runs as separate ops whose
backward autograd derives op by op (``pow``, ``mean``, ``rsqrt``, two products and their
gradients), and it refuses sequence parallelism. ``RMSNorm`` takes the same arguments and keeps
the parameter name (``weight``), so checkpoints and the Hugging Face mapping are unchanged; its
``RMSNormFunction`` saves the normalised input and the reciprocal RMS and computes the gradients
in closed form:

    y = x̂ w,  x̂ = x r,  r = 1 / sqrt(mean(x²) + eps)
    dw = Σ dy x̂,  dx = r (dy w - x̂ mean(dy w x̂))

in fp32 whatever the input's dtype (as Hugging Face's Qwen2 / Llama norms compute). Under
sequence parallelism its weight is marked ``sequence_parallel``, so megatron's
``finalize_model_grads`` sums its gradient over the TP group, as for Transformer Engine's norms.
"""

from __future__ import annotations

import torch


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
        xhat = x32 * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return (xhat.to(x.dtype) * weight).to(torch.promote_types(x.dtype, weight.dtype))

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved_tensors
        g32 = grad.float()
        grad_weight = (g32 * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        gxhat = g32 * weight.float()
        dot = (gxhat * xhat).mean(-1, keepdim=True)
        grad_x = gxhat.sub_(xhat * dot).mul_(rstd)
        return grad_x.to(grad.dtype), grad_weight, None


class RMSNorm(torch.nn.Module):
    """megatron's norm interface: ``(config, hidden_size, eps)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"megagrpo's local norm is RMSNorm, not {config.normalization}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("megagrpo's RMSNorm does not support layernorm_zero_centered_gamma")
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)
