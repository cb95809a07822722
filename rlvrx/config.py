"""Recipes: YAML validated into typed config before any work starts.

All errors are reported at once, each naming its dotted key path; unknown keys get a "did you mean"
suggestion. `a.b.c=value` overrides are applied to the raw YAML before validation, so they are typed
by the schema like everything else.
"""

from __future__ import annotations

import difflib
import re
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlvrx.errors import UsageError
from rlvrx.io.yamlio import load_yaml, read_yaml_file


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Strict):
    """A Qwen2-style model with random init and a character tokenizer, built locally."""

    layers: int = Field(2, ge=1)
    hidden: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    intermediate: int = Field(256, ge=8)
    max_position: int = Field(128, ge=16)
    tie_embeddings: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _shapes(self):
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden ({self.hidden}) / heads ({self.heads}) must be an even head size (rotary embeddings)")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        return self


class ModelConfig(Strict):
    path: Optional[str] = None
    tiny: Optional[TinyModelConfig] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of model.path (an HF checkpoint dir or hub id org/name[@revision]) or model.tiny (a local tiny model)")
        return self


class TaskConfig(Strict):
    name: str = "arithmetic"
    # arithmetic
    digits: int = Field(2, ge=1, le=6)
    operators: list[Literal["+", "-", "*"]] = ["+"]
    n_train: int = Field(2000, ge=0)
    n_test: int = Field(200, ge=0)
    seed: int = 0
    # math and benchmark tasks
    data: Optional[str] = None
    test_data: Optional[str] = None
    data_dir: Optional[str] = None
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: str = "id"
    limit: Optional[int] = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        from rlvrx.tasks.registry import unknown_task

        problem = unknown_task(name)
        if problem is not None:
            raise ValueError(problem)
        return name


class SFTConfig(Strict):
    enabled: bool = True
    steps: int = Field(200, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)


class GRPOConfig(Strict):
    """Names follow TRL's GRPOConfig and the GRPO/DAPO papers."""

    num_generations: int = Field(8, ge=2)
    batch_size: int = Field(16, ge=1, description="prompts per step; the step sees batch_size * num_generations samples")
    mini_batch_size: Optional[int] = Field(None, ge=1, description="prompts per optimizer step; default: the whole batch")
    ppo_epochs: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: Optional[float] = Field(None, gt=0, description="DAPO clip-higher; default: epsilon")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference model (low-variance k3 estimator)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    max_new_tokens: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    steps: int = Field(100, ge=0)
    save_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="greedy test accuracy every N steps (0: at start and end only)")
    eval_examples: int = Field(200, ge=1)
    seed: int = 0


class RLExtraConfig(Strict):
    m: int = Field(10, ge=1, description="RL steps per cycle")
    n: int = Field(10, ge=1, description="steps jumped ahead after each cycle")
    iterations: int = Field(5, ge=1)
    anchor: Literal["cycle_start", "window"] = "cycle_start"
    fit: Literal["two_point", "lstsq"] = "two_point"
    optimizer_state: Literal["keep", "reset", "rescale"] = "keep"
    norms: Literal["copy", "extrapolate"] = "copy"


# The kinds of `stages:` entries, in the order a workflow meets them (rlvrx.cli.pipeline maps each to its command).
STAGE_KINDS = (
    "train",
    "rl-extra",
    "linearity-weights",
    "linearity-logprobs",
    "extrapolate-weights",
    "extrapolate-logits",
    "eval",
    "linearity-rank",
    "extrapolate-compare",
)


class StageConfig(Strict):
    """One step of `rlvrx run`: an rlvrx command with its arguments (see rlvrx.cli.pipeline)."""

    kind: Literal[STAGE_KINDS]  # type: ignore[valid-type]  # Literal of a tuple: its members
    name: Optional[str] = Field(None, description="unique stage name (default: kind); used by --only / --from")
    args: list[str] = Field(default_factory=list, description="positional arguments; {run} and {recipe} are filled in")
    options: dict[str, Any] = Field(default_factory=dict, description="command options by long name, e.g. {sample: 0.001}")


class OutputConfig(Strict):
    dir: str = "runs/default"


