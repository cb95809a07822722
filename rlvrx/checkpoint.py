"""Hugging Face checkpoint directories: lazy per-tensor reads and an atomic, streaming sharded writer.

Reads go through `safetensors.safe_open`, one tensor (or one block of rows) at a time, so no caller
ever holds a whole model; `Checkpoint.raw` gives a tensor's stored values as a view of the file's
memory map instead. Names, shapes, dtypes and offsets come from the headers, parsed here. None of
this needs torch, which is imported only by what makes torch tensors (its import takes ~2 s, more
than the work of a sampled linearity run or a 0.5B extrapolation).

The writer plans every shard's header up front from the tensors' shapes and dtypes, then streams
each tensor's bytes straight to its offset: peak memory is one tensor, and the files are written
into `OUT.tmp-*` and renamed into place only when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import shutil
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from rlvrx.atomic import atomic_dir, atomic_file, atomic_write_text, check_replaceable, recover  # noqa: F401 (re-exported)
from rlvrx.errors import CheckpointError, UsageError
from rlvrx.jsonio import read_json

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

# safetensors dtype -> (bytes per element, torch dtype name)
DTYPE_INFO = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_BY_STR = ("float64", "float32", "float16", "bfloat16")
_torch_maps: dict[str, dict] = {}


def __getattr__(name: str):
    """DTYPES (safetensors name -> torch dtype), DTYPE_NAMES (the reverse) and DTYPE_BY_STR, made on
    first use so that importing this module does not import torch."""
    if name not in ("DTYPES", "DTYPE_NAMES", "DTYPE_BY_STR"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _torch_maps:
        import torch

        dtypes = {key: getattr(torch, torch_name) for key, (_, torch_name) in DTYPE_INFO.items()}
        _torch_maps.update(
            DTYPES=dtypes,
            DTYPE_NAMES={v: k for k, v in dtypes.items()},
            DTYPE_BY_STR={key: getattr(torch, key) for key in _BY_STR},
        )
    return _torch_maps[name]


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16', 'bf16', 'BF16', 'float32'... -> torch dtype."""
    key = name.strip()
    if key.upper() in DTYPE_INFO:
        return __getattr__("DTYPES")[key.upper()]
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}
    key = aliases.get(key.lower(), key.lower())
    if key not in _BY_STR:
        raise UsageError(f"unknown dtype {name!r}: use one of {', '.join(_BY_STR)}")
    return __getattr__("DTYPE_BY_STR")[key]


def dtype_name(dtype: torch.dtype | str) -> str:
    """safetensors' name of a torch dtype; names ("BF16", ...) pass through."""
    return dtype if isinstance(dtype, str) else __getattr__("DTYPE_NAMES")[dtype]


def element_size(dtype: torch.dtype | str) -> int:
    return DTYPE_INFO[dtype][0] if isinstance(dtype, str) else dtype.itemsize


@dataclass(frozen=True)
class RawValues:
    """A tensor's stored values without torch: `data` holds their bit patterns in a flat numpy array
    (bf16 and fp16 as uint16, fp8 as uint8), e.g. a view of a memory-mapped file or a kernel's output."""

    dtype_name: str
    data: np.ndarray


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype_name: str  # safetensors' name: "BF16", "F32", ...
    file: Path
    offset: int = 0  # of the tensor's first byte in the file

    @property
    def dtype(self) -> torch.dtype:
        return __getattr__("DTYPES")[self.dtype_name]

    @property
    def is_float(self) -> bool:
        return self.dtype_name in FLOAT_DTYPES

    @property
    def itemsize(self) -> int:
        return DTYPE_INFO[self.dtype_name][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


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
                f"{self.path}: holds only .bin/.pt weights; rlvrx reads safetensors "
                "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
            )
        if (self.path / "actor").is_dir():
            raise CheckpointError(
                f"{self.path}: a verl checkpoint without HF weights; run `rlvrx snapshot convert {self.path}`"
            )
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
                raise CheckpointError(
                    f"{self.path / INDEX_NAME}: lists tensor {missing[0]} in {self._file_of[missing[0]].name}, which does not hold it"
                )
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


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files (and index) of a checkpoint directory, in name order: what identifies its weights."""
    return sorted(p for p in Path(path).iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_NAME)


def checkpoint_sha256(path: str | os.PathLike, stop=None) -> str:
    """sha256 over the weight files (and index) of a checkpoint, in name order. With `stop` (a
    threading.Event), gives up between blocks once it is set (concurrent.futures.CancelledError)."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                if stop is not None and stop.is_set():
                    raise CancelledError
                digest.update(block)
    return digest.hexdigest()


