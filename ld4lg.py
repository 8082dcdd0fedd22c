"""ld4lg.py: Latent Diffusion for Language Generation in one file.

Implements LD4LG (Lovelace et al., "Latent Diffusion for Language Generation", NeurIPS 2023)
and the joint-training recipe of LDLM (Meshchaninov et al., 2026, "How to Train Your Latent
Diffusion Language Model Jointly With the Latent Space"). Equation labels in comments
(C1, R2, D2, T1, S1, G3, J1, ...) are those of the README's label table.

The method in one paragraph: a pretrained encoder-decoder LM (BART, T5) encodes text; a small
Perceiver "compression network" turns its variable-length states into ℓ fixed latent vectors
of width d_ae (C1-C3); a "reconstruction network" maps latents back to states the LM decoder
cross-attends to (R1-R2). A transformer denoiser then learns continuous-time diffusion over
those latents (D1-D7, T1, S1-S2), optionally conditioned on a class or a source text (G1-G4).
Sampling runs the reverse process from noise and decodes the latent with beam search.

Three commands run it end to end on the built-in offline demo corpus:
    python ld4lg.py train-ae --preset demo --out runs/demo/ae
    python ld4lg.py train    --preset demo --ae runs/demo/ae --out runs/demo/diffusion
    python ld4lg.py sample   runs/demo/diffusion --num_samples 1000
Evaluation (§4.1) and the benchmark live beside this file, in evaluate.py.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import csv
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from safetensors.torch import load_file, save_model
from tqdm.auto import tqdm


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class Interrupted(UserError):
    """SIGINT/SIGTERM: the checkpoint was saved; exit code 130."""


# ==========================================================================================
# 1. Configuration: one flat typed config per stage, presets as override dicts

# String fields with a fixed set of values.
CHOICES = dict(lm_mode=("freeze", "ft"), objective=("v", "eps", "x0"), loss=("l2", "l1"))
CHOICES |= dict(norm_latents=("auto", "on", "off"), compile=("auto", "on", "off"))
CHOICES |= dict(t_sampling=("auto", "uniform", "adaptive"), sampler=("ddpm", "ddim"))


def opt(default, help):
    """A config field whose help text is both the comment on its default and its --help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Fields shared by both training stages."""

    preset: str = opt("", "named set of overrides (see PRESETS); '' = the paper's ROCStories")
    data: str = opt("data/roc", "a local file or folder, or a hub data set NAME[:CONFIG]")
    text_column: str = opt("text", "column holding the target text")
    label_column: str = opt("", "column holding an integer class label (G1)")
    label_offset: int = opt(0, "added to every label (AG News's classes 1-4: -1)")
    source_column: str = opt("", "column holding the source text (G2)")
    clean_text: bool = opt(False, "undo tokenized spacing (' .' -> '.'), as for AG News, XSum")
    train_split: str = opt("train", "hub split for training")
    val_split: str = opt("", "hub split for validation ('' = held out of train)")
    test_split: str = opt("", "hub split for test ('' = held out of validation, or of train)")
    num_eval: int = opt(1000, "texts held out, where a split is cut from another (§10)")
    split_seed: int = opt(42, "seed of the held-out cuts (the official code's 42)")
    max_train: int = opt(0, "use at most this many training texts (0 = all)")
    max_len: int = opt(64, "maximum target length in tokens (paper: 64)")
    batch_size: int = opt(256, "global batch size")
    lr: float = opt(1e-4, "peak learning rate")
    betas: tuple = opt((0.9, 0.999), "AdamW betas")
    weight_decay: float = opt(1e-2, "AdamW weight decay (never on biases and norms)")
    warmup: int = opt(1000, "linear warmup steps")
    steps: int = opt(50_000, "optimizer steps")
    time_budget: float = opt(0.0, "minutes of training (0 = no limit); the lr decay ends with them")
    grad_clip: float = opt(1.0, "gradient-norm clipping")
    log_every: int = opt(50, "steps between metric lines (the only host syncs)")
    eval_every: int = opt(1000, "steps between validation passes and checkpoints")
    seed: int = opt(0, "seed for data splits, initialisation and noise")
    device: str = opt("auto", "auto | cuda | mps | cpu")
    compile: str = opt("auto", "torch.compile the denoiser in training: auto (CUDA) | on | off")
    bf16: bool = opt(True, "bf16 autocast on CUDA and on CPUs with AMX bf16 tiles")

    def __post_init__(self):  # every config (flags, presets, a saved run) passes here
        self.betas = tuple(self.betas)  # JSON stores the tuple as a list
        if isinstance(self.compile, bool):  # runs saved when it was a switch
            self.compile = "auto" if self.compile else "off"
        for k, allowed in CHOICES.items():
            if getattr(self, k, allowed[0]) not in allowed:
                raise UserError(f"--{k} '{getattr(self, k)}' is not one of {', '.join(allowed)}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise UserError("--steps and --batch_size must be positive")


@dataclass
class AEConfig(TrainConfig):
    """§3.1: the language autoencoder (Table 13 defaults)."""

    lm: str = opt("facebook/bart-base", "HF encoder-decoder name or folder, or 'tiny' / 'tiny-t5'")
    lm_mode: str = opt("freeze", "freeze | ft: train the LM too (a tiny random LM must be ft)")
    tiny_dim: int = opt(128, "width of the tiny random LM")
    tiny_layers: int = opt(2, "layers on each side of the tiny random LM")
    tiny_vocab: int = opt(1024, "BPE vocabulary trained on the training texts (tiny LM)")
    num_latents: int = opt(32, "ℓ, number of latent vectors (C1)")
    d_ae: int = opt(64, "d_ae, width of each latent vector (C2)")
    ae_dim: int = opt(768, "width of the compression and reconstruction networks")
    ae_heads: int = opt(12, "attention heads in both networks")
    enc_layers: int = opt(3, "compression (Perceiver) layers")
    dec_layers: int = opt(3, "reconstruction layers")
    norm_latents: str = opt("auto", "(C3) ‖x_i‖² = d_ae: on | off | auto (BART on, T5 off)")
    latent_noise: float = opt(0.0, "(J4) std of noise on the latents the decoder reads")
    cache_lm: float = opt(8.0, "GB of host memory for a frozen LM's E(w) (bf16), then a file")
    # (J4 in a two-stage model) fine-tune the decoder of a trained autoencoder on x + σε.
    init_from: str = opt("", "an autoencoder run: its encoder frozen, its decoder trained")


@dataclass
class DiffConfig(TrainConfig):
    """§3.2, App. A: the latent denoiser (Table 14 defaults)."""

    ae: str = opt("", "run directory of a trained autoencoder (train-ae)")
    dim: int = opt(768, "denoiser width")
    depth: int = opt(12, "denoiser blocks")
    heads: int = opt(12, "attention heads")
    skips: int = opt(3, "k: dense long skips from the first k to the last k blocks")
    dropout: float = opt(0.1, "dropout in attention and feed-forward")
    objective: str = opt("v", "v | eps | x0: what the network predicts (D3)")
    loss: str = opt("l2", "l2 | l1 (paper: L1 for seq2seq)")
    schedule_scale: float = opt(1.0, "s of the scaled cosine schedule (D5); 1 = plain (D4)")
    self_cond: bool = opt(True, "(S1) self-conditioning with p = 0.5")
    class_cond: bool = opt(False, "(G1) condition on the label column")
    seq2seq: bool = opt(False, "(G2) condition on the source column by cross-attention")
    max_source_len: int = opt(64, "maximum source length in tokens")
    cache_sources: float = opt(8.0, "GB of host memory for the source states (bf16), then a file")
    cond_drop: float = opt(0.1, "(G1, G2) probability of the null class / source in training")
    ema_decay: float = opt(0.9999, "EMA of the weights; sampling uses the EMA")
    num_classes: int = opt(0, "C, set from the training labels when class_cond")
    t_sampling: str = opt("auto", "uniform | adaptive (J3) | auto = adaptive with --joint")
    # (J1-J4) LDLM: the autoencoder trains together with the denoiser.
    joint: bool = opt(False, "train the autoencoder together with the denoiser (LDLM)")
    mse_loss: bool = opt(True, "(J1) decoder regresses the frozen LM states; CE on a stop-grad")
    warmup_joint: int = opt(1000, "(J2) steps of γ's sigmoid ramp (0 = off)")
    diff_weight: float = opt(1.0, "(J1) weight of L_diff in the joint loss (times γ)")
    mse_weight: float = opt(1.0, "(J1) weight of L_mse")
    ce_weight: float = opt(1.0, "(J1) weight of L_ce")
    decoder_noise: float = opt(0.1, "(J4) std of noise on the decoder's latents (joint)")
    # Defaults of `sample` (each also a flag of `sample`).
    sampler: str = opt("ddpm", "ddpm | ddim")
    sample_steps: int = opt(250, "sampling steps (paper: 250)")
    temperature: float = opt(1.0, "τ: scale of the DDPM step's fresh noise (D6; paper: 1)")
    guidance: float = opt(1.0, "guidance weight w (G3; paper: 2 for seq2seq)")


PAPER_DIFF = dict(steps=250_000, lr=2e-4, batch_size=128, weight_decay=1e-6)  # Table 14
SEQ2SEQ = dict(seq2seq=True, loss="l1", guidance=2.0)  # (G2, D3) L1 loss, w = 2
PRESETS = {
    # Offline demo: a tiny T5 and a BPE trained on the built-in grammar corpus; CPU minutes.
    "demo": dict(
        ae=dict(data="data/demo", lm="tiny-t5", lm_mode="ft", max_len=32, norm_latents="on")
        | dict(num_latents=16, d_ae=32, ae_dim=128, ae_heads=4, enc_layers=2, dec_layers=2)
        | dict(batch_size=64, lr=1e-3, warmup=200, steps=1200, eval_every=400, weight_decay=0.0)
        | dict(latent_noise=0.5),
        # A short run wants a short EMA and a high peak lr; (D5) s = 0.5 trains the small
        # denoiser more at high noise, where it fails; steps sized so that `bash train.sh`,
        # evaluation included, fits in 20 minutes on 2 CPU cores (probes in RESULTS.md).
        diff=dict(dim=128, depth=4, heads=4, skips=2, dropout=0.0, schedule_scale=0.5)
        | dict(batch_size=64, lr=3e-3, warmup=200, steps=5000, eval_every=1000)
        | dict(ema_decay=0.995, weight_decay=0.0),
    ),
    # The paper's recipes with BART-base (Tables 13-14), their data prepared as the official
    # code does (the paper notes, §10). roc: Diffusion-LM's roc_train.json and roc_valid.json,
    # whose first 1000 shuffled validation stories validate and the rest test: the defaults.
    "roc": dict(ae={}, diff=PAPER_DIFF),
    "ag_news": dict(  # descriptions only, labels 1-4 to 0-3, 1000 held out of train
        ae=dict(data="pietrolesci/ag_news:original", text_column="description", test_split="test")
        | dict(label_column="label", label_offset=-1, clean_text=True),
        diff=dict(PAPER_DIFF, class_cond=True),
    ),
    "xsum": dict(  # the official splits; the source cut at 4 × the target length
        ae=dict(data="EdinburghNLP/xsum", text_column="summary", source_column="document")
        | dict(val_split="validation", test_split="test", clean_text=True),
        diff=dict(PAPER_DIFF, max_source_len=256, **SEQ2SEQ),
    ),
    "qqp": dict(  # DiffuSeq's paraphrase pairs: train.jsonl, valid.jsonl, test.jsonl (src, trg)
        ae=dict(data="data/qqp", text_column="trg", source_column="src"),
        diff=dict(PAPER_DIFF, **SEQ2SEQ),
    ),
    "e2e": dict(  # not a paper experiment: E2E NLG's official splits, record → text
        ae=dict(data="GEM/e2e_nlg", text_column="target", source_column="meaning_representation")
        | dict(val_split="validation", test_split="test"),
        diff=dict(PAPER_DIFF, steps=50_000, **SEQ2SEQ),
    ),
}
# The demo's conditional variants reuse the demo autoencoder; only the conditioning changes.
_demo = PRESETS["demo"]
_class = dict(class_cond=True, label_column="label")
_seq2seq = dict(source_column="source", steps=8800, temperature=0.5, **SEQ2SEQ)
PRESETS["demo-class"] = dict(ae=_demo["ae"], diff=_demo["diff"] | _class)
PRESETS["demo-seq2seq"] = dict(ae=_demo["ae"], diff=_demo["diff"] | _seq2seq)
# (J4, two-stage) the demo autoencoder's decoder fine-tuned on x + σε: train-ae --init_from;
# σ chosen by the MAUVE of the demo's samples against the validation texts (RESULTS.md).
_decoder = dict(steps=4000, lr=1e-3, warmup=100, eval_every=500, latent_noise=2.5)
PRESETS["demo-decoder"] = dict(ae=_demo["ae"] | _decoder, diff=_demo["diff"])
# Data fields: both stages read the same data, so `train` takes them from the preset's ae part.
DATA_FIELDS = {"data", "text_column", "label_column", "label_offset", "source_column"}
DATA_FIELDS |= {"clean_text", "train_split", "val_split", "test_split", "num_eval", "split_seed"}
DATA_FIELDS |= {"max_train", "max_len"}


def make_config(cls, preset, **overrides):
    """Resolve defaults ← preset ← overrides into a config of type `cls`."""
    if preset and preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    names = {f.name for f in dataclasses.fields(cls)}
    parts = PRESETS.get(preset, dict(ae={}))
    stage = parts.get("ae" if cls is AEConfig else "diff", {})
    values = {k: v for k, v in parts["ae"].items() if k in DATA_FIELDS}
    values.update({k: v for k, v in stage.items() if k in names})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(preset=preset, **values)


def load_config(cls, run_dir, missing="{} is not a run directory (no config.json)"):
    """The config a run directory was trained with, and the raw JSON (which holds more)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(missing.format(run_dir))
    raw = json.load(open(path, encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(cls)}
    if raw.get("stage") != cls.__name__ or not names >= set(raw["config"]):
        raise UserError(f"{path} is not a {cls.__name__} run of this version")
    return cls(**raw["config"]), raw


def pick_device(name="auto"):
    """The device a config or flag names; 'auto' prefers CUDA, then MPS, then the CPU."""
    if name == "auto":
        mps = torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    return torch.device(name)


def fast_bf16(device):
    """bf16 pays on CUDA and on CPUs with AMX tiles; with AVX512-BF16 alone it is slower than
    float32 (RESULTS.md, benchmark)."""
    return device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_amx_tile_supported())


