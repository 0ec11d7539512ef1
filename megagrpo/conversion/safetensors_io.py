"""Streaming safetensors: read by slices through memory maps, write tensor by tensor.

``SafetensorsDir`` reads a Hugging Face checkpoint directory (``model.safetensors`` or a sharded
set with ``model.safetensors.index.json``) and serves slices of its tensors without loading whole
files. ``StreamingWriter`` writes one safetensors file whose header is fixed up front from the
names, dtypes and shapes, then takes the tensors one at a time in that order, so writing a model
holds one tensor in memory, not the model. Files are written to a temporary name, fsynced and
renamed, so a crash never leaves a truncated file under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as expected; names the path."""


def _read_header(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        n = int.from_bytes(raw, "little")
        try:
            return json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None


class SafetensorsDir:
    """A ``TensorSource`` over the safetensors files of one directory."""

    def __init__(self, directory: str, index_name: str = INDEX_NAME, single: str = SINGLE_NAME):
        self.directory = directory
        index_path = os.path.join(directory, index_name)
        single_path = os.path.join(directory, single)
        self.index_metadata: dict = {}
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            if "weight_map" not in index:
                raise CheckpointError(f"{index_path}: no 'weight_map' field")
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            self.index_metadata = dict(index.get("metadata") or {})
        elif os.path.isfile(single_path):
            header = _read_header(single_path)
            self.weight_map = {k: single for k in header if k != "__metadata__"}
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
            hint = (
                " (found pytorch_model.bin: convert it to safetensors first)"
                if found and any(n.startswith("pytorch_model") for n in found)
                else ""
            )
            raise CheckpointError(
                f"{directory}: neither {single} nor {index_name} found{hint}; files: {found}"
            )
        self._headers: dict[str, dict] = {}
        self._handles: dict[str, object] = {}
        for fname in sorted(set(self.weight_map.values())):
            path = os.path.join(directory, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in the index but missing")
            header = _read_header(path)
            self._headers[fname] = header
            missing = [n for n, f in self.weight_map.items() if f == fname and n not in header]
            if missing:
                raise CheckpointError(f"{path}: the index lists tensors it lacks: {missing[:5]}")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def file_metadata(self, fname: str) -> dict:
        return dict(self._headers[fname].get("__metadata__") or {})

    def _info(self, name: str) -> dict:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: tensor '{name}' not found in the checkpoint")
        return self._headers[self.weight_map[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._info(name)["dtype"]
        if code not in _FROM_ST:
            raise CheckpointError(f"{self.directory}: tensor '{name}' has unsupported dtype {code}")
        return _FROM_ST[code]

    def _handle(self, name: str):
        from safetensors import safe_open

        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(
                os.path.join(self.directory, fname), framework="pt", device="cpu"
            )
        return self._handles[fname]

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        shape = self.shape(name)
        if start == 0 and stop == shape[dim]:
            return self._handle(name).get_tensor(name)
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return self._handle(name).get_slice(name)[index]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


class StreamingWriter:
    """Writes one safetensors file; tensors must arrive in the order of ``entries``."""

    def __init__(
        self,
        path: str,
        entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = path
        self._order: list[str] = []
        self._expect: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        header: dict = {}
        offset = 0
        for name, dtype, shape in entries:
            if name in self._expect:
                raise ValueError(f"{path}: tensor '{name}' listed twice")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            self._order.append(name)
            self._expect[name] = (dtype, tuple(shape))
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tmp = path + ".tmp"
        self._f = open(self._tmp, "wb")
        self._f.write(len(blob).to_bytes(8, "little"))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"{self.path}: got tensor '{name}', expected {want}")
        dtype, shape = self._expect[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the header says {dtype} {shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._f.close()
            os.unlink(self._tmp)
            raise ValueError(
                f"{self.path}: closed after {self._next} of {len(self._order)} tensors; "
                f"missing {self._order[self._next :][:5]}"
            )
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)