def compare_structure(a: Checkpoint, b: Checkpoint) -> str | None:
    """None when both hold the same tensor names, shapes and dtypes, else a line naming the first difference
    (and how many more there are)."""
    ia, ib = a.infos(), b.infos()
    diffs = [f"tensor {name} is in {a.path} but not in {b.path}" for name in ia if name not in ib]
    diffs += [f"tensor {name} is in {b.path} but not in {a.path}" for name in ib if name not in ia]
    for name, info in ia.items():
        other = ib.get(name)
        if other is None:
            continue
        if info.shape != other.shape:
            diffs.append(f"tensor {name} has shape {list(info.shape)} in {a.path} but {list(other.shape)} in {b.path}")
        elif info.dtype_name != other.dtype_name:
            diffs.append(f"tensor {name} has dtype {info.dtype_name} in {a.path} but {other.dtype_name} in {b.path}")
    if not diffs:
        return None
    return diffs[0] + (f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else "")


def copy_aux_files(source: Path, dest: Path) -> list[str]:
    """Copy config, generation config and tokenizer files from `source` into `dest`."""
    copied = []
    for name in AUX_FILES:
        src = Path(source) / name
        if src.is_file():
            shutil.copyfile(src, Path(dest) / name)
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------------------------
# Streaming sharded writer


def plan_shards(specs: list[tuple[str, tuple[int, ...], torch.dtype | str]], max_shard_bytes: int) -> list[list[int]]:
    """Group spec indices into shards of at most max_shard_bytes (a tensor larger than that gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = math.prod(shape) * element_size(dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _raw_bytes(tensor: torch.Tensor | RawValues) -> memoryview:
    """The tensor's bytes as a flat memoryview (a copy only for non-contiguous or non-CPU tensors)."""
    if isinstance(tensor, RawValues):
        return memoryview(np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8))
    tensor = tensor.detach()
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to("cpu").contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    import torch

    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    """os.pwrite until every byte is written (one call writes at most ~2 GiB on Linux)."""
    while data.nbytes:
        written = os.pwrite(fd, data, position)
        data = data[written:]
        position += written


WRITEBACK_BYTES = 64 << 20


