"""Read back what the trackers wrote, through their own formats: wandb's offline .wandb datastore (a leveldb-style
log of wandb.proto Record messages; wandb 0.31 ships no Python reader for it) and trackio's SQLite store."""

from __future__ import annotations

import json
import re
import sqlite3
import struct
import zlib
from pathlib import Path

HEADER = struct.Struct("<4sHB")  # ident ":W&B", magic 0xBEE1, version
RECORD = struct.Struct("<IHB")  # crc32 of type + data, length, type (1 full, 2 first, 3 middle, 4 last)
BLOCK = 32768


def wandb_records(path: Path) -> list:
    """The Record messages of one run-ID.wandb file, in order (each checksum checked)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pending, offset = [], b"", HEADER.size
    while offset + RECORD.size <= len(data):
        if BLOCK - offset % BLOCK < RECORD.size:  # a block's zero-filled trailer
            offset += BLOCK - offset % BLOCK
            continue
        crc, length, kind = RECORD.unpack_from(data, offset)
        if kind == 0 and length == 0:
            offset += BLOCK - offset % BLOCK
            continue
        body = data[offset + RECORD.size : offset + RECORD.size + length]
        assert zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {offset}"
        offset += RECORD.size + length
        pending = body if kind in (1, 2) else pending + body
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(store: Path, run_id: str) -> tuple[list[str], list[dict], dict]:
    """Every offline-run folder of `run_id` under RUN/wandb (one per process that opened the run), oldest first:
    (the folders' run ids as their run records give them, the history rows {key: value}, the summary)."""
    # offline-run-<YYYYmmdd_HHMMSS>-<id>, with -1, -2, ... when two processes start within one second
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    matches = [(m.group(1), int(m.group(2) or 0), folder) for folder in store.iterdir() if (m := pattern.fullmatch(folder.name))]
    folders = [folder for _, _, folder in sorted(matches)]
    ids, history, summary = [], [], {}
    for folder in folders:
        for record in wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
            elif kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return ids, history, summary


def trackio_rows(db: Path, run_name: str) -> tuple[set[str], list[tuple[int, dict]]]:
    """trackio's SQLite store: (the run ids under `run_name`, [(step, metrics)] in insertion order)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT run_id, step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (run_name,)).fetchall()
    return {r[0] for r in rows}, [(int(step), json.loads(metrics)) for _, step, metrics in rows]
