"""Parse command-line overrides: ``--key value``, ``--key=value``, ``--flag``, ``--key a b c``.

Values stay strings here (several words become a list of strings); ``coerce`` converts them to the
field's type, so ``--bf16 false``, ``--learning_rate 1e-6``, ``--reward_funcs accuracy,format``,
``--reward_funcs accuracy format``, ``--reward_funcs "[accuracy, format]"`` and
``--dataset_mixture "{datasets: [{id: a}]}"`` all work. Dashes in keys count as underscores
(``--learning-rate``). A key given twice keeps the last value, as argparse does.
"""

from __future__ import annotations

from typing import Any

from megagrpo.config.coerce import FLAG
from megagrpo.config.errors import ConfigError


def _is_key(token: str) -> bool:
    return token.startswith("--") and len(token) > 2


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Map each ``--key`` of ``argv`` to its raw value (str, list of str, or FLAG)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not _is_key(token):
            raise ConfigError(
                f"command line: expected --key value, got {token!r} at position {i} "
                f"(overrides: {' '.join(argv)})"
            )
        body = token[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            key = body
            j = i + 1
            while j < len(argv) and not _is_key(argv[j]):
                j += 1
            words = argv[i + 1 : j]
            value = FLAG if not words else words[0] if len(words) == 1 else list(words)
            i = j
        key = key.replace("-", "_")
        if not key.isidentifier():
            raise ConfigError(f"command line: {token!r} is not a valid --key")
        out[key] = value
    return out
