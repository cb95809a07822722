"""The foundation's CLI: help/version, recipe, model tiny, snapshot; one-line errors and exit codes.

Most calls run `rlvrx.cli.main()` in-process (the same wrapper the console script uses, so errors are
formatted and exit codes set exactly as in a terminal); a few run a real subprocess for the exit codes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import rlvrx
from clirun import run_cli


def cli(*args: str) -> tuple[int, str, str]:
    """Run `rlvrx ARGS...` in-process: (exit code, stdout, stderr)."""
    return run_cli(*args)


def run_subprocess(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    env.pop("RLVRX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "rlvrx", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    return lines[0][len("error: ") :]


# ---------------------------------------------------------------------------------------- top level


def test_help_lists_command_groups():
    code, out, _ = cli("--help")
    assert code == 0
    for group in ("recipe", "snapshot", "model"):
        assert any(line.strip(" │").startswith(group + " ") for line in out.splitlines()), group
    assert "--debug" in out and "--version" in out


def test_version():
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"rlvrx {rlvrx.__version__}"


def test_click_usage_errors_exit_2():
    code, _, err = cli("snapshot", "scan", "somewhere")
    assert code == 2 and "--run" in err
    code, _, err = cli("no-such-command")
    assert code == 2 and "No such command" in err


# ---------------------------------------------------------------------------------------- recipe


MINIMAL = "description: Tiny test recipe.\nmodel:\n  tiny: {layers: 1}\n"


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    directory = tmp_path / "recipes_here"
    directory.mkdir()
    (directory / "alpha.yaml").write_text(MINIMAL)
    (directory / "beta.yaml").write_text("description: Second one, longer text.\nmodel:\n  path: /models/x\n")
    (directory / "broken.yaml").write_text("model:\n  tiny: {layers: 0}\ngrpo:\n  lr_rate: 1\n  steps: many\ntask:\n  operators: ['+', '/']\n")
    monkeypatch.setenv("RLVRX_RECIPES", str(directory))
    monkeypatch.setenv("COLUMNS", "200")
    return directory


def test_recipe_list(recipes):
    code, out, _ = cli("recipe", "list")
    assert code == 0
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") >= 3}
    assert rows["alpha"] == "Tiny test recipe." and rows["beta"] == "Second one, longer text."
    assert "broken" in rows


def test_recipe_show_applies_typed_overrides(recipes):
    code, out, err = cli("recipe", "show", "alpha", "grpo.lr=1e-5", "task.operators=[+,-]", "task.digits=3")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["grpo"]["lr"] == 1e-5 and shown["task"]["operators"] == ["+", "-"] and shown["task"]["digits"] == 3
    assert shown["model"]["tiny"]["layers"] == 1 and shown["model"]["path"] is None


def test_recipe_validate(recipes):
    code, out, _ = cli("recipe", "validate", "alpha")
    assert code == 0 and out.strip() == f"ok {recipes / 'alpha.yaml'}"
    code, out, err = cli("recipe", "validate", "broken")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"{recipes / 'broken.yaml'}: 4 error(s)"
    assert sorted(lines[1:]) == sorted(
        [
            "  - model.tiny.layers: Input should be greater than or equal to 1 (got 0)",
            "  - task.operators.1: Input should be '+', '-' or '*' (got '/')",
            "  - grpo.steps: Input should be a valid integer, unable to parse string as an integer (got 'many')",
            "  - grpo.lr_rate: unknown key; did you mean grpo.lr?",
        ]
    )
    code, _, err = cli("recipe", "validate", "alpha", "grpo.lr_rate=3")
    assert code == 2 and "grpo.lr_rate: unknown key; did you mean grpo.lr?" in err


def test_recipe_errors_are_one_line(recipes, tmp_path):
    code, _, err = cli("recipe", "show", "broken")
    assert code == 2
    assert one_error_line(err).startswith(f"{recipes / 'broken.yaml'}: 4 error(s) in recipe: ")
    code, _, err = cli("recipe", "show", "alpah")
    assert code == 2 and one_error_line(err) == "alpah: no such recipe file; did you mean alpha?"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1\n")
    code, _, err = cli("recipe", "validate", str(bad))
    assert code == 2 and one_error_line(err).startswith(f"{bad}: invalid YAML at line 2, column 1")
    code, _, err = cli("recipe", "show", "alpha", "grpo.lr.x=1")
    assert code == 2 and one_error_line(err) == "override grpo.lr.x: grpo.lr is a value, not a section"


# ---------------------------------------------------------------------------------------- model tiny


def test_model_tiny_builds_a_loadable_hf_dir(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlvrx.tiny import CHARACTERS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "m"
    code, stdout, err = cli(
        "model",
        "tiny",
        out,
        "--layers",
        "3",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--intermediate",
        "48",
        "--max-position",
        "40",
        "--seed",
        "5",
    )
    assert code == 0, err
    assert stdout.strip() == f"wrote {out}"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dir left behind
    config = json.loads((out / "config.json").read_text())
    assert (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
        config["max_position_embeddings"],
    ) == (3, 32, 2, 1, 48, 40)

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 3 + len(CHARACTERS) == config["vocab_size"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) == (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"])
    assert tok.padding_side == "left"
    text = "".join(CHARACTERS)
    ids = tok(text)["input_ids"]
    assert ids == list(range(3, 3 + len(CHARACTERS)))  # one token per character, in CHARACTERS order
    assert tok.decode(ids) == text
    assert tok("<bos>12+7=19<eos>")["input_ids"] == [1, 4, 5, 13, 10, 17, 4, 12, 2]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 4, 5, 13]])).logits
    assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()

    code, _, err = cli("model", "tiny", out)
    assert code == 2 and one_error_line(err).startswith(f"{out} already exists; pass --overwrite")
    code, _, err = cli("model", "tiny", tmp_path / "odd", "--hidden", "30")
    assert code == 2 and one_error_line(err) == "hidden (30) must be divisible by heads (4)"
    assert not (tmp_path / "odd").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "0"], "layers must be at least 1 (got 0)"),
        (["--heads", "0"], "heads must be at least 1 (got 0)"),
        (["--heads", "4", "--kv-heads", "3"], "heads (4) must be divisible by kv_heads (3)"),
        (["--hidden", "36"], "the head size hidden/heads (9) must be even for rotary embeddings"),
    ],
)
def test_model_tiny_rejects_bad_sizes(tmp_path, args, message):
    code, _, err = cli("model", "tiny", tmp_path / "m", *args)
    assert code == 2 and one_error_line(err) == message
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_is_seeded(tiny_model_kwargs):
    from rlvrx.tiny import build_tiny_model

    torch.manual_seed(123)
    a, _ = build_tiny_model(**{**tiny_model_kwargs, "seed": 1})
    after = torch.rand(1)  # building does not consume the caller's random stream
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)
    b, _ = build_tiny_model(**{**tiny_model_kwargs, "seed": 1})
    c, _ = build_tiny_model(**{**tiny_model_kwargs, "seed": 2})
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])


# ---------------------------------------------------------------------------------------- snapshot


@pytest.fixture
def scanned(tmp_path, checkpoint_series, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    paths = checkpoint_series(tmp_path / "ckpts", [100, 200, 300])
    run = tmp_path / "run"
    code, out, err = cli("snapshot", "scan", tmp_path / "ckpts", "--run", run, "--base", tiny_model_dir)
    assert code == 0, err
    assert out.strip() == f"registered 4 checkpoint(s); {run / 'trajectory.json'} now holds steps [0, 100, 200, 300]"
    return run, paths


def test_snapshot_scan_list_verify(scanned, tmp_path, tiny_model_dir):
    run, paths = scanned
    code, out, err = cli("snapshot", "scan", tmp_path / "ckpts", "--run", run, "--base", tiny_model_dir)  # idempotent
    assert code == 0 and "registered 0 checkpoint(s)" in out, err

    code, out, _ = cli("snapshot", "list", run, "--json", tmp_path / "list.json")
    assert code == 0
    rows = json.loads((tmp_path / "list.json").read_text())
    assert [(r["step"], r["kind"], r["dtype"]) for r in rows] == [(0, "base", "f32"), (100, "rl", "f32"), (200, "rl", "f32"), (300, "rl", "f32")]
    for row, path in zip(rows[1:], paths.values()):
        assert Path(row["path"]).resolve() == path.resolve()
        assert row["bytes"] == (path / "model.safetensors").stat().st_size and len(row["sha256"]) == 64
    table_rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in table_rows] == ["0", "100", "200", "300"]
    assert all(r.split("│")[4].strip() == "f32" for r in table_rows)

    code, out, _ = cli("snapshot", "verify", run)
    assert code == 0 and out.strip() == "ok 4 checkpoints, steps [0, 100, 200, 300]"


def test_snapshot_verify_fails_on_changed_shape(scanned, write_safetensors_checkpoint):
    run, paths = scanned
    from safetensors.torch import load_file

    tensors = load_file(str(paths[200] / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:10].clone()
    write_safetensors_checkpoint(paths[200], tensors)
    code, out, err = cli("snapshot", "verify", run, "--no-hash")
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"x step 200: tensor model.layers.0.mlp.up_proj.weight has shape [64, 32] in {Path(json.loads((run / 'trajectory.json').read_text())[0]['path'])} but [10, 32] in {paths[200]}",
        f"1 problem(s) in {run / 'trajectory.json'}",
    ]


def test_snapshot_errors(scanned, tmp_path, tiny_model_dir):
    run, paths = scanned
    code, _, err = cli("snapshot", "add", run, tiny_model_dir, "--step", "-1")
    assert code == 2 and one_error_line(err) == "step -1 is negative"
    code, _, err = cli("snapshot", "add", run, tiny_model_dir, "--step", "100")
    assert code == 2 and "step 100 is already in" in one_error_line(err)
    code, out, err = cli("snapshot", "add", run, tiny_model_dir, "--step", "150", "--kind", "extrapolated")
    assert code == 0 and out.strip() == f"step 150 (extrapolated) -> {tiny_model_dir.resolve()}", err
    code, _, err = cli("snapshot", "list", tmp_path / "nope")
    assert code == 2 and one_error_line(err) == f"{tmp_path / 'nope'}: no such run directory"
    (tmp_path / "empty").mkdir()
    code, _, err = cli("snapshot", "scan", tmp_path / "empty", "--run", tmp_path / "run2")
    assert code == 1 and err.strip() == f"no checkpoints found under {tmp_path / 'empty'}"
    assert not (tmp_path / "run2" / "trajectory.json").exists()

    manifest = run / "trajectory.json"
    entries = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(entries[::-1]))
    code, _, err = cli("snapshot", "verify", run)
    assert code == 2 and one_error_line(err) == (f"{manifest}: steps are out of order ([300, 200, 150, 100, 0]); entries must be sorted by step")
    entries[1]["kind"] = "sft"
    manifest.write_text(json.dumps(entries))
    code, _, err = cli("snapshot", "list", run)
    assert code == 2 and one_error_line(err) == f"{manifest} entry 1: kind 'sft' is not one of base, rl, extrapolated"


# ---------------------------------------------------------------------------------------- real processes


def test_subprocess_exit_codes_and_tracebacks(scanned, tmp_path):
    run, paths = scanned
    missing = tmp_path / "missing-run"
    proc = run_subprocess("snapshot", "list", missing)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {missing}: no such run directory"

    rlvrx_script = shutil.which("rlvrx")
    debug = [rlvrx_script] if rlvrx_script else [sys.executable, "-m", "rlvrx"]
    proc = subprocess.run([*debug, "--debug", "snapshot", "list", str(missing)], capture_output=True, text=True)
    assert proc.returncode == 1  # an uncaught exception
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"rlvrx.errors.UsageError: {missing}: no such run directory"

    weights = paths[300] / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    proc = run_subprocess("snapshot", "verify", run)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"x step 300: {weights}: corrupt or truncated safetensors file "
        "(tensor model.layers.0.self_attn.o_proj.weight lies outside the file or has the wrong size)",
        f"1 problem(s) in {run / 'trajectory.json'}",
    ]


SIDE_EFFECT_PROBE = """
import os, sys
before = dict(os.environ)
import rlvrx.train.trainer, rlvrx.eval.runner, rlvrx.linearity, rlvrx.extrapolate
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
loaded = sorted(m for m in sys.modules if m == "typer" or m.startswith(("typer.", "rlvrx.cli")))
print(changed, loaded)
"""


def test_importing_the_library_sets_no_environment_and_loads_no_cli():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENBLAS_NUM_THREADS", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TOKENIZERS_PARALLELISM")
    }
    out = subprocess.run([sys.executable, "-c", SIDE_EFFECT_PROBE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"


def test_importing_the_cli_sets_no_environment_but_main_does():
    probe = (
        "import os, sys\nbefore = dict(os.environ)\nimport rlvrx.cli\n"
        "assert dict(os.environ) == before and 'numpy' not in sys.modules\n"
        "sys.argv = ['rlvrx', '--version']\n"
        "try:\n    rlvrx.cli.main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('TOKENIZERS_PARALLELISM'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1 false"
