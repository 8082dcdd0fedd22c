"""§2, App. A: schedule identities, exact parameterisation conversions, samplers with an oracle."""

import contextlib
import json
import math
import os
import shutil

import pytest
import torch

import evaluate
import ld4lg
from conftest import diff_cfg


def test_cosine_schedule_endpoints_and_monotone():
    t = torch.linspace(0, 1, 101)
    a = ld4lg.alpha_cosine(t)
    assert a[0] == pytest.approx(1, abs=1e-5) and a[-1] == pytest.approx(0, abs=1e-5)
    assert (a[1:] < a[:-1]).all()
    assert torch.allclose(a, torch.cos(t * math.pi / 2).pow(2).clamp(1e-6, 1 - 1e-6))


def test_scaled_schedule():
    t = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(ld4lg.alpha_cosine(t, 1.0), ld4lg.alpha_cosine(t))
    # (D5) log-SNR is shifted by exactly 2 log s
    t = t.double()
    a, a2 = ld4lg.alpha_cosine(t), ld4lg.alpha_cosine(t, 2.0)
    assert torch.allclose(
        torch.logit(a2) - torch.logit(a), torch.full_like(a, 2 * math.log(2.0)), atol=1e-4
    )


@pytest.mark.parametrize("objective", ["v", "eps", "x0"])
def test_parameterisations_invert(objective):
    g = torch.Generator().manual_seed(0)
    x, eps = (
        torch.randn(8, 4, 6, generator=g, dtype=torch.float64),
        torch.randn(8, 4, 6, generator=g, dtype=torch.float64),
    )
    alpha = torch.rand(8, 1, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    z = alpha.sqrt() * x + (1 - alpha).sqrt() * eps
    pred = ld4lg.x0_eps_to_pred(x, eps, alpha, objective)
    x_hat, eps_hat = ld4lg.pred_to_x0_eps(pred, z, alpha, objective)
    assert torch.allclose(x_hat, x, atol=1e-10) and torch.allclose(eps_hat, eps, atol=1e-10)


def test_posterior_matches_direct_gaussian():
    """(D2) μ_Q, σ_Q² from conditioning the joint Gaussian of (z_s, z_t) given x."""
    a_s, a_t = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    x, z_t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a_ts = a_t / a_s
    mu = a_s.sqrt() * (1 - a_ts) / (1 - a_t) * x + a_ts.sqrt() * (1 - a_s) / (1 - a_t) * z_t
    var = (1 - a_s) * (1 - a_ts) / (1 - a_t)
    # direct: cov(z_s, z_t) = √α_{t|s} (1-α_s), var(z_t) = 1-α_t, means √α_s x, √α_t x
    cov = a_ts.sqrt() * (1 - a_s)
    mu_direct = a_s.sqrt() * x + cov / (1 - a_t) * (z_t - a_t.sqrt() * x)
    var_direct = (1 - a_s) - cov**2 / (1 - a_t)
    assert torch.allclose(mu, mu_direct) and torch.allclose(var, var_direct)
    # and the DDPM update uses μ_Q as its mean: with zero noise variance replaced, check the mean
    g = torch.Generator().manual_seed(0)
    out = torch.stack([ld4lg.ddpm_update(z_t, x, None, a_t, a_s, 1.0, g) for _ in range(4000)])
    assert torch.allclose(out.mean(0), mu, atol=0.05)
    assert torch.allclose(out.var(0), 1 - a_ts, atol=0.05)  # (D6) official variance 1 - α_{t|s}
    # temperature τ scales the fresh noise: τ = 0 is the posterior mean itself, τ = 0.5 a quarter of the variance
    assert torch.equal(ld4lg.ddpm_update(z_t, x, None, a_t, a_s, 0.0, g), mu)
    out = torch.stack([ld4lg.ddpm_update(z_t, x, None, a_t, a_s, 0.5, g) for _ in range(4000)])
    assert torch.allclose(out.mean(0), mu, atol=0.05) and torch.allclose(
        out.var(0), 0.25 * (1 - a_ts), atol=0.02
    )


def oracle_fn(x, eps, s=1.0):
    """A model function that knows the data x (and the noise of a fixed trajectory) under schedule scale s."""

    def fn(z, a, x_self):  # a: α_t of the sampler's grid
        return x, (z - a.sqrt() * x) / (1 - a).sqrt()

    return fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_oracle_sampler_ends_at_x(sampler):
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    cfg = diff_cfg()
    out = ld4lg.sample_loop(
        ld4lg.SAMPLERS[sampler],
        oracle_fn(x, None, cfg.schedule_scale),
        z,
        torch.linspace(1, 0, 51).tolist(),
        cfg,
        g,
    )
    assert torch.allclose(out, x)


def test_ddim_oracle_exact_every_step():
    g = torch.Generator().manual_seed(0)
    x, eps = (
        torch.randn(2, 4, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 8, generator=g, dtype=torch.float64),
    )
    ts, cfg = (
        torch.linspace(1, 0, 21).tolist(),
        diff_cfg(self_cond=False),
    )  # the sampler reads s from cfg (D5)
    a0 = ld4lg.alpha_cosine(torch.tensor(ts[0], dtype=torch.float64), cfg.schedule_scale)
    z = a0.sqrt() * x + (1 - a0).sqrt() * eps
    seen = []  # z_s after each update, recorded by wrapping the update rule

    def ddim_recorded(*args):
        seen.append(ld4lg.ddim_update(*args))
        return seen[-1]

    ld4lg.sample_loop(ddim_recorded, oracle_fn(x, eps, cfg.schedule_scale), z, ts, cfg, g)
    assert len(seen) == len(ts) - 2  # the last step returns x̂ instead of updating
    for i, z_s in enumerate(seen):
        a = ld4lg.alpha_cosine(torch.tensor(ts[i + 1], dtype=torch.float64), cfg.schedule_scale)
        assert torch.allclose(z_s, a.sqrt() * x + (1 - a).sqrt() * eps, atol=1e-6)


def test_denoiser_zero_init_and_shapes():
    cfg = diff_cfg()
    model = ld4lg.Denoiser(cfg, num_latents=4, d_ae=8)
    z = torch.randn(3, 4, 8)
    alpha = torch.rand(3)
    assert model(z, alpha).abs().max() == 0  # zero-initialised output projection
    assert model(z, alpha, x_self=torch.randn(3, 4, 8)).shape == (3, 4, 8)


def test_bf16_autocast_where_fast_and_float32_attention_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert isinstance(
        ld4lg.autocast(cpu, bf16=False), contextlib.nullcontext
    )  # --no-bf16: float32 throughout
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k),
    )
    torch.manual_seed(0)
    attn, x = ld4lg.Attention(32, heads=4), torch.randn(2, 5, 32)
    ref = attn(x)
    with ld4lg.autocast(cpu):  # a no-op where bf16 is slow (no AMX)
        out = attn(x)
    assert out.dtype == (torch.bfloat16 if ld4lg.fast_bf16(cpu) else torch.float32)
    monkeypatch.setattr(ld4lg, "fast_bf16", lambda device: True)  # the AMX path, on any CPU
    with ld4lg.autocast(cpu):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    assert seen == [torch.float32] * 3  # the attention itself stays float32 on the CPU
    assert torch.allclose(out.float(), ref, atol=0.05)
    assert not torch.equal(out.float(), ref)  # bf16 rounds