def autocast(device, bf16=True):
    """bf16 autocast where it is fast; float32 elsewhere (and with --no-bf16)."""
    if bf16 and fast_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def process_rank():
    """(rank, world size) of this process among torchrun's processes; (0, 1) alone."""
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def draw(fn, shape, generator, device, **kw):
    """fn (torch.rand or torch.randn) for every row of the global batch, then this process's
    rows of it (batch[rank::world]): the processes draw the same numbers from one seed, so a
    run is the same on one process or eight, and resumes on any number of them."""
    rank, world = process_rank()
    return fn((shape[0] * world, *shape[1:]), generator=generator, device=device, **kw)[rank::world]


@functools.cache
def hub_online(timeout=3.0):
    """Whether the model hub answers, asked once: offline, a load by name then costs one line
    rather than a storm of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    with contextlib.suppress(OSError):
        if not constants.HF_HUB_OFFLINE:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            return True
    return False


def from_hub(load, name, what):
    """load(name): a hub name or a local folder; offline, a name loads from the cache only."""
    offline = not os.path.exists(name) and not hub_online()
    try:
        return load(name, local_files_only=True) if offline else load(name)
    except Exception as e:
        reason = "the hub is unreachable and it is not cached" if offline else str(e)
        raise UserError(f"cannot load {what} '{name}': {reason.splitlines()[0][:200]}")


# ==========================================================================================
# 2. Data: one loader for local files, folders of splits, and hub data sets


@dataclass
class Split:
    texts: list
    labels: list | None = None
    sources: list | None = None

    def take(self, idx):
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]
        return Split(pick(self.texts), pick(self.labels), pick(self.sources))


DATA_EXTENSIONS = (".txt", ".jsonl", ".csv", ".json")


def read_rows(path):
    """Rows (dicts) of a local .txt, .jsonl, .csv or ROCStories-style .json file (JSON lines)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in DATA_EXTENSIONS:
        raise UserError(f"{path}: unsupported file type '{ext}' (use {', '.join(DATA_EXTENSIONS)})")
    try:
        with open(path, encoding="utf-8") as f:
            if ext == ".csv":
                return list(csv.DictReader(f))
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    if ext == ".txt":
        return [{"text": line.rstrip("\n")} for _, line in lines]
    rows = []
    for i, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i} is not JSON ({e.msg})")
        rows.append({"text": obj[0]} if isinstance(obj, list) and len(obj) == 1 else obj)
    return rows


def read_texts(path, what):
    """Texts of a .txt file (one per line) or a .jsonl file ({"text": ...} per line)."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    return [str(r["text"]).strip() for r in read_rows(path) if str(r.get("text", "")).strip()]


SPLIT_NAMES = dict(train="train", valid="val", dev="val", validation="val", test="test")
DATA_HINTS = {  # where the presets' local folders come from
    "data/demo": " (write it with: python evaluate.py demo-data)",
    "data/roc": " (put Diffusion-LM's roc_train.json and roc_valid.json there)",
    "data/qqp": " (put DiffuSeq's QQP train.jsonl, valid.jsonl and test.jsonl there)",
}


def split_files(folder):
    """{split: file} of a folder of train / valid (dev, validation) / test files; a prefix
    before '_' is allowed (Diffusion-LM's roc_train.json)."""
    found = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext in DATA_EXTENSIONS and stem.split("_")[-1] in SPLIT_NAMES:
            found[SPLIT_NAMES[stem.split("_")[-1]]] = os.path.join(folder, f)
    return found


def load_hub(cfg: TrainConfig, path):
    """{split: rows} of a hub data set NAME[:CONFIG] (or a local folder in the hub's layout).
    A set that still ships a loading script (which datasets 4 and later refuse) is read from
    the hub's automatic Parquet conversion (the paper notes, §10)."""
    import datasets

    name, _, config = path.partition(":")
    try:
        try:
            ds = datasets.load_dataset(name, config or None)
        except Exception as e:
            if "script" not in str(e).lower():
                raise
            ds = datasets.load_dataset(name, config or None, revision="refs/convert/parquet")
        names = dict(train=cfg.train_split, val=cfg.val_split, test=cfg.test_split)
        return {k: list(ds[split]) for k, split in names.items() if split}
    except Exception as e:
        reason = str(e).splitlines()[0][:200]
        raise UserError(f"cannot load data set '{path}' ({reason}); a local file or folder works")


def load_rows(cfg: TrainConfig):
    """{split: rows} for cfg.data: 'all' (a single file), or 'train' with 'val' and/or 'test'."""
    if os.path.isfile(cfg.data):
        return {"all": read_rows(cfg.data)}
    if os.path.isdir(cfg.data) and (files := split_files(cfg.data)):
        if "train" not in files:
            raise UserError(f"data directory {cfg.data} has no train.txt/.jsonl/.csv/.json")
        return {k: read_rows(f) for k, f in files.items()}
    if os.path.isdir(cfg.data.partition(":")[0]):  # a local copy in the hub's layout
        return load_hub(cfg, cfg.data)
    if cfg.data.endswith(DATA_EXTENSIONS) or cfg.data.startswith((".", "/", "data/")):
        hint = DATA_HINTS.get(os.path.normpath(cfg.data), "")
        raise UserError(f"data file or folder not found: {cfg.data}{hint}")
    if not hub_online():
        raise UserError(f"data set '{cfg.data}': the hub is unreachable (a local file works)")
    return load_hub(cfg, cfg.data)


MAX_CHARS_PER_TOKEN = 100  # a text longer than this many characters per token is a format error


def to_split(cfg: TrainConfig, rows):
    """The text, label and source columns of rows, without rows of empty text."""
    if not rows:
        raise UserError(f"data set '{cfg.data}' is empty")
    for col in filter(None, (cfg.text_column, cfg.label_column, cfg.source_column)):
        if col not in rows[0]:
            columns = ", ".join(map(str, rows[0]))
            raise UserError(f"data '{cfg.data}' has no column '{col}' (columns: {columns})")
    from transformers import PreTrainedTokenizerBase

    clean = lambda t: t
    if cfg.clean_text:  # the official preparation's cleanup (a method that reads no state)
        clean = functools.partial(PreTrainedTokenizerBase.clean_up_tokenization, None)
    split = Split([clean(str(r[cfg.text_column]).strip()) for r in rows])
    if cfg.label_column:
        try:
            split.labels = [int(r[cfg.label_column]) + cfg.label_offset for r in rows]
        except (TypeError, ValueError):
            raise UserError(f"column '{cfg.label_column}' must hold integer class labels")
    if cfg.source_column:
        split.sources = [clean(str(r[cfg.source_column]).strip()) for r in rows]
    keep = [i for i, t in enumerate(split.texts) if t]  # empty lines carry no text to learn
    if not keep:
        raise UserError(f"'{cfg.data}' has no non-empty text in column '{cfg.text_column}'")
    if max(map(len, split.texts)) > MAX_CHARS_PER_TOKEN * cfg.max_len:  # not one text per line
        raise UserError(f"a text of '{cfg.data}' is far over --max_len {cfg.max_len} tokens")
    return split.take(keep)


def load_data(cfg: TrainConfig):
    """Train/validation/test Splits of cfg.data. A split that the data lacks is cut, as the
    official code cuts it (§10), from a permutation by split_seed (the one `datasets` draws
    for its shuffles): validation from train; test from validation (ROCStories); both from
    a single file."""
    splits = {k: to_split(cfg, rows) for k, rows in load_rows(cfg).items()}

    def cut(split, parts):  # `parts` pieces of num_eval texts, then the rest
        idx = np.random.default_rng(cfg.split_seed).permutation(len(split.texts)).tolist()
        n = min(cfg.num_eval, len(idx) // (parts + 1))  # at most an even share of a small set
        if n == 0:
            raise UserError(f"'{cfg.data}' is too small ({len(idx)} texts) to hold out texts")
        pieces = [idx[i * n : (i + 1) * n] for i in range(parts)] + [idx[parts * n :]]
        return [split.take(p) for p in pieces]

    train = splits.get("train") or splits["all"]
    if "val" in splits and "test" in splits:
        val, test = splits["val"], splits["test"]
    elif "val" in splits:
        val, test = cut(splits["val"], 1)
    elif "test" in splits:
        val, train = cut(train, 1)
        test = splits["test"]
    else:
        val, test, train = cut(train, 2)
    if cfg.max_train:
        train = train.take(range(min(cfg.max_train, len(train.texts))))
    if train.labels is not None and min(train.labels) < 0:
        raise UserError(f"labels must be 0..C-1; found {min(train.labels)} (see --label_offset)")
    return dict(train=train, val=val, test=test)


# ==========================================================================================
# 3. Language models: a pretrained BART/T5 by name or folder, or a tiny random one


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE trained on the training texts (the `tokenizers` library does the work)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False)
    trainer.special_tokens, trainer.initial_alphabet = specials, alphabet
    bpe.train_from_iterator(texts, trainer)
    bos_eos = [("<s>", 0), ("</s>", 2)]
    bpe.post_processor = processors.TemplateProcessing("<s> $A </s>", special_tokens=bos_eos)
    names = ("bos", "pad", "eos", "unk", "mask")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, **{f"{k}_token": t for k, t in zip(names, specials)}
    )


