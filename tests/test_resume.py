"""Robustness: SIGKILL at random moments (checkpoint writes included) and --resume give exactly the
weights of an uninterrupted run; NaN stops cleanly; SIGTERM saves a checkpoint."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_cli import AE_FLAGS, DIFF_FLAGS

import ld4lg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(
    os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
)  # one thread: bitwise-reproducible CPU math


def cli(*argv):
    return [sys.executable, os.path.join(ROOT, "ld4lg.py"), *argv]


def stage_args(stage, ae_run, out):
    steps = ["--steps", "12", "--eval_every", "2", "--log_every", "1"]
    if stage == "train-ae":
        return ["train-ae", "--out", out, *AE_FLAGS, *steps]
    if stage == "decoder":  # (J4, two-stage) decoder fine-tuning of a trained autoencoder
        return [
            "train-ae",
            "--out",
            out,
            *AE_FLAGS,
            *steps,
            "--init_from",
            ae_run,
            "--latent_noise",
            "1",
        ]
    joint = ["--joint", "--t_sampling", "adaptive"] if stage == "joint" else []
    return ["train", "--ae", ae_run, "--out", out, *DIFF_FLAGS, *steps, *joint]


def weights(out):
    """Every tensor of the run's checkpoint."""
    ck = ld4lg.checkpoint_dir(out)
    return {
        f: load_file(os.path.join(ck, f))
        for f in sorted(os.listdir(ck))
        if f.endswith(".safetensors")
    }


@pytest.mark.parametrize("stage", ["train-ae", "decoder", "train", "joint"])
def test_kill_and_resume_is_exact(stage, ae_run, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    subprocess.run(cli(*stage_args(stage, ae_run, ref)), env=ENV, check=True, capture_output=True)
    rng = random.Random(stage)
    metrics = os.path.join(out, "metrics.jsonl")
    lines = lambda: sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0
    argv, kills = stage_args(stage, ae_run, out), 0
    proc = subprocess.Popen(
        cli(*argv), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while kills < 3:
        start = lines()
        while proc.poll() is None and lines() <= start:  # let this process make progress first
            time.sleep(0.02)
        time.sleep(
            rng.uniform(0, 0.4)
        )  # then kill at a random moment: mid-step or mid-checkpoint-write
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = subprocess.Popen(
            cli(*argv, "--resume"),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert kills >= 1
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    for f in a:
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (stage, f, k)


def test_sigterm_saves_checkpoint(ae_run, tmp_path):
    out = str(tmp_path / "run")
    argv = stage_args("train", ae_run, out)
    argv[argv.index("12")] = "100000"  # long enough to be stopped
    argv[argv.index("--eval_every") + 1] = "100000"
    proc = subprocess.Popen(
        cli(*argv), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while not os.path.isfile(os.path.join(out, "metrics.jsonl")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "checkpoint saved" in err
    step = torch.load(os.path.join(ld4lg.checkpoint_dir(out), "state.pt"), weights_only=False)[
        "step"
    ]
    assert step > 0


def test_time_budget_stops_the_run_and_ends_its_lr_decay(ae_run, tmp_path):
    out = str(tmp_path / "run")
    argv = stage_args("train", ae_run, out)
    argv[argv.index("12")] = "1000000"  # a step count the budget cuts short
    assert ld4lg.main([*argv, "--eval_every", "1000000", "--time_budget", "0.05"]) == 0
    rows = [json.loads(r) for r in open(os.path.join(out, "metrics.jsonl"))]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert 10 < rows[-1]["step"] < 1_000_000
    assert all(b <= a for a, b in zip(lrs[1:], lrs[2:]))  # decaying after the warmup step
    assert lrs[-1] < 0.1 * max(lrs)  # at the budget's end, not at 1_000_000 steps


def test_nan_loss_stops_without_poisoned_checkpoint(ae_run, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real = ld4lg.diffusion_loss
    calls = {"n": 0}

    def poisoned(
        *a, **k
    ):  # a NaN appears at the 5th training step (validation calls run without grad)
        calls["n"] += torch.is_grad_enabled()
        loss, t, per = real(*a, **k)
        return (loss * float("nan"), t, per) if calls["n"] >= 5 else (loss, t, per)

    monkeypatch.setattr(ld4lg, "diffusion_loss", poisoned)
    rc = ld4lg.main(stage_args("train", ae_run, out))
    assert rc == 2 and "non-finite loss" in capsys.readouterr().err
    ck = ld4lg.checkpoint_dir(out)
    assert (
        torch.load(os.path.join(ck, "state.pt"), weights_only=False)["step"] == 4
    )  # the last good one
    assert all(torch.isfinite(v).all() for f in weights(out).values() for v in f.values())


class RunsCode:
    """A pickle that would run a command when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_refuses_a_checkpoint_that_would_run_code(diff_run, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(diff_run, out)
    state = os.path.join(ld4lg.checkpoint_dir(out), "state.pt")
    torch.save(dict(torch.load(state, weights_only=True), step=RunsCode()), state)
    monkeypatch.chdir(tmp_path)
    cfg = ld4lg.load_config(ld4lg.DiffConfig, out)[0]
    with pytest.raises(ld4lg.UserError, match="not a plain checkpoint"):
        ld4lg.train_diffusion(cfg, out, resume=True)
    assert not os.path.exists(tmp_path / "pwned")
