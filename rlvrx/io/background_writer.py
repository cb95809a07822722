"""A writer thread in front of a ShardedWriter, so that computing the next chunk overlaps writing this one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from rlvrx.io.dtypes import RawValues
from rlvrx.io.writer import ShardedWriter

if TYPE_CHECKING:
    import torch


class BackgroundWriter:
    """Writes on one background thread, so computing chunk k+1 overlaps writing chunk k.

    Extrapolated tensors are computed chunk by chunk into a ring of `buffers` reused buffers: no
    allocation (and no page faults) per tensor, and peak memory is the ring. Copied tensors go as
    they are (memory-mapped views of the input, no copy). The first error raised by the writer is
    re-raised in the caller at the next call or at close().
    """

    def __init__(self, writer: ShardedWriter, buffer_bytes: int, buffers: int = 3):
        import queue
        import threading

        self.writer = writer
        self.buffer_bytes = buffer_bytes
        self.free: "queue.Queue" = queue.Queue()
        for _ in range(buffers):
            self.free.put(None)  # allocated on first use
        self.queue: "queue.Queue" = queue.Queue(maxsize=buffers + 1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="rlvrx-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            name, start, tensor, buffer, check = item
            if self.error is None:
                try:
                    if check is not None:
                        check()
                    if start is None:
                        self.writer.write(name, tensor)
                    else:
                        self.writer.write_part(name, start, tensor)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self.error = exc
            del tensor, check
            if buffer is not None:
                self.free.put(buffer)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def buffer(self, nbytes: int) -> np.ndarray:
        """A free uint8 buffer of at least nbytes (waits while the writer is behind)."""
        self._raise()
        buffer = self.free.get()
        if buffer is None or buffer.size < nbytes:
            buffer = np.empty(max(nbytes, self.buffer_bytes), dtype=np.uint8)
        return buffer

    def put(
        self, name: str, tensor: torch.Tensor | RawValues, check: Callable[[], None] | None = None, start: int | None = None, buffer: np.ndarray | None = None
    ) -> None:
        """Queue a whole tensor, or (start given) elements [start, start + numel) of it held in
        `buffer`, which returns to the ring once written; `check` runs on the writer thread first."""
        self._raise()
        self.queue.put((name, start, tensor, buffer, check))

    def close(self) -> None:
        """Wait for pending writes; re-raise a writer error."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def close_quietly(self) -> None:
        """On the error path: drop what is queued and stop the thread."""
        import queue

        self.error = self.error or RuntimeError("aborted")
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(None)
        self.thread.join()
