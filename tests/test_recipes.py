"""Every shipped recipe parses, validates, and fits its parallel layout and the GPU it names."""

from __future__ import annotations

import glob
import os
import warnings

import pytest

from megagrpo.config import ConfigError, load_recipe, validate_layout, validate_recipe
from megagrpo.models.known_configs import resolve_arch
from megagrpo.planning.memory import GIB, estimate_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "launch", "configs", "*.yaml")))
# recipes written without a world_size of their own: the layout their comments describe
DEFAULT_WORLD = {"qwen2.5-1.5b-openr1-demo.yaml": 8, "cpu-demo.yaml": 1}


def _load(path, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_recipe(path, list(extra))


def test_the_recipes_are_there():
    names = {os.path.basename(p) for p in RECIPES}
    assert {
        "cpu-demo.yaml",
        "qwen2.5-0.5b-math.yaml",
        "qwen2.5-1.5b-math.yaml",
        "qwen2.5-7b-math.yaml",
        "llama-3.3-70b-math.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_parses_validates_and_fits(path, tiny_checkpoint):
    name = os.path.basename(path)
    extra = ["--model_name_or_path", tiny_checkpoint("qwen2")] if name == "cpu-demo.yaml" else []
    recipe = _load(path, *extra)
    validate_recipe(recipe)
    arch = resolve_arch(recipe.model.model_name_or_path)
    world = recipe.megatron.world_size or DEFAULT_WORLD[name]
    layout = validate_layout(recipe, world_size=world, **arch.layout_dims())
    assert layout.world_size == world and layout.tp * layout.pp * layout.dp == world
    if name != "cpu-demo.yaml":  # the GPU recipes fit an 80 GiB H100 during the update
        est = estimate_memory(recipe, arch, dp=layout.dp, gpu_memory_bytes=80 * GIB)
        assert est.update_total < 75 * GIB, est.table()


def test_the_70b_layout():
    recipe = _load(os.path.join(ROOT, "launch", "configs", "llama-3.3-70b-math.yaml"))
    assert (
        recipe.megatron.tensor_model_parallel_size,
        recipe.megatron.pipeline_model_parallel_size,
    ) == (8, 4)
    arch = resolve_arch(recipe.model.model_name_or_path)
    with pytest.raises(ConfigError, match="world_size=32 in the recipe, but the run has 16"):
        validate_layout(recipe, world_size=16, **arch.layout_dims())
