"""How config fields are declared and documented.

Every field of every megagrpo config dataclass is declared with :func:`option`, which stores its
one line of documentation in ``metadata["help"]`` (the convention TRL and open-r1 use, so a CLI can
print it). Literal annotations carry the allowed choices; nothing else is needed.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, *, help: str, aliases: dict | None = None) -> Any:
    """A dataclass field with its documentation.

    Mutable defaults (lists, dicts) are copied per instance. ``aliases`` maps values users are
    used to (TRL's old spellings, YAML 1.1 booleans such as an unquoted ``no``) to the canonical
    value; keys are compared case-insensitively when they are strings.
    """
    metadata: dict[str, Any] = {"help": help}
    if aliases:
        metadata["aliases"] = aliases
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda d=default: copy.deepcopy(d), metadata=metadata
        )
    return dataclasses.field(default=default, metadata=metadata)


def help_of(cls: type, name: str) -> str:
    """The documentation line of field ``name`` of dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(f"{cls.__name__} has no field {name!r}")
