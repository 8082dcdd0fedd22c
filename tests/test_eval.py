"""§4.1 metrics on inputs with known answers; MAUVE and perplexity with tiny local models."""

import json
import math

import pytest
import torch

import evaluate
import ld4lg


def test_diversity_known_values():
    assert evaluate.diversity(["a b c d e"]) == 1.0
    # "a a a": 2-grams (a,a)x2 → 1/2; 3-grams 1/1; 4-grams none (0/0 counts as 0)
    assert evaluate.diversity(["a b", "a b"]) == 0  # no 3-grams at all
    texts = ["x y z w v", "x y z w u"]
    # 2-grams: 8 total, unique {xy, yz, zw, wv, wu} = 5; 3-grams: 6 total, unique 4; 4-grams: 4 total, unique 3
    assert evaluate.diversity(texts) == pytest.approx(5 / 8 * 4 / 6 * 3 / 4)


def test_memorization_known_values():
    train = ["the cat sat on the mat today"]
    assert evaluate.memorization(["the cat sat on"], train) == 1.0
    assert evaluate.memorization(["the cat sat on a"], train) == pytest.approx(
        1 / 2
    )  # (the cat sat on) yes, (cat sat on a) no
    assert evaluate.memorization(["dogs bark at night"], train) == 0.0


def test_rouge_known_values():
    """ROUGE of the rouge-score package (the paper's); with several references the best counts."""
    assert ld4lg.rouge("the cat sat", "the cat sat")["rougeL"] == 1.0
    r = ld4lg.rouge("a b c d", "a c d e")  # LCS 3 of 4: P = R = 3/4; bigrams: (c d) of 3 each
    assert r["rougeL"] == pytest.approx(0.75) and r["rouge1"] == pytest.approx(0.75)
    assert r["rouge2"] == pytest.approx(1 / 3)
    assert ld4lg.rouge("a b c d", ["x y", "a c d e"])["rougeL"] == pytest.approx(0.75)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT-2 with a BPE tokenizer, saved like a hub model directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = str(tmp_path_factory.mktemp("gpt2"))
    texts = [t for t, _, _ in evaluate.demo_corpus(500, 0)] + [
        f"{i} {i * 7} numbers {i % 13}" for i in range(500)
    ]
    tok = ld4lg.train_tokenizer(texts, 400)
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_perplexity_matches_direct_computation(tiny_gpt2):
    lm, tok = evaluate.load_causal_lm(tiny_gpt2, torch.device("cpu"))
    texts = ["The coach kicks a ball.", "Many chefs bake two cakes."]
    nlls, ns = [], []
    for t in texts:
        ids = tok(tok.bos_token + t, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(lm(ids).logits[0, :-1], -1)
        nlls.append(-logp.gather(1, ids[0, 1:, None]).sum().item())
        ns.append(ids.shape[1] - 1)
    assert ns[0] != ns[1]  # texts of different lengths: the two figures differ
    mean, corpus = evaluate.perplexity(lm, tok, texts, torch.device("cpu"))
    assert mean == pytest.approx(
        sum(math.exp(a / b) for a, b in zip(nlls, ns)) / 2, rel=1e-4
    )  # the paper's
    assert corpus == pytest.approx(math.exp(sum(nlls) / sum(ns)), rel=1e-4)


def test_mauve_same_vs_different(tiny_gpt2):
    featurize = evaluate.load_featurizer(tiny_gpt2, torch.device("cpu"))
    p = [t for t, _, _ in evaluate.demo_corpus(200, 1)]
    q = [t for t, _, _ in evaluate.demo_corpus(200, 2)]
    other = [f"{i} {i * 7} numbers {i % 13}" for i in range(200)]
    same, diff = evaluate.mauve_score(featurize, p, q), evaluate.mauve_score(featurize, p, other)
    assert same > 0.8 and diff < 0.2


def test_missing_featurizer_is_reported_not_replaced(capsys):
    assert evaluate.load_featurizer("/no/such/model", torch.device("cpu")) is None
    assert "MAUVE skipped" in capsys.readouterr().err
    m = evaluate.text_metrics(["a b c d e"], ["a b c d e"], ["a b c d e"], featurize=None)
    assert m["mauve"] is None and "missing" in evaluate.markdown_table([("x", m)], "none")


def test_eval_external_jsonl(tmp_path, tiny_gpt2):
    samples, refs = tmp_path / "s.jsonl", tmp_path / "r.txt"
    samples.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t, _, _ in evaluate.demo_corpus(60, 3))
    )
    refs.write_text("".join(t + "\n" for t, _, _ in evaluate.demo_corpus(60, 4)))
    rc = evaluate.main(
        [
            "--samples",
            str(samples),
            "--references",
            str(refs),
            "--featurizer",
            tiny_gpt2,
            "--ppl_model",
            tiny_gpt2,
        ]
    )
    assert rc == 0
    out = json.load(open(tmp_path / "s.eval.json"))["metrics"]
    assert 0 <= out["mauve"] <= 1 and out["perplexity"] > 1 and 0 < out["diversity"] <= 1