def tiny_lm(kind, vocab_size, cfg: AEConfig):
    """A small randomly initialised BART ('tiny') or T5 ('tiny-t5'); ids as train_tokenizer's."""
    import transformers as tf

    d, n = cfg.tiny_dim, cfg.tiny_layers
    ids = dict(vocab_size=vocab_size, pad_token_id=1, eos_token_id=2)
    if kind == "tiny-t5":
        shape = dict(d_model=d, d_kv=d // 4, d_ff=4 * d, num_layers=n, num_heads=4)
        config = tf.T5Config(**shape, **ids, dropout_rate=0.0, decoder_start_token_id=1)
        return tf.T5ForConditionalGeneration(config)
    shape = dict(d_model=d, encoder_layers=n, decoder_layers=n, encoder_ffn_dim=4 * d)
    shape |= dict(decoder_ffn_dim=4 * d, encoder_attention_heads=4, decoder_attention_heads=4)
    shape |= dict(max_position_embeddings=max(cfg.max_len, 64) + 2)
    config = tf.BartConfig(**shape, **ids, dropout=0.0, attention_dropout=0.0)
    config.bos_token_id, config.decoder_start_token_id = 0, 2
    return tf.BartForConditionalGeneration(config)


def load_lm(cfg: AEConfig, run_dir=None, texts=None):
    """(lm, tokenizer). A tiny LM is rebuilt from its run's tokenizer (weights: the checkpoint)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if cfg.lm not in ("tiny", "tiny-t5"):
        tok = from_hub(AutoTokenizer.from_pretrained, cfg.lm, "tokenizer")
        lm = from_hub(AutoModelForSeq2SeqLM.from_pretrained, cfg.lm, "language model")
        if not lm.config.is_encoder_decoder:
            raise UserError(f"'{cfg.lm}' is not an encoder-decoder model (BART or T5 style)")
        return lm, tok
    tok_dir = run_dir and os.path.join(run_dir, "tokenizer")
    if tok_dir and os.path.isdir(tok_dir):
        tok = AutoTokenizer.from_pretrained(tok_dir)
    elif texts is not None:
        tok = train_tokenizer(texts, cfg.tiny_vocab)
    else:
        raise UserError(f"run directory {run_dir} has no tokenizer/ for its tiny LM")
    torch.manual_seed(cfg.seed)
    return tiny_lm(cfg.lm, len(tok), cfg), tok


def tokenize(tok, texts, max_len, warn=None):
    """Pad/truncate to max_len. warn: the flag that sets max_len, to report truncated texts."""
    texts = list(texts)
    enc = tok(texts, max_length=max_len, truncation=True, padding="longest", return_tensors="pt")
    if warn and (n := sum(len(ids) > max_len for ids in tok(texts)["input_ids"])):
        msg = f"{n} of {len(texts)} texts are longer than --{warn} {max_len} tokens"
        print(f"warning: {msg} and were truncated", file=sys.stderr)
    return enc["input_ids"], enc["attention_mask"].bool()


# ==========================================================================================
# 4. Language autoencoder (§3.1): compression f_φ (C1-C3), reconstruction g_φ (R1-R2)


class Attention(nn.Module):
    """Multi-head attention with query-key RMSNorm (C1), by scaled_dot_product_attention."""

    def __init__(self, dim, heads, context_dim=None, qk_norm=True, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        # (C1) RMSNorm on queries and keys: trains at a larger learning rate
        self.q_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x, context=None, mask=None):  # mask: (B, L_kv), True where visible
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        kv = rearrange(self.to_kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        q, k, v = q, kv[0], kv[1]
        if q.is_cpu:  # CPU attention kernels are slow in bf16 (RESULTS.md): run it in float32
            q, k, v = q.float(), k.float(), v.float()
        q, k = self.q_norm(q), self.k_norm(k)
        if mask is not None:
            mask = mask[:, None, None, :]  # (B, 1, 1, L_kv): over heads and queries
        p = self.dropout if self.training else 0.0
        with torch.autocast("cpu", enabled=False):  # keeps that float32; CUDA's is untouched
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-LN block: qk-norm attention, GELU feed-forward. mode 'self': x attends to x;
    'cross': to a context; 'both': to [x ; context] (the Perceiver layer of C1)."""

    def __init__(self, dim, heads, mode="self"):
        super().__init__()
        self.mode = mode
        self.ln, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_ctx = nn.LayerNorm(dim) if mode != "self" else None
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, context=None, mask=None):
        q = self.ln(x)
        kv = q if self.mode == "self" else self.ln_ctx(context)
        kv = torch.cat([q, kv], 1) if self.mode == "both" else kv
        x = x + self.attn(q, kv, mask)
        return x + self.ff(self.ln_ff(x))


def on_sphere(x):
    """(C3) ‖x_i‖² = d_ae, the expected squared norm of N(0, I) noise."""
    return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


class Compressor(nn.Module):
    """(C1-C3) f_φ: ℓ learned queries read the LM encoder states into ℓ × d_ae latents."""

    def __init__(self, d_lm, cfg: AEConfig, c3=True):
        super().__init__()
        d = cfg.ae_dim
        self.queries = nn.Parameter(torch.randn(cfg.num_latents, d) * 0.02)  # Z ∈ R^{ℓ×d}
        self.in_proj = nn.Linear(d_lm, d) if d_lm != d else nn.Identity()
        self.pos = nn.Parameter(torch.randn(cfg.max_len, d) * 0.02)  # (C1) added to E(w)
        self.layers = nn.ModuleList(Block(d, cfg.ae_heads, "both") for _ in range(cfg.enc_layers))
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.d_ae))  # (C2) to d_ae
        self.c3 = c3

    def forward(self, h, mask):  # h: (B, L, d_lm) LM encoder states, mask: (B, L)
        h = self.in_proj(h) + self.pos[: h.shape[1]]
        z = repeat(self.queries, "l d -> b l d", b=h.shape[0])
        queries_visible = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        kv_mask = torch.cat([queries_visible, mask], 1)
        for layer in self.layers:
            z = layer(z, h, kv_mask)  # (C1) Z += MHA(Z, [Z; E(w)]), Z += FF(Z)
        x = self.out(z)  # (B, ℓ, d_ae)
        return on_sphere(x) if self.c3 else x


class Reconstructor(nn.Module):
    """(R1) g_φ: Linear d_ae → d, learned positions, pre-LN transformer, projection to d_LM.
    With `readout` (LDLM joint runs, J1) learned token positions cross-attend to g_φ(x) to
    regress the frozen LM's states E(w) ∈ R^{L×d_LM}, which the LM decoder reads as E(w)."""

    def __init__(self, d_lm, cfg: AEConfig, readout=False):
        super().__init__()
        d = cfg.ae_dim
        self.in_proj = nn.Linear(cfg.d_ae, d)
        self.pos = nn.Parameter(torch.randn(cfg.num_latents, d) * 0.02)
        self.body = nn.ModuleList(Block(d, cfg.ae_heads) for _ in range(cfg.dec_layers))
        to_lm = nn.Linear(d, d_lm) if d_lm != d else nn.Identity()
        self.out = nn.Sequential(nn.LayerNorm(d), to_lm)
        self.readout_pos = self.readout = None
        if readout:
            self.readout_pos = nn.Parameter(torch.randn(cfg.max_len, d_lm) * 0.02)
            self.readout = nn.ModuleList(Block(d_lm, cfg.ae_heads, "cross") for _ in range(2))

    def forward(self, x):  # (B, ℓ, d_ae) -> (B, ℓ, d_lm), or (B, max_len, d_lm) with readout
        g = self.in_proj(x) + self.pos
        for block in self.body:
            g = block(g)
        g = self.out(g)
        if self.readout is None:
            return g
        h = repeat(self.readout_pos, "l d -> b l d", b=x.shape[0])
        for block in self.readout:
            h = block(h, g)
        return h


OFFICIAL_DECODE = dict(num_beams=4, repetition_penalty=1.2, no_repeat_ngram_size=3)


class LatentAutoencoder(nn.Module):
    """w → E(w) → x = f_φ(E(w)) → g_φ(x) → D(·) ≈ w  (§3.1, R2)."""

    def __init__(self, lm, tok, cfg: AEConfig):
        super().__init__()
        self.lm, self.tok, self.cfg = lm, tok, cfg
        d_lm = lm.config.d_model
        # (C3) on for BART, off for T5, as in the paper, unless --norm_latents says otherwise
        self.c3 = cfg.norm_latents == "on" or (
            cfg.norm_latents == "auto" and lm.config.model_type != "t5"
        )
        self.compressor = Compressor(d_lm, cfg, self.c3)
        self.reconstructor = Reconstructor(d_lm, cfg)
        self.lm.requires_grad_(cfg.lm_mode == "ft")
        self.save_lm = cfg.lm_mode == "ft"  # a frozen pretrained LM reloads by name

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if self.save_lm or not k.startswith("lm.")}

    def lm_states(self, ids, mask):
        """E(w). A frozen LM's encoder is a fixed function: no dropout, no gradient, so that E(w)
        can be computed once. The official code runs the whole frozen LM in training mode (its
        encoder under no_grad): its decoder's dropout stays on while g_φ trains, as here."""
        frozen = self.cfg.lm_mode == "freeze" or bool(self.cfg.init_from)
        encoder = self.lm.get_encoder().train(self.training and not frozen)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def encode(self, ids, mask):  # (B, L) -> (B, ℓ, d_ae)
        return self.compressor(self.lm_states(ids, mask), mask)

    def decoder_loss(self, h, ids, mask):
        """(R2) token cross-entropy of D cross-attending to all positions of h, and accuracy."""
        from transformers.modeling_outputs import BaseModelOutput

        labels = ids.masked_fill(~mask, -100)  # padding is not a target
        out = self.lm(encoder_outputs=BaseModelOutput(last_hidden_state=h), labels=labels)
        hit = (out.logits.argmax(-1) == labels) & mask
        loss, world = out.loss, process_rank()[1]
        if world > 1 and torch.is_grad_enabled():  # in training, under torchrun: each process's
            # mean reweighted by its token count, so that DDP's average of the gradients is the
            # mean over every token of the global batch, as on one process
            n = mask.sum().float()
            total = n.clone()
            torch.distributed.all_reduce(total)
            loss = loss * n * world / total
        return loss, hit.sum() / mask.sum()

    def noised(self, x, std, generator=None):
        """(J4) noise on the latents the decoder reads, in training only."""
        if not (self.training and std):
            return x
        return x + std * draw(torch.randn, x.shape, generator, x.device)

    def forward(self, ids, mask, generator=None, h=None):  # h: E(w) when cached (frozen LM)
        h = self.lm_states(ids, mask) if h is None else h
        x = self.noised(self.compressor(h, mask), self.cfg.latent_noise, generator)
        return self.decoder_loss(self.reconstructor(x), ids, mask)

    @torch.no_grad()
    def generate(self, x, max_length=64, **decode):
        """Text from latents: g_φ(x), then the LM decoder's beam search (§3.2), with the
        official code's settings unless `decode` overrides them."""
        from transformers.modeling_outputs import BaseModelOutput

        h = BaseModelOutput(last_hidden_state=self.reconstructor(x))
        ones = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)  # every latent
        decode = OFFICIAL_DECODE | decode
        out = self.lm.generate(
            encoder_outputs=h, attention_mask=ones, max_length=max_length, **decode
        )
        return [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]


# ==========================================================================================
# 5. Denoising network (§3.2): pre-LN transformer, GeGLU, α-conditioning (T1), long skips


class GEGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class DenoiserBlock(nn.Module):
    """Self-attention, optional cross-attention to the source (G2), and a GeGLU feed-forward
    whose output passes a zero-initialised adaptive LayerNorm driven by the time embedding."""

    def __init__(self, dim, heads, dropout, time_dim, context_dim=0):
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=False, dropout=dropout)
        self.ln_cross = self.cross = None
        if context_dim:  # (G2) cross-attention after every self-attention
            self.ln_cross = nn.LayerNorm(dim)
            self.cross = Attention(dim, heads, context_dim, qk_norm=False, dropout=dropout)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, 8 * dim), GEGLU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.ln_ada = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(time_dim, 2 * dim)  # (T1) scale and shift from the time embedding
        nn.init.zeros_(self.ada.weight)  # identity modulation at initialisation
        nn.init.zeros_(self.ada.bias)

    def forward(self, h, temb, context=None, context_mask=None):
        h = h + self.attn(self.ln_attn(h))
        if self.cross is not None:
            h = h + self.cross(self.ln_cross(h), context, context_mask)
        scale, shift = rearrange(self.ada(temb), "b (two d) -> two b 1 d", two=2)
        return h + self.ln_ada(self.ff(self.ln_ff(h))) * (1 + scale) + shift  # (T1)


def sinusoidal(x, dim, max_period=10_000):
    """Sinusoidal features of one scalar per sample; x: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[:, None] * freqs[None] * 1000  # α ∈ [0, 1] stretched to a timestep range
    return torch.cat([args.sin(), args.cos()], -1)


class Denoiser(nn.Module):
    """The x̂-network of §3.2. Reads z_t and the self-conditioning estimate (S2); returns the
    raw prediction in the configured parameterisation (v, ε or x0; D3)."""

    def __init__(self, cfg: DiffConfig, num_latents, d_ae, num_classes=0, context_dim=0):
        super().__init__()
        d, time_dim = cfg.dim, 4 * cfg.dim
        self.in_proj = nn.Linear(2 * d_ae, d)  # over [z_t ; x̂_prev]
        self.pos = nn.Parameter(torch.randn(num_latents, d) * 0.02)
        self.null_self_cond = nn.Parameter(torch.randn(num_latents, d_ae) * 0.02)  # (S2) ∅
        self.time_mlp = nn.Sequential(  # (T1)
            nn.Linear(d, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        self.time_to_input = nn.Linear(time_dim, d)
        self.num_classes = num_classes
        self.class_emb = self.null_context = None
        if num_classes:  # (G1) index C is the null label y_∅
            self.class_emb = nn.Embedding(num_classes + 1, time_dim)
        if context_dim:  # (G2) the null source
            self.null_context = nn.Parameter(torch.randn(context_dim) * 0.02)
        self.blocks = nn.ModuleList(
            DenoiserBlock(d, cfg.heads, cfg.dropout, time_dim, context_dim)
            for _ in range(cfg.depth)
        )
        self.skips = min(cfg.skips, cfg.depth // 2)
        # U-ViT style long skips: concatenate, then Linear(2d, d)
        self.skip_proj = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(self.skips))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, d_ae)
        nn.init.zeros_(self.out.weight)  # predicts 0 at initialisation
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        z_t,
        alpha,
        x_self=None,
        label=None,
        context=None,
        context_mask=None,
        drop_context=None,
    ):
        """z_t: (B, ℓ, d_ae); alpha: (B,); label: (B,), C = null; context: (B, L_s, d_ctx);
        drop_context: (B,) True where the source is replaced by the null embedding (G2)."""
        if x_self is None:
            x_self = self.null_self_cond.expand_as(z_t)
        else:  # ∅ in the graph with zero weight: every parameter in every step (DDP)
            x_self = x_self + 0 * self.null_self_cond
        temb = self.time_mlp(sinusoidal(alpha, self.pos.shape[1]))  # (T1) embeds α_t, not t
        if self.class_emb is not None:
            if label is None:
                label = torch.full_like(alpha, self.num_classes, dtype=torch.long)
            temb = temb + self.class_emb(label)  # (G1) added to the time embedding
        if self.null_context is not None and drop_context is not None:
            # Every key the null embedding: attention returns its value, as one null token.
            null = self.null_context.to(context.dtype)
            context = torch.where(drop_context[:, None, None], null, context)
            context_mask = context_mask | drop_context[:, None]
        h = self.in_proj(torch.cat([z_t, x_self], -1)) + self.pos
        h = h + self.time_to_input(temb)[:, None]
        skips = []
        for i, block in enumerate(self.blocks):
            depth_from_end = len(self.blocks) - 1 - i
            if depth_from_end < self.skips:  # the last k blocks take the first k, deepest first
                h = self.skip_proj[depth_from_end](torch.cat([h, skips.pop()], -1))
            h = block(h, temb, context, context_mask)
            if i < self.skips:
                skips.append(h)
        return self.out(self.norm(h))


# ==========================================================================================
# 6. Diffusion (§2, App. A): cosine schedule (D4, D5), parameterisations (D3), the loss, J3

ALPHA_EPS = 1e-6  # α_t inside (0, 1): log-SNR and the D2 ratios stay finite at t = 0 and 1


def alpha_cosine(t, scale=1.0):
    """(D4) α_t = cos²(πt/2); (D5) the scaled schedule shifts log-SNR by 2 log s."""
    alpha = torch.cos(t * math.pi / 2) ** 2
    if scale != 1.0:
        log_snr = torch.logit(alpha.clamp(ALPHA_EPS, 1 - ALPHA_EPS))
        alpha = torch.sigmoid(log_snr + 2 * math.log(scale))
    return alpha.clamp(ALPHA_EPS, 1 - ALPHA_EPS)


def pred_to_x0_eps(pred, z_t, alpha, objective):
    """(D3) exact conversions from the network's output to (x̂, ε̂); alpha: (B, 1, 1)."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if objective == "v":
        return a * z_t - s * pred, s * z_t + a * pred
    if objective == "eps":
        return (z_t - s * pred) / a, pred
    return pred, (z_t - a * pred) / s  # x0


def x0_eps_to_pred(x0, eps, alpha, objective):
    """The training target: v = √α ε − √(1−α) x (D3), ε, or x."""
    if objective == "v":
        return alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
    return eps if objective == "eps" else x0


class AdaptiveTime(nn.Module):
    """(J3) Adaptive timesteps: an EMA of the diffusion loss in bins of t; t is drawn with
    density ∝ |dL/dt| (plus a floor), so each stretch of the loss curve gets equal weight
    (CDCD's time warping). A module, so that checkpoints save its buffer like weights."""

    def __init__(self, bins=64, decay=0.99, floor=0.05):
        super().__init__()
        self.bins, self.decay, self.floor = bins, decay, floor
        self.register_buffer("loss", torch.ones(bins))  # flat: uniform t until losses arrive

    def update(self, t, loss):  # t, loss: (B,); no host sync
        idx = (t * self.bins).long().clamp(max=self.bins - 1)
        total = torch.zeros_like(self.loss).index_add_(0, idx, loss.detach().float())
        count = torch.zeros_like(self.loss).index_add_(0, idx, torch.ones_like(total[idx]))
        if process_rank()[1] > 1:  # the whole global batch's statistics, on every process
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        mean = total / count.clamp(min=1)
        ema = self.decay * self.loss + (1 - self.decay) * mean
        self.loss = torch.where(count > 0, ema, self.loss)

    def density(self):
        slope = torch.gradient(self.loss)[0].abs()
        p = slope / slope.sum().clamp(min=1e-12)
        return (1 - self.floor) * p + self.floor / self.bins  # the floor keeps every t

    def sample(self, n, generator=None):  # a bin by the inverse CDF, then a uniform t inside it
        u = draw(torch.rand, (n, 2), generator, self.loss.device)
        bins = torch.searchsorted(self.density().cumsum(0), u[:, 0].contiguous())
        return (bins.clamp(max=self.bins - 1) + u[:, 1]) / self.bins


def diffusion_loss(model, x, cfg: DiffConfig, cond, generator, adaptive=None):
    """(D1, D3, S1) a Monte-Carlo estimate of the diffusion loss: (mean, t, per-sample loss)."""
    B = x.shape[0]
    if adaptive is not None:
        t = adaptive.sample(B, generator)
    else:
        t = draw(torch.rand, (B,), generator, x.device)
    alpha = alpha_cosine(t, cfg.schedule_scale)
    a = alpha[:, None, None]  # (B, 1, 1)
    eps = draw(torch.randn, x.shape, generator, x.device, dtype=x.dtype)
    z_t = a.sqrt() * x + (1 - a).sqrt() * eps  # (D1) z_t ~ q(z_t | x)
    x_self = None
    if cfg.self_cond and torch.rand(()) < 0.5:  # (S1) a host coin: no device sync
        with torch.no_grad():
            x_self = pred_to_x0_eps(model(z_t, alpha, None, **cond), z_t, a, cfg.objective)[0]
    pred = model(z_t, alpha, x_self, **cond).float()
    target = x0_eps_to_pred(x.float(), eps.float(), a, cfg.objective)  # float32 under bf16
    err = (pred - target).abs() if cfg.loss == "l1" else (pred - target) ** 2
    per_sample = err.mean((1, 2))
    return per_sample.mean(), t, per_sample


def drop_conditions(cond, p, num_classes, generator=None):
    """(G1, G2) each sample's class / source replaced by the null one with probability p:
    condition dropout in training (p = 0.1); p = 1 is the unconditional pass of (G3)."""

    def drop(n, device):
        if p >= 1:
            return torch.ones(n, dtype=torch.bool, device=device)
        return draw(torch.rand, (n,), generator, device) < p

    out = dict(cond)
    if "label" in cond:
        label = cond["label"]
        out["label"] = torch.where(drop(len(label), label.device), num_classes, label)
    if "context" in cond:
        out["drop_context"] = drop(cond["context"].shape[0], cond["context"].device)
    return out


# ==========================================================================================
# 7. Sampling (App. A): one loop, two update rules (D6 DDPM, D7 DDIM)


def guided_model_fn(model, cfg: DiffConfig, cond, guidance):
    """The sampler's view of the network: (z_t, α_t, x̂_prev) → (x̂, ε̂), with
    classifier-free guidance (G3) on the raw prediction; both passes in one batched forward."""
    conditional = "label" in cond or "context" in cond

    def fn(z_t, alpha, x_self):  # alpha: a 0-d tensor, made by the sampler (no host copy)
        B = z_t.shape[0]
        alpha = alpha.expand(B)
        if not conditional or guidance == 1.0:  # w = 1 is the conditional model: one pass
            pred = model(z_t, alpha, x_self, **cond)
        elif guidance == 0.0:  # w = 0 is the unconditional model: one pass, null condition
            pred = model(z_t, alpha, x_self, **drop_conditions(cond, 1.0, model.num_classes))
        else:
            full = dict(cond)
            if "context" in cond:
                full["drop_context"] = torch.zeros(B, dtype=torch.bool, device=z_t.device)
            null = drop_conditions(full, 1.0, model.num_classes)
            both = {k: torch.cat([full[k], null[k]]) for k in full}
            x_self = None if x_self is None else torch.cat([x_self, x_self])
            pred = model(torch.cat([z_t, z_t]), torch.cat([alpha, alpha]), x_self, **both)
            pred_c, pred_u = pred.chunk(2)
            pred = guidance * pred_c + (1 - guidance) * pred_u  # (G3)
        return pred_to_x0_eps(pred.float(), z_t, alpha[:, None, None], cfg.objective)

    return fn


