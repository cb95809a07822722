import re

import pytest

from rlvrx.errors import UsageError
from rlvrx.tasks import INSTRUCTION, ArithmeticTask, Example, MathTask, get_task, task_names, task_options
from rlvrx.verify.arithmetic import extract_integer
from rlvrx.tiny import char_tokenizer

from benchdata import benchmarks_dir

# (completion, extracted answer); the rule is in rlvrx/tasks/arithmetic.py
TRICKY = [
    ("52", "52"),
    ("52 ", "52"),
    ("52<eos>", "52"),
    ("52<eos>17", "52"),
    ("52\n", "52"),
    (" 52", "52"),  # leading whitespace is skipped
    ("052", "52"),  # leading zeros are fine
    ("0", "0"),
    ("000", "0"),
    ("-3", "-3"),
    ("-03", "-3"),
    ("-0", "0"),
    ("52abc", "52"),  # the integer ends at the first non-digit
    ("52=52", "52"),
    ("5 2", "5"),
    ("52,000", "52"),
    ("52.0", None),  # a decimal is not an integer answer
    ("52.", "52"),
    ("", None),
    ("   ", None),
    ("abc", None),
    ("=52", None),
    ("+52", None),
    ("- 3", None),
    ("--3", None),
    ("\u22123", None),  # unicode minus
    ("\uff15\uff12", None),  # fullwidth digits: int() would take them, we do not
    ("\u0665\u0662", None),  # Arabic-Indic digits
    ("5\u0662", "5"),
    ("9" * 10000, "9" * 10000),  # no int() on model output: no digit limit, no cost
]


@pytest.mark.parametrize("completion, expected", TRICKY)
def test_arithmetic_extraction_on_tricky_completions(completion, expected):
    assert extract_integer(completion) == expected


def test_arithmetic_reward_uses_the_extracted_integer():
    task = ArithmeticTask()
    example = Example("07+45", "07+45=", "52")
    rewards = {c: task.reward(c, example) for c in ["52", "052", "52<eos>", "52abc", "5 2", "53", "", "52.0", "-52"]}
    assert rewards == {"52": 1.0, "052": 1.0, "52<eos>": 1.0, "52abc": 1.0, "5 2": 0.0, "53": 0.0, "": 0.0, "52.0": 0.0, "-52": 0.0}
    negative = Example("07-45", "07-45=", "-38")
    assert task.reward("-38", negative) == 1.0 and task.reward("38", negative) == 0.0
    result = task.grade("052 and more", example)
    assert (result.correct, result.extracted, result.answer_key, result.status) == (True, "52", "52", "ok")
    assert task.extract_answer("-007") == "-7"


def test_arithmetic_examples_are_correct_and_zero_padded():
    task = ArithmeticTask(digits=2, operators="+-*", n_train=300, n_test=100, seed=3)
    examples = task.train_examples() + task.test_examples()
    assert {e.record["op"] for e in examples} == {"+", "-", "*"}
    for e in examples:
        match = re.fullmatch(r"(\d{2})([+\-*])(\d{2})=", e.prompt)
        assert match, e.prompt
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        assert int(e.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert e.id == e.prompt[:-1]
        assert task.format_prompt(e) == e.prompt
        assert task.reward(task.gold_completion(e), e) == 1.0


def test_arithmetic_split_is_disjoint_and_reproducible():
    task = ArithmeticTask(digits=2, n_train=2000, n_test=200, seed=0)
    train, test = task.train_examples(), task.test_examples()
    assert len(train) == 2000 and len(test) == 200
    assert len({e.id for e in train}) == 2000 and len({e.id for e in test}) == 200
    assert not {e.id for e in train} & {e.id for e in test}
    again = ArithmeticTask(digits=2, n_train=2000, n_test=200, seed=0)
    assert again.train_examples() == train and again.test_examples() == test
    other = ArithmeticTask(digits=2, n_train=2000, n_test=200, seed=1)
    assert other.test_examples() != test
    # The test set depends only on the seed and n_test, not on n_train.
    assert ArithmeticTask(digits=2, n_train=50, n_test=200, seed=0).test_examples() == test


def test_arithmetic_can_use_every_problem():
    task = ArithmeticTask(digits=1, operators=["+", "*"], n_train=150, n_test=50, seed=7)
    ids = {e.id for e in task.train_examples() + task.test_examples()}
    assert ids == {f"{a}{op}{b}" for op in "+*" for a in range(10) for b in range(10)}


@pytest.mark.parametrize(
    "options",
    [
        {"digits": 0},
        {"digits": 2.5},
        {"operators": "/"},
        {"operators": []},
        {"operators": "++"},
        {"n_train": -1},
        {"digits": 1, "n_train": 90, "n_test": 20},
    ],
)
def test_arithmetic_bad_options(options):
    with pytest.raises(UsageError):
        ArithmeticTask(**options)


def test_encode_prompt_puts_bos_in_front_once():
    tokenizer = char_tokenizer()
    task = ArithmeticTask()
    example = Example("07+45", "07+45=", "52")
    ids = task.encode_prompt(example, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids[1:]) == "07+45="


def _chat_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "[UNK]": 1}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", unk_token="[UNK]")
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tokenizer


