"""The paper's path, offline: a small randomly initialised BART and a small T5, each saved with
save_pretrained beside a tokenizer, stand where facebook/bart-base and google/flan-t5-base stand. The
command line runs on them as a user runs the hub's models: the paper's presets (frozen LM, its E(w)
cached, C3 by the LM family), on fixtures in each data set's layout, shrunk by flags."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_data import write_parquet_repo

import evaluate
import ld4lg

SMALL = (
    "--max_len 32 --num_latents 4 --d_ae 8 --ae_dim 32 --ae_heads 2 --enc_layers 1 --dec_layers 1"
)
STEPS = "--steps 4 --batch_size 8 --warmup 1 --eval_every 2 --log_every 2 --num_eval 5"
DENOISER = "--dim 32 --depth 2 --heads 2 --skips 1 --max_source_len 32"


@pytest.fixture(scope="module", params=["tiny", "tiny-t5"], ids=["bart", "t5"])
def pretrained(request, tmp_path_factory):
    """A folder like a hub model's: config, safetensors weights, tokenizer."""
    path = str(tmp_path_factory.mktemp(request.param))
    texts = [t for t, _, _ in evaluate.demo_corpus(300, seed=9)]
    tok = ld4lg.train_tokenizer(texts, 300)
    cfg = ld4lg.make_config(ld4lg.AEConfig, "", tiny_dim=32, tiny_layers=1)
    ld4lg.tiny_lm(request.param, len(tok), cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """ROCStories as Diffusion-LM's files, AG News in the hub's Parquet layout, QQP as DiffuSeq's."""
    root = tmp_path_factory.mktemp("data")
    rows = evaluate.demo_corpus(160, seed=4)
    (root / "roc").mkdir()
    for name, part in (("train", rows[:120]), ("valid", rows[120:])):
        lines = "".join(json.dumps([t]) + "\n" for t, _, _ in part)
        (root / "roc" / f"roc_{name}.json").write_text(lines)
    news = lambda part: [
        dict(title="t", description=t, label=y + 1, **{"class": y + 1}) for t, _, y in part
    ]
    write_parquet_repo(
        str(root / "ag_news"), "original", dict(train=news(rows[:120]), test=news(rows[120:]))
    )
    (root / "qqp").mkdir()
    for name, part in (("train", rows[:120]), ("valid", rows[120:140]), ("test", rows[140:])):
        pairs = "".join(json.dumps(dict(src=s, trg=t)) + "\n" for t, s, _ in part)
        (root / "qqp" / f"{name}.jsonl").write_text(pairs)
    return root


def run(*argv):
    assert ld4lg.main([str(a) for a in argv]) == 0, argv


def test_paper_presets_on_a_frozen_pretrained_lm(pretrained, fixtures, tmp_path):
    t5 = "t5" in os.path.basename(pretrained)
    ae = tmp_path / "ae"
    # roc: the defaults are the paper's, so --preset roc only names them
    run(
        "train-ae",
        "--preset",
        "roc",
        "--lm",
        pretrained,
        "--data",
        fixtures / "roc",
        "--out",
        ae,
        *SMALL.split(),
        *STEPS.split(),
    )
    cfg = ld4lg.load_config(ld4lg.AEConfig, ae)[0]
    assert cfg.lm_mode == "freeze" and cfg.cache_lm > 0 and cfg.split_seed == 42
    saved = load_file(os.path.join(ld4lg.checkpoint_dir(ae), "ae.safetensors"))
    assert saved and not any(k.startswith("lm.") for k in saved)  # the frozen LM reloads by name
    assert not os.path.exists(ae / "lm_states.bin")
    auto_ae = ld4lg.load_autoencoder(str(ae), torch.device("cpu"))[0]
    assert auto_ae.c3 == (not t5)  # (C3) on for BART, off for T5, as in the paper
    diff = ["--ae", ae, *DENOISER.split(), *STEPS.split()]
    run("train", "--preset", "roc", "--data", fixtures / "roc", "--out", tmp_path / "roc", *diff)
    run("sample", tmp_path / "roc", "--num_samples", 4, "--steps", 5, "--batch_size", 4)
    # ag_news: class-conditional (G1) on the descriptions, labels 1-4 read as 0-3
    ag = f"{fixtures / 'ag_news'}:original"
    run("train", "--preset", "ag_news", "--data", ag, "--out", tmp_path / "ag", *diff)
    assert ld4lg.load_config(ld4lg.DiffConfig, tmp_path / "ag")[0].num_classes == 4
    run("sample", tmp_path / "ag", "--num_samples", 4, "--steps", 5, "--class", 3, "--guidance", 2)
    # qqp: seq2seq (G2), the source read by the autoencoder's own LM encoder, MBR over 2 (G4)
    run("train", "--preset", "qqp", "--data", fixtures / "qqp", "--out", tmp_path / "qqp", *diff)
    run("sample", tmp_path / "qqp", "--num_samples", 3, "--steps", 5, "--candidates", 2)
    rows = [json.loads(line) for line in open(tmp_path / "qqp" / "samples.jsonl")]
    assert len(rows) == 3 and all(len(r["candidates"]) == 2 and r["reference"] for r in rows)
