"""torchrun with 2 CPU processes (gloo): ranks stay identical and match one process at the same global batch."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import ld4lg
rank, world = ld4lg.setup_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
X, Y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), torch.randn(64, 1, generator=torch.Generator().manual_seed(2))
def loss_fn(step, idx, gen, net):
    loss = ((net(X[idx]) - Y[idx]) ** 2).mean()  # equal per-rank batches: the mean of means is the global mean
    return loss, dict(loss=loss)
loss_fn.num_rows = 64
cfg = ld4lg.make_config(ld4lg.AEConfig, "demo", batch_size=16, steps=20, warmup=2, lr=1e-2, log_every=5, eval_every=10,
                        bf16=False)  # float32: an equality to 1e-5
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
ld4lg.train_loop(cfg, out, model, loss_fn, None, torch.device("cpu"), False, dict(model=model))
torch.save(model.state_dict(), os.path.join(out, f"rank{{rank}}.pt"))
"""


def test_two_gloo_processes_match_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    for cmd in (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            two,
        ],
        [sys.executable, str(script), one],
    ):  # --standalone: a free port, so parallel runs do not collide
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    r0, r1, single = (
        torch.load(os.path.join(d, f))
        for d, f in ((two, "rank0.pt"), (two, "rank1.pt"), (one, "rank0.pt"))
    )
    for k in r0:
        assert torch.equal(r0[k], r1[k])  # DDP keeps the replicas identical
        assert torch.allclose(r0[k], single[k], atol=1e-5)  # same global batch, same result
    assert os.path.isdir(os.path.join(two, "ckpt")) and not os.path.exists(
        os.path.join(two, "ckpt.tmp")
    )
