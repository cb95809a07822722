"""Reading Hugging Face checkpoint directories lazily, one tensor (or one block of rows) at a time.

Reads go through `safetensors.safe_open`, so no caller ever holds a whole model; `Checkpoint.raw`
gives a tensor's stored values as a view of the file's memory map instead. Names, shapes, dtypes and
offsets come from the headers, parsed here. None of this needs torch, which is imported only by what
makes torch tensors (its import alone costs more than the work of a small extrapolation).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from rlvrx.errors import CheckpointError, UsageError
from rlvrx.io.dtypes import DTYPE_INFO, RawValues, TensorInfo
from rlvrx.io.jsonio import read_json

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied next to the weights when a checkpoint is derived from another one.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def read_header(file: Path) -> tuple[dict, int]:
    """(the safetensors header without __metadata__, byte offset of the data), checked against the
    file's size: a truncated or damaged file is a CheckpointError naming it."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            length = int.from_bytes(head, "little")
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{file}: corrupt safetensors file (its header is nested too deeply)") from None
    header.pop("__metadata__", None)
    data_start = 8 + length
    spans = []
    for name, meta in header.items():
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            dtype, shape = meta["dtype"], [int(x) for x in meta["shape"]]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file (no valid dtype, shape and data_offsets for tensor {name})") from None
        if dtype not in DTYPE_INFO:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != math.prod(shape) * DTYPE_INFO[dtype][0] or data_start + end > size:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file (tensor {name} lies outside the file or has the wrong size)")
        spans.append((begin, end, name))
    # As safetensors itself checks: the tensors' data, in offset order, tile the data section exactly.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes before it"
            raise CheckpointError(f"{file}: corrupt safetensors file (tensor {name} at data offset {begin} {what})")
        position = end
    if data_start + position != size:
        raise CheckpointError(f"{file}: corrupt safetensors file ({size - data_start - position} bytes after the last tensor's data)")
    return header, data_start


def load_torch_file(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """torch.load of a file a user handed us: tensors, containers, numbers and the classes torch allows
    (DTensor pieces once torch.distributed.tensor is imported) only, with weights_only=True; anything
    else, or a damaged file, is a CheckpointError naming the file. Never runs code from the file.
    mmap: map the tensors' storage instead of reading it (the legacy non-zip format is read)."""
    import pickle
    import re
    import zipfile

    import torch

    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (it asks for {blocked.group(1)})" if blocked else ""
        raise CheckpointError(f"{path}: refused to unpickle: it holds objects other than tensors and plain values{what}, which could run code") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({first[:200]})") from None


def is_checkpoint_dir(path: Path) -> bool:
    path = Path(path)
    return (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()


class Checkpoint:
    """A Hugging Face checkpoint directory (single-file or sharded safetensors), read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        if self.path.is_file():
            raise CheckpointError(f"{self.path}: is a file; pass the checkpoint directory that holds it")
        self._headers: dict[Path, tuple[dict, int]] = {}
        self._file_of = self._map_files()
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._infos: dict[str, TensorInfo] | None = None

    def _map_files(self) -> dict[str, Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = read_json(index, dict)["weight_map"]
            except UsageError as exc:
                detail = str(exc).removeprefix(f"{index}: ")
                raise CheckpointError(f"{index}: not a valid safetensors index ({detail})") from None
            except KeyError:
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            for shard in set(weight_map.values()):
                if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
                    raise CheckpointError(f"{index}: shard {shard!r} is not a file name inside {self.path}; refusing to read it")
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index} names shard {shard.name}, which is missing from {self.path}")
            return files
        single = self.path / SINGLE_NAME
        if single.is_file():
            return {name: single for name in self._header(single)[0]}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise CheckpointError(
                f"{self.path}: holds only .bin/.pt weights; rlvrx reads safetensors (convert with `model.save_pretrained(dir, safe_serialization=True)`)"
            )
        if (self.path / "actor").is_dir():
            raise CheckpointError(f"{self.path}: a verl checkpoint without HF weights; run `rlvrx snapshot convert {self.path}`")
        raise CheckpointError(f"{self.path}: not a checkpoint directory (no {SINGLE_NAME} or {INDEX_NAME})")

    def _header(self, file: Path) -> tuple[dict, int]:
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except SafetensorError as exc:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
            self._handles[file] = handle
        return handle

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()  # views handed out keep their map alive

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def infos(self) -> dict[str, TensorInfo]:
        """Name -> shape/dtype for every tensor, read from the headers only."""
        if self._infos is None:
            infos = {}
            for file in self.files:
                header, data_start = self._header(file)
                for name, meta in header.items():
                    if self._file_of.get(name) != file:
                        continue
                    offset = data_start + int(meta["data_offsets"][0])
                    infos[name] = TensorInfo(name, tuple(int(x) for x in meta["shape"]), meta["dtype"], file, offset)
            missing = [n for n in self._file_of if n not in infos]
            if missing:
                raise CheckpointError(f"{self.path / INDEX_NAME}: lists tensor {missing[0]} in {self._file_of[missing[0]].name}, which does not hold it")
            self._infos = {name: infos[name] for name in self._file_of}
        return self._infos

    def info(self, name: str) -> TensorInfo:
        infos = self.infos()
        if name not in infos:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        return infos[name]

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        try:
            return self._handle(file).get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({exc})") from None

    def _mapped(self, info: TensorInfo) -> mmap.mmap:
        mapped = self._maps.get(info.file)
        if mapped is None:
            try:
                with open(info.file, "rb") as f:
                    mapped = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{info.file}: cannot map the safetensors file ({exc})") from None
        if info.offset + info.nbytes > len(mapped):
            raise CheckpointError(f"{info.file}: tensor {info.name} lies outside the file; the file was truncated")
        return mapped

    def raw(self, name: str) -> RawValues:
        """The tensor's stored values, flat and read-only, straight from the file's memory map (no
        copy, no torch; pages are read when touched)."""
        info = self.info(name)
        storage = {"F32": np.float32, "F64": np.float64}.get(info.dtype_name, f"u{info.itemsize}")  # else: bit patterns
        if info.numel == 0:
            return RawValues(info.dtype_name, np.zeros(0, dtype=storage))
        data = np.frombuffer(self._mapped(info), dtype=storage, count=info.numel, offset=info.offset)
        return RawValues(info.dtype_name, data)

    def will_need(self, name: str) -> None:
        """Ask the kernel to read a tensor ahead (on a cold cache, blocks read from several files
        would otherwise wait on one page fault after another)."""
        info = self.info(name)
        if not info.numel or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        try:
            self._mapped(info).madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)
        except OSError:  # advice only
            pass

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor's first dimension (the whole tensor for scalars)."""
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        sl = self._handle(file).get_slice(name)
        if len(sl.get_shape()) == 0:
            return self.get(name)
        return sl[start:stop]

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def dtypes(self) -> set[torch.dtype]:
        return {info.dtype for info in self.infos().values()}
