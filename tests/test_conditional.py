"""§3.2 conditioning: condition dropout rates, classifier-free guidance identities, cross-attention
masks, MBR."""

import json

import torch

import evaluate
import ld4lg
from conftest import ae_cfg, diff_cfg


def random_denoiser(**kw):
    torch.manual_seed(0)
    cfg = diff_cfg(**kw)
    model = ld4lg.Denoiser(
        cfg,
        num_latents=4,
        d_ae=8,
        num_classes=kw.get("num_classes", 0),
        context_dim=16 if kw.get("seq2seq") else 0,
    ).eval()
    for (
        p
    ) in model.parameters():  # leave the zero-init: identities must hold for a trained-looking net
        torch.nn.init.normal_(p, std=0.2)
    return cfg, model


def test_null_class_and_null_source_rates():
    g = torch.Generator().manual_seed(0)
    cond = dict(
        label=torch.zeros(20000, dtype=torch.long),
        context=torch.zeros(20000, 1, 2),
        context_mask=torch.ones(20000, 1, dtype=torch.bool),
    )
    out = ld4lg.drop_conditions(cond, 0.1, 4, g)
    assert abs((out["label"] == 4).float().mean() - 0.1) < 0.008
    assert abs(out["drop_context"].float().mean() - 0.1) < 0.008
    assert ((out["label"] == 4) | (out["label"] == 0)).all()


def test_guidance_identities_class():
    cfg, model = random_denoiser(class_cond=True, num_classes=3)
    z, label = torch.randn(5, 4, 8), torch.tensor([0, 1, 2, 1, 0])
    alpha = ld4lg.alpha_cosine(torch.full((5,), 0.3), cfg.schedule_scale)
    cond_pred = ld4lg.pred_to_x0_eps(
        model(z, alpha, None, label=label), z, alpha[:, None, None], cfg.objective
    )[0]
    uncond_pred = ld4lg.pred_to_x0_eps(
        model(z, alpha, None, label=torch.full_like(label, 3)),
        z,
        alpha[:, None, None],
        cfg.objective,
    )[0]
    x1 = ld4lg.guided_model_fn(model, cfg, dict(label=label), 1.0)(z, alpha[0], None)[0]
    x0 = ld4lg.guided_model_fn(model, cfg, dict(label=label), 0.0)(z, alpha[0], None)[0]
    assert torch.equal(x1, cond_pred) and torch.equal(x0, uncond_pred)
    # w = 2 in one batched pass equals w·cond + (1 − w)·uncond computed separately (G3; linear in x̂)
    x2 = ld4lg.guided_model_fn(model, cfg, dict(label=label), 2.0)(z, alpha[0], None)[0]
    assert torch.allclose(x2, 2 * cond_pred - uncond_pred, atol=1e-5)


def test_cross_attention_ignores_padding():
    cfg, model = random_denoiser(seq2seq=True)
    z, alpha = torch.randn(2, 4, 8), torch.rand(2)
    ctx, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    ctx_pad = torch.cat([ctx, torch.randn(2, 3, 16) * 100], 1)  # garbage at padded positions
    mask_pad = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    a = model(z, alpha, context=ctx, context_mask=mask)
    b = model(z, alpha, context=ctx_pad, context_mask=mask_pad)
    assert torch.allclose(a, b, atol=1e-5)
    # the null source replaces the context completely
    drop = torch.tensor([True, False])
    c = model(z, alpha, context=ctx, context_mask=mask, drop_context=drop)
    d = model(z, alpha, context=torch.randn(2, 5, 16), context_mask=mask, drop_context=drop)
    assert torch.allclose(c[0], d[0], atol=1e-5) and not torch.allclose(c[1], d[1])


def test_guidance_identities_seq2seq():
    cfg, model = random_denoiser(seq2seq=True)
    z, ctx, mask = torch.randn(3, 4, 8), torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    cond = dict(context=ctx, context_mask=mask)
    alpha = ld4lg.alpha_cosine(torch.full((3,), 0.5), cfg.schedule_scale)
    drop = torch.ones(3, dtype=torch.bool)
    uncond = ld4lg.pred_to_x0_eps(
        model(z, alpha, None, **cond, drop_context=drop), z, alpha[:, None, None], "v"
    )[0]
    assert torch.equal(ld4lg.guided_model_fn(model, cfg, cond, 0.0)(z, alpha[0], None)[0], uncond)
    c = ld4lg.guided_model_fn(model, cfg, cond, 1.0)(z, alpha[0], None)[0]
    assert torch.allclose(
        ld4lg.guided_model_fn(model, cfg, cond, 3.0)(z, alpha[0], None)[0],
        3 * c - 2 * uncond,
        atol=1e-5,
    )


