#!/usr/bin/env bash
# Rebuild the bundled default model, src/midiva/assets/default_model.safetensors (features backend).
#
#   bash scripts/train_default_model.sh [EMOPIA_DIR] [WORK_DIR]
#
# EMOPIA_DIR defaults to ../shared/data/emopia; WORK_DIR (per-clip features, labels, training log)
# to out/emopia-features. The recipe is robust to authoring by design (see the README's model card):
# - the training clips get 4 random authoring rewrites each (flat or compressed velocities,
#   quantization, another tempo map with the same seconds, melody/bass/accompaniment tracks with
#   octave doublings, no pedal, transposition, notated note lengths, and in 35% of them a band backing:
#   a pad and power-chord guitar playing the clip's own harmony; labels unchanged) and 800 medleys
#   of train clips whose bars carry their own segment's label, so bars follow a change of mood;
# - the columns are those that describe the music however it was written down: pitched-only
#   densities, doubling-free densities and polyphony, pitch, harmony read from onsets (onsets_*),
#   articulation; left out are harmony weighted by written note lengths (a transcription's sounding
#   lengths and a sequencer's notated ones read differently there),
#   absolute velocities (a sequencer's default says nothing about emotion) and relative velocity
#   (it cost medley accuracy and made flat-velocity copies of expressive files move), drum-including
#   densities and note-count polyphony (they add up with drums and doublings), the tempo-dependent
#   columns (EMOPIA fixes a 120 bpm grid) and whole-piece (*_song) columns;
# - the context is the mean of bars b-8..b+8, next to each bar's own and ±2-bar columns;
# - outputs reach at most ±0.8, the labels' reach (tanh scaled by the label mapping's largest value);
# - each normalised input is clipped to ±3 training standard deviations: beyond that lies music EMOPIA
#   never showed (dense band arrangements), where an MLP would extrapolate freely.
# Chosen on EMOPIA's validation split with benchmarks/robust_recipes.py and benchmarks/authoring.py;
# the test split is scored once, after training (--report-test), and only recorded. Seed 0 was fixed
# before training. On CPU with torch 2.13 the weights are reproducible bit for bit (single-threaded).
set -euo pipefail
cd "$(dirname "$0")/.."
EMOPIA_DIR="${1:-../shared/data/emopia}"
WORK_DIR="${2:-out/emopia-features}"

midiva preprocess-emopia --emopia-dir "$EMOPIA_DIR" --out "$WORK_DIR" --backend features --num-workers 2 --augment 4 --medleys 800 --augment-seed 0 --augment-backing
midiva prepare-labels --data "$WORK_DIR"
midiva train --data "$WORK_DIR" --out "$WORK_DIR/default_model.safetensors" \
  --features '' --exclude-features '*_song,tempo_bpm*,note_count*,*_per_beat*,duration_beats*,velocity_*,note_density_*,onset_density_*,polyphony*,mode*,key_strength*,chroma_entropy_bits*,consonance*,triad_*,diatonicity*' \
  --context window8 --activation relu --dropout 0.2 --tanh --input-clip 3 --loss smooth_l1 --clip-weighting \
  --lr 0.001 --weight-decay 0.01 --max-epochs 200 --patience 30 --batch-clips 32 --monitor loss \
  --seed 0 --report-test
cp "$WORK_DIR/default_model.safetensors" src/midiva/assets/default_model.safetensors
# The metrics the README quotes (test split, bundled model), and the authoring-robustness suite:
midiva evaluate --emopia-dir "$EMOPIA_DIR" --out "$WORK_DIR/evaluation"
python benchmarks/authoring.py --split val --split test --out "$WORK_DIR/authoring"
