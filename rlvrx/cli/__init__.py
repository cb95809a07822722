"""The `rlvrx` command: one Typer app, one module per command group, thin over the library.

Importing this package changes no process state; `main()` (what `rlvrx` and `python -m rlvrx` run)
sets the process up for a CLI run, and the app's callback quiets the libraries (also when the app is
run without main(), e.g. by a test runner or `rlvrx run`'s stages).
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from rlvrx import __version__
from rlvrx.cli import common
from rlvrx.errors import RlvrxError

app = typer.Typer(
    name="rlvrx",
    help="Linear dynamics of RLVR training, made usable: train with GRPO and keep the checkpoint trajectory, "
    "measure how linearly weights and log-probs move, extrapolate future models, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"rlvrx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    common.DEBUG = debug or bool(os.environ.get("RLVRX_DEBUG"))
    common.quiet_libraries()  # before a command imports transformers


def _register() -> None:
    """Commands in the order a user meets them; each module stays thin over the library."""
    from rlvrx.cli import eval as eval_cli
    from rlvrx.cli import extrapolate, linearity, model, recipe, report, rl_extra, run, slurm, snapshot, train

    app.command("run")(run.run)
    app.command("train")(train.train)
    app.command("rl-extra")(rl_extra.rl_extra)
    app.add_typer(linearity.app, name="linearity", help="Measure how linearly weights and token log-probs move with the training step.")
    app.add_typer(extrapolate.app, name="extrapolate", help="Predict future models from earlier checkpoints: extrapolate weights or logits.")
    app.command("eval")(eval_cli.eval_)
    app.command("report")(report.report)
    app.add_typer(snapshot.app, name="snapshot", help="Register, list, verify and convert a run's checkpoint trajectory.")
    app.add_typer(recipe.app, name="recipe", help="Show, validate and list YAML recipes.")
    app.add_typer(model.app, name="model", help="Build local models (a tiny Qwen2-style model for tests and quickstarts).")
    app.command("slurm")(slurm.slurm)


_register()


class Stopped(BaseException):
    """SIGINT or SIGTERM (what Slurm sends at its time limit) arrived. Raised in the main thread, it
    unwinds like KeyboardInterrupt: atomic writers remove their temporaries, locks are released."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame) -> None:
    if os.getpid() != _MAIN_PID:  # a forked child: die of the signal as it would have
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Stopped(signum)


_MAIN_PID = os.getpid()


def main() -> None:
    global _MAIN_PID
    # numpy's OpenBLAS starts a thread per core that spins after import; the CLI's numpy work is small
    # (the heavy loops are torch's or rlvrx's own kernels). Set before any command imports numpy (importing
    # this package loads neither numpy nor torch). A user's setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    common.quiet_libraries()
    _MAIN_PID = os.getpid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):  # not if ignored (nohup)
            signal.signal(signum, _on_signal)
    try:
        app()
    except RlvrxError as exc:
        if common.DEBUG:
            raise
        common.fail(common.message(exc), exc.exit_code)
    except Stopped as exc:
        if exc.signum == signal.SIGTERM:
            common.fail("terminated (SIGTERM)", 128 + signal.SIGTERM)
        common.fail("interrupted", 130)
    except KeyboardInterrupt:
        common.fail("interrupted", 130)
    except (MemoryError, OSError) as exc:
        if common.DEBUG:
            raise
        common.fail(f"{type(exc).__name__}: {exc}", 1)
    finally:
        # The process is about to exit: keep interpreter shutdown from walking the ~million objects
        # torch creates. Reference counting still frees them. Not with triton loaded
        # (torch._dynamo imports it where installed): its nanobind types then print ~30 lines of
        # "leaked instance" warnings at exit.
        import gc

        if "triton" not in sys.modules:
            gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