def ddpm_update(z_t, x0, eps, a_t, a_s, tau, generator):
    """(D6) ancestral step: the posterior mean μ_Q (D2) at x̂, variance τ²(1 − α_{t|s});
    the official code's variance, with τ = 1."""
    a_ts = a_t / a_s
    mean = (
        a_s.sqrt() * (1 - a_ts) / (1 - a_t) * x0 + a_ts.sqrt() * (1 - a_s) / (1 - a_t) * z_t
    )  # (D2) μ_Q
    noise = torch.randn(z_t.shape, device=z_t.device, generator=generator)
    return mean + tau * (1 - a_ts).sqrt() * noise


def ddim_update(z_t, x0, eps, a_t, a_s, tau, generator):
    """(D7) deterministic: z_s = √α_s x̂ + √(1−α_s) ε̂."""
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


SAMPLERS = {"ddpm": ddpm_update, "ddim": ddim_update}


@torch.no_grad()
def sample_loop(update, model_fn, z, ts, cfg: DiffConfig, generator=None, progress=None):
    """The reverse process over the grid ts (1 → 0). Self-conditioning (S2) feeds each step's
    x̂ to the next; the first step uses ∅. Returns x̂ of the last step (App. A)."""
    x_self = None
    alphas = alpha_cosine(torch.tensor(ts, dtype=torch.float64), cfg.schedule_scale)
    alphas = alphas.to(z.device, z.dtype)  # made once, not per step
    for i in range(len(ts) - 1):
        x0, eps = model_fn(z, alphas[i], x_self if cfg.self_cond else None)
        x_self = x0
        if i == len(ts) - 2:
            break
        z = update(z, x0, eps, alphas[i], alphas[i + 1], cfg.temperature, generator)
        if progress:  # progress(i, z_s, x̂): watch the trajectory (the notebook decodes it)
            progress(i, z, x0)
    return x0


def generate_latents(model, cfg: DiffConfig, n, cond, sampler, steps, guidance, generator):
    """n latents (n, ℓ, d_ae) by the reverse process over a linear grid 1 → 0, `steps` calls."""
    device = model.pos.device
    z = torch.randn((n, *model.null_self_cond.shape), device=device, generator=generator)
    ts = torch.linspace(1, 0, steps + 1).tolist()
    fn = guided_model_fn(model, cfg, cond, guidance)
    with autocast(device, cfg.bf16):
        return sample_loop(SAMPLERS[sampler], fn, z, ts, cfg, generator).float()


# ==========================================================================================
# 8. Training: optimizer, run directories, atomic checkpoints, one loop for every stage


def make_optimizer(named_params, cfg: TrainConfig, device, fused=True):
    """AdamW, no weight decay on biases, norms and other 1-D parameters (Table 14)."""
    params = [p for _, p in named_params if p.requires_grad]
    decay = dict(params=[p for p in params if p.ndim >= 2], weight_decay=cfg.weight_decay)
    no_decay = dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)
    fused = fused and device.type == "cuda"
    return torch.optim.AdamW([decay, no_decay], lr=cfg.lr, betas=cfg.betas, fused=fused)


def batch_indices(step, n, batch_size, seed):
    """Data order as a pure function of the step: epoch e is a permutation seeded by (seed, e),
    so a resumed run sees exactly the batches an uninterrupted run would."""
    start, idx = step * batch_size, []
    while len(idx) < batch_size:
        epoch, pos = divmod(start + len(idx), n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        idx.extend(torch.randperm(n, generator=g)[pos : pos + batch_size - len(idx)].tolist())
    return torch.tensor(idx)


def prepare_run_dir(out, resume, overwrite):
    """Never overwrite a run without --overwrite. Returns whether there is a checkpoint to
    resume: a run killed before its first checkpoint restarts from step 0 under --resume."""
    if resume:
        if any(os.path.isfile(os.path.join(out, n, "state.pt")) for n in ("ckpt", "ckpt.old")):
            return True
        print(f"--resume: {out} has no checkpoint yet; starting from step 0", file=sys.stderr)
        shutil.rmtree(os.path.join(out, "ckpt.tmp"), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, "metrics.jsonl"))
        return False
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise UserError(f"run directory {out} exists; pass --resume or --overwrite")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    return False


def write_json(path, obj):
    """Atomic: a temporary file, then a rename."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def save_checkpoint(run_dir, weights: dict, train_state: dict):
    """Write ckpt.tmp/ whole, then swap it in by renames: a kill at any moment leaves ckpt/ or
    ckpt.old/ whole. weights: file stem -> module (safetensors); the rest in state.pt."""
    tmp, cur, old = (os.path.join(run_dir, n) for n in ("ckpt.tmp", "ckpt", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)  # a ckpt.tmp/ left by a kill is stale
    os.makedirs(tmp)
    for stem, module in weights.items():  # save_model stores tied weights once
        save_model(module, os.path.join(tmp, f"{stem}.safetensors"))
    torch.save(train_state, os.path.join(tmp, "state.pt"))
    if os.path.isdir(cur):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(cur, old)
    os.rename(tmp, cur)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run_dir):
    for name in ("ckpt", "ckpt.old"):  # ckpt.old is whole if a kill fell between the renames
        if os.path.isfile(os.path.join(run_dir, name, "state.pt")):
            return os.path.join(run_dir, name)
    raise UserError(f"{run_dir} has no checkpoint")


def load_weights(module, path):
    """A safetensors checkpoint into module; a mismatch is a one-line error. LM keys may be
    absent: tied copies are stored once, a frozen pretrained LM not at all."""
    try:
        missing, unexpected = module.load_state_dict(load_file(path), strict=False)
    except Exception as e:  # an unreadable file, or a tensor of another shape
        reason = str(e).splitlines()[0][:100]
        raise UserError(f"checkpoint {path} is unreadable or does not fit this model ({reason})")
    if unexpected or [k for k in missing if not k.startswith("lm.")]:
        raise UserError(f"checkpoint {path} does not match this model's config")


@contextlib.contextmanager
def figure(path, ncols=1, size=(6, 3.5)):
    """A headless matplotlib figure, saved to path when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=size)
    yield ax
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(run_dir, keys=("loss", "val_loss")):
    """Loss curves of metrics.jsonl to loss.png (log-scale y)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    with figure(os.path.join(run_dir, "loss.png")) as ax:
        for key in keys:
            if points := [(r["step"], r[key]) for r in rows if key in r]:
                ax.plot(*zip(*points), label=key, marker="o" if "val" in key else None, ms=3)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=os.path.basename(run_dir))
        ax.legend()


def setup_distributed(device):
    """(rank, world size): joins the torchrun process group (NCCL on GPUs, gloo on the CPU)
    when WORLD_SIZE > 1, else (0, 1)."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # all ranks done, then destroy: a rank that exits first can abort gloo
        atexit.register(lambda: (dist.barrier(), dist.destroy_process_group()))
    return process_rank()


def on_rank0(fn, *args):
    """fn(*args) on rank 0 only (run directories, config files), the others waiting: its
    result, or its error, reaches every process, so that a bad flag never leaves one hanging."""
    rank, world = process_rank()
    out = [None, None]
    if rank == 0:
        try:
            out[0] = fn(*args)
        except UserError as e:
            out[1] = str(e)
    if world > 1:
        torch.distributed.broadcast_object_list(out, src=0)
    if out[1] is not None:
        raise UserError(out[1])
    return out[0]


def to_device(x, device, dtype=None):
    """A host tensor on the device without stalling the host: from pinned memory on CUDA."""
    if device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, dtype, non_blocking=True)


def train_loop(cfg, run_dir, model, loss_fn, validate, device, resume, weights, ema=None):
    """The flat loop every stage shares; loss_fn(step, idx, generator, net) -> (loss, logs).
    1. AdamW; warmup, then linear decay (cosine with an EMA) ending at --steps or the budget; DDP
    2. resume: weights (EMA and J3 state too), optimizer, scheduler, step, RNG states
    3. each step: this rank's share of the global batch, loss, backward, clip, step, EMA,
       with no host sync outside log steps
    4. log steps: metrics reduced across ranks; a NaN/inf stops before anything is saved
    5. eval steps, the time budget, signals and the end: validation, atomic checkpoint."""
    import transformers

    rank, world = setup_distributed(device)
    if cfg.batch_size % world:
        raise UserError(f"--batch_size {cfg.batch_size} must divide among {world} processes")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model.named_parameters(), cfg, device)  # 1.
    kind = "cosine" if ema else "linear"
    sched = transformers.get_scheduler(kind, opt, min(cfg.warmup, cfg.steps), cfg.steps)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    gen = torch.Generator(device).manual_seed(cfg.seed)  # t, ε: the same on every process (draw)
    step = 0
    if resume:  # 2.
        ck = checkpoint_dir(run_dir)
        for stem, module in weights.items():
            load_weights(module, os.path.join(ck, f"{stem}.safetensors"))
        try:  # tensors and plain values only: a run directory from elsewhere runs no code
            st = torch.load(os.path.join(ck, "state.pt"), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{ck}/state.pt is not a plain checkpoint ({type(e).__name__})")
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = st["step"]
        gen.set_state(st["generator"])  # any process count continues the same streams (draw)
        torch.set_rng_state(st["torch_rng"])
        if rank == 0:
            print(f"resumed from {ck} at step {step}", file=sys.stderr)
    stop, t_start = {}, time.time()
    for sig in (signal.SIGINT, signal.SIGTERM):  # checkpoint, then exit, after this step
        signal.signal(sig, lambda signum, frame: stop.setdefault("signal", signum))
    bad = torch.zeros((), dtype=torch.bool, device=device)  # sticky "a loss was non-finite"
    desc = f"train {os.path.basename(run_dir)}"
    pbar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=rank > 0)
    acc, n_acc, t_log, clock = {}, 0, time.time(), 0  # clock: --steps × the budget's share used

    def log(row):
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint(reason):
        if bad.item():
            raise UserError(f"non-finite loss at or before step {step}; stopped unsaved")
        if rank > 0:
            return
        val = validate() if validate else {}
        log(dict(step=step, **val, time=round(time.time() - t_start, 1)))
        state = dict(step=step, generator=gen.get_state(), torch_rng=torch.get_rng_state())
        state.update(optimizer=opt.state_dict(), scheduler=sched.state_dict())
        save_checkpoint(run_dir, weights, state)
        plot_curves(run_dir)
        floats = " ".join(f"{k}={v:.4g}" for k, v in val.items() if isinstance(v, float))
        tqdm.write(f"step {step}: checkpoint ({reason}) {floats}")

    if ema is not None:  # (EMA copy, live module, decay)
        ema_params, live_params = list(ema[0].parameters()), list(ema[1].parameters())
    model.train()
    while step < cfg.steps:
        batch = batch_indices(step, loss_fn.num_rows, cfg.batch_size, cfg.seed)
        with autocast(device, cfg.bf16):
            loss, logs = loss_fn(step, batch[rank::world], gen, net)  # 3. this rank's share
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        bad |= ~torch.isfinite(loss)
        opt.step()
        if step > cfg.warmup:  # the decay runs on the budget's clock when that is ahead
            sched.last_epoch = max(sched.last_epoch, min(clock, cfg.steps) - 1)
        sched.step()
        if ema is not None:  # ema += (1 - decay)(live - ema), on the device
            torch._foreach_lerp_(ema_params, live_params, 1 - ema[2])
        step += 1
        for k, v in logs.items():
            acc[k] = acc.get(k, 0) + v.detach().float()
        n_acc += 1
        pbar.update(1)
        log_step = step % cfg.log_every == 0 or step == cfg.steps
        if log_step:  # 4.
            elapsed = torch.tensor(time.time() - t_start, device=device)
            stats = torch.stack([bad.float(), elapsed, *acc.values()])
            if world > 1:
                torch.distributed.all_reduce(stats)
                stats[1:] /= world
            if stats[0].item():
                raise UserError(f"non-finite loss at or before step {step}; stopped unsaved")
            clock = int(cfg.steps * float(stats[1]) / (60 * (cfg.time_budget or math.inf)))
            means = {k: round(float(v) / n_acc, 5) for k, v in zip(acc, stats[2:])}
            speed = round(n_acc / (time.time() - t_log), 2)
            log(dict(step=step, **means, lr=sched.get_last_lr()[0], steps_per_s=speed))
            pbar.set_postfix(loss=f"{means['loss']:.4f}", it_s=speed)
            acc, n_acc, t_log = {}, 0, time.time()
        budget = bool(cfg.time_budget) and time.time() - t_start > 60 * cfg.time_budget
        halt = dict(budget=budget, signal=bool(stop))
        if world > 1 and not log_step:  # every process stops at the same step: a log step
            halt = dict.fromkeys(halt, False)
        elif world > 1:
            flags = torch.tensor(list(halt.values()), dtype=torch.float32, device=device)
            torch.distributed.all_reduce(flags)
            halt = dict(zip(halt, (flags > 0).tolist()))
        if step % cfg.eval_every == 0 or step == cfg.steps or any(halt.values()):  # 5.
            model.eval()
            checkpoint("signal" if halt["signal"] else "time budget" if halt["budget"] else "eval")
            model.train()
            if halt["signal"]:
                msg = f"stopped by signal {stop.get('signal', 'on another process')} at step {step}"
                raise Interrupted(f"{msg}; checkpoint saved, continue with --resume")
            if halt["budget"]:
                break
    pbar.close()
    model.eval()
    return step, time.time() - t_start


