"""What dynamic sampling must do on the demo, predicted from the data and the documented rules
(docs/dynamic_sampling.md) alone, for the reward ``_reward_fns.signal_when_divisible_by_<k>``:
a group has a reward spread exactly when its prompt's solution is a multiple of k."""

from __future__ import annotations

GROUPS = 8
"""The demo's batch: 8 prompts (64 completions) per step."""
SEED = 1806
"""The recipe seed (``--seed``) the dynamic-sampling tests run with: on the demo's training split
it draws prompts that meet every case they check (cut short at the bound, full at it with a
surplus, full before it, no signal at all)."""


def dynamic_expected(solutions, step: int, k: int, max_rounds: int, *, multiple: int) -> dict:
    """Kept prompt rows (in generation order), the groups generated and the
    ``dynamic_sampling/*`` metrics of ``step``; ``multiple``: the smallest trainable batch."""
    from megagrpo.data.sampler import GenerationRounds, PromptSampler

    rounds = GenerationRounds(PromptSampler(len(solutions), GROUPS, seed=SEED), max_rounds)
    generated, r = [], 0  # (row, has a spread), in generation order
    while r < max_rounds and sum(sig for _, sig in generated) < GROUPS:
        generated += [(row, int(solutions[row]) % k == 0) for row in rounds.rows_at(step, r)]
        r += 1
    signal = [i for i, (_, sig) in enumerate(generated) if sig]
    silent = [i for i, (_, sig) in enumerate(generated) if not sig]
    size = GROUPS if len(signal) >= GROUPS else max(multiple, len(signal) // multiple * multiple)
    kept = signal[:size]
    padding = silent[len(silent) - (size - len(kept)) :] if size > len(kept) else []
    return {
        "rows": [generated[i][0] for i in sorted(kept + padding)],
        "generated": len(generated),
        "dynamic_sampling/rounds": r,
        "dynamic_sampling/filtered_groups": len(silent) - len(padding),
        "dynamic_sampling/kept_groups": size,
        "dynamic_sampling/padded_groups": len(padding),
        "dynamic_sampling/surplus_groups": len(signal) - len(kept),
    }
