#!/usr/bin/env bash
# Rebuild the bundled barseq weights, src/midiva/assets/barseq.safetensors, from scratch on EMOPIA train.
#
#   bash scripts/train_barseq.sh [EMOPIA_DIR] [WORK_DIR]
#
# EMOPIA_DIR defaults to ../shared/data/emopia; WORK_DIR (token cache, checkpoint) to out/barseq.
# Recipe (chosen on EMOPIA val with benchmarks/barseq_eval.py; test scored once, afterwards):
# every train clip as it is plus 8 authoring rewrites (midiva.authoring.random_augmentation with
# synthetic drum loops), a random transposition per epoch, per-bar cross-entropy + clip-mean
# expected (valence, arousal) squared error; seed 0. Single-threaded, so the weights are the same
# bit for bit on every run on the same CPU build of torch. No downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
EMOPIA_DIR="${1:-../shared/data/emopia}"
WORK_DIR="${2:-out/barseq}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mkdir -p "$WORK_DIR"
python -m midiva.barseq_train --emopia-dir "$EMOPIA_DIR" --out "$WORK_DIR/barseq.safetensors" \
  --cache "$WORK_DIR/tokens_aug8.npz" --augment 8 --seed 0
cp "$WORK_DIR/barseq.safetensors" src/midiva/assets/barseq.safetensors
