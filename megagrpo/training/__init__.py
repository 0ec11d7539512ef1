"""The GRPO trainer: ``build_run(recipe)`` assembles a run, ``train(run)`` runs its loop."""

from megagrpo.training.build import Run, build_run
from megagrpo.training.loop import train

__all__ = ["Run", "build_run", "train"]
