"""backend: verl against the installed verl 0.9 (the verl lane): the overrides rlvrx builds compose
through Hydra into verl's own ppo_trainer config and pass verl's validation, the exact command line
parses with verl's CLI, the parquet rows load through verl's RLHFDataset, and the reward entry point
grades those rows with the task's verifier."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.verl
pytest.importorskip("verl", reason="needs verl: pip install 'verl[verl-core]==0.9.1' (the verl CI lane)")
pytest.importorskip("pyarrow", reason="writing verl parquet needs pyarrow")

from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rlvrx.backends.verl.data import write_verl_data  # noqa: E402
from rlvrx.backends.verl.launch import build_command, prepare  # noqa: E402
from rlvrx.backends.verl.overrides import build_overrides, check_recipe  # noqa: E402
from rlvrx.config import load_recipe  # noqa: E402
from rlvrx.errors import UsageError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
from benchdata import benchmark_file  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} {% endif %}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint whose tokenizer has a chat template (verl renders prompts through it)."""
    from transformers import AutoTokenizer

    from rlvrx.tiny import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("verl") / "tiny", layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def math_rows(tmp_path_factory) -> Path:
    """Six GSM8K problems as a JSONL file (the task's own data format)."""
    source = benchmark_file("gsm8k")
    lines = source.read_text().splitlines()[:6]
    out = tmp_path_factory.mktemp("data") / "train.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def _recipe(name: str, tiny_model: Path, math_rows: Path, run_dir: Path, *extra: str):
    return load_recipe(
        REPO / "recipes" / f"{name}.yaml",
        [f"model.path={tiny_model}", f"task.data={math_rows}", f"task.test_data={math_rows}", f"output.dir={run_dir}", *extra],
    )


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def _validate(config) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    omega_conf_to_dataclass(config.algorithm)
    model = omega_conf_to_dataclass(config.actor_rollout_ref.model)  # loads config + tokenizer from model.path
    assert model.hf_config.num_hidden_layers == 2


def test_grpo_recipe_composes_and_passes_verl_validation(tiny_model, math_rows, tmp_path):
    recipe = _recipe("deepscaler-1.5b-grpo", tiny_model, math_rows, tmp_path / "run")
    plan = prepare(recipe, tmp_path / "run")
    config = _compose(plan.overrides)
    _validate(config)
    a = config.actor_rollout_ref
    # The paper's baseline, as verl sees it.
    assert config.algorithm.adv_estimator == "grpo" and config.algorithm.use_kl_in_reward is False
    assert config.data.train_batch_size == 128 and a.rollout.n == 16
    assert a.actor.optim.lr == pytest.approx(1e-6)
    assert (a.actor.clip_ratio_low, a.actor.clip_ratio_high) == (pytest.approx(0.2), pytest.approx(0.28))
    assert a.actor.use_kl_loss is False and a.actor.strategy == "fsdp2"
    assert config.data.max_response_length == 16384 and a.rollout.name == "vllm"
    assert list(a.actor.checkpoint.save_contents) == ["model", "optimizer", "extra", "hf_model"]
    assert config.trainer.save_freq == 100 and config.trainer.total_training_steps == 1300
    assert config.trainer.default_local_dir == str((tmp_path / "run" / "verl_checkpoints").resolve())
    assert config.reward.custom_reward_function.path == "pkg://rlvrx.backends.verl.reward"
    assert config.reward.custom_reward_function.name == "compute_score"
    assert config.trainer.checkpoint_callback_class == "rlvrx.backends.verl.callback.TrajectoryCallback"
    assert config.rlvrx.run_dir == str((tmp_path / "run").resolve())
    assert Path(config.data.train_files).is_file() and Path(config.data.val_files).is_file()
    # verl resolves the callback and the reward function from those strings.
    from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback
    from verl.trainer.ppo.reward import get_custom_reward_fn

    assert type(build_checkpoint_callback(config)).__name__ == "TrajectoryCallback"
    reward_fn = get_custom_reward_fn(config)
    row = json.loads(math_rows.read_text().splitlines()[0])
    info = {"task": "math", "task_options": json.dumps({"data": str(math_rows)})}
    assert reward_fn(data_source="rlvrx/math", solution_str=f"so \\boxed{{{row['answer']}}}", ground_truth=row["answer"], extra_info=info) == 1.0


