"""torchrun --nproc_per_node 2 (gloo, CPU) on the real command line and the project's models: every
rank holds the same weights, the result is one process's at the same global batch, and a run resumes
on another number of processes."""

import json
import os
import subprocess
import sys

import torch
from test_cli import AE_FLAGS, DIFF_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs several `ld4lg.py` command lines in one process group, then saves each rank's weights of
# each run; STOP_AT ends the processes right after the checkpoint of that step (a crash).
WRAPPER = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
import ld4lg
save, loop = ld4lg.save_checkpoint, ld4lg.train_loop
def save_then_crash(run_dir, weights, state):
    save(run_dir, weights, state)
    if state["step"] == int(os.environ.get("STOP_AT", -1)):
        os._exit(3)
def loop_then_dump(cfg, run_dir, model, *args, **kwargs):
    out = loop(cfg, run_dir, model, *args, **kwargs)
    rank = ld4lg.process_rank()[0]
    state = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
    torch.save(state, os.path.join(run_dir, f"rank{{rank}}.pt"))
    return out
ld4lg.save_checkpoint, ld4lg.train_loop = save_then_crash, loop_then_dump
for argv in json.load(open(sys.argv[1])):
    if ld4lg.main(argv) != 0:
        sys.exit(2)
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
# float32 (bf16 rounds differently per batch split), no dropout (its masks come from each process's
# own device generator); 16 texts per step, 8 per process
COMMON = [
    "--no-bf16",
    "--steps",
    "6",
    "--eval_every",
    "3",
    "--log_every",
    "3",
    "--batch_size",
    "16",
]


def launch(tmp_path, runs, procs, stop_at=None):
    (tmp_path / "wrapper.py").write_text(WRAPPER.format(root=ROOT))
    argv_file = tmp_path / f"argv{procs}.json"
    argv_file.write_text(json.dumps(runs))
    python = [sys.executable]
    if procs > 1:  # --standalone: a free port, so parallel runs do not collide
        python += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    env = dict(ENV, STOP_AT=str(stop_at)) if stop_at else ENV
    cmd = [*python, str(tmp_path / "wrapper.py"), str(argv_file)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def weights(run, rank=0):
    return torch.load(os.path.join(run, f"rank{rank}.pt"))


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def test_two_processes_match_one(ae_run, tmp_path):
    """train-ae (tiny BART, fine-tuned with its autoencoder), then `train` with self-conditioning,
    class-conditional, seq2seq (its source states in a shared memory-mapped file) and --joint."""
    ae = ["train-ae", *AE_FLAGS, *COMMON]
    diff = ["train", "--ae", ae_run, *DIFF_FLAGS, *COMMON, "--dropout", "0"]
    runs = {
        "ae": ae,
        "self_cond": diff + ["--self_cond"],
        "class": diff + ["--preset", "demo-class"],
        "seq2seq": diff + ["--preset", "demo-seq2seq"],
        "joint": diff + ["--joint", "--warmup_joint", "4"],
    }
    for procs in (2, 1):
        argv = [[*a, "--out", str(tmp_path / f"{name}{procs}")] for name, a in runs.items()]
        r = launch(tmp_path, argv, procs)
        assert r.returncode == 0, r.stderr[-3000:]
    for name in runs:
        two, one = str(tmp_path / f"{name}2"), str(tmp_path / f"{name}1")
        r0, r1 = weights(two, 0), weights(two, 1)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), name  # DDP keeps the replicas equal
        # the same global batch and the same random numbers (draw): only the order of float32 sums
        # differs (gradients averaged over 2 processes). That is a rounding-scale difference (a few
        # 1e-6 here); the bound leaves room for other CPUs and stays far below one Adam step (lr 3e-3)
        assert_close(r0, weights(one), atol=1e-4)
        assert not os.path.exists(os.path.join(two, "ckpt.tmp"))
        assert sorted(os.listdir(os.path.join(two, "ckpt"))) == sorted(
            os.listdir(os.path.join(one, "ckpt"))
        )
    assert not os.path.exists(tmp_path / "seq2seq2" / "source_states.bin")  # a cache, removed


def test_resume_on_another_process_count(ae_run, tmp_path, procs=(2, 1)):
    """A run of 2 processes that crashes after its step-3 checkpoint continues on 1 process, and ends
    where an uninterrupted run ends."""
    argv = ["train", "--ae", ae_run, *DIFF_FLAGS, *COMMON, "--dropout", "0"]
    crashed, ref = str(tmp_path / "crashed"), str(tmp_path / "ref")
    r = launch(tmp_path, [argv + ["--out", crashed]], procs[0], stop_at=3)
    assert r.returncode != 0 and os.path.isdir(os.path.join(crashed, "ckpt"))
    r = launch(tmp_path, [argv + ["--out", crashed, "--resume"]], procs[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert launch(tmp_path, [argv + ["--out", ref]], procs[1]).returncode == 0
    assert_close(weights(crashed), weights(ref), atol=1e-4)  # as in test_two_processes_match_one


def test_an_error_on_rank_0_ends_every_rank(tmp_path):
    """An existing run directory without --overwrite: rank 0's one-line error, on every rank, no hang."""
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = launch(tmp_path, [["train-ae", *AE_FLAGS, "--out", str(out)]], 2)
    assert r.returncode != 0 and r.stderr.count("error: run directory") == 2
    assert (out / "keep.txt").read_text() == "x"