@torch.no_grad()
def encode_all(fn, ids, mask, device, bf16=True, chunk=256):
    """fn(ids, mask) of every row, once, on the device in float32: the latents x of a frozen
    autoencoder (fn = ae.encode), which the denoiser then reads."""
    out = []
    for i in tqdm(range(0, len(ids), chunk), desc="encoding", leave=False):
        L = int(mask[i : i + chunk].sum(1).max())  # each chunk trimmed to its longest text
        with autocast(device, bf16):
            out.append(fn(ids[i : i + chunk, :L].to(device), mask[i : i + chunk, :L].to(device)))
    return torch.cat(out).float()


@torch.no_grad()
def cache_states(fn, ids, mask, width, device, gb, path=None, bf16=True, chunk=256):
    """The states fn(ids, mask) ∈ R^{L×width} of a frozen encoder (E(w) of the LM, or of the
    sources), once, in bf16 and zero-padded to the full length: in pinned host memory up to
    `gb` GB; above it (or with several processes) in a memory-mapped file at `path`, which the
    processes share, each encoding its own chunks; None when neither is allowed."""
    rank, world = process_rank()
    shape = (len(ids), ids.shape[1], width)
    n = math.prod(shape)
    if n * 2 / 2**30 <= gb and world == 1:
        store = torch.empty(shape, dtype=torch.bfloat16, pin_memory=device.type == "cuda")
    elif path and gb > 0:
        if rank == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # a stale cache
            torch.from_file(path, shared=True, size=n, dtype=torch.bfloat16)  # the file, sized
        if world > 1:
            torch.distributed.barrier()
        store = torch.from_file(path, shared=True, size=n, dtype=torch.bfloat16).view(shape)
    else:
        print(
            f"states: {n * 2 / 2**30:.2f} GB over {gb} GB: encoded at every step", file=sys.stderr
        )
        return None
    starts = range(rank * chunk, len(ids), chunk * world)  # this process's chunks
    for i in tqdm(starts, desc="caching", leave=False, disable=rank > 0):
        L = int(mask[i : i + chunk].sum(1).max())  # each chunk trimmed to its longest text
        with autocast(device, bf16):
            y = fn(ids[i : i + chunk, :L].to(device), mask[i : i + chunk, :L].to(device))
        store[i : i + chunk] = F.pad(y, (0, 0, 0, shape[1] - L)).to("cpu", torch.bfloat16)
    if world > 1:
        torch.distributed.barrier()  # every chunk written before any process reads
    return store


# ------------------------------------------------------------------------------------------
# Stage 1: the language autoencoder (§3.1)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def rouge(hyp, refs):
    """ROUGE-1/2/L F1 of the `rouge-score` package, as the paper's evaluation (no stemming);
    with several references (E2E) the best one counts."""
    scores = _rouge_scorer().score_multi([refs] if isinstance(refs, str) else list(refs), hyp)
    return {k: scores[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


def build_autoencoder(cfg: AEConfig, run_dir=None, texts=None):
    lm, tok = load_lm(cfg, run_dir, texts)
    torch.manual_seed(cfg.seed)
    return LatentAutoencoder(lm, tok, cfg)


def load_autoencoder(run_dir, device, weights="ae"):
    """A trained autoencoder run (config, tokenizer, weights), ready to encode and decode."""
    cfg = load_config(AEConfig, run_dir)[0]
    ae = build_autoencoder(cfg, run_dir)
    load_weights(ae, os.path.join(checkpoint_dir(run_dir), f"{weights}.safetensors"))
    return ae.to(device).eval(), cfg


@torch.no_grad()
def ae_reconstruction_metrics(ae, split: Split, cfg: AEConfig, device, max_texts=1000, bs=100):
    """Table 1: token accuracy and loss (teacher forcing), then exact match, BLEU (sacrebleu)
    and ROUGE-L of beam-search reconstructions of held-out texts."""
    import sacrebleu

    texts, hyps, loss, acc = split.texts[:max_texts], [], 0.0, 0.0
    for i in range(0, len(texts), bs):
        ids, mask = (t.to(device) for t in tokenize(ae.tok, texts[i : i + bs], cfg.max_len))
        with autocast(device, cfg.bf16):
            batch_loss, batch_acc = ae(ids, mask)
            hyps += ae.generate(ae.encode(ids, mask), max_length=cfg.max_len + 2)
        loss, acc = loss + float(batch_loss) * len(ids), acc + float(batch_acc) * len(ids)
    # the reference is what the model could see: the text after truncation
    cut = ae.tok(texts, max_length=cfg.max_len, truncation=True)["input_ids"]
    refs = [t.strip() for t in ae.tok.batch_decode(cut, skip_special_tokens=True)]
    m = dict(token_acc=acc / len(texts), loss=loss / len(texts), num_texts=len(texts))
    m["exact_match"] = float(np.mean([h == r for h, r in zip(hyps, refs)]))
    m["bleu"] = sacrebleu.corpus_bleu(hyps, [refs]).score
    m["rouge_l"] = 100 * float(np.mean([rouge(h, r)["rougeL"] for h, r in zip(hyps, refs)]))
    m["examples"] = [dict(text=r, reconstruction=h) for r, h in zip(refs[:5], hyps[:5])]
    return m


def train_ae(cfg: AEConfig, out, resume=False, overwrite=False):
    """§3.1: train f_φ and g_φ (and a fine-tuned LM) with token cross-entropy (R2); with
    --init_from, fine-tune only the decoder side of a trained autoencoder (J4, two-stage)."""
    if cfg.lm.startswith("tiny") and cfg.lm_mode != "ft":
        raise UserError("a tiny random LM must be trained: use --lm_mode ft")
    device = pick_device(cfg.device)
    rank, _ = setup_distributed(device)
    data = load_data(cfg)
    resume = on_rank0(prepare_run_dir, out, resume, overwrite)
    if cfg.lm.startswith("tiny"):  # its BPE, trained once (or taken from --init_from)
        save = lambda tok: tok.save_pretrained(os.path.join(out, "tokenizer"))
        on_rank0(lambda: save(load_lm(cfg, cfg.init_from or out, data["train"].texts)[1]))
    on_rank0(
        write_json, os.path.join(out, "config.json"), dict(stage="AEConfig", config=asdict(cfg))
    )
    ae = build_autoencoder(cfg, out).to(device)
    if cfg.init_from:  # (J4, two-stage) g_φ and D learn to read x + σε; x stays as it was
        load_weights(ae, os.path.join(checkpoint_dir(cfg.init_from), "ae.safetensors"))
        ae.requires_grad_(False)
        ae.reconstructor.requires_grad_(True)
        ae.lm.get_decoder().requires_grad_(cfg.lm_mode == "ft")
        ae.lm.get_input_embeddings().requires_grad_(False)  # shared with the encoder
    ids_all, mask_all = tokenize(ae.tok, data["train"].texts, cfg.max_len, warn="max_len")
    val_ids, val_mask = tokenize(ae.tok, data["val"].texts[:500], cfg.max_len)
    states = None  # E(w) of a frozen LM, once: the speed-up the paper names
    if cfg.lm_mode == "freeze" and not cfg.init_from:
        path, width = os.path.join(out, "lm_states.bin"), ae.lm.config.d_model
        states = cache_states(ae.lm_states, ids_all, mask_all, width, device, cfg.cache_lm, path)
    dtype = next(ae.compressor.parameters()).dtype  # the cache is bf16; the model reads its own

    def loss_fn(step, idx, gen, net):
        L = int(mask_all[idx].sum(1).max())  # the batch trimmed to its longest text
        ids, mask = to_device(ids_all[idx, :L], device), to_device(mask_all[idx, :L], device)
        h = None if states is None else to_device(states[idx, :L], device, dtype)
        loss, acc = net(ids, mask, gen, h)
        return loss, dict(loss=loss, token_acc=acc)

    loss_fn.num_rows = len(ids_all)

    def validate():
        with torch.no_grad(), autocast(device, cfg.bf16):
            loss, acc = ae(val_ids.to(device), val_mask.to(device))
        return dict(val_loss=float(loss), val_token_acc=float(acc))

    step, secs = train_loop(cfg, out, ae, loss_fn, validate, device, resume, {"ae": ae})
    if rank > 0:
        return {}
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "lm_states.bin"))  # a cache, not a result
    metrics = ae_reconstruction_metrics(ae, data["test"], cfg, device)
    metrics.update(steps=step, train_minutes=round(secs / 60, 2), device=str(device))
    metrics["num_train"] = len(data["train"].texts)
    summary = {k: v for k, v in metrics.items() if k != "examples"}
    write_json(os.path.join(out, "eval_ae.json"), metrics)
    write_json(os.path.join(out, "summary.json"), summary)
    print(json.dumps(summary, indent=1))
    return metrics


# ------------------------------------------------------------------------------------------
# Stage 2: the latent denoiser (§3.2), the LDLM joint recipe (J1-J4), decoder fine-tuning


def scale_grad(x, gamma):
    """(J2) the identity in the forward pass; the gradient is multiplied by gamma."""
    return x.detach() + gamma * (x - x.detach())


def joint_gamma(step, warmup):
    """(J2) γ rises from 0 to 1 along a sigmoid centred at warmup/2 (≈0.002 at 0, ≈0.998 at
    warmup)."""
    return 1.0 if warmup <= 0 else 1 / (1 + math.exp(-12 * (step / warmup - 0.5)))


def joint_loss(ae, model, cfg: DiffConfig, ids, mask, cond, gamma, generator, adaptive=None):
    """(J1-J4) One LDLM step: L = w_d·L_diff + w_m·L_mse + w_c·L_ce, the diffusion gradient
    into the encoder scaled by γ (J2), noise on the decoder's input latents (J4)."""
    h = ae.lm_states(ids, mask)  # the frozen E(w): the regression target of J1
    x = ae.compressor(h, mask)
    var = x.detach().float().var(0).mean()  # variance across the batch: near 0 is collapse
    x_diff = scale_grad(x, gamma)  # (J2)
    l_diff, t, per_sample = diffusion_loss(model, x_diff, cfg, cond, generator, adaptive)
    h_hat = ae.reconstructor(ae.noised(x, cfg.decoder_noise, generator))  # (J4), (B, L, d_lm)
    l_mse = F.mse_loss(h_hat.float(), h.float()) if cfg.mse_loss else torch.zeros_like(var)
    # (J1) CE on a stop-gradient of ĥ trains the decoder without shaping the encoder
    l_ce, acc = ae.decoder_loss(h_hat.detach() if cfg.mse_loss else h_hat, ids, mask)
    loss = cfg.diff_weight * l_diff + cfg.mse_weight * l_mse + cfg.ce_weight * l_ce
    logs = dict(loss=loss, diff_loss=l_diff, mse_loss=l_mse, ce_loss=l_ce, token_acc=acc)
    return loss, dict(logs, latent_var=var), t, per_sample


