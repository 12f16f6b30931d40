"""The built-in preference task: deterministic, disjoint splits, a sane ground-truth reward."""

from __future__ import annotations

import pytest

from dpo.data import tasks
from dpo.data.sources import DataError
from dpo.data.pairs import prepare_pairs
from dpo.data.tasks import builtin_task, prompt_text, rows_for, sentiment_score


def prompts(rows):
    return [prompt_text(r["prompt"]) for r in rows]


def test_default_is_sentiment_and_names_its_dataset():
    task = builtin_task()
    assert task is builtin_task("sentiment") is builtin_task("builtin:sentiment")
    assert task.name == "sentiment" and task.description
    assert task.dataset == tasks.DEFAULT_DATASET == "builtin:sentiment"
    with pytest.raises(ValueError, match="no such built-in task"):
        builtin_task("nope")


def test_rows_are_deterministic_and_seeded():
    task = builtin_task()
    assert task.train_rows(40, seed=0) == task.train_rows(40, seed=0)
    assert task.eval_rows(20, seed=3) == task.eval_rows(20, seed=3)
    assert task.train_rows(40, seed=0) != task.train_rows(40, seed=1)
    # row k depends only on (split, seed, k): a longer list starts with the shorter one
    assert task.train_rows(50)[:20] == task.train_rows(20)
    assert task.train_rows(0) == []


def test_splits_are_disjoint_and_prompts_distinct():
    task = builtin_task()
    train, held_out = prompts(task.train_rows(1500)), prompts(task.eval_rows(300))
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)
    # stronger: no reviewed name of the held-out split appears in any training prompt
    eval_names = {n for g in ("place", "title", "product") for n in tasks._names(g) if tasks._split_of(n) == "eval"}
    assert eval_names
    joined = "\n".join(train)
    assert not [n for n in eval_names if n in joined]


def test_rows_are_conversational_and_differ_in_sentiment():
    task = builtin_task()
    for row in task.train_rows(200) + task.eval_rows(100):
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        assert task.reward(row["prompt"], row["chosen"]) >= 2 > 0 > -2 >= task.reward(row["prompt"], row["rejected"])
        assert sentiment_score(prompt_text(row["prompt"])) == 0  # prompts carry no sentiment words


def test_reward_sanity():
    task = builtin_task()
    assert task.reward("p", "The food was delicious and the staff were friendly.") == 2
    assert task.reward("p", "The food was cold and the service was slow.") == -2
    assert task.reward("p", "It was not great.") == -1  # negation flips
    assert task.reward("p", "It was never disappointing.") == 1
    assert task.reward("p", "The hotel wasn't bad at all.") == 1
    assert task.reward("p", "") == 0
    assert task.reward("p", "The museum is on Main Street.") == 0
    assert task.reward("p", [{"role": "assistant", "content": "Wonderful!"}]) == 1
    assert isinstance(task.reward("p", "good"), float)


def test_rows_for_and_dataset_strings():
    assert rows_for("data/prefs.jsonl") is None
    assert rows_for(None) is None
    assert rows_for("builtin:sentiment", n=5) == builtin_task().train_rows(5)
    assert rows_for("builtin:default", n=5) == builtin_task().train_rows(5)
    assert rows_for("builtin:sentiment:eval", n=5) == builtin_task().eval_rows(5)
    assert len(rows_for("builtin:sentiment")) == tasks.DEFAULT_TRAIN_ROWS
    with pytest.raises(DataError, match="no such built-in task"):
        rows_for("builtin:nope")
    with pytest.raises(DataError, match="split"):
        rows_for("builtin:sentiment:test")


def test_rows_tokenize_into_short_pairs(tokenizer):
    rows = tasks.load_builtin("builtin:sentiment", n=64)
    assert rows.format == "conversation, explicit prompt"
    pairs, report = prepare_pairs(tokenizer, rows, max_length=128)
    assert report.kept == 64 and not report.dropped
    for p in pairs:
        assert 5 <= len(p.chosen_ids) <= 25 and 5 <= len(p.rejected_ids) <= 25
        assert len(p.prompt_ids) < 64
