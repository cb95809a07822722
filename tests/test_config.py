"""rlvrx.config: recipes validated as a whole, errors naming dotted keys, typed KEY=VALUE overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlvrx.config import (
    Recipe,
    RecipeError,
    find_recipe,
    load_recipe,
    recipe_description,
    recipe_to_yaml,
    suggest_key,
    validate_recipe,
)
from rlvrx.errors import UsageError

SHIPPED = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(path, list(overrides))
    return err.value.errors


MINIMAL = "description: minimal\nmodel:\n  tiny: {layers: 1}\n"


def test_minimal_recipe_fills_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert isinstance(recipe, Recipe)
    assert recipe.model.tiny.layers == 1 and recipe.model.path is None
    assert recipe.grpo.lr == 5e-5 and recipe.task.operators == ["+"]


@pytest.mark.parametrize(
    "key, message",
    [
        ("grpo:\n  lr_rate: 1.0e-5", "grpo.lr_rate: unknown key; did you mean grpo.lr?"),
        ("grpo:\n  learning_rate: 1.0e-5", "grpo.learning_rate: unknown key; did you mean grpo.lr?"),
        ("grpo:\n  num_generation: 4", "grpo.num_generation: unknown key; did you mean grpo.num_generations?"),
        ("gpro:\n  lr: 1.0e-5", "gpro: unknown key; did you mean grpo?"),
        ("sft:\n  step: 3", "sft.step: unknown key; did you mean sft.steps?"),
    ],
)
def test_unknown_keys_get_a_suggestion(tmp_path, key, message):
    assert errors_of(write(tmp_path, MINIMAL + key)) == [message]


def test_unknown_key_in_nested_optional_section(tmp_path):
    text = "model:\n  tiny: {layer: 1}\nrl_extra:\n  mm: 3\n"
    assert errors_of(write(tmp_path, text)) == [
        "model.tiny.layer: unknown key; did you mean model.tiny.layers?",
        "rl_extra.mm: unknown key; did you mean rl_extra.m?",
    ]


def test_unknown_key_without_close_match_lists_known_keys(tmp_path):
    (line,) = errors_of(write(tmp_path, MINIMAL + "sft:\n  zzzz: 1\n"))
    assert line.startswith("sft.zzzz: unknown key (known keys: enabled, steps, batch_size, lr,")


def test_suggest_key():
    known = ["num_generations", "lr", "beta", "epsilon", "epsilon_high"]
    assert suggest_key("lr_rate", known) == "lr"
    assert suggest_key("kl_coef", known) == "beta"
    assert suggest_key("generations", known) == "num_generations"
    assert suggest_key("epsilon_hi", known) == "epsilon_high"
    assert suggest_key("qqqq", known) is None


def test_every_error_at_once_with_dotted_keys(tmp_path):
    text = "model:\n  tiny: {layers: 0}\ngrpo:\n  steps: many\n  lr_rate: 1\n  top_p: 2\ntask:\n  operators: ['+', '/']\nbackend: torch\n"
    path = write(tmp_path, text)
    errors = errors_of(path)
    assert sorted(errors) == sorted(
        [
            "model.tiny.layers: Input should be greater than or equal to 1 (got 0)",
            "task.operators.1: Input should be '+', '-' or '*' (got '/')",
            "grpo.steps: Input should be a valid integer, unable to parse string as an integer (got 'many')",
            "grpo.top_p: Input should be less than or equal to 1 (got 2)",
            "grpo.lr_rate: unknown key; did you mean grpo.lr?",
            "backend: Input should be 'native' or 'verl' (got 'torch')",
        ]
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert text.startswith(f"{path}: 6 error(s) in recipe: ") and "\n" not in text
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    "model, message",
    [
        ("model:\n  path: /x\n  tiny: {}\n", "model: give exactly one of model.path (an HF checkpoint dir or hub id org/name[@revision]) or model.tiny"),
        ("model:\n  dtype: float32\n", "model: give exactly one of model.path"),
        ("description: no model\n", "model: Field required"),
    ],
)
def test_model_needs_exactly_one_source(tmp_path, model, message):
    (line,) = errors_of(write(tmp_path, model))
    assert line.startswith(message)


# ---------------------------------------------------------------------------------------- overrides


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(
        path,
        [
            "grpo.lr=1e-5",
            "task.operators=[+,-]",
            "task.digits=3",
            "sft.enabled=false",
            "grpo.epsilon_high=null",
            "rl_extra.m=3",
            "model.tiny.hidden=32",
        ],
    )
    assert type(recipe.grpo.lr) is float and recipe.grpo.lr == 1e-5
    assert recipe.task.operators == ["+", "-"]
    assert recipe.task.digits == 3 and recipe.sft.enabled is False and recipe.grpo.epsilon_high is None
    assert recipe.rl_extra.m == 3 and recipe.rl_extra.n == 10  # a new section from an override
    assert recipe.model.tiny.hidden == 32 and recipe.model.tiny.layers == 1


def test_overrides_into_string_fields_keep_their_text(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["model.tiny=null", "model.path=001", "description=yes", "output.dir=2024"])
    assert recipe.model.path == "001" and recipe.model.tiny is None
    assert recipe.description == "yes" and recipe.output.dir == "2024"


def test_override_errors(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(UsageError, match=r"override 'grpo': expected KEY=VALUE with a dotted key, e.g. grpo.lr=1e-5"):
        load_recipe(path, ["grpo"])
    with pytest.raises(UsageError, match="override 'grpo..lr=1': expected KEY=VALUE"):
        load_recipe(path, ["grpo..lr=1"])
    with pytest.raises(UsageError, match="override grpo.lr.x: grpo.lr is a value, not a section"):
        load_recipe(path, ["grpo.lr.x=1"])
    with pytest.raises(UsageError, match="override description.x: description is a value, not a section"):
        load_recipe(path, ["description.x=1"])
    assert errors_of(path, ["grpo.lr_rate=1e-5"]) == ["grpo.lr_rate: unknown key; did you mean grpo.lr?"]
    assert errors_of(path, ["task.operators=[+,/]"]) == ["task.operators.1: Input should be '+', '-' or '*' (got '/')"]
    assert errors_of(path, ["model.path=/m"])[0].startswith("model: give exactly one of")


# ---------------------------------------------------------------------------------------- YAML, lookup, output


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  tiny: {}\ngrpo:\n  lr: [1\n")
    with pytest.raises(UsageError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path}: invalid YAML at line 5, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 4)"
    )
    path = write(tmp_path, "model:\n  tiny: {}\n   bad: indent\n", "indent.yaml")
    with pytest.raises(UsageError, match=r"indent.yaml: invalid YAML at line 3, column 4: expected <block end>"):
        load_recipe(path)
    with pytest.raises(UsageError, match="a recipe must be a YAML mapping of sections"):
        load_recipe(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert errors_of(write(tmp_path, "", "empty.yaml")) == ["model: Field required"]


def test_hostile_yaml_is_refused_in_one_line(tmp_path):
    # An alias bomb: 9 levels of 9 references expand to 9**9 strings under yaml.safe_load.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    lines += ["model:\n  tiny: {}"]
    cases = {
        "bomb.yaml": ("\n".join(lines), r"bomb.yaml: invalid YAML at line 2, column \d+: YAML aliases \(\*a0\) are not accepted"),
        "dup.yaml": ("model:\n  tiny: {}\ngrpo:\n  lr: 1\n  lr: 2\n", r"dup.yaml: invalid YAML at line 5, column 3: duplicate key 'lr' \(first at line 4\)"),
        "deep.yaml": ("model: " + "[" * 5000 + "]" * 5000 + "\n", r"deep.yaml: invalid YAML at line 1, column \d+: nested deeper than 32 levels"),
        "big.yaml": ("model: {tiny: {}}\n" + "# padding\n" * 120_000, r"big.yaml: \d+ bytes; a YAML file of at most 1048576 is read"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(UsageError, match=message) as err:
            load_recipe(write(tmp_path, text, name))
        assert "\n" not in str(err.value)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("description: caf\u00e9\nmodel:\n  tiny: {}\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.yaml: not UTF-8 text \(byte 16\)"):
        load_recipe(latin1)
    # Overrides and plain recipes are unaffected: a mapping value still parses, an alias-like text stays text.
    recipe = load_recipe(write(tmp_path, MINIMAL, "ok.yaml"), ["description=*not-an-alias"])
    assert recipe.description == "*not-an-alias"


def test_find_recipe_by_name(tmp_path, monkeypatch):
    recipes = tmp_path / "shipped"
    recipes.mkdir()
    write(recipes, "description: |\n  Quick start on CPU.\n  Second line.\n" + MINIMAL.split("\n", 1)[1], "quickstart.yaml")
    write(recipes, "description: '  '\n" + MINIMAL.split("\n", 1)[1], "blank.yaml")
    monkeypatch.setenv("RLVRX_RECIPES", str(recipes))
    monkeypatch.chdir(tmp_path)
    assert find_recipe("quickstart") == recipes / "quickstart.yaml"
    assert load_recipe("quickstart").model.tiny.layers == 1
    assert recipe_description(recipes / "quickstart.yaml") == "Quick start on CPU."
    assert recipe_description(recipes / "blank.yaml") == ""
    with pytest.raises(UsageError, match="quickstrat: no such recipe file; did you mean quickstart?"):
        find_recipe("quickstrat")
    with pytest.raises(UsageError, match="nothing/x.yaml: no such recipe file"):
        find_recipe("nothing/x.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["grpo.lr=1e-5", "task.operators=[+,-]"])
    text = recipe_to_yaml(recipe)
    assert "\n  lr: 1.0e-05\n" in text and "{" not in text  # block style: one key per line
    again = validate_recipe(yaml.safe_load(text))
    assert again == recipe


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe_description(path), f"{path.name} needs a description"
    assert validate_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe
