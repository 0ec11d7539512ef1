"""``megagrpo demo``: GRPO on the embedded tiny demo, end to end, on this machine.

1. Write the addition dataset under ``<output_dir>/data``: the 100 one-digit facts a + b in five
   phrasings, one phrasing of every fact held out by the seed (400 train / 100 held-out
   problems; see ``demo/arithmetic.py`` for what the held-out accuracy does and does not show).
2. Warm-start the tiny model (the format and part of the facts) into ``<output_dir>/model``
   (reused when ``assets.json`` there records the same seed and settings).
3. Train with ``launch/configs/cpu-demo.yaml`` (its paths pointed into ``output_dir``): the
   transformers rollout engine, the reward pool (math-verify accuracy + format), megatron-core
   policy and optimizer, checkpoints, metrics under ``<output_dir>/run``; the held-out set is
   evaluated (greedy, and mean@k) before training and every ``eval_steps``.
4. Print the before/after table, write the before/after plot (``demo/report.py``), and export
   the final policy as a Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

DEMO_RECIPE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "launch",
    "configs",
    "cpu-demo.yaml",
)


ASSETS_FILE = "assets.json"


def prepare_demo(output_dir: str, seed: int = 0) -> tuple[str, str]:
    """Data and warm-started model for ``seed`` (the test split's shuffle, the model's
    initialisation and the warm start's batches); returns (data_dir, model_dir). The model is
    reused when ``assets.json`` says it was built with the same settings."""
    from megagrpo.demo.arithmetic import TEMPLATES, write_addition_dataset
    from megagrpo.demo.warm_start import WarmStartConfig, warm_start

    data_dir = os.path.join(output_dir, "data")
    paths = write_addition_dataset(data_dir, seed=seed)
    model_dir = os.path.join(output_dir, "model")
    config = WarmStartConfig(seed=seed)
    settings = {
        "templates": list(TEMPLATES),
        "seed": seed,
        "warm_start": dataclasses.asdict(config),
    }
    marker = os.path.join(model_dir, ASSETS_FILE)
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")) and os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == settings:
                return data_dir, model_dir
    with open(paths["train"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    warm_start(model_dir, rows, config)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(settings, f)
    return data_dir, model_dir


def demo_recipe(output_dir: str, overrides: list[str] | None = None, seed: int = 0):
    """The demo recipe, its assets for ``seed`` built (or reused) in ``output_dir``, the run in
    ``run/``; ``seed`` is also the recipe's seed (sampling) unless ``overrides`` set one."""
    prepare_demo(output_dir, seed)
    return demo_recipe_at(output_dir, os.path.join(output_dir, "run"), overrides, seed)


def demo_recipe_at(
    assets_dir: str, run_dir: str, overrides: list[str] | None = None, seed: int | None = None
):
    """The demo recipe on assets ``prepare_demo`` built in ``assets_dir``, writing ``run_dir``;
    ``seed`` (when given) replaces the recipe's."""
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
            *([] if seed is None else ["--seed", str(seed)]),
            *(overrides or []),
        ],
    )


def learning_summary(records: list[dict], window: int = 10) -> dict:
    """Before / after, from the logged records: mean reward and training accuracy of the first
    and last ``window`` steps (no keys when there was no step), and the held-out evaluation at
    the start (step 0) and at the end (``_after`` keys only when there was a later one)."""
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/accuracy" in r]

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    out = {}
    if steps:
        out.update(
            reward_first=mean(steps[:window], "reward"), reward_last=mean(steps[-window:], "reward")
        )
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
