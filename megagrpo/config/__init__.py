"""Recipe configuration: typed dataclasses, YAML + command-line loading, validation.

    recipe = load_recipe("launch/configs/qwen2.5-1.5b-openr1-demo.yaml", ["--beta", "0.01"])
    validate_recipe(recipe)
    layout = validate_layout(recipe, world_size=8, num_layers=28, num_attention_heads=12,
                             num_query_groups=2)

Modules: ``script_args`` (GRPOScriptArguments), ``training`` (GRPOConfig), ``model``
(ModelConfig), ``megatron`` (MegatronConfig), ``recipe`` (Recipe, loading, dumping),
``validate`` / ``layout`` (rules), ``coerce`` / ``overrides`` (value conversion, argv parsing),
``known_keys`` (recognised-but-unused keys, aliases), ``fields`` (the field convention).
"""

from megagrpo.config.errors import ConfigError, UnusedKeysWarning
from megagrpo.config.layout import ParallelLayout, validate_layout
from megagrpo.config.megatron import MegatronConfig, RecomputeSettings
from megagrpo.config.model import ModelConfig
from megagrpo.config.recipe import Recipe, dump_recipe, load_recipe, recipe_to_dict
from megagrpo.config.script_args import (
    REWARD_FUNCS,
    DatasetConfig,
    DatasetMixtureConfig,
    GRPOScriptArguments,
)
from megagrpo.config.training import GRPOConfig
from megagrpo.config.validate import validate_recipe

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "DatasetMixtureConfig",
    "GRPOConfig",
    "GRPOScriptArguments",
    "MegatronConfig",
    "ModelConfig",
    "ParallelLayout",
    "REWARD_FUNCS",
    "Recipe",
    "RecomputeSettings",
    "UnusedKeysWarning",
    "dump_recipe",
    "load_recipe",
    "recipe_to_dict",
    "validate_layout",
    "validate_recipe",
]