def test_rl_extra_recipe_composes_with_schedule(tiny_model, math_rows, tmp_path):
    recipe = _recipe("deepscaler-1.5b-rl-extra", tiny_model, math_rows, tmp_path / "run")
    command = build_command(recipe, tmp_path / "run")
    assert command[1:3] == ["-m", "rlvrx.backends.verl.rl_extra"]
    config = _compose(command[3:])
    _validate(config)
    assert OmegaConf.to_container(config.rlvrx.rl_extra) == {
        "m": 100,
        "n": 100,
        "iterations": 12,
        "optimizer_state": "keep",
        "norms": "copy",
        "anchor": "cycle_start",
    }
    assert config.trainer.total_training_steps == 1200  # m * iterations gradient steps
    from rlvrx.backends.verl.rl_extra import RLExtraTrainer, RLExtraWorker
    from verl.single_controller.base.decorator import MAGIC_ATTR, Dispatch
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
    from verl.workers.engine_workers import ActorRolloutRefWorker

    assert issubclass(RLExtraTrainer, PPOTrainerSync) and issubclass(RLExtraWorker, ActorRolloutRefWorker)
    for method in (RLExtraWorker.rlvrx_jump, RLExtraWorker.rlvrx_snapshot_anchor):
        assert getattr(method, MAGIC_ATTR)["dispatch_mode"] == Dispatch.ONE_TO_ALL


