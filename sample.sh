#!/usr/bin/env bash
# Sample from a finished diffusion run; every setting comes from the run's saved config.
#
#   bash sample.sh runs/demo/diffusion                       # 1000 samples, DDPM, 250 steps → RUN/samples.jsonl
#   bash sample.sh runs/demo/diffusion --sampler ddim --steps 50      # deterministic DDIM (D7), 50 steps
#   bash sample.sh runs/demo/diffusion --decoder runs/demo/decoder    # read by a fine-tuned decoder (J4)
#   bash sample.sh runs/demo/diffusion --temperature 0.5 --output t05.jsonl  # half the DDPM noise: more valid, less diverse
#   bash sample.sh runs/demo-class/diffusion --class 2 --guidance 2   # one topic, classifier-free guidance
#   bash sample.sh runs/demo-seq2seq/diffusion --candidates 5         # seq2seq test sources, MBR over 5
#   bash sample.sh RUN --source-file sources.txt --output out.jsonl   # your own sources, one per line
#
# Extra flags go to `python ld4lg.py sample` (see its --help). Existing output needs --overwrite or --resume.
set -euo pipefail
cd "$(dirname "$0")"
[ $# -ge 1 ] || { echo "usage: bash sample.sh RUN_DIR [flags]" >&2; exit 2; }
run=$1; shift
${PYTHON:-python} ld4lg.py sample "$run" --num_samples 1000 "$@"
