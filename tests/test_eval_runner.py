"""rlvrx.eval.runner: model runs, generations files, resume, metrics recomputed from the written lines."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlvrx.errors import UsageError
from rlvrx.generation.generations import read_generations, write_generations, generation_record
from rlvrx.verify.graders import grade_one
from rlvrx.eval.model_spec import generations_spec, resolve_model
from rlvrx.eval.options import EvalOptions
from rlvrx.eval.runner import Evaluation, problem_key
from rlvrx.eval.summary import load_results, summarize_runs
from rlvrx.tasks.build import build_tasks
from rlvrx.verify.records import summarize_records
from rlvrx.tasks import get_task

from benchdata import benchmark_file

HANG = r"$\dfrac{5^{(5^{(5^{(5^5)})} - 4)} - 5}{16}$"  # math-verify issue #65: runs past 25 s unguarded


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def enumerated_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def model_run(model_dir, out, tasks=None, **options):
    spec = resolve_model(str(model_dir), out=out)
    notes = []
    with Evaluation(EvalOptions(**options), note=notes.append) as evaluation:
        runs = evaluation.run(spec, tasks or [get_task("arithmetic")])
    return runs, notes


# ------------------------------------------------------------------------------------------ model runs


def test_model_run_matches_direct_sampling_grading_and_metrics(tiny_model_dir, tmp_path):
    """Each problem's line holds exactly the completions `generate` gives for its batch, seeded by
    (seed, problem_key(id)) per problem, also when the problem is sampled alone; the verdicts of
    in-process grading; and the summary equals metrics recomputed from the lines."""
    from rlvrx.generation import SamplingParams, generate
    from rlvrx.models import load_pretrained

    runs, _ = model_run(tiny_model_dir, tmp_path / "eval", n=4, limit=12, batch_size=5, temperature=1.0)
    (run,) = runs
    assert run.path == tmp_path / "eval" / "model" / "arithmetic.jsonl"
    written = lines(run.path)
    task = get_task("arithmetic")
    examples = task.test_examples()[:12]
    assert [r["id"] for r in written] == [e.id for e in examples]
    assert written == run.records

    model, tokenizer = load_pretrained(tiny_model_dir, torch.device("cpu"))
    for start in range(0, 12, 5):
        batch = examples[start : start + 5]
        params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=0)
        keys = [problem_key(e.id) for e in batch]
        generations = generate(model, tokenizer, [task.encode_prompt(e, tokenizer) for e in batch], n=4, params=params, prompt_keys=keys)
        for p, example in enumerate(batch):
            texts = [g.text for g in generations if g.prompt_index == p]
            record = written[start + p]
            assert record["completions"] == texts
            alone = generate(model, tokenizer, [task.encode_prompt(example, tokenizer)], n=4, params=params, prompt_keys=[keys[p]])
            assert [g.text for g in alone] == texts
            assert record["gold"] == example.answer and record["prompt"] == example.prompt
            assert record["num_tokens"] == [len(g.token_ids) for g in generations if g.prompt_index == p]

    extracted_any = 0
    for record in written:
        for j, completion in enumerate(record["completions"]):
            expected = grade_one(completion, record["gold"], "arithmetic")
            assert (record["correct"][j], record["extracted"][j], record["status"][j]) == (expected.correct, expected.extracted, "ok")
            extracted_any += expected.extracted is not None
    assert extracted_any > 0  # the untrained model writes some digits: the extraction path is exercised

    summary = summarize_runs(runs)["model"]["arithmetic"]
    accuracies = [sum(r["correct"]) / 4 for r in written]
    assert summary["problems"] == 12 and summary["n"] == 4
    assert summary["avg"] == pytest.approx(np.mean(accuracies))
    assert summary["avg_stderr"] == pytest.approx(np.std(accuracies, ddof=1) / math.sqrt(12))
    assert summary["pass@1"] == pytest.approx(summary["avg"])
    assert summary["pass@4"] == pytest.approx(np.mean([enumerated_pass_at_k(r["correct"], 4) for r in written]))
    assert 0 <= summary["pass@1"] <= summary["pass@4"] <= 1
    assert summary["timeouts"] == summary["errors"] == 0


def test_resume_keeps_finished_lines_and_redoes_a_cut_line(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    runs, _ = model_run(tiny_model_dir, out, n=2, limit=6, batch_size=4)
    path = runs[0].path
    before = path.read_bytes()
    assert len(before.splitlines()) == 6
    with open(path, "ab") as handle:  # a write cut short by a kill
        handle.write(b'{"id": "99+99", "prompt": "99+')

    runs, notes = model_run(tiny_model_dir, out, n=2, limit=10, batch_size=4)
    (run,) = runs
    after = path.read_bytes()
    assert after.startswith(before) and after.endswith(b"\n")
    ids = [r["id"] for r in lines(path)]
    assert ids == [e.id for e in get_task("arithmetic").test_examples()[:10]]
    assert (run.resumed, run.generated, run.dropped_partial) == (6, 4, True)

    runs, notes = model_run(tiny_model_dir, out, n=2, limit=10, batch_size=4)
    assert path.read_bytes() == after
    assert (runs[0].resumed, runs[0].generated) == (10, 0)
    assert not any(note.startswith("loading") for note in notes)  # nothing to do: no model loaded

    with pytest.raises(UsageError, match="sampling"):
        model_run(tiny_model_dir, out, n=3, limit=10)
    runs, _ = model_run(tiny_model_dir, out, n=3, limit=2, overwrite=True)
    assert [len(r["completions"]) for r in lines(path)] == [3, 3]


def test_resume_refuses_results_of_other_problems(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    model_run(tiny_model_dir, out, n=1, limit=2)
    path = out / "model" / "arithmetic.jsonl"
    first = lines(path)[0]
    record = dict(first, gold=str(int(first["gold"]) + 1))  # as if made for another problem set
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UsageError, match="different problem"):
        model_run(tiny_model_dir, out, n=1, limit=2)


# --------------------------------------------------------------------------------------- model names


def test_run_step_names_and_default_output(tiny_model_dir, tmp_path):
    import shutil

    from rlvrx.trajectory import Trajectory

    run_dir = tmp_path / "runs" / "quick"
    checkpoint = run_dir / "checkpoints" / "step_000200"
    shutil.copytree(tiny_model_dir, checkpoint)
    trajectory = Trajectory.load(run_dir, create=True)
    trajectory.add(200, checkpoint, kind="rl", hash=False)
    trajectory.save()

    spec = resolve_model(f"{run_dir}:200")
    assert (spec.name, spec.out_dir, spec.path, spec.step) == ("quick:200", run_dir / "eval" / "step_000200", checkpoint, 200)
    same = resolve_model(str(checkpoint))
    assert (same.name, same.out_dir.resolve(), same.step) == ("quick:200", (run_dir / "eval" / "step_000200").resolve(), 200)
    assert resolve_model(f"{run_dir}:last").step == 200
    elsewhere = resolve_model(f"{run_dir}:200", out=tmp_path / "all")
    assert elsewhere.out_dir == tmp_path / "all" / "quick-step_000200"
    assert resolve_model(str(tiny_model_dir), name="base").out_dir == Path("eval") / "base"
    logits = write_generations(run_dir / "extrapolated" / "logits-s0-s10-t30" / "arithmetic.jsonl", [generation_record("1", "", "1", ["1"])])
    gens = generations_spec(logits)
    assert (gens.name, gens.task, gens.out_dir) == ("logits-s0-s10-t30", "arithmetic", run_dir / "eval" / "logits-s0-s10-t30")
    with pytest.raises(UsageError, match=r"quick:STEP \(steps: \[200\]\)"):
        resolve_model(str(run_dir))
    with pytest.raises(UsageError, match="no checkpoint at step 5"):
        resolve_model(f"{run_dir}:5")
    with pytest.raises(UsageError, match="no such model directory"):
        resolve_model(str(tmp_path / "missing"))


# -------------------------------------------------------------------------------- generations files


def grade_file(tmp_path, records, task_names=(), **options):
    source = write_generations(tmp_path / "gens.jsonl", records)
    spec = generations_spec(source, out=tmp_path / "eval")
    tasks = build_tasks(task_names) if task_names else []
    with Evaluation(EvalOptions(**options)) as evaluation:
        (run,) = evaluation.run(spec, tasks)
    return run


def test_crafted_generations_give_hand_computed_metrics(tmp_path):
    records = [
        generation_record("p1", "2+3=", "5", ["5", "5", "4", "x"]),
        generation_record("p2", "3+4=", "7", ["1", "2", "1", "7"]),
        generation_record("p3", "1+2=", "3", ["a", "b", "c", "d"]),
        generation_record("p4", "6+6=", "12", ["12", "012", "12 ", "12"]),
    ]
    run = grade_file(tmp_path, records, ["arithmetic"])
    assert run.path == tmp_path / "eval" / "gens" / "arithmetic.jsonl"
    written = lines(run.path)
    assert [r["correct"] for r in written] == [
        [True, True, False, False],
        [False, False, False, True],
        [False] * 4,
        [True] * 4,
    ]
    assert written[0]["answer_key"] == ["5", "5", "4", None]
    s = summarize_runs([run], k_list=[1, 2, 4])["gens"]["arithmetic"]
    per_problem = [0.5, 0.25, 0.0, 1.0]
    assert s["avg"] == pytest.approx(0.4375) and s["pass@1"] == pytest.approx(0.4375)
    assert s["avg_stderr"] == pytest.approx(np.std(per_problem, ddof=1) / 2)
    assert s["pass@2"] == pytest.approx((5 / 6 + 1 / 2 + 0 + 1) / 4)
    assert s["pass@2"] == pytest.approx(np.mean([enumerated_pass_at_k(r["correct"], 2) for r in written]))
    assert s["pass@4"] == pytest.approx(0.75)
    # maj@2: p1 {5,5} right; p2 {1,2} tie -> the earlier "1", wrong; p4 right. maj@4: p2's "1" wins twice -> wrong.
    assert (s["maj@1"], s["maj@2"], s["maj@4"]) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))
    assert summarize_records(written, [1, 2, 4]) == {k: s[k] for k in summarize_records(written, [1, 2, 4])}


def test_pathological_answer_finishes_as_a_timeout_counted_wrong(tmp_path):
    records = [
        generation_record("fine", "", "1/2", ["so \\boxed{0.5}"]),
        generation_record("hang", "", "1", [HANG, "\\boxed{1}"]),
        generation_record("wrong", "", "2", ["\\boxed{3}"]),
    ]
    run = grade_file(tmp_path, records, workers=2, grading_timeout=2.0)
    written = {r["id"]: r for r in lines(run.path)}
    assert written["fine"]["correct"] == [True]
    assert written["hang"]["status"] == ["timeout", "ok"] and written["hang"]["correct"] == [False, True]
    assert written["hang"]["error"][0] and written["hang"]["error"][1] is None
    s = summarize_runs([run])["gens"]["math"]
    assert (s["timeouts"], s["errors"], s["n"]) == (1, 0, 1)
    assert s["avg"] == pytest.approx((1 + 0.5 + 0) / 3)


def _gold_solution_records(rows):
    """The worked solutions as completions, cut before the file's trailing "The answer is: ..." line,
    so the answer must come from the solution's own \\boxed{}."""
    return [generation_record(r["id"], r["problem"], r["answer"], [r["solution"].split("The answer is:")[0]]) for r in rows]