def test_command_line_parses_with_verls_own_cli(tiny_model, math_rows, tmp_path):
    """`python -m verl.trainer.main_ppo OVERRIDES --cfg job` prints the composed job config without running it."""
    recipe = _recipe("deepscaler-1.5b-grpo", tiny_model, math_rows, tmp_path / "run a", "verl.project_name=it's mine")
    command = build_command(recipe, tmp_path / "run a")
    result = subprocess.run([*command, "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    import yaml

    job = yaml.safe_load(result.stdout)
    assert job["trainer"]["project_name"] == "it's mine"  # quoting survived the shell-free argv
    assert job["data"]["train_files"] == str((tmp_path / "run a" / "verl_data" / "train.parquet").resolve())
    assert job["reward"]["custom_reward_function"]["path"] == "pkg://rlvrx.backends.verl.reward"


def test_legacy_reward_key_is_refused_because_verl_ignores_it(tiny_model, math_rows, tmp_path):
    recipe = _recipe("deepscaler-1.5b-grpo", tiny_model, math_rows, tmp_path / "run")
    data = write_verl_data(recipe, tmp_path / "data")
    overrides = build_overrides(recipe, tmp_path / "run", data, tiny_model)
    # What verl does with the pre-0.9 key: it composes, and the key that matters stays as we set it.
    config = _compose(overrides + ["custom_reward_function.path=/elsewhere/reward.py"])
    assert config.reward.custom_reward_function.path == "pkg://rlvrx.backends.verl.reward"
    bad = _recipe("deepscaler-1.5b-grpo", tiny_model, math_rows, tmp_path / "run", "verl.overrides=[custom_reward_function.path=/x.py]")
    with pytest.raises(UsageError, match=r"reward\.custom_reward_function\.path"):
        check_recipe(bad)


def test_verl_rejects_what_its_validation_rejects(tiny_model, math_rows, tmp_path):
    """The validation is verl's, not a copy: with fixed micro-batches, 3 x 3 samples cannot split over 8 GPUs."""
    recipe = _recipe(
        "deepscaler-1.5b-grpo",
        tiny_model,
        math_rows,
        tmp_path / "run",
        "verl.micro_batch_size_per_gpu=1",
        "grpo.num_generations=3",
        "grpo.batch_size=3",
        "grpo.mini_batch_size=3",
    )
    data = write_verl_data(recipe, tmp_path / "data")
    config = _compose(build_overrides(recipe, tmp_path / "run", data, tiny_model))
    with pytest.raises(Exception, match="divisible"):
        _validate(config)


def test_parquet_rows_load_in_verl_and_grade_with_the_task_verifier(tiny_model, math_rows, tmp_path):
    from transformers import AutoTokenizer
    from verl.trainer.ppo.utils import create_rl_dataset

    from rlvrx.backends.verl.reward import compute_score

    recipe = _recipe("deepscaler-1.5b-grpo", tiny_model, math_rows, tmp_path / "run")
    data = write_verl_data(recipe, tmp_path / "data")
    assert (data.n_train, data.n_val) == (6, 6)
    config = _compose(build_overrides(recipe, tmp_path / "run", data, tiny_model) + [f"+data.cache_dir={tmp_path / 'cache'}"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    dataset = create_rl_dataset(config.data.train_files, config.data, tokenizer, None, is_train=True)
    assert len(dataset) == 6
    gold = [json.loads(line) for line in math_rows.read_text().splitlines()]
    for i in range(len(dataset)):
        row = dataset[i]
        assert row["data_source"] == "rlvrx/math" and row["ability"] == "math"
        assert row["raw_prompt"][0]["role"] == "user" and gold[i]["problem"] in row["raw_prompt"][0]["content"]
        answer = row["reward_model"]["ground_truth"]
        assert answer == str(gold[i]["answer"])
        args = dict(data_source=row["data_source"], ground_truth=answer, extra_info=row["extra_info"])
        assert compute_score(solution_str=f"The answer is \\boxed{{{answer}}}.", **args) == 1.0
        assert compute_score(solution_str=f"The answer is \\boxed{{{int(float(answer)) + 1}}}.", **args) == 0.0
        assert compute_score(solution_str="no idea", **args) == 0.0


def test_arithmetic_rows_grade_exactly(tmp_path):
    """The arithmetic verifier through verl-format rows: every row's gold is right, gold+1 and junk are wrong."""
    import pyarrow.parquet as pq

    from rlvrx.backends.verl.reward import compute_score

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["backend=verl", "sft.enabled=false", "task.n_train=20", "task.n_test=10"])
    data = write_verl_data(recipe, tmp_path)
    rows = pq.read_table(data.train).to_pylist()
    assert len(rows) == 20 and rows[0]["prompt"][0]["content"].endswith("=")
    for row in rows:
        a, b = row["prompt"][0]["content"].rstrip("=").split("+")
        gold = row["reward_model"]["ground_truth"]
        assert int(gold) == int(a) + int(b)
        args = dict(data_source=row["data_source"], ground_truth=gold, extra_info=row["extra_info"])
        assert compute_score(solution_str=gold, **args) == 1.0
        assert compute_score(solution_str=str(int(gold) + 1), **args) == 0.0
        assert compute_score(solution_str="x" + gold, **args) == 0.0


def test_recipe_logger_passes_through_to_trainer_logger(tiny_model, math_rows, tmp_path):
    default = _compose(build_command(_recipe("deepscaler-1.5b-grpo", tiny_model, math_rows, tmp_path / "a"), tmp_path / "a")[3:])
    assert list(default.trainer.logger) == ["console"]  # not verl's default, which includes wandb
    recipe = _recipe("deepscaler-1.5b-grpo", tiny_model, math_rows, tmp_path / "b", "logger=[tensorboard, mlflow]")
    assert list(_compose(build_command(recipe, tmp_path / "b")[3:]).trainer.logger) == ["tensorboard", "mlflow", "console"]