def test_math_prompt_with_and_without_chat_template():
    task = MathTask(data="unused.jsonl")
    example = Example("p1", "What is $1+1$?", "2")
    plain = "What is $1+1$? Let's think step by step and output the final answer within \\boxed{}."
    assert INSTRUCTION == "Let's think step by step and output the final answer within \\boxed{}."
    assert task.format_prompt(example) == plain
    tokenizer = _chat_tokenizer()
    assert task.format_prompt(example, tokenizer) == f"<s><|user|>\n{plain}\n<|assistant|>\n"
    ids = task.encode_prompt(example, tokenizer)
    assert ids[0] == 0 and ids[1:].count(0) == 0  # the template's BOS, and no second one


def test_math_task_rewards_and_extraction():
    task = MathTask(data="unused.jsonl")
    example = Example("p", "", r"\frac{1}{2}")
    assert task.reward(r"so the answer is $\boxed{0.5}$", example) == 1.0
    assert task.reward(r"\boxed{2}", example) == 0.0
    assert task.extract_answer(r"We get \boxed{\dfrac{1}{2}}.") == r"\frac{1}{2}"
    assert task.extract_answer("no idea") is None
    assert task.gold_completion(example) == r"The answer is \boxed{\frac{1}{2}}."


def test_benchmark_tasks_read_the_shared_files():
    BENCHMARKS = benchmarks_dir()
    sizes = {"aime24": 30, "aime25": 30, "math500": 500, "gsm8k": 1319}
    for name, size in sizes.items():
        task = get_task(name, data_dir=str(BENCHMARKS))
        examples = task.test_examples()
        assert len(examples) == size and task.name == name
        first = examples[0]
        assert task.reward(f"\\boxed{{{first.answer}}}", first) == 1.0
    limited = get_task("math500", data_dir=str(BENCHMARKS), limit=3).test_examples()
    assert [e.id for e in limited] == ["math500-0", "math500-1", "math500-2"]
    chosen = get_task("aime24", data_dir=str(BENCHMARKS), ids=["aime24-61", "aime24-60"]).test_examples()
    assert [e.id for e in chosen] == ["aime24-60", "aime24-61"]


def test_registry_names_errors_and_dotted_paths():
    assert task_names() == ["aime24", "aime25", "arithmetic", "gsm8k", "math", "math500"]
    assert task_options("arithmetic") == {"digits", "operators", "n_train", "n_test", "seed"}
    assert task_options("aime24") == {"data_dir", "limit", "ids", "instruction"}
    task = get_task("arithmetic", digits=1, n_train=10, n_test=5)
    assert isinstance(task, ArithmeticTask) and len(task.train_examples()) == 10
    with pytest.raises(UsageError, match="did you mean 'arithmetic'"):
        get_task("arithmetc")
    with pytest.raises(UsageError, match="aime24, aime25, arithmetic, gsm8k, math, math500"):
        get_task("nothing_like_it")
    with pytest.raises(UsageError, match="did you mean 'digits'"):
        get_task("arithmetic", digit=3)
    with pytest.raises(UsageError, match="needs task.data"):
        get_task("math")
    dotted = get_task("rlvrx.tasks.arithmetic:ArithmeticTask", digits=1, n_train=3, n_test=2)
    assert isinstance(dotted, ArithmeticTask)
    with pytest.raises(UsageError, match="not an rlvrx.tasks.Task"):
        get_task("builtins:dict")
    with pytest.raises(UsageError, match="cannot import"):
        get_task("no_such_module_xyz:make")
    with pytest.raises(UsageError, match="no callable"):
        get_task("rlvrx.tasks:no_such_factory")
