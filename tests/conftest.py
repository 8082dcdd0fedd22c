"""Shared fixtures: tiny configs and one small trained run reused by the CLI tests."""

import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="ld4lg-tests-datasets-")  # not the user's
import evaluate  # noqa: E402
import ld4lg  # noqa: E402

# two threads, as CI's machine has, unless OMP_NUM_THREADS asks for another count
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
# huggingface_hub's logger gets its stderr handler on first use; made here, not inside a test's capsys (whose stream
# closes with the test), so the order in which test files run does not matter.
from huggingface_hub.utils import logging as hub_logging  # noqa: E402

hub_logging.get_logger()

# The demo corpus, written once per test session as `python evaluate.py demo-data` writes it.
DEMO_DATA = os.path.join(tempfile.mkdtemp(prefix="ld4lg-tests-"), "demo")
evaluate.write_demo_data(DEMO_DATA, n_train=2000, n_eval=20)

# Smallest shapes that still exercise every code path.
TINY_AE = dict(
    data=DEMO_DATA,
    lm="tiny",
    lm_mode="ft",
    tiny_dim=32,
    tiny_layers=1,
    tiny_vocab=300,
    max_len=32,
    num_latents=4,
    d_ae=8,
    ae_dim=32,
    ae_heads=2,
    enc_layers=1,
    dec_layers=1,
    batch_size=16,
    steps=4,
    warmup=1,
    num_eval=20,
    eval_every=2,
    log_every=1,
    max_train=300,
)
TINY_DIFF = dict(
    data=DEMO_DATA,
    dim=32,
    depth=2,
    heads=2,
    skips=1,
    batch_size=16,
    steps=4,
    warmup=1,
    eval_every=2,
    log_every=1,
    max_train=300,
    num_eval=20,
    ema_decay=0.9,
)


def ae_cfg(**kw):
    return ld4lg.make_config(ld4lg.AEConfig, "demo", **{**TINY_AE, **kw})


def diff_cfg(**kw):
    return ld4lg.make_config(ld4lg.DiffConfig, "demo", **{**TINY_DIFF, **kw})


@pytest.fixture(scope="session")
def ae_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "ae")
    ld4lg.train_ae(ae_cfg(), out)
    return out


@pytest.fixture(scope="session")
def diff_run(ae_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "diff")
    ld4lg.train_diffusion(diff_cfg(ae=ae_run), out)
    return out


@pytest.fixture(scope="session")
def decoder_run(ae_run, tmp_path_factory):
    """(J4, two-stage) the decoder of ae_run fine-tuned on noised latents (train-ae --init_from)."""
    out = str(tmp_path_factory.mktemp("runs") / "decoder")
    ld4lg.train_ae(ae_cfg(init_from=ae_run, latent_noise=1.0, steps=3), out)
    return out