def make_source_encoder(cfg: DiffConfig, ae, device, texts=None, path=None):
    """(G2) The frozen encoder of the source text: the autoencoder's own LM encoder, as in the
    paper. texts: the sources to come (training or sampling): a warning if --max_source_len
    cuts them, and their states cached (cache_states; path: its file). -> (encode, width)."""
    enc = ae.lm.get_encoder().to(device).eval().requires_grad_(False)
    states = torch.no_grad()(lambda ids, m: enc(input_ids=ids, attention_mask=m).last_hidden_state)
    cache, row, dim = None, {}, enc.config.d_model
    if texts is not None:
        ids, mask = tokenize(ae.tok, texts, cfg.max_source_len, warn="max_source_len")
        cache = cache_states(states, ids, mask, dim, device, cfg.cache_sources, path, cfg.bf16)
        row = {s: i for i, s in enumerate(texts)}

    def encode(texts):
        if cache is not None and all(s in row for s in texts):  # sources given up front
            idx = torch.tensor([row[s] for s in texts])
            L = int(mask[idx].sum(1).max())  # trimmed to the batch's longest source
            return to_device(cache[idx, :L], device, torch.float32), to_device(
                mask[idx, :L], device
            )
        ids_, mask_ = (t.to(device) for t in tokenize(ae.tok, texts, cfg.max_source_len))
        return states(ids_, mask_).float(), mask_

    return encode, dim


def build_denoiser(cfg: DiffConfig, ae_cfg: AEConfig, context_dim=0):
    torch.manual_seed(cfg.seed)
    num_classes = cfg.num_classes if cfg.class_cond else 0
    return Denoiser(cfg, ae_cfg.num_latents, ae_cfg.d_ae, num_classes, context_dim)


def batch_condition(cfg, split: Split, idx, encode_source, device):
    """Model keyword arguments for the rows idx: a label (G1) and/or source states (G2)."""
    cond = {}
    if cfg.class_cond:
        cond["label"] = to_device(torch.tensor([split.labels[i] for i in idx]), device)
    if cfg.seq2seq:
        cond["context"], cond["context_mask"] = encode_source([split.sources[i] for i in idx])
    return cond


class JointStep(nn.Module):
    """(J1-J4) The LDLM step as one module, so that DistributedDataParallel wraps all of it."""

    def __init__(self, ae, denoiser, cfg: DiffConfig):
        super().__init__()
        self.ae, self.denoiser, self.cfg = ae, denoiser, cfg

    def forward(self, ids, mask, cond, gamma, generator, adaptive=None):
        return joint_loss(
            self.ae, self.denoiser, self.cfg, ids, mask, cond, gamma, generator, adaptive
        )


def setup_joint(ae, ae_cfg: AEConfig, device):
    """(J1) LDLM's autoencoder: the LM encoder stays frozen (it gives the targets E(w)); the
    compressor and the reconstructor with its token readout start fresh; the LM decoder
    trains if the autoencoder run fine-tuned its LM."""
    d_lm = ae.lm.config.d_model
    ae.compressor = Compressor(d_lm, ae_cfg, ae.c3).to(device)
    ae.reconstructor = Reconstructor(d_lm, ae_cfg, readout=True).to(device)
    ae.lm.requires_grad_(False)
    ae.lm.get_decoder().requires_grad_(ae_cfg.lm_mode == "ft")
    ae.cfg = dataclasses.replace(ae_cfg, lm_mode="freeze")  # E(w) without gradient


