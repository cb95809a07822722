"""Writing Hugging Face checkpoint directories: an atomic, streaming sharded writer.

The writer plans every shard's header up front from the tensors' shapes and dtypes, then streams
each tensor's bytes straight to its offset: peak memory is one tensor, and the files are written
into `OUT.tmp-*` and renamed into place only when complete.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from rlvrx.errors import CheckpointError
from rlvrx.io.atomic import atomic_dir
from rlvrx.io.dtypes import RawValues, dtype_name, element_size
from rlvrx.io.reader import AUX_FILES, INDEX_NAME, SINGLE_NAME

if TYPE_CHECKING:
    import torch


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


def group_into_files(specs: Sequence[tuple[str, tuple[int, ...], torch.dtype | str]], max_shard_bytes: int) -> list[list[int]]:
    """Group spec indices into files (shards) of at most max_shard_bytes (a tensor larger than that gets its own)."""
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
        return np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8).data
    tensor = tensor.detach()
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to("cpu").contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy().data


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
        self.shards = group_into_files(self.specs, max_shard_bytes)
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