def test_source_encoder_reports_cut_sources(capsys):
    """Sources longer than --max_source_len lose their last slots: training says how many, once."""
    rows = evaluate.demo_corpus(40, seed=3)
    ae = ld4lg.build_autoencoder(ae_cfg(), None, [t for t, _, _ in rows])
    sources = [s for _, s, _ in rows]
    lengths = sorted(len(ids) for ids in ae.tok(sources)["input_ids"])
    limit = lengths[len(lengths) // 2]  # the median: some sources are cut, some not
    n_long = sum(n > limit for n in lengths)
    assert 0 < n_long < len(sources)
    encode, dim = ld4lg.make_source_encoder(
        diff_cfg(seq2seq=True, max_source_len=limit), ae, torch.device("cpu"), sources
    )
    assert (
        f"{n_long} of 40 texts are longer than --max_source_len {limit} tokens"
        in capsys.readouterr().err
    )
    ctx, mask = encode(sources)
    assert ctx.shape[:2] == mask.shape == (40, limit) and ctx.shape[2] == dim
    fit = [s for s, ids in zip(sources, ae.tok(sources)["input_ids"]) if len(ids) <= limit]
    ld4lg.make_source_encoder(
        diff_cfg(seq2seq=True, max_source_len=limit), ae, torch.device("cpu"), fit
    )
    assert "longer than" not in capsys.readouterr().err


def test_seq2seq_sample_reports_cut_sources(ae_run, tmp_path, capsys):
    """`sample` on a seq2seq run: one row per source, and a source that --max_source_len cuts is reported."""
    run = str(tmp_path / "s2s")
    ld4lg.train_diffusion(
        diff_cfg(ae=ae_run, seq2seq=True, source_column="source", max_source_len=16), run
    )
    capsys.readouterr()
    (tmp_path / "src.txt").write_text(
        "subject: coach\nsubject: coach, verb: kick, object: ball, place: stadium, time: Monday\n"
    )
    assert (
        ld4lg.main(
            [
                "sample",
                run,
                "--source-file",
                str(tmp_path / "src.txt"),
                "--num_samples",
                "2",
                "--steps",
                "3",
                "--output",
                str(tmp_path / "s.jsonl"),
            ]
        )
        == 0
    )
    assert "1 of 2 texts are longer than --max_source_len 16 tokens" in capsys.readouterr().err
    rows = [json.loads(l) for l in open(tmp_path / "s.jsonl")]
    assert [r["source"] for r in rows] == (tmp_path / "src.txt").read_text().splitlines()


def test_cached_source_states_match_the_encoder(capsys):
    """Training caches the frozen source encoder's states of the training sources once (bf16): a batch read back
    equals the batch encoded, on its real tokens and with the same mask; a source not in the cache is encoded."""
    rows = evaluate.demo_corpus(40, seed=3)
    ae = ld4lg.build_autoencoder(ae_cfg(), None, [t for t, _, _ in rows])
    sources, cpu = [s for _, s, _ in rows], torch.device("cpu")
    cached, _ = ld4lg.make_source_encoder(
        diff_cfg(seq2seq=True, max_source_len=64), ae, cpu, sources
    )  # the tiny BART's positions
    fresh, _ = ld4lg.make_source_encoder(
        diff_cfg(seq2seq=True, max_source_len=64, cache_sources=0), ae, cpu, sources
    )
    assert "encoded at every step" in capsys.readouterr().err
    (c, cm), (f, fm) = (
        cached([sources[i] for i in (7, 3, 30, 3)]),
        fresh([sources[i] for i in (7, 3, 30, 3)]),
    )
    assert torch.equal(cm, fm) and c.shape == f.shape
    err = (c[cm] - f[fm]).abs().max() / f[fm].abs().max()
    assert 0 < err < 1e-2  # bf16 rounding: read from the cache, and the same states
    unseen = ["subject: lighthouse, verb: sings"]
    assert torch.equal(cached(unseen)[0], fresh(unseen)[0])


def test_mbr_picks_medoid():
    cands = [
        "the cat sat on the mat",
        "the cat sat on a mat",
        "a cat sat on the mat",
        "dogs run fast in parks",
        "the cat is on the mat",
    ]
    assert ld4lg.mbr_select(cands) == 0
    assert ld4lg.mbr_select(["x y z", "a b c", "a b c d", "a b c e"]) == 1