@functools.cache
def _sync_file_range():
    """Linux's sync_file_range (not in the os module), or None."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk without waiting (SYNC_FILE_RANGE_WRITE), so that
    the disk works while the rest is computed; the close's fsync still guarantees durability."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, 0, 0, 2)


class _ShardFile:
    """One safetensors file whose header is written first, then tensors land at their offsets."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], str]], metadata: dict[str, str]):
        self.path = path
        header: dict[str, object] = {"__metadata__": metadata}
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape, dtype in specs:
            nbytes = math.prod(shape) * element_size(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = self.data_start + offset
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little"))
        self.file.write(raw)
        self.file.truncate(self.total)
        self.file.flush()
        self.pending = set(self.offsets)
        self.done_bytes: dict[str, int] = {}
        self.unflushed = 0

    def write(self, name: str, tensor: torch.Tensor | RawValues, start: int = 0) -> bool:
        """Write the tensor's bytes at byte `start` of `name`'s data; True once `name` is complete.

        Parts must arrive in order (start = the bytes written so far), so a tensor is never half
        written twice. os.pwrite from the tensor's own memory: no intermediate copy.
        """
        offset, nbytes = self.offsets[name]
        done = self.done_bytes.get(name, 0)
        data = _raw_bytes(tensor)
        if start != done or done + data.nbytes > nbytes:
            raise CheckpointError(f"tensor {name}: bytes [{start}, {start + data.nbytes}) written where byte {done} of {nbytes} was next")
        _pwrite_all(self.file.fileno(), data, self.data_start + offset + start)
        self.unflushed += data.nbytes
        if self.unflushed >= WRITEBACK_BYTES:  # the final fsync then has little left to wait for
            _start_writeback(self.file.fileno())
            self.unflushed = 0
        done += data.nbytes
        self.done_bytes[name] = done
        if done == nbytes:
            self.pending.discard(name)
            return True
        return False

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _described(tensor: torch.Tensor | RawValues) -> tuple[str, tuple[int, ...] | int]:
    """(safetensors dtype name, shape) of a tensor; RawValues are flat: (name, number of values)."""
    if isinstance(tensor, RawValues):
        return tensor.dtype_name, int(tensor.data.size)
    return dtype_name(tensor.dtype), tuple(tensor.shape)


class ShardedWriter:
    """Write a checkpoint whose tensor names, shapes and dtypes are known up front, one tensor at a time.

    Use through `write_checkpoint`, or as a context manager inside an `atomic_dir`.
    """

    def __init__(
        self,
        directory: Path,
        specs: Iterable[tuple[str, Iterable[int], torch.dtype | str]],
        max_shard_bytes: int = 4 << 30,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = Path(directory)
        self.specs = [(name, tuple(int(s) for s in shape), dtype_name(dtype)) for name, shape, dtype in specs]
        names = [s[0] for s in self.specs]
        if len(set(names)) != len(names):
            raise CheckpointError("duplicate tensor names in the writer's plan")
        self.shards = plan_shards(self.specs, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        n = len(self.shards)
        self.shard_names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard_of: dict[str, int] = {}
        for k, idxs in enumerate(self.shards):
            for i in idxs:
                self._shard_of[self.specs[i][0]] = k
        self._spec = {name: (shape, dtype) for name, shape, dtype in self.specs}
        self._open: dict[int, _ShardFile] = {}
        self._done: set[int] = set()
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor | RawValues) -> None:
        """Write a whole tensor (RawValues: its flat stored values, checked by count)."""
        if name not in self._spec:
            raise CheckpointError(f"tensor {name} is not in the writer's plan")
        shape, dtype = self._spec[name]
        got_dtype, got_shape = _described(tensor)
        if isinstance(got_shape, int):  # flat RawValues
            got, ok = f"{got_shape} values", got_shape == math.prod(shape)
        else:
            got, ok = f"shape {list(got_shape)}", got_shape == shape
        if got_dtype != dtype or not ok:
            raise CheckpointError(f"tensor {name}: got {got} {got_dtype}, planned shape {list(shape)} {dtype}")
        self._write(name, tensor, 0)

    def write_part(self, name: str, start: int, part: torch.Tensor | RawValues) -> None:
        """Write `part` (any shape, the planned dtype) as elements [start, start + numel) of `name`,
        flattened in row-major order. Parts of a tensor must come in order, without gaps, so a tensor
        can be streamed in chunks through a few reused buffers."""
        if name not in self._spec:
            raise CheckpointError(f"tensor {name} is not in the writer's plan")
        shape, dtype = self._spec[name]
        got_dtype, got_shape = _described(part)
        numel = got_shape if isinstance(got_shape, int) else math.prod(got_shape)
        if got_dtype != dtype or start < 0 or start + numel > math.prod(shape):
            raise CheckpointError(f"tensor {name}: got elements [{start}, {start + numel}) {got_dtype}, planned {math.prod(shape)} {dtype}")
        self._write(name, part, start * element_size(dtype))

    def _write(self, name: str, tensor: torch.Tensor | RawValues, start_byte: int) -> None:
        if name in self._written:
            raise CheckpointError(f"tensor {name} written twice")
        k = self._shard_of[name]
        shard = self._open.get(k)
        if shard is None:
            specs = [self.specs[i] for i in self.shards[k]]
            shard = self._open[k] = _ShardFile(self.directory / self.shard_names[k], specs, self.metadata)
        if not shard.write(name, tensor, start_byte):
            return
        self._written.add(name)
        if not shard.pending:
            shard.close()
            del self._open[k]
            self._done.add(k)

    def finish(self) -> None:
        """Check every planned tensor was written; write the index for sharded output."""
        missing = [name for name, _, _ in self.specs if name not in self._written]
        if missing:
            raise CheckpointError(f"tensor {missing[0]} was planned but never written ({len(missing)} missing)")
        if not self.specs:  # an empty plan still gets a (valid, empty) weights file
            _ShardFile(self.directory / self.shard_names[0], [], self.metadata).close()
        if len(self.shards) > 1:
            total = sum(math.prod(shape) * element_size(dtype) for _, shape, dtype in self.specs)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {name: self.shard_names[self._shard_of[name]] for name, _, _ in self.specs},
            }
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for shard in self._open.values():
            shard.file.close()
        self._open.clear()


def write_checkpoint(
    out: str | os.PathLike,
    specs: Iterable[tuple[str, Iterable[int], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Atomically write a checkpoint dir: stream `tensors` into planned shards, copy aux files from source_dir.

    `tensors` is consumed lazily, so a generator that computes one tensor at a time keeps memory at one
    tensor. `extra_files` maps file names to text written beside the weights (e.g. provenance JSON).
    """
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        try:
            for name, tensor in tensors:
                writer.write(name, tensor)
            writer.finish()
        finally:
            writer.abort()
        if source_dir is not None:
            copy_aux_files(Path(source_dir), tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def save_state_dict(
    out: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
) -> Path:
    """Atomically save an in-memory state dict as an HF checkpoint dir.

    Tied tensors (the same storage, offset, shape and stride under several names, e.g. lm_head.weight and
    model.embed_tokens.weight) are saved once, under their first name, as `save_pretrained` does; so the
    result has the same tensor names as the source checkpoint, and `from_pretrained` re-ties them.
    """
    tensors = dict(_untied(state_dict))
    specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    return write_checkpoint(out, specs, tensors.items(), source_dir, max_shard_bytes, overwrite)


def _untied(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for name, tensor in state_dict.items():
        if tensor.numel() > 0:
            key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
        yield name, tensor
