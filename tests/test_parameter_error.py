"""ParameterError: library errors name parameters; the CLI words the same errors with its flags."""

import pickle

import pytest

from clirun import run_cli
from rlvrx.errors import ParameterError, UsageError


def test_str_names_parameters_and_worded_names_flags():
    exc = ParameterError("give {target} or {alpha}, not both", "target", "alpha")
    assert isinstance(exc, UsageError) and exc.exit_code == 2
    assert str(exc) == "give target or alpha, not both"
    assert exc.params == ("target", "alpha")
    assert exc.worded({"target": "--target", "alpha": "--alpha"}) == "give --target or --alpha, not both"
    assert exc.worded({"alpha": "--alpha"}) == "give target or --alpha, not both"  # unmapped: the parameter name


def test_values_are_substituted_verbatim():
    path = "/tmp/{run}/{0}/x{"
    exc = ParameterError("{path} already exists; pass {overwrite} to replace it", "overwrite=True", path=path)
    assert str(exc) == f"{path} already exists; pass overwrite=True to replace it"
    assert exc.worded({"overwrite": "--overwrite"}) == f"{path} already exists; pass --overwrite to replace it"
    exc = ParameterError("{alpha} {value}: must be a finite number", "alpha", value=float("nan"))
    assert (str(exc), exc.worded({"alpha": "--alpha"})) == ("alpha nan: must be a finite number", "--alpha nan: must be a finite number")
    exc = ParameterError("{0} {arg!r}: one per {0}", "sbatch_args", arg="{x}")
    assert exc.worded({"sbatch_args": "--sbatch"}) == "--sbatch '{x}': one per --sbatch"


def test_placeholders_and_pickling():
    exc = ParameterError("give {run} with {base:S0}, or {window:A:B}", "run", "base", "window")
    assert str(exc) == "give run with base=S0, or window=A:B"
    assert exc.worded({"run": "RUN", "base": "--base", "window": "--window"}) == "give RUN with --base S0, or --window A:B"
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is ParameterError and str(back) == str(exc) and back.params == exc.params
    with pytest.raises(ValueError):
        ParameterError("{out}", "out", out="x")  # a name is a parameter or a value, not both


def test_cli_message_maps_parameters_to_flags():
    from rlvrx.cli.common import flag, message

    assert (flag("base_path"), flag("copy_patterns"), flag("run"), flag("gold_key")) == ("--base-path", "--copy-pattern", "RUN", "--answer-key")
    exc = ParameterError("{0} and {out}", "nodes", "out")
    assert message(exc) == "--nodes and --out"
    assert message(exc, {"out": "output.dir"}) == "--nodes and output.dir"  # a command's own names first
    assert message(UsageError("plain {braces}")) == "plain {braces}"


def test_weights_api_names_parameters_cli_names_flags(tmp_path):
    from rlvrx.extrapolate.request import extrapolate_weights

    with pytest.raises(ParameterError, match=r"^two model directories without steps need alpha \(or base=S0 second=S1 target=T\)$"):
        extrapolate_weights(base_path=tmp_path / "a", second_path=tmp_path / "b")
    rc, _, err = run_cli("extrapolate", "weights", "--base-path", tmp_path / "a", "--second-path", tmp_path / "b")
    assert rc == 2 and "two model directories without steps need --alpha (or --base S0 --second S1 --target T)" in err


def test_logits_api_names_parameters_cli_names_flags(tmp_path):
    from rlvrx.extrapolate.logits import extrapolate_logits

    with pytest.raises(ParameterError, match="^alpha needs two checkpoints: give both base_path and second_path$"):
        extrapolate_logits(task="arithmetic", base_path=tmp_path / "a", alpha=2.0)
    rc, _, err = run_cli("extrapolate", "logits", "--task", "arithmetic", "--base-path", tmp_path / "a", "--alpha", "2")
    assert rc == 2 and "--alpha needs two checkpoints: give both --base-path and --second-path" in err


def test_generations_api_names_parameters_cli_names_flags(tmp_path):
    from rlvrx.generation.generations import read_generations

    path = tmp_path / "g.jsonl"
    path.write_text('{"id": "1", "prompt": "p", "completions": ["a"]}\n')
    with pytest.raises(ParameterError, match=r"no gold answer field \('gold' or 'answer'\); set gold_key to its name$"):
        read_generations(path)
    rc, _, err = run_cli("eval", "--generations", path, "--task", "arithmetic", "--out", tmp_path / "o")
    assert rc == 2 and "no gold answer field ('gold' or 'answer'); set --answer-key to its name" in err


def test_pipeline_stage_error_names_the_stage_commands_flags(tmp_path, monkeypatch):
    from pathlib import Path

    import rlvrx.cli.pipeline as pipeline
    from rlvrx.config import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes/quickstart.yaml"
    first = load_recipe(recipe).stages[0]
    name = first.name or first.kind

    def invoke(argv):
        raise ParameterError("{path} exists; pass {overwrite} to replace it", "overwrite=True", path="/x/{y}")

    monkeypatch.setattr(pipeline, "invoke", invoke)
    with pytest.raises(UsageError, match=r"^stage \S+ failed: /x/\{y\} exists; pass --overwrite to replace it$") as error:
        pipeline.run_pipeline(recipe, [f"output.dir={tmp_path / 'run'}"], only=name, echo=lambda line: None)
    assert not isinstance(error.value, ParameterError)  # already worded: main() prints it as it is