class VerlConfig(Strict):
    """backend: verl (Ray + FSDP2 + vLLM rollouts). The grpo/task/model sections map onto verl's
    Hydra config (rlvrx.backends.verl.overrides); these are the cluster, rollout and checkpoint
    settings, and `overrides` are raw Hydra overrides for verl.trainer.main_ppo, applied last."""

    python: Optional[str] = Field(None, description="interpreter that has verl installed; default: the one running rlvrx")
    nnodes: int = Field(1, ge=1)
    n_gpus_per_node: int = Field(8, ge=1)
    rollout: Literal["vllm", "sglang"] = "vllm"
    rollout_tp: int = Field(1, ge=1, description="tensor-parallel size of each rollout engine")
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    max_prompt_length: int = Field(1024, ge=1)
    ppo_max_token_len_per_gpu: int = Field(32768, ge=1, description="dynamic batch size: tokens per GPU per micro-batch")
    micro_batch_size_per_gpu: Optional[int] = Field(None, ge=1, description="fixed micro-batches instead of dynamic batch size")
    param_offload: bool = False
    optimizer_offload: bool = False
    save_contents: list[Literal["model", "optimizer", "extra", "hf_model"]] = ["model", "optimizer", "extra", "hf_model"]
    max_ckpt_to_keep: Optional[int] = Field(None, ge=1)
    checkpoint_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of HF weights converted from FSDP shards")
    rl_extra_mode: Literal["in_process", "restart"] = Field("in_process", description="RL-Extra: jumps inside one Ray job, or the restart loop")
    project_name: str = "rlvrx"
    logger: list[str] = ["console"]
    data_dir: Optional[str] = Field(None, description="where the verl parquet files go; default: RUN/verl_data")
    overrides: list[str] = []


class Recipe(Strict):
    description: str = ""
    backend: Literal["native", "verl"] = "native"
    model: ModelConfig
    task: TaskConfig = TaskConfig()
    sft: SFTConfig = SFTConfig()
    grpo: GRPOConfig = GRPOConfig()
    rl_extra: Optional[RLExtraConfig] = None
    output: OutputConfig = OutputConfig()
    stages: list[StageConfig] = Field(default_factory=list)
    verl: VerlConfig = VerlConfig()
    logger: list[Literal["console", "tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=lambda: ["console"], description="trackers of a native run (metrics.jsonl is always written)"
    )


# ----------------------------------------------------------------------------------------------
# Loading, overrides, errors


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = re.sub(r"\[(\d+)\]", r".\1", key.strip())  # stages[2].name -> stages.2.name
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. grpo.lr=1e-5")
        try:
            parsed.append((key.split("."), load_yaml(value, "override") if value.strip() else None))
        except UsageError:  # not YAML: the text itself
            parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str], schema: type[BaseModel] | None = None) -> dict:
    """Set each dotted KEY=VALUE in `raw`. Values are YAML-typed, except that a scalar aimed at a string
    field of `schema` keeps its text (model.path=001 stays '001', description=yes stays 'yes')."""
    for item in overrides:
        ((path, value),) = parse_overrides([item])
        if schema is not None and not isinstance(value, (str, list, dict, type(None))) and _is_str_field(schema, [p for p in path if not p.isdigit()]):
            value = item.partition("=")[2].strip()
        node = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                child = node[_list_index(node, path[: i + 1])]
            else:
                child = node.get(part)
                fields = [p for p in path[: i + 1] if not p.isdigit()]
                if child is None and not (schema is not None and _is_value_field(schema, fields)):
                    child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise UsageError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        if isinstance(node, list):
            node[_list_index(node, path)] = value
        else:
            node[path[-1]] = value
    return raw


def _list_index(items: list, path: list[str]) -> int:
    part = path[-1]
    if not part.isdigit() or int(part) >= len(items):
        raise UsageError(f"override {'.'.join(path)}: {'.'.join(path[:-1])} is a list of {len(items)}; use an index from 0 to {len(items) - 1}")
    return int(part)


def _is_value_field(schema: type[BaseModel], path: list[str]) -> bool:
    """True when `path` names a schema field that holds a value rather than a section."""
    parent = _model_at(schema, tuple(path[:-1]))
    return parent is not None and path[-1] in parent.model_fields and _model_at(schema, tuple(path)) is None