def _benchmark_rows(name, limit=None):
    path = benchmark_file(name)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def test_math500_gold_solutions_grade_correct(tmp_path):
    rows = _benchmark_rows("math500", 50)
    run = grade_file(tmp_path, _gold_solution_records(rows), ["math500"], workers=2)
    wrong = [(r["id"], r["gold"], r["extracted"][0], r["status"][0]) for r in run.records if not r["correct"][0]]
    assert wrong == []
    assert len(run.records) == 50
    assert [r.id for r in read_generations(tmp_path / "gens.jsonl")] == [r["id"] for r in rows]


@pytest.mark.slow
def test_all_math500_gold_solutions_grade_correct(tmp_path):
    rows = _benchmark_rows("math500")
    run = grade_file(tmp_path, _gold_solution_records(rows), ["math500"])
    wrong = [(r["id"], r["gold"], r["extracted"][0], r["status"][0], r["error"][0]) for r in run.records if not r["correct"][0]]
    assert wrong == []
    assert len(run.records) == 500


def test_graded_result_file_summarizes_in_place_and_bad_files_are_refused(tmp_path):
    records = [generation_record("a", "", "4", ["4", "5"]), generation_record("b", "", "9", ["9", "9"])]
    run = grade_file(tmp_path, records, ["arithmetic"])
    spec = generations_spec(run.path, out=tmp_path / "eval")  # eval/gens/arithmetic.jsonl: itself
    assert (spec.name, spec.task) == ("gens", "arithmetic")
    with Evaluation(EvalOptions()) as evaluation:
        (again,) = evaluation.run(spec, [])
    assert again.records == run.records and again.generated == 0
    assert summarize_runs([again])["gens"]["arithmetic"]["avg"] == pytest.approx(0.75)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "gold": "1", "completions": "1"}\n')
    with pytest.raises(UsageError, match="'completions' must be a list of strings"):
        grade_file_at(bad, tmp_path)
    bad.write_text('{"id": "a", "completions": ["1"]}\n')
    with pytest.raises(UsageError, match="no gold answer field"):
        grade_file_at(bad, tmp_path)


def grade_file_at(path, tmp_path):
    with Evaluation(EvalOptions()) as evaluation:
        return evaluation.run(generations_spec(path, out=tmp_path / "eval"), [])


def test_load_results_ignores_a_cut_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    good = generation_record("a", "", "1", ["1"], correct=[True], extracted=["1"], answer_key=["1"], status=["ok"], error=[None])
    path.write_text(json.dumps(good) + "\n" + '{"id": "b", "pro')
    assert load_results(path) == [good]
