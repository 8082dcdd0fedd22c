"""§2 of the file: the demo grammar, its exact checks, and the data loader."""

import json
import random

import pytest

import evaluate
import ld4lg
from conftest import ae_cfg

ROWS = ld4lg.demo_corpus(3000, seed=0)


def test_demo_sentences_valid_and_labelled():
    topics = list(ld4lg.DEMO_TOPICS)
    assert all(evaluate.demo_topic(t) == topics[l] for t, _, l in ROWS)
    assert all(evaluate.demo_slots_ok(t, s) for t, s, _ in ROWS)


def test_demo_corpus_is_not_trivial():
    lengths = [len(t.split()) for t, _, _ in ROWS]
    assert min(lengths) <= 6 and max(lengths) >= 18
    vocab = {w.strip(".,").lower() for t, _, _ in ROWS for w in t.split()}
    assert len(vocab) >= 200 and len(ld4lg.DEMO_TOPICS) >= 4
    assert len({t for t, _, _ in ROWS}) == len(ROWS)  # 3000 draws, no repeats: a large language


def test_agreement_rules_are_checked():
    assert (
        evaluate.demo_is_valid("The coach trains the team.") is False
    )  # 'team' is no sports object
    assert evaluate.demo_is_valid("The coach trains the players.") is False
    assert evaluate.demo_is_valid("The coach trains the athletes.") is False
    assert evaluate.demo_is_valid("The coach kicks a ball.")
    assert not evaluate.demo_is_valid("The coach kick a ball.")  # subject-verb agreement
    assert not evaluate.demo_is_valid("The coaches kicks a ball.")
    assert not evaluate.demo_is_valid("The coach kicks an ball.")  # a/an
    assert evaluate.demo_is_valid("The coach kicks an old ball.")
    assert not evaluate.demo_is_valid("These coach kicks a ball.")  # determiner number
    assert not evaluate.demo_is_valid("the coach kicks a ball.")  # capital letter


def test_shuffled_sentences_are_invalid():
    rng = random.Random(0)
    shuffled = []
    for t, _, _ in ROWS[:2000]:
        w = t[:-1].split()
        rng.shuffle(w)
        s = " ".join(w) + "."
        s = s[0].upper() + s[1:]
        if s != t:
            shuffled.append(s)
    assert sum(map(evaluate.demo_is_valid, shuffled)) <= 0.01 * len(shuffled)


def test_demo_splits_deterministic_and_disjoint():
    a, b = ld4lg.load_data(ae_cfg(max_train=0)), ld4lg.load_data(ae_cfg(max_train=0))
    assert a["train"].texts[:50] == b["train"].texts[:50] and a["test"].texts == b["test"].texts
    assert not set(a["test"].texts) & set(a["train"].texts)
    c = ld4lg.load_data(ae_cfg(max_train=0, seed=1))
    assert c["test"].texts != a["test"].texts


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "json"])
def test_local_file_formats(tmp_path, fmt):
    texts = [f"text number {i}" for i in range(100)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(texts) + "\n\n")
    elif fmt == "jsonl":
        path.write_text(
            "".join(
                json.dumps({"text": t, "label": i % 3, "source": "s" + t}) + "\n"
                for i, t in enumerate(texts)
            )
        )
    elif fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{t},{i % 3}\n" for i, t in enumerate(texts)))
    else:
        path.write_text("".join(json.dumps([t]) + "\n" for t in texts))
    kw = dict(label_column="label") if fmt in ("jsonl", "csv") else {}
    d = ld4lg.load_data(ae_cfg(data=str(path), num_eval=10, max_train=0, **kw))
    assert len(d["train"].texts) == 80 and len(d["val"].texts) == 10
    assert set(d["train"].texts + d["val"].texts + d["test"].texts) == set(texts)
    if kw:
        assert set(d["train"].labels) == {0, 1, 2}
