"""rlvrx.io (reader, writer): lazy reads, the atomic sharded writer, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlvrx.io.atomic import atomic_dir, atomic_write_text
from rlvrx.io.dtypes import parse_dtype
from rlvrx.io.identity import checkpoint_sha256, compare_structure
from rlvrx.io.reader import INDEX_NAME, SINGLE_NAME, Checkpoint
from rlvrx.io.writer import save_state_dict, write_checkpoint
from rlvrx.errors import CheckpointError, UsageError


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    f32 = torch.randn(33, 17, generator=gen)
    f32[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])  # bit patterns must survive
    return {
        "f32": f32,
        "bf16": torch.randn(8, 5, 3, generator=gen).bfloat16(),
        "f16": torch.randn(61, generator=gen).half(),
        "f64": torch.randn(4, 4, generator=gen).double(),
        "i64": torch.randint(-(2**62), 2**62, (7, 3), generator=gen),
        "i8": torch.randint(-128, 127, (13,), generator=gen, dtype=torch.int8),
        "bool": torch.rand(11, generator=gen) > 0.5,  # 11 bytes: misaligns everything after it
        "scalar": torch.tensor(2.75),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(0, dtype=torch.bfloat16),
        "transposed": torch.randn(6, 9, generator=gen).t(),  # non-contiguous input
        "fp8": torch.randn(5, 5, generator=gen).to(torch.float8_e4m3fn),
    }


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def read_all_with_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for file in sorted(directory.glob("*.safetensors")):
        merged.update(load_file(str(file)))
    return merged


# ---------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 600])
def test_round_trip_is_bit_exact(tmp_path, max_shard_bytes):
    tensors = sample_tensors()
    out = save_state_dict(tmp_path / "ckpt", tensors, max_shard_bytes=max_shard_bytes)
    shard_files = sorted(out.glob("*.safetensors"))
    if max_shard_bytes > 1 << 20:
        assert files_in(out) == [SINGLE_NAME]
    else:
        assert len(shard_files) >= 3 and (out / INDEX_NAME).is_file()
        index = json.loads((out / INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert set(index["weight_map"].values()) == {f.name for f in shard_files}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        for file in shard_files:  # each shard's data stays under the limit unless one tensor alone exceeds it
            held = [n for n, f in index["weight_map"].items() if f == file.name]
            data = sum(tensors[n].numel() * tensors[n].element_size() for n in held)
            assert data <= max_shard_bytes or len(held) == 1

    ckpt = Checkpoint(out)
    assert sorted(ckpt.names()) == sorted(tensors)
    via_safetensors = read_all_with_safetensors(out)
    assert set(via_safetensors) == set(tensors)
    for name, want in tensors.items():
        info = ckpt.info(name)
        assert info.shape == tuple(want.shape) and info.dtype == want.dtype, name
        for got in (ckpt.get(name), via_safetensors[name]):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert raw_bytes(got) == raw_bytes(want), name
    assert ckpt.dtypes() == {t.dtype for t in tensors.values()}
    assert ckpt.nbytes() == sum(f.stat().st_size for f in shard_files)


def test_row_reads_cover_the_tensor(tmp_path):
    tensors = sample_tensors()
    ckpt = Checkpoint(save_state_dict(tmp_path / "ckpt", tensors, max_shard_bytes=600))
    f32 = tensors["f32"]
    assert raw_bytes(ckpt.get_rows("f32", 5, 9)) == raw_bytes(f32[5:9])
    blocks = [(0, 4), (4, 9), (9, 32), (32, 33)]
    assert raw_bytes(torch.cat([ckpt.get_rows("f32", a, b) for a, b in blocks])) == raw_bytes(f32)
    assert ckpt.get_rows("scalar", 0, 1).item() == 2.75
    with pytest.raises(CheckpointError, match="no tensor named nope"):
        ckpt.get("nope")


def _tiny_source_dir(model, directory: Path) -> Path:
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("tie", [True, False])
def test_state_dict_round_trip_through_from_pretrained(tmp_path, tiny_model_kwargs, tie):
    from transformers import AutoModelForCausalLM

    from rlvrx.tiny import build_tiny_model

    model, _ = build_tiny_model(**{**tiny_model_kwargs, "tie_embeddings": tie, "seed": 7})
    with torch.no_grad():  # make lm_head differ from a fresh init, so a re-init could not pass
        model.lm_head.weight.mul_(1.5)
    source = _tiny_source_dir(model, tmp_path / "source")
    out = save_state_dict(tmp_path / "out", model.state_dict(), source_dir=source, max_shard_bytes=20_000)
    assert len(list(out.glob("*.safetensors"))) > 2
    assert (out / "config.json").read_text() == (source / "config.json").read_text()

    names = set(Checkpoint(out).names())
    assert ("lm_head.weight" in names) is (not tie)  # tied: saved once, like save_pretrained
    reference = tmp_path / "reference"
    model.save_pretrained(reference)
    assert names == set(Checkpoint(reference).names())

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert raw_bytes(got[name]) == raw_bytes(want[name]), name
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


def test_save_state_dict_keeps_equal_but_distinct_tensors(tmp_path):
    a = torch.ones(3, 3)
    state = {"a": a, "alias": a, "b": a.clone(), "view": a[1:], "e1": torch.zeros(0), "e2": torch.zeros(0)}
    ckpt = Checkpoint(save_state_dict(tmp_path / "out", state))
    assert sorted(ckpt.names()) == ["a", "b", "e1", "e2", "view"]
    assert ckpt.get("view").shape == (2, 3)


def test_empty_plan_writes_a_readable_checkpoint(tmp_path):
    out = write_checkpoint(tmp_path / "empty", [], [])
    assert files_in(out) == [SINGLE_NAME]
    assert Checkpoint(out).names() == []


def test_source_and_extra_files_are_copied(tmp_path, tiny_model_dir):
    out = write_checkpoint(
        tmp_path / "out",
        [("x", (2,), torch.float32)],
        [("x", torch.ones(2))],
        source_dir=tiny_model_dir,
        extra_files={"provenance.json": '{"a": 1}'},
    )
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert json.loads((out / "provenance.json").read_text()) == {"a": 1}


# ---------------------------------------------------------------------------------------- atomicity

SPECS = [(f"t{i}", (10, 10), torch.float32) for i in range(6)]


def tensors_until(fail_at: int | None, offset: float = 0.0, exc: type[BaseException] = RuntimeError):
    for i in range(6):
        if i == fail_at:
            raise exc("boom")
        yield f"t{i}", torch.full((10, 10), float(i + offset))


def test_failure_mid_write_leaves_nothing(tmp_path):
    # 800-byte shards: two tensors each, so the first shard is complete on disk when the generator fails.
    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(tmp_path / "out", SPECS, tensors_until(3), max_shard_bytes=800)
    assert files_in(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "out", SPECS, tensors_until(5, exc=KeyboardInterrupt), max_shard_bytes=800)
    assert files_in(tmp_path) == []


def test_overwrite_keeps_old_output_until_success(tmp_path):
    out = write_checkpoint(tmp_path / "out", SPECS, tensors_until(None), max_shard_bytes=800)
    before = checkpoint_sha256(out)
    assert files_in(out) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] + [INDEX_NAME]

    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(out, SPECS, tensors_until(4, offset=100), max_shard_bytes=800, overwrite=True)
    assert files_in(tmp_path) == ["out"] and checkpoint_sha256(out) == before
    assert Checkpoint(out).get("t5")[0, 0].item() == 5.0

    with pytest.raises(UsageError, match="already exists"):
        write_checkpoint(out, SPECS, tensors_until(None, offset=100))
    assert files_in(tmp_path) == ["out"] and checkpoint_sha256(out) == before

    write_checkpoint(out, SPECS, tensors_until(None, offset=100), overwrite=True)  # now single-file
    assert files_in(tmp_path) == ["out"] and files_in(out) == [SINGLE_NAME]
    assert Checkpoint(out).get("t5")[0, 0].item() == 105.0


def test_output_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    out = write_checkpoint(tmp_path / "out", SPECS, tensors_until(None))
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
    atomic_write_text(tmp_path / "manifest.json", "[]\n")
    assert ((tmp_path / "manifest.json").stat().st_mode & 0o777) == 0o666 & ~umask
    assert (tmp_path / "manifest.json").read_text() == "[]\n"


@pytest.mark.parametrize(
    "tensors, message",
    [
        ([(f"t{i}", torch.zeros(10, 10)) for i in range(6) if i != 4], "tensor t4 was planned but never written"),
        ([("t0", torch.zeros(10, 10))] * 2, "tensor t0 written twice"),
        ([("t0", torch.zeros(10, 9))], r"tensor t0: got shape \[10, 9\]"),
        ([("t0", torch.zeros(10, 10, dtype=torch.float16))], "tensor t0: got shape"),
        ([("zz", torch.zeros(1))], "tensor zz is not in the writer's plan"),
    ],
)
def test_writer_rejects_stream_that_does_not_match_plan(tmp_path, tensors, message):
    with pytest.raises(CheckpointError, match=message):
        write_checkpoint(tmp_path / "out", SPECS, tensors)
    assert files_in(tmp_path) == []


def test_atomic_dir_removes_temp_on_error(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
            raise ValueError
    assert files_in(tmp_path) == []
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "d" / "f").read_text() == "x" and files_in(tmp_path) == ["d"]


# ---------------------------------------------------------------------------------------- errors


def _good(tmp_path, write_safetensors_checkpoint, shards=1):
    tensors = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5), "c": torch.zeros(2, 2)}
    return write_safetensors_checkpoint(tmp_path / "ckpt", tensors, shards=shards)


def _truncate(path: Path, keep: int | None = None, drop: int = 0):
    os.truncate(path, keep if keep is not None else path.stat().st_size - drop)


def _corrupt_header(path: Path):
    data = bytearray(path.read_bytes())
    data[12:16] = b"!!!!"
    path.write_bytes(bytes(data))


BROKEN = {
    "empty dir": (lambda d: [p.unlink() for p in d.iterdir()], "not a checkpoint directory", ""),
    "truncated data": (lambda d: _truncate(d / SINGLE_NAME, drop=3), "corrupt or truncated", SINGLE_NAME),
    "truncated header": (lambda d: _truncate(d / SINGLE_NAME, keep=20), "corrupt or truncated", SINGLE_NAME),
    "three bytes": (lambda d: _truncate(d / SINGLE_NAME, keep=3), "corrupt or truncated", SINGLE_NAME),
    "corrupt header": (lambda d: _corrupt_header(d / SINGLE_NAME), "corrupt or truncated", SINGLE_NAME),
    "only .bin": (lambda d: [(d / SINGLE_NAME).unlink(), (d / "pytorch_model.bin").write_bytes(b"x")], ".bin/.pt weights", ""),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_single_file_checkpoint(tmp_path, write_safetensors_checkpoint, case):
    directory = _good(tmp_path, write_safetensors_checkpoint)
    breaker, message, file = BROKEN[case]
    breaker(directory)
    with pytest.raises(CheckpointError) as err:
        ckpt = Checkpoint(directory)
        ckpt.infos()
        [ckpt.get(n) for n in ckpt.names()]
    text = str(err.value)
    assert message in text and "\n" not in text
    assert text.startswith(str(directory / file) if file else str(directory))


SHARD_BROKEN = {
    "missing shard": (
        lambda d: (d / "model-00002-of-00003.safetensors").unlink(),
        "names shard model-00002-of-00003.safetensors, which is missing",
        INDEX_NAME,
    ),
    "truncated shard": (lambda d: _truncate(d / "model-00003-of-00003.safetensors", drop=1), "corrupt or truncated", "model-00003-of-00003.safetensors"),
    "index not JSON": (lambda d: (d / INDEX_NAME).write_text('{"weight_map": '), "not a valid safetensors index", INDEX_NAME),
    "index without weight_map": (lambda d: (d / INDEX_NAME).write_text("[1, 2]"), "not a valid safetensors index", INDEX_NAME),
    "index maps to a number": (lambda d: (d / INDEX_NAME).write_text('{"weight_map": {"a": 5}}'), "weight_map must map", INDEX_NAME),
    "index points at wrong shard": (
        lambda d: (d / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00002-of-00003.safetensors"}})),
        "lists tensor a in model-00002-of-00003.safetensors, which does not hold it",
        INDEX_NAME,
    ),
}


@pytest.mark.parametrize("case", list(SHARD_BROKEN))
def test_broken_sharded_checkpoint(tmp_path, write_safetensors_checkpoint, case):
    directory = _good(tmp_path, write_safetensors_checkpoint, shards=3)
    assert sorted(Checkpoint(directory).names()) == ["a", "b", "c"]
    breaker, message, file = SHARD_BROKEN[case]
    breaker(directory)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(directory).infos()
    text = str(err.value)
    assert message in text and "\n" not in text
    assert text.startswith(str(directory / file))


def test_paths_that_are_not_checkpoint_dirs(tmp_path, write_safetensors_checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        Checkpoint(tmp_path / "missing")
    directory = _good(tmp_path, write_safetensors_checkpoint)
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory"):
        Checkpoint(directory / SINGLE_NAME)
    verl = tmp_path / "global_step_5"
    (verl / "actor").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="rlvrx snapshot convert"):
        Checkpoint(verl)


# ---------------------------------------------------------------------------------------- hashes, structure


def test_sha256_and_structure_comparison(tmp_path, write_safetensors_checkpoint):
    a = _good(tmp_path / "a", write_safetensors_checkpoint)
    b = write_safetensors_checkpoint(tmp_path / "b", {"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5), "c": torch.zeros(2, 2)})
    assert checkpoint_sha256(a) == checkpoint_sha256(b)
    (b / "config.json").write_text("{}")  # only weight files count
    assert checkpoint_sha256(a) == checkpoint_sha256(b)
    assert compare_structure(Checkpoint(a), Checkpoint(b)) is None

    c = write_safetensors_checkpoint(tmp_path / "c", {"a": torch.arange(12.0).reshape(3, 4) + 1, "b": torch.ones(5), "c": torch.zeros(2, 2)})
    assert checkpoint_sha256(c) != checkpoint_sha256(a)
    assert compare_structure(Checkpoint(a), Checkpoint(c)) is None

    d = write_safetensors_checkpoint(tmp_path / "d", {"a": torch.zeros(4, 3), "b": torch.ones(5), "c": torch.zeros(2, 2)})
    assert compare_structure(Checkpoint(a), Checkpoint(d)) == f"tensor a has shape [3, 4] in {a} but [4, 3] in {d}"
    e = write_safetensors_checkpoint(tmp_path / "e", {"a": torch.zeros(3, 4).half(), "b": torch.ones(5), "c": torch.zeros(2, 2)})
    assert compare_structure(Checkpoint(a), Checkpoint(e)) == f"tensor a has dtype F32 in {a} but F16 in {e}"
    f = write_safetensors_checkpoint(tmp_path / "f", {"a": torch.zeros(3, 4), "b": torch.ones(5)})
    assert compare_structure(Checkpoint(a), Checkpoint(f)) == f"tensor c is in {a} but not in {f}"
    assert compare_structure(Checkpoint(f), Checkpoint(a)) == f"tensor c is in {a} but not in {f}"
    g = write_safetensors_checkpoint(tmp_path / "g", {"a": torch.zeros(3, 4).half(), "b": torch.ones(6), "z": torch.zeros(2, 2)})
    assert compare_structure(Checkpoint(a), Checkpoint(g)) == f"tensor c is in {a} but not in {g} (and 3 more difference(s))"


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32 and parse_dtype("fp16") is torch.float16
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        parse_dtype("int3")


def test_tiny_model_dir_is_a_checkpoint(tiny_model_dir):
    ckpt = Checkpoint(tiny_model_dir)
    assert ckpt.files == [tiny_model_dir / SINGLE_NAME]
    assert ckpt.info("model.embed_tokens.weight").shape == (99, 32)
    assert "lm_head.weight" not in ckpt  # tied


# ---------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 600])
def test_writer_parts_give_the_same_bytes_as_whole_tensors(tmp_path, max_shard_bytes):
    tensors = sample_tensors()
    specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    whole = write_checkpoint(tmp_path / "whole", specs, tensors.items(), max_shard_bytes=max_shard_bytes)
    from rlvrx.io.writer import ShardedWriter

    with atomic_dir(tmp_path / "parts") as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        for name, tensor in tensors.items():
            flat = tensor.contiguous().reshape(-1)
            if flat.numel() == 0:
                writer.write(name, tensor)
                continue
            for start in range(0, flat.numel(), 7):  # uneven chunks, the last one short
                writer.write_part(name, start, flat[start : start + 7].clone())
        writer.finish()
    assert files_in(whole) == files_in(tmp_path / "parts")
    for file in files_in(whole):
        assert (whole / file).read_bytes() == (tmp_path / "parts" / file).read_bytes()
    got = read_all_with_safetensors(tmp_path / "parts")
    assert all(raw_bytes(got[name]) == raw_bytes(t) for name, t in tensors.items())


def test_writer_parts_must_come_in_order_and_match_the_plan(tmp_path):
    from rlvrx.io.writer import ShardedWriter

    writer = ShardedWriter(tmp_path, [("t", (4, 5), torch.float32)])
    writer.write_part("t", 0, torch.zeros(6))
    with pytest.raises(CheckpointError, match=r"tensor t: bytes \[40, 64\) written where byte 24 of 80 was next"):
        writer.write_part("t", 10, torch.zeros(6))
    with pytest.raises(CheckpointError, match="planned 20 F32"):
        writer.write_part("t", 6, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(CheckpointError, match=r"elements \[6, 21\)"):
        writer.write_part("t", 6, torch.zeros(15))
    writer.write_part("t", 6, torch.ones(14))
    with pytest.raises(CheckpointError, match="written twice"):
        writer.write_part("t", 0, torch.zeros(1))
    writer.finish()
    assert load_file(str(tmp_path / SINGLE_NAME))["t"].reshape(-1).tolist() == [0.0] * 6 + [1.0] * 14


@pytest.mark.parametrize("shards", [1, 3])
def test_raw_values_are_the_stored_bytes_and_write_back_identically(tmp_path, write_safetensors_checkpoint, shards):
    """Checkpoint.raw (memory-mapped, no torch) against safetensors' own reads, for every dtype, and
    RawValues through the writer (whole and in parts) reproduce the file's tensors bit for bit."""
    from rlvrx.io.dtypes import RawValues
    from rlvrx.io.writer import ShardedWriter

    tensors = sample_tensors()
    ckpt = Checkpoint(write_safetensors_checkpoint(tmp_path / "in", tensors, shards=shards))
    specs = []
    for name, tensor in tensors.items():
        raw = ckpt.raw(name)
        assert raw.data.tobytes() == raw_bytes(tensor), name
        assert raw.dtype_name == ckpt.info(name).dtype_name and raw.data.size == tensor.numel()
        specs.append((name, tuple(tensor.shape), raw.dtype_name))
    with atomic_dir(tmp_path / "out") as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=300)
        for name, _, _ in specs:
            raw = ckpt.raw(name)
            if raw.data.size > 4:
                writer.write_part(name, 0, RawValues(raw.dtype_name, raw.data[:3]))
                writer.write_part(name, 3, RawValues(raw.dtype_name, raw.data[3:]))
            else:
                writer.write(name, raw)
        with pytest.raises(CheckpointError, match="got 5 values F32"):
            writer.write("f32", RawValues("F32", ckpt.raw("f32").data[:5]))
        writer.finish()
    back = read_all_with_safetensors(tmp_path / "out")
    assert all(raw_bytes(back[n]) == raw_bytes(t) and back[n].dtype == t.dtype for n, t in tensors.items())


def test_raw_read_of_a_file_truncated_after_opening(tmp_path, write_safetensors_checkpoint):
    ckpt = Checkpoint(write_safetensors_checkpoint(tmp_path / "c", sample_tensors()))
    ckpt.infos()
    os.truncate(tmp_path / "c" / SINGLE_NAME, 200)
    with pytest.raises(CheckpointError, match="lies outside the file; the file was truncated"):
        ckpt.raw("fp8")
