"""What a run over a model samples with (n, temperature, top-p, length, seed), and the defaults it
falls back to: the paper's on a GPU (n = 64 samples, temperature 0.6, top-p 0.95, max 32768 new
tokens), small ones on CPU (n = 4, max 256 new tokens); a task with a natural answer length (e.g.
arithmetic: 2 * digits + 2 tokens) uses that as its max on both. Shared by eval and logits
extrapolation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["CPU_DEFAULTS", "GPU_DEFAULTS", "Sampling", "resolve_sampling"]

GPU_DEFAULTS = {"n": 64, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768}
CPU_DEFAULTS = {"n": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 256}


@dataclass(frozen=True)
class Sampling:
    """What a model run samples with; `origin` says where the values came from (for the report)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int = 0
    origin: str = "given"

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "origin"}

    def describe(self) -> str:
        return (
            f"n={self.n} samples, temperature {self.temperature:g}, top-p {self.top_p:g}, "
            f"max {self.max_new_tokens} new tokens, seed {self.seed} ({self.origin})"
        )

    def params(self):
        """The SamplingParams of one generate call."""
        from rlvrx.generation import SamplingParams

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed)


def resolve_sampling(
    *,
    gpu: bool,
    task_name: str,
    task_max_new_tokens: int | None = None,
    n: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> Sampling:
    """The given values, the rest from the defaults for the device (and the task's answer length)."""
    defaults = dict(GPU_DEFAULTS if gpu else CPU_DEFAULTS)
    if task_max_new_tokens is not None:
        defaults["max_new_tokens"] = task_max_new_tokens
    values_given = {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    given = {k: v for k, v in values_given.items() if v is not None}
    values = {**defaults, **given}
    if len(given) == len(defaults):
        origin = "given"
    else:
        origin = ("GPU defaults (the paper's)" if gpu else "CPU defaults") + (
            f", {task_name} answer length" if task_max_new_tokens is not None and "max_new_tokens" not in given else ""
        )
        if given:
            origin += f"; given: {', '.join(given)}"
    from rlvrx.generation import SamplingParams

    SamplingParams(temperature=values["temperature"], top_p=values["top_p"], max_new_tokens=values["max_new_tokens"])  # validates
    return Sampling(values["n"], float(values["temperature"]), float(values["top_p"]), int(values["max_new_tokens"]), seed, origin)
