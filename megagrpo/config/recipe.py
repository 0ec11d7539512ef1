"""A recipe: the four config sections, loaded from a flat YAML file plus command-line overrides.

The YAML is flat, as open-r1's recipes are: every key is the name of a field of exactly one of
``ModelConfig``, ``GRPOScriptArguments``, ``GRPOConfig`` or ``MegatronConfig`` and goes there.
Loading converts and checks types only; call ``validate_recipe`` (static rules) and
``validate_layout`` (rules that need the world size and the model shape) afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any

import yaml

from megagrpo.config.coerce import build_dataclass, unknown_key_message
from megagrpo.config.errors import ConfigError, UnusedKeysWarning
from megagrpo.config.known_keys import (
    KEY_ALIASES,
    REFUSED_UNLESS,
    UNREAD_FIELDS,
    UNUSED_KEYS,
    is_known_unused,
    refusal,
)
from megagrpo.config.megatron import MegatronConfig
from megagrpo.config.model import ModelConfig
from megagrpo.config.overrides import parse_overrides
from megagrpo.config.script_args import GRPOScriptArguments
from megagrpo.config.training import GRPOConfig


@dataclass
class Recipe:
    """Everything a megagrpo run is configured with."""

    script: GRPOScriptArguments = dataclasses.field(default_factory=GRPOScriptArguments)
    training: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    megatron: MegatronConfig = dataclasses.field(default_factory=MegatronConfig)
    #: Recognised-but-unused keys of the loaded recipe and their raw values (warned about once,
    #: not dumped by ``recipe_to_dict``).
    unused: dict[str, Any] = dataclasses.field(default_factory=dict)


#: Section attribute -> dataclass, in the order recipes are written (open-r1's order first).
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "script": GRPOScriptArguments,
    "training": GRPOConfig,
    "megatron": MegatronConfig,
}
_SECTION_TITLES = {
    "model": "Model arguments (ModelConfig)",
    "script": "Data and reward arguments (GRPOScriptArguments)",
    "training": "GRPO trainer config (GRPOConfig)",
    "megatron": "megatron-core (MegatronConfig)",
}


def _field_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise AssertionError(f"field {f.name} is in both {index[f.name]} and {section}")
            index[f.name] = section
    return index


#: Recipe key -> section attribute of the config that owns it.
FIELD_SECTION: dict[str, str] = _field_index()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{self.name}: key {key!r} appears twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml_recipe(path: str) -> dict[str, Any]:
    """The top-level mapping of a YAML recipe file."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        loader = _UniqueKeyLoader(f)
        loader.name = path
        try:
            data = loader.get_single_data()
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        finally:
            loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of key: value, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def _canonical_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Rename alias keys (dtype -> torch_dtype, ...); an alias next to its field must agree."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = KEY_ALIASES.get(key, key)
        if name in out and out[name] != value:
            raise ConfigError(
                f"{source}: {key}={value!r} conflicts with {name}={out[name]!r} "
                f"({key} is another name for {name}; set one)"
            )
        out[name] = value
    return out


def load_recipe(path: str | None, overrides: list[str] | None = None) -> Recipe:
    """Load a flat YAML recipe (or none) and apply ``--key value`` overrides (which win).

    Raises ConfigError listing every unknown key (with the closest known keys) and every value
    of the wrong type. Keys megagrpo recognises but ignores give one UnusedKeysWarning naming them.
    """
    from_file = _canonical_keys(read_yaml_recipe(path), path) if path else {}
    from_cli = _canonical_keys(parse_overrides(list(overrides or [])), "command line")
    merged = {**from_file, **from_cli}

    known = list(FIELD_SECTION) + sorted(UNUSED_KEYS) + list(REFUSED_UNLESS) + list(KEY_ALIASES)
    sources = {key: "command line" if key in from_cli else str(path) for key in merged}
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    unused: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in merged.items():
        if key in FIELD_SECTION:
            per_section[FIELD_SECTION[key]][key] = value
        elif is_known_unused(key):
            why = refusal(key, value)
            if why is not None:
                errors.append(f"{why} [{sources[key]}]")
            unused[key] = value
        else:
            errors.append(f"{unknown_key_message(key, key, known)} [{sources[key]}]")

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        try:
            sections[section] = build_dataclass(cls, per_section[section], sources=sources)
        except ConfigError as e:
            errors.extend(e.errors)
    if errors:
        raise ConfigError(errors)
    unread = sorted(k for k in merged if k in UNREAD_FIELDS)
    if unused or unread:
        parts = [f"{k} ({UNREAD_FIELDS[k]})" for k in unread] + sorted(unused)
        warnings.warn(
            UnusedKeysWarning(
                f"megagrpo ignores these recipe keys (known from TRL / open-r1 / transformers, "
                f"not used here): {', '.join(parts)}"
            ),
            stacklevel=2,
        )
    return Recipe(**sections, unused=unused)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as one flat mapping of every field (nested configs as plain mappings)."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        out.update(dataclasses.asdict(getattr(recipe, section)))
    return out


def dump_recipe(recipe: Recipe, path: str | None = None) -> str:
    """The recipe as flat YAML, one commented block per section; written to ``path`` if given.
    ``load_recipe`` of the result gives an equal recipe (minus the unused keys; fields nothing
    reads, ``UNREAD_FIELDS``, are left out)."""
    blocks = []
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(recipe, section))
        values = {k: v for k, v in values.items() if k not in UNREAD_FIELDS}
        text = yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=100)
        blocks.append(f"# {_SECTION_TITLES[section]}\n{text}")
    text = "\n".join(blocks)
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return text
