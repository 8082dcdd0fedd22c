"""§4.1 metrics on inputs with known answers; MAUVE and perplexity with tiny local models."""
import json
import math
import os

import pytest
import torch

import ld4lg


def test_diversity_known_values():
    assert ld4lg.diversity(["a b c d e"]) == 1.0
    # "a a a": 2-grams (a,a)x2 → 1/2; 3-grams 1/1; 4-grams none (0/0 counts as 0)
    assert ld4lg.diversity(["a b", "a b"]) == 0  # no 3-grams at all
    texts = ["x y z w v", "x y z w u"]
    # 2-grams: 8 total, unique {xy, yz, zw, wv, wu} = 5; 3-grams: 6 total, unique 4; 4-grams: 4 total, unique 3
    assert ld4lg.diversity(texts) == pytest.approx(5 / 8 * 4 / 6 * 3 / 4)


def test_memorization_known_values():
    train = ["the cat sat on the mat today"]
    assert ld4lg.memorization(["the cat sat on"], train) == 1.0
    assert ld4lg.memorization(["the cat sat on a"], train) == pytest.approx(1 / 2)  # (the cat sat on) yes, (cat sat on a) no
    assert ld4lg.memorization(["dogs bark at night"], train) == 0.0


def test_rouge_and_bleu_known_values():
    assert ld4lg.rouge_n("the cat sat", "the cat sat", "l") == 1.0
    # LCS("a b c d", "a c d e") = 3 → P = R = 3/4
    assert ld4lg.rouge_n("a b c d", "a c d e", "l") == pytest.approx(0.75)
    assert ld4lg.rouge_n("a b c d", "a c d e", 1) == pytest.approx(0.75)
    assert ld4lg.rouge_n("a b c d", "a c d e", 2) == pytest.approx(1 / 3)  # (c d) of 3 bigrams each
    assert ld4lg.corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    assert ld4lg.corpus_bleu(["a b c d"], ["e f g h"]) == 0.0


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT-2 with a BPE tokenizer, saved like a hub model directory."""
    from transformers import GPT2Config, GPT2LMHeadModel
    path = str(tmp_path_factory.mktemp("gpt2"))
    texts = [t for t, _, _ in ld4lg.demo_corpus(500, 0)] + [f"{i} {i * 7} numbers {i % 13}" for i in range(500)]
    tok = ld4lg.train_tokenizer(texts, 400)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_perplexity_matches_direct_computation(tiny_gpt2):
    lm, tok = ld4lg.load_causal_lm(tiny_gpt2, torch.device("cpu"))
    texts = ["The coach kicks a ball.", "Many chefs bake two cakes."]
    nll = n = 0
    for t in texts:
        ids = tok(tok.bos_token + t, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(lm(ids).logits[0, :-1], -1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
    assert ld4lg.perplexity(lm, tok, texts, torch.device("cpu")) == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_mauve_same_vs_different(tiny_gpt2):
    featurize = ld4lg.load_featurizer(tiny_gpt2, torch.device("cpu"))
    p = [t for t, _, _ in ld4lg.demo_corpus(200, 1)]
    q = [t for t, _, _ in ld4lg.demo_corpus(200, 2)]
    other = [f"{i} {i * 7} numbers {i % 13}" for i in range(200)]
    same, diff = ld4lg.mauve_score(featurize, p, q), ld4lg.mauve_score(featurize, p, other)
    assert same > 0.8 and diff < 0.2


def test_missing_featurizer_is_reported_not_replaced(capsys):
    assert ld4lg.load_featurizer("/no/such/model", torch.device("cpu")) is None
    assert "MAUVE skipped" in capsys.readouterr().err
    m = ld4lg.text_metrics(["a b c d e"], ["a b c d e"], ["a b c d e"], featurize=None)
    assert m["mauve"] is None and "missing" in ld4lg.markdown_table([("x", m)], "none")


def test_eval_external_jsonl(tmp_path, tiny_gpt2):
    samples, refs = tmp_path / "s.jsonl", tmp_path / "r.txt"
    samples.write_text("".join(json.dumps({"text": t}) + "\n" for t, _, _ in ld4lg.demo_corpus(60, 3)))
    refs.write_text("".join(t + "\n" for t, _, _ in ld4lg.demo_corpus(60, 4)))
    rc = ld4lg.main(["eval", "--samples", str(samples), "--references", str(refs), "--featurizer", tiny_gpt2,
                     "--ppl_model", tiny_gpt2])
    assert rc == 0
    out = json.load(open(tmp_path / "s.eval.json"))["metrics"]
    assert 0 <= out["mauve"] <= 1 and out["perplexity"] > 1 and 0 < out["diversity"] <= 1
