"""§2 of the file: the demo grammar, its exact checks, and the data loader."""

import json
import os
import random

import numpy as np
import pytest

import evaluate
import ld4lg
from conftest import ae_cfg

ROWS = evaluate.demo_corpus(3000, seed=0)


def test_demo_sentences_valid_and_labelled():
    topics = list(evaluate.DEMO_TOPICS)
    assert all(evaluate.demo_topic(t) == topics[l] for t, _, l in ROWS)
    assert all(evaluate.demo_slots_ok(t, s) for t, s, _ in ROWS)


def test_demo_corpus_is_not_trivial():
    lengths = [len(t.split()) for t, _, _ in ROWS]
    assert min(lengths) <= 6 and max(lengths) >= 18
    vocab = {w.strip(".,").lower() for t, _, _ in ROWS for w in t.split()}
    assert len(vocab) >= 200 and len(evaluate.DEMO_TOPICS) >= 4
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


def test_demo_folder_splits_are_its_files():
    d = ld4lg.load_data(ae_cfg(max_train=0))
    assert [len(d[k].texts) for k in ("train", "val", "test")] == [2000, 20, 20]
    assert not set(d["test"].texts) & set(d["train"].texts)


def permutation(n, seed=42):  # the shuffle of `datasets` (Dataset.shuffle, train_test_split)
    return np.random.default_rng(seed).permutation(n).tolist()


def test_roc_prepared_as_the_official_code(tmp_path):
    """(§10) Diffusion-LM's roc_train.json / roc_valid.json, one-element lists: the validation file
    shuffled with seed 42, its first num_eval stories validate and the rest test; the defaults."""
    stories = lambda k, n: [f"Story {k} {i}. It ends." for i in range(n)]
    for k, n in (("train", 50), ("valid", 30)):
        (tmp_path / f"roc_{k}.json").write_text(
            "".join(json.dumps([t]) + "\n" for t in stories(k, n))
        )
    cfg = ld4lg.make_config(ld4lg.AEConfig, "", data=str(tmp_path), num_eval=10)
    assert (cfg.data, cfg.split_seed) == (str(tmp_path), 42)  # the paper's recipe needs no preset
    d = ld4lg.load_data(cfg)
    valid, perm = stories("valid", 30), permutation(30)
    assert d["train"].texts == stories("train", 50)
    assert d["val"].texts == [valid[i] for i in perm[:10]]
    assert d["test"].texts == [valid[i] for i in perm[10:]]


def write_parquet_repo(root, config, splits):
    """A local copy of a hub data set in the hub's layout: CONFIG/SPLIT-00000-of-00001.parquet and a
    README whose YAML header declares the config, as the hub's repositories do."""
    import pandas as pd

    os.makedirs(os.path.join(root, config), exist_ok=True)
    files = []
    for split, rows in splits.items():
        path = f"{config}/{split}-00000-of-00001.parquet"
        pd.DataFrame(rows).to_parquet(os.path.join(root, path))
        files.append(f"  - split: {split}\n    path: {path}")
    header = (
        f"---\nconfigs:\n- config_name: {config}\n  data_files:\n" + "\n".join(files) + "\n---\n"
    )
    open(os.path.join(root, "README.md"), "w").write(header)


def test_ag_news_prepared_as_the_official_code(tmp_path):
    """(§10) pietrolesci/ag_news, config original: the description only, labels 1-4 as 0-3, 1000
    (here num_eval) held out of train with seed 42, the official test split."""
    row = lambda i: dict(
        title=f"Title {i}",
        description=f"News {i} , told .",
        label=1 + i % 4,
        **{"class": 1 + i % 4},
    )
    root = str(tmp_path / "ag_news")
    write_parquet_repo(
        root,
        "original",
        dict(train=[row(i) for i in range(40)], test=[row(100 + i) for i in range(8)]),
    )
    cfg = ld4lg.make_config(ld4lg.AEConfig, "ag_news", data=f"{root}:original", num_eval=10)
    d = ld4lg.load_data(cfg)
    perm = permutation(40)
    assert d["val"].texts == [
        f"News {i}, told." for i in perm[:10]
    ]  # cleaned, as the official code
    assert d["train"].texts == [f"News {i}, told." for i in perm[10:]]
    assert d["test"].texts == [f"News {100 + i}, told." for i in range(8)]
    assert d["train"].labels == [i % 4 for i in perm[10:]]


def test_xsum_and_qqp_official_splits(tmp_path):
    """(§10) XSum: its own train / validation / test splits, the document as the source, cut at 4 × 64
    tokens by the preset; QQP: DiffuSeq's train / valid / test files of paraphrase pairs (src, trg)."""
    doc = lambda s, i: dict(document=f"Document {s} {i} .", summary=f"Summary {s} {i} .", id=str(i))
    root = str(tmp_path / "xsum")
    write_parquet_repo(
        root, "default", {s: [doc(s, i) for i in range(6)] for s in ("train", "validation", "test")}
    )
    cfg = ld4lg.make_config(ld4lg.DiffConfig, "xsum", data=f"{root}:default")
    assert cfg.max_source_len == 256 and cfg.seq2seq
    d = ld4lg.load_data(cfg)
    assert d["val"].texts == [f"Summary validation {i}." for i in range(6)]
    assert d["test"].sources == [f"Document test {i}." for i in range(6)]
    qqp = tmp_path / "qqp"
    qqp.mkdir()
    for k in ("train", "valid", "test"):
        pairs = [
            dict(src=f"How do I {k} {i}?", trg=f"What is the way to {k} {i}?") for i in range(5)
        ]
        (qqp / f"{k}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    d = ld4lg.load_data(ld4lg.make_config(ld4lg.DiffConfig, "qqp", data=str(qqp)))
    assert (
        d["test"].texts[0] == "What is the way to test 0?"
        and d["val"].sources[4] == "How do I valid 4?"
    )


def test_a_hub_set_with_a_loading_script_is_read_from_its_parquet_conversion(tmp_path, monkeypatch):
    """datasets >= 4 refuses loading scripts: the loader retries the hub's refs/convert/parquet revision."""
    import datasets

    root = str(tmp_path / "xsum")
    write_parquet_repo(
        root,
        "default",
        {
            s: [dict(document="d .", summary=f"s {s} .")] * 4
            for s in ("train", "validation", "test")
        },
    )
    calls, load = [], datasets.load_dataset

    def hub(name, config=None, **kw):
        calls.append(kw.get("revision"))
        if "revision" not in kw:
            raise RuntimeError("Dataset scripts are no longer supported, but found xsum.py")
        return load(root, config)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # its own
    monkeypatch.setattr(ld4lg, "hub_online", lambda: True)
    cfg = ld4lg.make_config(ld4lg.AEConfig, "xsum", data="EdinburghNLP/xsum:default", num_eval=1)
    assert ld4lg.load_data(cfg)["test"].texts == ["s test."] * 4 and calls == [
        None,
        "refs/convert/parquet",
    ]


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