def train_diffusion(cfg: DiffConfig, out, resume=False, overwrite=False):
    """§3.2: train the denoiser on cached latents of a trained autoencoder, or (--joint) the
    LDLM recipe: encoder, denoiser and decoder in one step (J1-J4)."""
    if not cfg.ae:
        raise UserError("train needs --ae RUN_DIR of a trained autoencoder (train-ae)")
    if cfg.class_cond and not cfg.label_column or cfg.seq2seq and not cfg.source_column:
        raise UserError("class_cond needs --label_column and seq2seq needs --source_column")
    device = pick_device(cfg.device)
    rank, world = setup_distributed(device)
    ae, ae_cfg = load_autoencoder(cfg.ae, device)
    limit = getattr(ae.lm.config, "max_position_embeddings", None)  # T5: relative, no limit
    if cfg.seq2seq and limit and cfg.max_source_len > limit:
        raise UserError(f"--max_source_len {cfg.max_source_len} > the encoder's {limit} positions")
    data = load_data(cfg)
    train = data["train"]
    if cfg.class_cond:
        cfg.num_classes = max(train.labels) + 1
    resume = on_rank0(prepare_run_dir, out, resume, overwrite)  # after every input check
    ae_dir = os.path.relpath(os.path.abspath(cfg.ae), os.path.abspath(out))
    config = dict(stage="DiffConfig", config=asdict(cfg), ae_dir=ae_dir)
    on_rank0(write_json, os.path.join(out, "config.json"), config)
    encode_source, context_dim = None, 0
    if cfg.seq2seq:
        path = os.path.join(out, "source_states.bin")
        encode_source, context_dim = make_source_encoder(cfg, ae, device, train.sources, path)
    model = build_denoiser(cfg, ae_cfg, context_dim).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  # the EMA of the weights, on the device
    weights = {"denoiser": model, "ema": ema}
    adaptive = None
    if cfg.t_sampling == "adaptive" or (cfg.t_sampling == "auto" and cfg.joint):
        weights["adaptive_t"] = adaptive = AdaptiveTime().to(device)
    ids_all, mask_all = tokenize(ae.tok, train.texts, ae_cfg.max_len, warn="max_len")
    val_ids, val_mask = tokenize(ae.tok, data["val"].texts[:500], ae_cfg.max_len)
    trainable, latents, val_x = model, None, None
    compiled = model  # checkpoints save the raw module
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        compiled = torch.compile(model)
    if cfg.joint:
        setup_joint(ae, ae_cfg, device)
        weights["ae"] = ae
        trainable = JointStep(ae, compiled, cfg)
        pad = ae_cfg.max_len - ids_all.shape[1]  # the readout's decoder reads all positions
        ids_all = F.pad(ids_all, (0, pad), value=ae.tok.pad_token_id)
        mask_all = F.pad(mask_all, (0, pad))
    else:  # the latents once, (N, ℓ, d_ae); joint runs re-encode them at every step
        latents = encode_all(ae.encode, ids_all, mask_all, device, bf16=cfg.bf16)
        val_x = encode_all(ae.encode, val_ids, val_mask, device, bf16=cfg.bf16)
        ae.requires_grad_(False)

    def loss_fn(step, idx, gen, net):
        net = compiled if net is model else net
        cond = batch_condition(cfg, train, idx.tolist(), encode_source, device)
        cond = drop_conditions(cond, cfg.cond_drop, cfg.num_classes, gen)
        if cfg.joint:
            ids, mask = to_device(ids_all[idx], device), to_device(mask_all[idx], device)
            gamma = joint_gamma(step, cfg.warmup_joint)
            loss, logs, t, per_sample = net(ids, mask, cond, gamma, gen, adaptive)
        else:
            x = latents[to_device(idx, device)]
            loss, t, per_sample = diffusion_loss(net, x, cfg, cond, gen, adaptive)
            logs = dict(loss=loss)
        if adaptive is not None:
            adaptive.update(t, per_sample)
        return loss, logs

    loss_fn.num_rows = len(train.texts)

    def validate():
        """Validation loss of the EMA denoiser at fixed noise, and a few decoded samples."""
        g = torch.Generator(device).manual_seed(cfg.seed + 1)
        plain = dataclasses.replace(cfg, self_cond=False)
        with torch.no_grad(), autocast(device, cfg.bf16):
            x = val_x
            if cfg.joint:
                x = ae.encode(val_ids.to(device), val_mask.to(device)).float()
            cond = batch_condition(cfg, data["val"], range(len(x)), encode_source, device)
            val_loss = float(diffusion_loss(ema, x, plain, cond, g)[0])
            cond4 = {k: v[:4] for k, v in cond.items()}
            z = generate_latents(ema, cfg, 4, cond4, "ddim", 50, cfg.guidance, g)
            row = dict(val_loss=val_loss, samples=ae.generate(z, max_length=ae_cfg.max_len + 2))
        if cfg.joint:  # per-dimension variance near 0 across the batch: the latents collapse
            row["latent_var"] = float(x.var(0).mean())
        return row

    step, secs = train_loop(
        cfg, out, trainable, loss_fn, validate, device, resume, weights, (ema, model, cfg.ema_decay)
    )
    if rank > 0:
        return {}
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "source_states.bin"))  # a cache, not a result
    if adaptive is not None:  # the learned (J3) density over t and the loss EMA it came from
        t = (torch.arange(adaptive.bins) + 0.5) / adaptive.bins
        with figure(os.path.join(out, "adaptive_t.png"), ncols=2, size=(8, 3)) as ax:
            ax[0].plot(t, adaptive.loss.cpu())
            ax[0].set(xlabel="t", ylabel="diffusion loss (EMA)")
            ax[1].plot(t, adaptive.density().cpu() * adaptive.bins)
            ax[1].set(xlabel="t", ylabel="sampling density of t")
    summary = dict(steps=step, train_minutes=round(secs / 60, 2), device=str(device))
    summary["num_train"] = len(train.texts)
    summary["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    write_json(os.path.join(out, "summary.json"), summary)
    return summary


# ==========================================================================================
# 9. Generation: a trained run, latents from noise, text by beam search (§3.2), MBR (G4)


@dataclass
class Run:
    """A trained run and its sampling settings: all that sampling needs."""

    cfg: DiffConfig  # its sampler, sample_steps, guidance and temperature are the defaults
    ae: LatentAutoencoder
    ae_cfg: AEConfig
    model: Denoiser  # the EMA weights (compiled on request)
    encode_source: object = None  # (G2) texts -> (states, mask)
    decode: dict = field(default_factory=dict)  # beam-search settings of ae.generate
    batch_size: int = 500  # latents sampled and decoded together
    candidates: int = 1  # (G4) samples per source, one chosen by MBR
    random_latents: bool = False  # the control: N(0, I) latents, no denoiser


def load_run(run_dir, device, compile=False, decoder="", sources=None, **settings):
    """A trained run, ready to sample. decoder: an autoencoder run fine-tuned from the run's
    own with --init_from (J4), to read the latents; sources: to cache their states (G2);
    settings: overrides of the run's sampler, sample_steps, guidance and temperature (None:
    the run's), and Run's sampling fields."""
    cfg, raw = load_config(DiffConfig, run_dir)
    run_fields = {f.name for f in dataclasses.fields(Run)}
    for k, v in settings.items():
        if k not in run_fields and v is not None:
            setattr(cfg, k, v)
    ae_dir = os.path.join(run_dir, raw["ae_dir"])
    if decoder:  # the same latent space, read by another decoder
        base = load_config(AEConfig, decoder)[0].init_from
        if not base or os.path.realpath(base) != os.path.realpath(ae_dir):
            raise UserError(f"--decoder {decoder} was not fine-tuned from {ae_dir} (--init_from)")
    ae, ae_cfg = load_autoencoder(decoder or ae_dir, device)
    ck = checkpoint_dir(run_dir)
    if cfg.joint:
        ae.reconstructor = Reconstructor(ae.lm.config.d_model, ae_cfg, readout=True).to(device)
        load_weights(ae, os.path.join(ck, "ae.safetensors"))
        ae.eval()
    encode_source, context_dim = None, 0
    if cfg.seq2seq:
        encode_source, context_dim = make_source_encoder(cfg, ae, device, sources)
    model = build_denoiser(cfg, ae_cfg, context_dim).to(device).eval()
    load_weights(model, os.path.join(ck, "ema.safetensors"))
    if compile and device.type == "cuda":
        model = torch.compile(model)
    run_settings = {k: v for k, v in settings.items() if k in run_fields and v is not None}
    return Run(cfg, ae, ae_cfg, model, encode_source, **run_settings)


def mbr_select(candidates):
    """(G4) the candidate with the least mean loss (−ROUGE-L) to the others: the medoid."""

    def score(i):  # the summed ROUGE-L to the other candidates
        return sum(rouge(candidates[i], d)["rougeL"] for j, d in enumerate(candidates) if j != i)

    return max(range(len(candidates)), key=score)


def sample_rows(run: Run, n, seed, labels=None, sources=None, references=None, skip=0):
    """Yield one JSON-ready row per sample (per source, for seq2seq), batch by batch, and a
    dict `clock` of diffusion and decoding seconds. Each batch has its own generator, seeded by
    (seed, batch index), so a resumed file (skip > 0) gets exactly the rows it lacks."""
    cfg, device = run.cfg, next(run.ae.parameters()).device
    per = run.candidates if sources is not None else 1
    n_rows = len(sources) if sources is not None else n
    clock = dict(diffusion_s=0.0, decoding_s=0.0, samples=0)
    rows_per_batch = max(1, run.batch_size // per)
    settings = dict(sampler=cfg.sampler, steps=cfg.sample_steps, guidance=cfg.guidance)

    def gen():
        for b, start in enumerate(tqdm(range(0, n_rows, rows_per_batch), desc="sampling")):
            rows = list(range(start, min(n_rows, start + rows_per_batch)))
            if rows[-1] < skip:
                continue
            g = torch.Generator(device).manual_seed(seed * 1_000_003 + b)
            cond, B = {}, len(rows) * per
            if labels is not None:
                cond["label"] = torch.tensor([labels[i] for i in rows], device=device)
                cond["label"] = cond["label"].repeat_interleave(per)
            if sources is not None:
                context, mask = run.encode_source([sources[i] for i in rows])
                cond["context"] = context.repeat_interleave(per, 0)
                cond["context_mask"] = mask.repeat_interleave(per, 0)
            t0 = time.time()
            if run.random_latents:  # the control: no denoiser, N(0, I) (onto C3's sphere)
                shape = (B, run.ae_cfg.num_latents, run.ae_cfg.d_ae)
                z = torch.randn(shape, device=device, generator=g)
                z = on_sphere(z) if run.ae.c3 else z
            else:
                z = generate_latents(run.model, cfg, B, cond, *settings.values(), g)
            t1 = time.time()
            texts = run.ae.generate(z, max_length=run.ae_cfg.max_len + 2, **run.decode)
            clock["diffusion_s"] += t1 - t0
            clock["decoding_s"] += time.time() - t1
            clock["samples"] += len(texts)
            for j, i in enumerate(rows):
                if i < skip:
                    continue
                row = dict(index=i, **settings, temperature=cfg.temperature, seed=seed)
                cands = texts[j * per : (j + 1) * per]
                row["text"] = cands[mbr_select(cands)] if per > 1 else cands[0]  # (G4)
                if labels is not None:
                    row["label"] = labels[i]
                if sources is not None:
                    row.update(source=sources[i], single=cands[0], candidates=cands)
                if references is not None:
                    row["reference"] = ref = references[i]
                    if per > 1:  # oracle: the candidate closest to the reference (a bound)
                        row["oracle"] = max(cands, key=lambda c: rouge(c, ref)["rougeL"])
                yield row

    return gen(), clock


def timing_summary(clock):
    """Samples per second and seconds per 1000 samples, diffusion and decoding apart."""
    n, total = max(clock["samples"], 1), clock["diffusion_s"] + clock["decoding_s"]
    out = dict(samples=clock["samples"], samples_per_s=round(n / max(total, 1e-9), 2))
    for k, s in (("diffusion", clock["diffusion_s"]), ("decoding", clock["decoding_s"])):
        out[f"{k}_s_per_1000"] = round(1000 * s / n, 1)
    return dict(out, total_s_per_1000=round(1000 * total / n, 1))


def sample_settings(args):
    """The run overrides that `sample` and evaluate.py share (None: the run's own)."""
    decode = dict(num_beams=args.num_beams, repetition_penalty=args.repetition_penalty)
    decode["no_repeat_ngram_size"] = args.no_repeat_ngram
    steps = args.steps if isinstance(args.steps, int) else None  # evaluate: a list, a sweep
    names = ("sampler", "guidance", "temperature", "batch_size", "candidates")
    return dict(sample_steps=steps, decode=decode, **{k: getattr(args, k) for k in names})


def cmd_sample(args):
    """`sample RUN_DIR`: writes RUN_DIR/samples.jsonl (or --output) row by row."""
    for k in ("num_samples", "steps", "batch_size", "candidates"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            raise UserError(f"--{k} must be positive")
    cfg, n = load_config(DiffConfig, args.run_dir)[0], args.num_samples
    labels = sources = references = None
    if args.guidance not in (None, 1.0) and not (cfg.class_cond or cfg.seq2seq):
        raise UserError("--guidance needs a class-conditional or seq2seq model")
    if args.class_ is not None and not cfg.class_cond:
        raise UserError("--class needs a class-conditional model (trained with --class_cond)")
    if args.class_ is not None and not 0 <= args.class_ < cfg.num_classes:
        raise UserError(f"--class {args.class_} is not in 0..{cfg.num_classes - 1}")
    if args.source_file and not cfg.seq2seq:
        raise UserError("--source-file needs a seq2seq model (trained with --seq2seq)")
    if cfg.class_cond:  # one class, or every class in turn (equal counts)
        labels = [i % cfg.num_classes if args.class_ is None else args.class_ for i in range(n)]
    if cfg.seq2seq and args.source_file:  # one source per line, or {"text": ...} lines
        sources = read_texts(args.source_file, "--source-file")[:n]
    elif cfg.seq2seq:
        split = load_data(cfg)[args.split]
        sources, references = split.sources[:n], split.texts[:n]
    device, settings = pick_device(args.device), sample_settings(args)
    settings["random_latents"] = args.random_latents
    run = load_run(args.run_dir, device, args.compile, args.decoder, sources, **settings)
    path = args.output or os.path.join(args.run_dir, "samples.jsonl")
    if os.path.exists(path) and not (args.resume or args.overwrite):
        raise UserError(f"{path} exists; pass --resume to continue it or --overwrite")
    skip = sum(1 for _ in open(path)) if args.resume and os.path.exists(path) else 0
    rows, clock = sample_rows(run, n, args.seed, labels, sources, references, skip)
    with open(path, "a" if skip else "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            f.flush()  # a kill loses at most the row being written
    texts = [json.loads(line)["text"] for line in open(path)]
    summary = dict(output=path, sampler=run.cfg.sampler, steps=run.cfg.sample_steps)
    summary.update(guidance=run.cfg.guidance, temperature=run.cfg.temperature, seed=args.seed)
    summary.update(random_latents=args.random_latents, decoder=args.decoder)
    summary.update(timing_summary(clock))
    write_json(os.path.splitext(path)[0] + ".summary.json", summary)  # beside its samples
    print("\n".join("  " + t for t in texts[:5]) + "\n" + json.dumps(summary, indent=1))
    return summary


# ==========================================================================================
# 10. Command line


def add_config_flags(parser, cls):
    """One --flag per config field, its help the field's comment; None means 'not given'."""
    for f in dataclasses.fields(cls):
        if f.name == "preset":  # a run flag
            continue
        kind, flag = type(f.default), f"--{f.name}"
        kw = dict(default=None, help=f"{f.metadata['help']} (default {f.default!r})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is tuple:
            parser.add_argument(flag, type=float, nargs=len(f.default), **kw)
        else:
            parser.add_argument(flag, type=kind, **kw)


def add_sample_flags(s):
    """Flags of `sample`, shared with evaluate.py."""
    s.add_argument("--num_samples", type=int, default=1000, help="samples (seq2seq: sources)")
    s.add_argument("--sampler", choices=list(SAMPLERS), help="update rule (default: the run's)")
    s.add_argument("--batch_size", type=int, default=500, help="latents sampled together")
    s.add_argument("--seed", type=int, default=0, help="same seed, same samples (same device)")
    s.add_argument("--guidance", type=float, help="guidance weight w (G3; default: the run's)")
    s.add_argument("--temperature", type=float, help="τ of the DDPM step (default: the run's)")
    s.add_argument("--candidates", type=int, default=1, help="(G4) samples per source; MBR")
    s.add_argument("--num_beams", type=int, default=4, help="beam width of the LM decoder")
    s.add_argument("--repetition_penalty", type=float, default=1.2, help="decoder penalty")
    s.add_argument("--no_repeat_ngram", type=int, default=3, help="decoder no-repeat n-gram")
    s.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    s.add_argument("--compile", action="store_true", help="torch.compile the denoiser (CUDA)")
    s.add_argument("--decoder", default="", help="(J4) a decoder run (train-ae --init_from)")


def build_parser():
    p = argparse.ArgumentParser(prog="ld4lg.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--preset", default="", help=f"{', '.join(PRESETS)} (default: none)")
    run.add_argument("--out", required=True, help="run directory to create")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--overwrite", action="store_true", help="replace --out")
    note = "Defaults below are Tables 13-14's; a --preset overrides some of them (see PRESETS)."
    for name, cls, text in (
        ("train-ae", AEConfig, "§3.1: the language autoencoder"),
        ("train", DiffConfig, "§3.2: the denoiser (--joint: LDLM)"),
    ):
        add_config_flags(sub.add_parser(name, help=text, parents=[run], description=note), cls)
    s = sub.add_parser("sample", help="App. A: sample texts from a trained run")
    s.add_argument("run_dir", help="run directory of `train`")
    add_sample_flags(s)
    s.add_argument("--steps", type=int, help="sampler steps (default: the run's, 250)")
    s.add_argument("--class", dest="class_", type=int, help="class of every sample (G1)")
    s.add_argument("--source-file", dest="source_file", help="seq2seq: a source per line")
    s.add_argument("--split", default="test", choices=["val", "test"], help="seq2seq sources")
    s.add_argument("--output", help="JSONL to write (default RUN_DIR/samples.jsonl)")
    s.add_argument("--resume", action="store_true", help="continue a partly written --output")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    s.add_argument("--random_latents", action="store_true", help="control: N(0, I) latents")
    return p


def run_training(args):
    stage = {"train-ae": (AEConfig, train_ae), "train": (DiffConfig, train_diffusion)}
    cls, train = stage[args.command]
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "preset"}
    if not args.resume:
        return train(make_config(cls, args.preset, **flags), args.out, False, args.overwrite)
    cfg = load_config(cls, args.out, "--resume: {} holds no run (no config.json)")[0]
    # --resume continues the saved config: a flag that disagrees would be ignored in silence
    given = {k: v for k, v in flags.items() if v is not None}
    if bad := [f"--{k}" for k, v in given.items() if type(getattr(cfg, k))(v) != getattr(cfg, k)]:
        raise UserError(f"--resume continues {args.out} as saved; these flags differ: {bad}")
    return train(cfg, args.out, True, args.overwrite)


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    try:
        cmd_sample(args) if args.command == "sample" else run_training(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 130 if isinstance(e, Interrupted) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
