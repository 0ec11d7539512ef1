"""megagrpo's on-disk layout of a megatron-core model, sharded TP x PP.

```
<dir>/megagrpo_megatron.json        metadata (MegatronCheckpointMeta)
<dir>/hf/                           config.json, tokenizer and generation files, carried verbatim
<dir>/mp_rank_{tp:02d}_{pp:03d}/model.safetensors
```
Each rank file holds that rank's megatron-core state (local-spec parameter names; with virtual
pipeline stages the names of chunk v are prefixed ``model{v}.``, as in Megatron-LM). The rank
directory names are Megatron-LM's; the tensors are safetensors rather than pickles, so they are
memory-mapped and read by slices.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field

META_NAME = "megagrpo_megatron.json"
HF_FILES_DIR = "hf"
RANK_FILE = "model.safetensors"
FORMAT_VERSION = 1


def rank_dir(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_file(root: str, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(root, rank_dir(tp_rank, pp_rank), RANK_FILE)


def chunk_prefix(vp_stage: int, vpp: int | None) -> str:
    return f"model{vp_stage}." if vpp and vpp > 1 else ""


@dataclass
class MegatronCheckpointMeta:
    """What a megatron checkpoint directory holds and how to turn it back into HF files."""

    hf_config: dict
    """The HF config.json the model was built from."""
    tp: int
    pp: int
    vpp: int | None
    padded_vocab_size: int
    format_version: int = FORMAT_VERSION
    hf_weight_map: dict[str, str] = field(default_factory=dict)
    """HF tensor name -> file name in the source checkpoint (reproduced on export)."""
    hf_index_metadata: dict = field(default_factory=dict)
    """The ``metadata`` of the source's safetensors index, if it had one."""
    hf_file_metadata: dict[str, dict] = field(default_factory=dict)
    """The ``__metadata__`` of each source safetensors file."""
    hf_aliases: dict[str, str] = field(default_factory=dict)
    """HF names stored as copies of another tensor (lm_head.weight of a tied checkpoint that
    still carries it) -> the tensor they copy."""
    hf_sharded: bool = False
    """Whether the source used an index (``model.safetensors.index.json``)."""

    def save(self, root: str) -> None:
        path = os.path.join(root, META_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, root: str) -> MegatronCheckpointMeta:
        path = os.path.join(root, META_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: not found; '{root}' is not a megagrpo megatron checkpoint "
                "(convert a Hugging Face checkpoint with `megagrpo convert hf-to-megatron`)"
            )
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version={data.get('format_version')}, expected {FORMAT_VERSION}"
            )
        return cls(**data)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy config, tokenizer and generation files (everything but weights); returns names."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not is_weight_file(name):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied
