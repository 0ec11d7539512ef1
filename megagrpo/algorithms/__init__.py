"""GRPO algorithm pieces: advantages, loss types (grpo, bnpo, dr_grpo, dapo)."""
