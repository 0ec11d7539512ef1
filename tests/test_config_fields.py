"""Every documented recipe field is read somewhere outside ``megagrpo/config`` (or is listed in
``UNREAD_FIELDS`` with the reason, and a recipe that sets it gets a warning): a field that
nothing reads would be a setting that silently does nothing."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import pytest

from megagrpo.config import (
    GRPOConfig,
    GRPOScriptArguments,
    MegatronConfig,
    ModelConfig,
    UnusedKeysWarning,
    load_recipe,
)
from megagrpo.config.known_keys import UNREAD_FIELDS
from megagrpo.demo.grpo_demo import DEMO_RECIPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_outside_config() -> str:
    texts = []
    for top in ("megagrpo", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if os.path.join("megagrpo", "config") in dirpath:
                continue
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                        texts.append(fh.read())
    return "\n".join(texts)


CLASSES = (GRPOConfig, GRPOScriptArguments, ModelConfig, MegatronConfig)


def _fields():
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            yield cls.__name__, f.name


def _read_through_accessors(code: str) -> set[str]:
    """Fields a config method or property reads (``self.<field>``) when that accessor is used
    outside ``megagrpo/config`` (e.g. ``MegatronConfig.fp8_scaling_recipe`` reads fp8_recipe)."""
    import inspect

    read = set()
    for cls in CLASSES:
        for name, member in vars(cls).items():
            fn = member.fget if isinstance(member, property) else member
            if name.startswith("__") or not callable(fn) or not re.search(rf"\.{name}\b", code):
                continue
            read |= set(re.findall(r"self\.(\w+)", inspect.getsource(fn)))
    return read


def test_every_field_is_read_or_listed_with_a_reason():
    code = _code_outside_config()
    via_accessors = _read_through_accessors(code)
    unread = [
        f"{cls}.{name}" for cls, name in _fields()
        if not re.search(rf"\.{name}\b|[\"']{name}[\"']", code)
        and name not in via_accessors and name not in UNREAD_FIELDS
    ]  # fmt: skip
    assert unread == [], (
        f"fields nothing reads (wire them, or list them in UNREAD_FIELDS): {unread}"
    )
    stale = [n for n in UNREAD_FIELDS if re.search(rf"\.{n}\b", code)]
    assert stale == [], f"listed as unread but read: {stale}"
    names = {name for _, name in _fields()}
    assert set(UNREAD_FIELDS) <= names and all(len(r) > 20 for r in UNREAD_FIELDS.values())


def test_setting_an_unread_field_warns_with_the_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_recipe(DEMO_RECIPE, ["--attn_implementation", "sdpa"])
    messages = [str(w.message) for w in caught if issubclass(w.category, UnusedKeysWarning)]
    assert len(messages) == 1 and "attn_implementation (megatron-core" in messages[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_recipe(DEMO_RECIPE, [])
    assert not [w for w in caught if issubclass(w.category, UnusedKeysWarning)]


def test_log_level_sets_the_library_loggers():
    import logging

    from megagrpo.monitoring.log_levels import LIBRARY_LOGGERS, apply_log_level

    before = {n: logging.getLogger(n).level for n in LIBRARY_LOGGERS}
    try:
        apply_log_level("passive")
        assert {n: logging.getLogger(n).level for n in LIBRARY_LOGGERS} == before
        apply_log_level("error")
        assert all(logging.getLogger(n).level == logging.ERROR for n in LIBRARY_LOGGERS)
        assert logging.getLogger("vllm.engine.core").getEffectiveLevel() == logging.ERROR
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)


def test_completions_print_as_a_table(capsys):
    from megagrpo.monitoring.completions_table import print_completions

    print_completions(7, ["p0", "p1", "p2"], ["c0", "c1", "c2"], [1.0, 0.5, 0.0], [1, 0, -1], 2)
    out = capsys.readouterr().out
    assert "step 7: 2 of 3 completions" in out and "c1" in out and "c2" not in out
    print_completions(7, ["p0"], ["c0"], [1.0], [0.0], 0)
    assert capsys.readouterr().out == ""


def test_choice_lists_are_defined_once_and_implemented():
    import typing

    from megagrpo.algorithms.loss_aggregation import LOSS_TYPES
    from megagrpo.algorithms.loss_variants import OBJECTIVES
    from megagrpo.config.training import IS_MODES, LOSS_TYPE_NAMES, LR_SCHEDULERS, SCALE_REWARDS

    hints = typing.get_type_hints(GRPOConfig)
    assert typing.get_args(hints["loss_type"]) == LOSS_TYPE_NAMES
    assert typing.get_args(hints["scale_rewards"]) == SCALE_REWARDS
    assert typing.get_args(hints["lr_scheduler_type"]) == LR_SCHEDULERS
    assert typing.get_args(hints["vllm_importance_sampling_mode"]) == IS_MODES
    # every loss type has its aggregation and its per-token objective
    assert tuple(LOSS_TYPES) == LOSS_TYPE_NAMES and tuple(OBJECTIVES) == LOSS_TYPE_NAMES


def _trl_fields():
    """(class name, field name, default) of TRL's GRPOConfig, ModelConfig and ScriptArguments."""
    from _trl import import_trl

    trl = import_trl()

    for cls in (trl.GRPOConfig, trl.ModelConfig, trl.ScriptArguments):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            yield cls.__name__, f.name, default


