"""``megagrpo demo``: GRPO on the embedded tiny demo, end to end, on this machine.

1. Write the addition dataset (train / test jsonl) under ``<output_dir>/data``.
2. Warm-start the tiny model (format only) into ``<output_dir>/model`` (reused if present).
3. Train with ``launch/configs/cpu-demo.yaml`` (its paths pointed into ``output_dir``): the
   transformers rollout engine, the reward pool (math-verify accuracy + format), megatron-core
   policy and optimizer, checkpoints, metrics under ``<output_dir>/run``.
4. Report whether the reward went up, and export the final policy as a Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import os

DEMO_RECIPE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "launch",
    "configs",
    "cpu-demo.yaml",
)


def prepare_demo(output_dir: str) -> tuple[str, str]:
    """Data and warm-started model; returns (data_dir, model_dir)."""
    from megagrpo.demo.arithmetic import write_addition_dataset
    from megagrpo.demo.warm_start import warm_start

    data_dir = os.path.join(output_dir, "data")
    paths = write_addition_dataset(data_dir)
    model_dir = os.path.join(output_dir, "model")
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        with open(paths["train"], encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        warm_start(model_dir, rows)
    return data_dir, model_dir


def demo_recipe(output_dir: str, overrides: list[str] | None = None):
    """The demo recipe, its assets built (or reused) in ``output_dir``, the run in ``run/``."""
    prepare_demo(output_dir)
    return demo_recipe_at(output_dir, os.path.join(output_dir, "run"), overrides)


def demo_recipe_at(assets_dir: str, run_dir: str, overrides: list[str] | None = None):
    """The demo recipe on assets ``prepare_demo`` built in ``assets_dir``, writing ``run_dir``."""
    from megagrpo.config import load_recipe

    return load_recipe(
        DEMO_RECIPE,
        [
            "--model_name_or_path",
            os.path.join(assets_dir, "model"),
            "--dataset_name",
            os.path.join(assets_dir, "data"),
            "--output_dir",
            run_dir,
            *(overrides or []),
        ],
    )


def learning_summary(records: list[dict], window: int = 10) -> dict:
    """Before / after: mean reward and training accuracy of the first and last ``window`` steps,
    and the held-out evaluation at the start (step 0) and at the end (``_after`` keys only when
    there was a later evaluation), from the logged records."""
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/accuracy" in r]

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    out = {
        "reward_first": mean(steps[:window], "reward"),
        "reward_last": mean(steps[-window:], "reward"),
    }
    acc = (
        next(
            (k for k in steps[0] if k.startswith("rewards/accuracy") and k.endswith("/mean")), None
        )
        if steps
        else None
    )
    if acc:
        out.update(
            accuracy_first=mean(steps[:window], acc), accuracy_last=mean(steps[-window:], acc)
        )
    if evals:
        mean_k = next(k for k in evals[0] if k.startswith("eval/mean@"))
        out.update(
            eval_accuracy_before=evals[0]["eval/accuracy"],
            eval_mean_k_before=evals[0][mean_k],
            eval_k=mean_k.split("@")[1],
        )
    if len(evals) >= 2:
        out.update(
            eval_accuracy_after=evals[-1]["eval/accuracy"], eval_mean_k_after=evals[-1][mean_k]
        )
    return out
