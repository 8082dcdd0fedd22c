"""Command line: the bad-input catalogue (one-line error, exit 2, nothing modified), sampling
reproducibility and resume, run-directory safety."""

import json
import os
import shutil

import pytest
import torch

import evaluate
import ld4lg
from conftest import TINY_AE, TINY_DIFF


def flags(d):
    out = []
    for k, v in d.items():
        out += (
            [f"--{k}", str(v)] if not isinstance(v, bool) else ([f"--{k}"] if v else [f"--no-{k}"])
        )
    return out


AE_FLAGS = flags(TINY_AE)
DIFF_FLAGS = flags(TINY_DIFF)


def snapshot(root):
    return {
        os.path.join(d, f): (
            os.path.getsize(os.path.join(d, f)),
            os.path.getmtime(os.path.join(d, f)),
        )
        for d, _, fs in os.walk(root)
        for f in fs
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n\n  \n")
    (d / "nocol.csv").write_text("sentence\nhello there\n" * 50)
    (d / "badlabel.jsonl").write_text(
        "".join(json.dumps({"text": f"t {i}", "label": "x"}) + "\n" for i in range(50))
    )
    (d / "neglabel.jsonl").write_text(
        "".join(json.dumps({"text": f"t {i}", "label": -1}) + "\n" for i in range(50))
    )
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 50)
    (d / "huge.txt").write_text("word " * 20000 + "\n" + "short text\n" * 50)
    (d / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (d / "sources.txt").write_text("subject: coach, verb: kicks, object: ball\n")
    return d


@pytest.fixture(scope="module")
def class_run(ae_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "class")
    assert (
        ld4lg.main(["train", "--preset", "demo-class", "--ae", ae_run, "--out", out, *DIFF_FLAGS])
        == 0
    )
    return out


def cases(ae_run, diff_run, class_run, b, tmp):
    ae = ["train-ae", "--out", str(tmp / "new"), *AE_FLAGS]
    return {
        "missing data file": ae + ["--data", str(b / "missing.txt")],
        "missing hub data set": ae + ["--data", "no-such-user/no-such-dataset-xyz"],
        "empty data file": ae + ["--data", str(b / "empty.txt")],
        "only empty lines": ae + ["--data", str(b / "blank.txt")],
        "missing column": ae + ["--data", str(b / "nocol.csv")],
        "non-integer label": ae + ["--data", str(b / "badlabel.jsonl"), "--label_column", "label"],
        "label out of range": ae + ["--data", str(b / "neglabel.jsonl"), "--label_column", "label"],
        "non-UTF-8 bytes": ae + ["--data", str(b / "latin1.txt")],
        "text far over the maximum length": ae + ["--data", str(b / "huge.txt")],
        "broken JSON line": ae + ["--data", str(b / "badjson.jsonl")],
        "unknown preset": ae + ["--preset", "nope"],
        "zero steps": ae + ["--steps", "0"],
        "existing run without --overwrite": ["train-ae", "--out", ae_run, *AE_FLAGS],
        "resume without a checkpoint": ["train-ae", "--out", str(tmp / "empty_run"), "--resume"],
        "resume with a flag that differs from the run": [
            "train-ae",
            "--out",
            ae_run,
            "--resume",
            "--steps",
            "99",
        ],
        "unknown timestep sampling": [
            "train",
            "--ae",
            ae_run,
            "--out",
            str(tmp / "d"),
            *DIFF_FLAGS,
            "--t_sampling",
            "bogus",
        ],
        "autoencoder run of another stage": [
            "train",
            "--ae",
            diff_run,
            "--out",
            str(tmp / "d"),
            *DIFF_FLAGS,
        ],
        "sample from an autoencoder run": ["sample", ae_run, "--output", str(tmp / "s.jsonl")],
        "negative sample steps": [
            "sample",
            diff_run,
            "--steps",
            "-5",
            "--output",
            str(tmp / "s.jsonl"),
        ],
        "guidance for an unconditional model": [
            "sample",
            diff_run,
            "--guidance",
            "2",
            "--output",
            str(tmp / "s.jsonl"),
        ],
        "guidance sweep for an unconditional model": [
            "eval",
            diff_run,
            "--guidance_sweep",
            "0,2",
            "--featurizer",
            "none",
            "--ppl_model",
            "none",
            "--num_samples",
            "4",
        ],
        "class id out of range": [
            "sample",
            class_run,
            "--class",
            "9",
            "--output",
            str(tmp / "s.jsonl"),
        ],
        "source file without seq2seq": [
            "sample",
            diff_run,
            "--source-file",
            str(b / "sources.txt"),
            "--output",
            str(tmp / "s.jsonl"),
        ],
        "missing featurizer directory": [
            "eval",
            diff_run,
            "--featurizer",
            str(tmp / "no_model"),
            "--num_samples",
            "4",
        ],
        "source length beyond the encoder's positions": [
            "train",
            "--preset",
            "demo-seq2seq",
            "--ae",
            ae_run,
            "--out",
            str(tmp / "s2s"),
            *DIFF_FLAGS,
            "--max_source_len",
            "100",
        ],  # the tiny BART's: 66
        "compile neither auto, on nor off": [
            "train",
            "--preset",
            "demo",
            "--ae",
            ae_run,
            "--out",
            str(tmp / "new"),
            *DIFF_FLAGS,
            "--compile",
            "yes",
        ],
        "truncated checkpoint": ["sample", str(tmp / "trunc"), "--output", str(tmp / "s.jsonl")],
        "foreign checkpoint": ["sample", str(tmp / "foreign"), "--output", str(tmp / "s.jsonl")],
    }


def test_bad_input_catalogue(ae_run, diff_run, class_run, bad_files, tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    for name, damage in (
        ("trunc", "truncate"),
        ("foreign", "foreign"),
    ):  # broken copies of a good run
        shutil.copytree(diff_run, tmp_path / name)
        ema = tmp_path / name / "ckpt" / "ema.safetensors"
        if damage == "truncate":
            ema.write_bytes(ema.read_bytes()[:100])
        else:
            from safetensors.torch import save_file

            save_file({"weight": torch.zeros(3)}, str(ema))
        (tmp_path / name / "config.json").write_text(
            (tmp_path / name / "config.json")
            .read_text()
            .replace(
                '"ae_dir": "', '"ae_dir": "' + os.path.relpath(diff_run, tmp_path / name) + "/"
            )
        )
    before = {p: snapshot(p) for p in (ae_run, diff_run, class_run, str(bad_files))}
    table = cases(ae_run, diff_run, class_run, bad_files, tmp_path)
    assert len(table) >= 15
    for name, argv in table.items():
        rc = evaluate.main(argv[1:]) if argv[0] == "eval" else ld4lg.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), (
            name,
            err,
        )
        assert not (tmp_path / "new" / "ckpt").exists(), name
    assert not (tmp_path / "s2s").exists()  # a bad flag leaves no half-made run directory behind
    assert before == {p: snapshot(p) for p in before}  # nothing that existed was touched
    # a run saved when --compile was a switch still loads
    assert [ld4lg.DiffConfig(compile=c).compile for c in (True, False)] == ["auto", "off"]


def test_sampling_is_reproducible_and_resumable(diff_run, tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    common = ["--num_samples", "6", "--steps", "5", "--batch_size", "2", "--seed", "3"]
    assert ld4lg.main(["sample", diff_run, "--output", a, *common]) == 0
    assert ld4lg.main(["sample", diff_run, "--output", b, *common]) == 0
    rows = [json.loads(l) for l in open(a)]
    assert rows == [json.loads(l) for l in open(b)] and len(rows) == 6
    # resume: keep the first 3 lines, continue; the file ends identical
    open(b, "w").writelines(open(a).readlines()[:3])
    assert ld4lg.main(["sample", diff_run, "--output", b, "--resume", *common]) == 0
    assert open(a).read() == open(b).read()
    assert (
        ld4lg.main(["sample", diff_run, "--output", a, *common]) == 2
    )  # exists: needs --overwrite


def test_temperature_flag_reaches_the_ddpm_step(diff_run, tmp_path, monkeypatch):
    """--temperature overrides the run's τ (its config's; the paper's 1 by default) in the DDPM update and is recorded per row."""
    seen, ddpm = [], ld4lg.SAMPLERS["ddpm"]
    monkeypatch.setitem(ld4lg.SAMPLERS, "ddpm", lambda *a: seen.append(a[5]) or ddpm(*a))
    run_tau = ld4lg.load_config(ld4lg.DiffConfig, diff_run)[0].temperature
    for tau, name in ((None, "default"), (1.0 if run_tau != 1.0 else 0.5, "flag")):
        out = str(tmp_path / f"{name}.jsonl")
        flags = [] if tau is None else ["--temperature", str(tau)]
        assert (
            ld4lg.main(
                ["sample", diff_run, "--output", out, "--num_samples", "2", "--steps", "3", *flags]
            )
            == 0
        )
        assert {json.loads(l)["temperature"] for l in open(out)} == {tau or run_tau} and set(
            seen
        ) == {tau or run_tau}
        seen.clear()


def test_random_latents_control(diff_run, tmp_path, monkeypatch):
    """--random_latents decodes latents on C3's sphere without calling the denoiser."""
    seen = []
    monkeypatch.setattr(ld4lg, "generate_latents", lambda *a, **k: pytest.fail("the denoiser ran"))
    decode = ld4lg.LatentAutoencoder.generate
    monkeypatch.setattr(
        ld4lg.LatentAutoencoder,
        "generate",
        lambda self, x, **k: seen.append(x) or decode(self, x, **k),
    )
    out = str(tmp_path / "r.jsonl")
    assert (
        ld4lg.main(["sample", diff_run, "--output", out, "--num_samples", "4", "--random_latents"])
        == 0
    )
    assert json.load(open(str(tmp_path / "r.summary.json")))["random_latents"] is True
    d_ae = seen[0].shape[-1]
    assert torch.allclose(seen[0].norm(dim=-1), torch.full(seen[0].shape[:2], d_ae**0.5), atol=1e-4)


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit):
        ld4lg.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--self_cond" in out and "self-conditioning" in out and "--guidance" in out


def test_bench_demo_runs(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        evaluate.main(
            [
                "bench",
                "--preset",
                "demo",
                "--repeats",
                "1",
                "--sample_batch",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    res = json.load(open(out))
    assert (
        res["denoiser_steps_per_s"] > 0
        and res["ae_steps_per_s"] > 0
        and res["diffusion_s_per_1000"] > 0
    )


def test_eval_protocol_and_sweeps(class_run):
    """eval over seeds with the guidance and steps sweeps on a tiny class-conditional run (paths, files, table)."""
    common = "--num_samples 8 --batch_size 8 --featurizer none --ppl_model none".split()
    assert evaluate.main([class_run, *common, "--seeds", "2", "--guidance_sweep", "0,2"]) == 0
    report = json.load(open(os.path.join(class_run, "eval.json")))
    assert set(report["guidance_sweep"]) == {"0.0", "2.0"} and report["model"]["mauve"] is None
    assert "topic_acc" in report["guidance_sweep"]["2.0"] and "missing" in report["table"]
    assert os.path.isfile(os.path.join(class_run, "guidance_sweep.png"))
    assert evaluate.main([class_run, *common, "--seeds", "0", "--steps", "3,5"]) == 0
    assert os.path.isfile(os.path.join(class_run, "steps_sweep.png"))