def test_every_trl_field_is_implemented_harmless_or_refused():
    """Each field of TRL 1.16's configs is a megagrpo field (or an alias of one), a key listed
    as unable to change training, or a refused key whose TRL default is accepted; so a TRL
    recipe can never train a different algorithm than it asks for without an error."""
    from megagrpo.config.known_keys import (
        KEY_ALIASES,
        REFUSED_UNLESS,
        UNUSED_KEYS,
        UNUSED_PREFIXES,
        refusal,
    )
    from megagrpo.config.recipe import FIELD_SECTION

    unclassified, refused_default = [], []
    for cls, name, default in _trl_fields():
        if name in FIELD_SECTION or name in KEY_ALIASES:
            continue
        if name in REFUSED_UNLESS:
            if default is not dataclasses.MISSING and refusal(name, default) is not None:
                refused_default.append(f"{cls}.{name}={default!r}")
            continue
        if name in UNUSED_KEYS or name.startswith(UNUSED_PREFIXES):
            continue
        unclassified.append(f"{cls}.{name}")
    assert not unclassified, f"TRL fields megagrpo neither implements nor lists: {unclassified}"
    assert not refused_default, f"refused keys whose TRL default is refused: {refused_default}"


def test_refused_keys_error_at_other_values_and_pass_at_their_default(tmp_path):
    """A key megagrpo does not implement that would change training is an error naming it,
    unless it holds its default; harmless keys only warn."""
    from megagrpo.config import ConfigError, load_recipe
    from megagrpo.config.errors import UnusedKeysWarning

    base = ["--model_name_or_path", "m", "--dataset_name", "d"]
    with pytest.raises(ConfigError) as err:
        load_recipe(None, [*base, "--use_peft", "true", "--optim", "sgd", "--data_seed", "3"])
    text = str(err.value)
    assert "use_peft=True: megagrpo does not implement use_peft" in text
    assert "optim='sgd': megagrpo does not implement optim" in text
    assert "data_seed=3" in text and "[command line]" in text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = load_recipe(
            None, [*base, "--use_peft", "false", "--optim", "adamw_torch", "--lora_r", "8"]
        )
    assert set(r.unused) == {"use_peft", "optim", "lora_r"}
    assert any(issubclass(w.category, UnusedKeysWarning) for w in caught)


def test_importing_trl_leaves_the_vllm_log_level_alone(monkeypatch):
    """TRL's import sets VLLM_LOGGING_LEVEL=ERROR for the whole process (trl/_compat.py); the
    tests import it through ``_trl.import_trl``, which undoes that, so vLLM processes spawned by
    later tests still log their settings at INFO."""
    import sys

    from _trl import import_trl

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
        monkeypatch.delitem(sys.modules, name)
    import_trl()
    assert "VLLM_LOGGING_LEVEL" not in os.environ
