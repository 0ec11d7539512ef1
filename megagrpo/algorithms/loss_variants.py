"""Each ``loss_type``'s per-token objective, and the loss spec a run builds once from its recipe.

TRL 1.16's ``loss_type`` names both an objective and an aggregation. The aggregation lives in
``loss_aggregation.py``; the objective is one of the kernels' (``GRPOLossSpec.objective``):

- ``clip``: grpo, bnpo, dr_grpo, dapo, luspo (PPO's clipped ratio);
- ``cispo``: MiniMax-M1's clipped importance-sampling weight times the log-prob;
- ``sapo``: a soft sigmoid gate on the ratio instead of the clip;
- ``vespo``: a gamma-shaped weight of the sequence's ratio times the log-prob.

``loss_spec(training)`` is the only place a recipe's loss knobs become a ``GRPOLossSpec``; the
trainer hands that object straight to the kernels.
"""

from __future__ import annotations

from megagrpo_kernels import GRPOLossSpec

#: ``loss_type`` -> the kernels' per-token objective.
OBJECTIVES: dict[str, str] = {
    "grpo": "clip",
    "bnpo": "clip",
    "dr_grpo": "clip",
    "dapo": "clip",
    "luspo": "clip",
    "cispo": "cispo",
    "sapo": "sapo",
    "vespo": "vespo",
}


def loss_spec(training) -> GRPOLossSpec:
    """The per-token loss of a recipe's ``GRPOConfig`` (validated before)."""
    t = training
    return GRPOLossSpec(
        objective=OBJECTIVES[t.loss_type],
        temperature=t.temperature,
        epsilon_low=t.epsilon,
        epsilon_high=t.epsilon_high if t.epsilon_high is not None else t.epsilon,
        delta=t.delta,
        beta=t.beta,
        kl_bias_correction=t.use_bias_correction_kl,
        importance_sampling_level=t.importance_sampling_level,
        sapo_temperature_pos=t.sapo_temperature_pos,
        sapo_temperature_neg=t.sapo_temperature_neg,
        vespo_k_pos=t.vespo_k_pos,
        vespo_lambda_pos=t.vespo_lambda_pos,
        vespo_k_neg=t.vespo_k_neg,
        vespo_lambda_neg=t.vespo_lambda_neg,
        off_policy_mask_threshold=t.off_policy_mask_threshold,
        top_entropy_quantile=t.top_entropy_quantile,
    )
