"""Every command's --out is a directory and its help names the default the command really uses."""

import typer

from rlvrx.cli import app


def _commands(group, prefix=()):
    ctx = type(group).context_class(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if hasattr(command, "list_commands"):
            yield from _commands(command, prefix + (name,))
        else:
            yield " ".join(prefix + (name,)), command


def _option(command, flag: str):
    return next((p for p in command.params if flag in getattr(p, "opts", ())), None)


def _out_helps() -> dict[str, str]:
    root = typer.main.get_command(app)
    return {name: _option(cmd, "--out").help for name, cmd in _commands(root) if _option(cmd, "--out") is not None}


def test_every_out_option_is_a_directory_with_a_named_default():
    helps = _out_helps()
    assert {
        "eval",
        "extrapolate weights",
        "extrapolate logits",
        "linearity weights",
        "linearity logprobs",
        "linearity merge",
        "snapshot convert",
        "slurm",
    } <= set(helps)
    for name, text in helps.items():
        assert "director" in text.lower(), (name, text)
        assert "default" in text.lower(), (name, text)
    assert "RUN/extrapolated/logits-s<S0>-s<S1>-t<T>" in helps["extrapolate logits"]
    assert "RUN/extrapolated/step_T" in helps["extrapolate weights"]
    assert "RUN/eval" in helps["eval"]


def test_linearity_helps_name_their_own_default():
    helps = _out_helps()
    assert "RUN/linearity/weights" in helps["linearity weights"] and "logprobs" not in helps["linearity weights"]
    assert "RUN/linearity/logprobs" in helps["linearity logprobs"] and "weights" not in helps["linearity logprobs"]


def test_sample_help_says_how_medians_are_computed():
    root = typer.main.get_command(app)
    weights = dict(_commands(root))["linearity weights"]
    text = _option(weights, "--sample").help
    assert "without --sample they come from a histogram" in text and "1e-5" in text
    assert "with --sample they are exact" in text
