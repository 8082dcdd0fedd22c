"""LDLM joint training (J1-J4): where gradients flow, and that decoder noise is training-only."""

import torch

import evaluate
import ld4lg
from conftest import ae_cfg, diff_cfg

TEXTS = [t for t, _, _ in evaluate.demo_corpus(32, seed=7)]


def joint_setup(**kw):
    torch.manual_seed(0)
    acfg = ae_cfg()
    ae = ld4lg.build_autoencoder(acfg, None, TEXTS)
    (
        ae.lm.requires_grad_(False),
        ae.lm.get_decoder().requires_grad_(True),
    )  # as train --joint sets it up
    ae.cfg = ae_cfg(lm_mode="freeze")
    ae.reconstructor = ld4lg.Reconstructor(ae.lm.config.d_model, acfg, readout=True)
    cfg = diff_cfg(joint=True, **kw)
    model = ld4lg.build_denoiser(cfg, acfg)
    torch.nn.init.normal_(model.out.weight, std=0.1)  # so the diffusion loss depends on its input
    ids, mask = ld4lg.tokenize(ae.tok, TEXTS[:8], acfg.max_len)
    return ae, model, cfg, ids, mask


def grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def test_gamma_zero_blocks_diffusion_gradient_to_encoder():
    ae, model, cfg, ids, mask = joint_setup()
    x = ae.compressor(ae.lm_states(ids, mask), mask)
    g = torch.Generator().manual_seed(0)
    loss = ld4lg.diffusion_loss(model, ld4lg.scale_grad(x, 0.0), cfg, {}, g)[0]
    loss.backward()
    assert all(gr is None or gr.abs().max() == 0 for gr in grads(ae.compressor))
    assert any(
        gr is not None and gr.abs().max() > 0 for gr in grads(model)
    )  # the denoiser still learns

    # and with γ = 0.5 the encoder gets exactly half of the γ = 1 gradient
    def enc_grad(gamma):
        ae.zero_grad(), model.zero_grad()
        x = ae.compressor(ae.lm_states(ids, mask), mask)
        torch.manual_seed(0)  # the same self-conditioning coin (S1, drawn on the host)
        ld4lg.diffusion_loss(
            model, ld4lg.scale_grad(x, gamma), cfg, {}, torch.Generator().manual_seed(0)
        )[0].backward()
        return ae.compressor.queries.grad.clone()

    assert torch.allclose(enc_grad(0.5), 0.5 * enc_grad(1.0), atol=1e-7)


def test_ce_loss_leaves_encoder_untouched_with_mse():
    ae, model, cfg, ids, mask = joint_setup(diff_weight=0.0, mse_weight=0.0)  # only L_ce remains
    ae.train()
    loss = ld4lg.joint_loss(ae, model, cfg, ids, mask, {}, 1.0, torch.Generator().manual_seed(0))[0]
    loss.backward()
    untouched = lambda m: all(gr is None or gr.abs().max() == 0 for gr in grads(m))
    assert untouched(ae.compressor) and untouched(ae.reconstructor)
    assert any(
        gr is not None and gr.abs().max() > 0 for gr in grads(ae.lm.get_decoder())
    )  # CE trains the decoder
    # naive joint training (no J1): CE reaches the encoder
    ae, model, cfg, ids, mask = joint_setup(diff_weight=0.0, mse_loss=False)
    ld4lg.joint_loss(ae, model, cfg, ids, mask, {}, 1.0, torch.Generator().manual_seed(0))[
        0
    ].backward()
    assert any(gr is not None and gr.abs().max() > 0 for gr in grads(ae.compressor))


def test_decoder_noise_only_in_training():
    ae, model, cfg, ids, mask = joint_setup(decoder_noise=0.5, diff_weight=0.0)
    run = lambda seed: ld4lg.joint_loss(
        ae, model, cfg, ids, mask, {}, 1.0, torch.Generator().manual_seed(seed)
    )[1]["mse_loss"]
    ae.eval()
    assert run(0) == run(1)
    ae.train()
    assert run(0) != run(1)


def test_gamma_ramp():
    assert ld4lg.joint_gamma(0, 1000) < 0.01 and ld4lg.joint_gamma(1000, 1000) > 0.99
    assert abs(ld4lg.joint_gamma(500, 1000) - 0.5) < 1e-9 and ld4lg.joint_gamma(0, 0) == 1.0