def test_tiny_denoiser_overfits_fixed_batch():
    torch.manual_seed(0)
    cfg = diff_cfg(self_cond=False, objective="x0")
    model = ld4lg.Denoiser(cfg, num_latents=4, d_ae=8)
    x = torch.randn(8, 4, 8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    alpha = torch.full((8,), 0.5)
    z = alpha.sqrt()[:, None, None] * x + 0.5**0.5 * torch.randn(8, 4, 8)
    for _ in range(300):
        loss = ((model(z, alpha) - x) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < 0.02


def test_adaptive_time_converges_to_slope_density():
    """(J3) with a synthetic loss curve L(t) = t², the density converges to ∝ |dL/dt| = 2t."""
    at = ld4lg.AdaptiveTime(bins=32, decay=0.9, floor=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        t = torch.rand(512, generator=g)
        at.update(t, t**2)
    centers = (torch.arange(32) + 0.5) / 32
    target = centers / centers.sum()
    assert torch.allclose(at.density()[1:-1], target[1:-1], atol=0.004)
    s = at.sample(20000, g)
    assert 0.6 < s.mean() < 0.72  # E[t] under p(t) = 2t is 2/3


def test_decoder_finetuning_keeps_the_encoder_and_changes_the_decoder(ae_run, decoder_run):
    """(J4, two-stage) train-ae --init_from moves only g_φ and the LM decoder: the latents the denoiser
    learned are unchanged."""
    cpu = torch.device("cpu")
    before, after = (
        ld4lg.load_autoencoder(ae_run, cpu)[0],
        ld4lg.load_autoencoder(decoder_run, cpu)[0],
    )
    old, new = before.state_dict(), after.state_dict()
    prefixes = ("compressor.", "lm.encoder.", "lm.shared.", "lm.model.shared.", "lm.model.encoder.")
    encoder = [k for k in old if k.startswith(prefixes)]
    assert encoder and all(torch.equal(old[k], new[k]) for k in encoder)
    assert not torch.equal(old["reconstructor.in_proj.weight"], new["reconstructor.in_proj.weight"])
    decoder = [k for k in old if ".decoder.layers." in k or ".decoder.block." in k]
    assert decoder and any(not torch.equal(old[k], new[k]) for k in decoder)
    texts = [t for t, _, _ in evaluate.demo_corpus(8, seed=3)]
    ids, mask = ld4lg.tokenize(before.tok, texts, 32)
    x_old = ld4lg.encode_all(before.encode, ids, mask, cpu)
    assert torch.equal(x_old, ld4lg.encode_all(after.encode, ids, mask, cpu))


def test_sampling_reads_a_decoder_of_the_same_autoencoder_only(
    ae_run, decoder_run, diff_run, tmp_path
):
    """sample --decoder reads the run's latents with the fine-tuned decoder; a decoder fine-tuned from another
    autoencoder is refused."""
    cpu = torch.device("cpu")
    tuned = ld4lg.load_run(diff_run, cpu, decoder=decoder_run).ae.state_dict()
    own = ld4lg.load_autoencoder(decoder_run, cpu)[0].state_dict()
    assert all(torch.equal(tuned[k], own[k]) for k in own)
    other = str(tmp_path / "other")
    shutil.copytree(decoder_run, other)
    cfg = json.load(open(os.path.join(other, "config.json")))
    cfg["config"]["init_from"] = str(tmp_path)
    json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
    with pytest.raises(ld4lg.UserError, match="was not fine-tuned from"):
        ld4lg.load_run(diff_run, cpu, decoder=other)


def test_evaluating_with_another_decoder_keeps_the_runs_own_report(diff_run, decoder_run):
    """evaluate.py RUN --decoder D writes its report and samples beside the run's own, not over them."""
    flags = ["--num_samples", "4", "--steps", "4", "--featurizer", "none", "--ppl_model", "none"]
    assert evaluate.main([diff_run, *flags]) == 0
    own = open(os.path.join(diff_run, "eval.json")).read()
    report = json.loads(own)  # both controls, scored as the model is
    for control in ("control_random_latents", "control_data_latents"):
        assert set(report[control]) >= {"diversity", "memorization", "valid"}
    assert evaluate.main([diff_run, "--decoder", decoder_run, *flags]) == 0
    assert open(os.path.join(diff_run, "eval.json")).read() == own
    tuned = json.load(open(os.path.join(diff_run, "eval_decoder-decoder.json")))
    assert tuned["decoder"] == decoder_run and "control_ae_decoder" in tuned
    names = os.listdir(diff_run)
    assert any(
        n.startswith("samples_seed0") and n.endswith("_decoder-decoder.jsonl") for n in names
    )
    # settings are chosen against the validation texts: that report is beside the test one too
    assert evaluate.main([diff_run, "--split", "val", "--seeds", "1", *flags]) == 0
    assert open(os.path.join(diff_run, "eval.json")).read() == own
    assert json.load(open(os.path.join(diff_run, "eval_val.json")))["split"] == "val"


def test_gpt2_baseline_learns_its_training_text_and_joins_the_report(
    ae_run, diff_run, tmp_path, capsys
):
    """The GPT-2 row (--ar_minutes): trained from scratch for a wall-clock budget on the run's
    texts and tokenizer, it writes back the one sentence it saw; in a run's report it is scored
    as the model is, and `evaluate.py minutes` puts both on the minutes axis."""
    tok = ld4lg.load_autoencoder(ae_run, torch.device("cpu"))[0].tok
    text = "Every summer, the proud coach praises a fast runner."
    cpu = torch.device("cpu")
    # a step budget, not the wall-clock one, so that a busy machine trains it as far
    texts, info = evaluate.ar_baseline(
        [text] * 64, tok, 32, 60, 20, cpu, 64, 2, lr=3e-3, max_steps=300
    )
    assert info["ar_steps"] == 300 and len(texts) == 20
    # its first words at least, in most samples (nucleus sampling keeps a little of the rest)
    assert sum(t.startswith("Every summer, the proud coach") for t in texts) >= 15
    flags = ["--num_samples", "4", "--steps", "4", "--featurizer", "none", "--ppl_model", "none"]
    assert evaluate.main([diff_run, "--ar_minutes", "0.02", "--no-controls", *flags]) == 0
    ar = json.load(open(os.path.join(diff_run, "eval.json")))["ar_baseline"]
    assert ar["ar_steps"] > 0 and {"diversity", "memorization", "valid"} <= set(ar)
    assert len(open(os.path.join(diff_run, "samples_ar.jsonl")).readlines()) == 4
    capsys.readouterr()
    plot = str(tmp_path / "minutes.png")
    assert evaluate.main(["minutes", diff_run, "--output", plot]) == 0
    table = capsys.readouterr().out
    minutes = sum(
        json.load(open(os.path.join(d, "summary.json")))["train_minutes"]
        for d in (ae_run, diff_run)
    )
    assert f"| LD4LG two-stage | {minutes:.1f} |" in table
    assert "| GPT-2 from scratch | 0.0 |" in table and os.path.getsize(plot) > 0


def test_noised_latent_control_reads_the_data_latents_moved_by_sigma(diff_run, monkeypatch):
    """--noised_latents: the training texts' latents plus N(0, σ²) noise, back on C3's sphere,
    read by the same decoder; σ = 0 reads the data's own latents."""
    run = ld4lg.load_run(diff_run, torch.device("cpu"))
    read = []
    monkeypatch.setattr(run.ae, "generate", lambda z, **kw: read.append(z.float()) or [""] * len(z))
    texts = [f"The coach trains a ball on {d}." for d in evaluate.DEMO_DAYS] * 3
    for sigma in (0.0, 0.1, 1.0):
        evaluate.data_latent_texts(run, texts, sigma, bs=8)
    clean, small, large = (torch.cat(read[i : i + 3]) for i in (0, 3, 6))
    d = clean.shape[-1]
    for z in (clean, small, large):
        assert torch.allclose(z.norm(dim=-1), torch.full(z.shape[:2], d**0.5), rtol=1e-2)
    rms = lambda z: float((z - clean).pow(2).mean().sqrt())
    assert 0.03 < rms(small) < 0.2 < rms(large)  # about σ, less the part along the sphere
    flags = ["--num_samples", "4", "--steps", "4", "--featurizer", "none", "--ppl_model", "none"]
    flags += ["--seeds", "1", "--split", "val", "--noised_latents", "0.1,1"]
    monkeypatch.undo()
    assert evaluate.main([diff_run, *flags]) == 0
    report = json.load(open(os.path.join(diff_run, "eval_val.json")))
    assert set(report["control_noised_latents"]) == {"0.1", "1.0"}
    assert {"diversity", "memorization", "valid"} <= set(report["control_noised_latents"]["0.1"])