def _is_str_field(schema: type[BaseModel], path: list[str]) -> bool:
    parent = _model_at(schema, tuple(path[:-1]))
    field = parent.model_fields.get(path[-1]) if parent else None
    if field is None:
        return False
    annotation = field.annotation
    return annotation is str or (str in getattr(annotation, "__args__", ()) and getattr(annotation, "__origin__", None) is not list)


# Names used elsewhere (TRL, verl, papers) for keys rlvrx spells differently.
KEY_ALIASES = {"learning_rate": "lr", "kl_coef": "beta", "kl_coeff": "beta", "clip_ratio": "epsilon", "group_size": "num_generations"}


def suggest_key(name: str, known: list[str]) -> str | None:
    """The known key a mistyped one most likely meant: an alias, a close spelling, or shared words (lr_rate -> lr)."""
    if KEY_ALIASES.get(name) in known:
        return KEY_ALIASES[name]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        return close[0]
    words = set(name.lower().replace("-", "_").split("_")) - {""}
    sharing = [k for k in known if words and (set(k.split("_")) <= words or words <= set(k.split("_")))]
    return max(sharing, key=lambda k: difflib.SequenceMatcher(None, name, k).ratio()) if sharing else None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by following `loc` field names from `model`."""
    for part in loc:
        if not isinstance(part, str):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def format_errors(exc: ValidationError, schema: type[BaseModel] = Recipe) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(schema, loc[:-1])
            known = list(parent.model_fields) if parent else []
            close = [c for c in [suggest_key(str(loc[-1]), known)] if c]
            hint = f"; did you mean {'.'.join(str(p) for p in loc[:-1]) + '.' if loc[:-1] else ''}{close[0]}?" if close else ""
            known_hint = f" (known keys: {', '.join(known)})" if known and not close else ""
            lines.append(f"{key}: unknown key{hint}{known_hint}")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"{key}: {msg}{shown}")
    return lines


class RecipeError(UsageError):
    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s) in recipe: " + "; ".join(errors))


def recipes_dirs() -> list[Path]:
    """Where shipped recipes are looked up: $RLVRX_RECIPES, ./recipes, and the source checkout's recipes/."""
    dirs = []
    if os.environ.get("RLVRX_RECIPES"):
        dirs.append(Path(os.environ["RLVRX_RECIPES"]))
    dirs.append(Path.cwd() / "recipes")
    dirs.append(Path(__file__).resolve().parents[1] / "recipes")
    seen, out = set(), []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen and d.is_dir():
            seen.add(key)
            out.append(d)
    return out


def find_recipe(name: str | os.PathLike) -> Path:
    """A recipe path, or the name of a shipped recipe (`quickstart` -> recipes/quickstart.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and path.parent == Path("."):
        for directory in recipes_dirs():
            for candidate in (directory / f"{name}.yaml", directory / f"{name}.yml"):
                if candidate.is_file():
                    return candidate
    known = [p.stem for d in recipes_dirs() for p in d.glob("*.y*ml")]
    close = difflib.get_close_matches(path.stem, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else (f"; shipped recipes: {', '.join(sorted(known))}" if known else "")
    raise UsageError(f"{name}: no such recipe file{hint}")


def read_yaml(path: Path) -> dict:
    raw = read_yaml_file(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a recipe must be a YAML mapping of sections (model, task, grpo, ...)")
    return raw


def load_recipe(source: str | os.PathLike, overrides: list[str] | None = None, schema: type[BaseModel] = Recipe):
    """Load, override and validate a recipe; raise RecipeError listing every problem."""
    path = find_recipe(source)
    raw = apply_overrides(read_yaml(path), list(overrides or []), schema)
    return validate_recipe(raw, str(path), schema)


def validate_recipe(raw: dict, source: str = "recipe", schema: type[BaseModel] = Recipe):
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(source, format_errors(exc, schema)) from None


def recipe_to_yaml(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False, width=float("inf"))


def recipe_description(path: Path) -> str:
    try:
        raw = read_yaml_file(path) or {}
    except UsageError:
        return "(invalid YAML)"
    text = str(raw.get("description") or "").strip() if isinstance(raw, dict) else ""
    return text.splitlines()[0] if text else ""
