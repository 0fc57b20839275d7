#!/usr/bin/env bash
# The experiments behind the small recipe (src/train/config/recipe.rs, docs/recipe-small.md):
# each named setting trained for each seed on the demo data (or the held-out Fashion-MNIST
# split written by tools/fashion-mnist-split.py), one run at a time so the timings compare.
#
#   tools/recipe-experiments.sh OUT [--seeds "0 1"] [--only NAME,NAME] [--heldout DIR]
#                               [--binary target/release/dinotrain]
#
# Writes OUT/<name>-s<seed>/ (the run folders) and appends one line per run to OUT/results.tsv:
# name, seed, wall seconds, k-NN at initialisation, k-NN at each evaluation (every 100 steps),
# final k-NN, final linear probe. The run's own evaluation: k-NN@20 (T 0.07) of the teacher's
# CLS token, official eval transform (resize 256/224, centre crop). Rerunning appends.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
binary="$root/target/release/dinotrain"
seeds="0 1"
only=""
heldout=""
out="${1:?usage: tools/recipe-experiments.sh OUT [--seeds \"0 1\"] [--only A,B] [--heldout DIR]}"
shift
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --heldout) heldout="$2"; shift 2 ;;
        --binary) binary="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

# name|arguments (after `dinotrain train`). `small` is the default run (the small recipe, 600
# steps); `official` is the demo model with the official recipe, 200 steps (the main job before
# the small recipe); the others change one setting of `small`.
experiments=(
    "small|"
    "small-3x|--steps 1800"
    "small-patch8|--set student.patch_size=8"
    "small-patch4|--set student.patch_size=4"
    "small-layerscale1e-5|--set student.layerscale=0.00001"
    "small-layerscale1|--set student.layerscale=1.0"
    "small-koleo0.3|--set dino.koleo_loss_weight=0.3"
    "official|--recipe official"
)

mkdir -p "$out"
results="$out/results.tsv"
[[ -f "$results" ]] || printf "name\tseed\tseconds\tknn_init\tknn_curve\tknn_final\tprobe\targs\n" > "$results"
for line in "${experiments[@]}"; do
    name="${line%%|*}"
    args="${line#*|}"
    if [[ -n "$only" && ",$only," != *",$name,"* ]]; then continue; fi
    for seed in $seeds; do
        run="$out/$name-s$seed"
        data=()
        if [[ -n "$heldout" ]]; then
            data=(--data "$heldout/train" --recipe small
                  --set "dinotrain.knn_train=$heldout/train" --set "dinotrain.knn_val=$heldout/test"
                  --set dinotrain.knn_every=100)
        fi
        start=$(date +%s)
        # shellcheck disable=SC2086 # $args is a list of flags
        "$binary" train --out "$run" --overwrite --seed "$seed" "${data[@]}" $args > "$run.log" 2>&1
        seconds=$(( $(date +%s) - start ))
        init=$(grep -o 'at initialisation: [0-9.]*' "$run/train.log" | head -1 | grep -o '[0-9.]*$')
        curve=$(grep -o 'step [0-9]*: k-NN top-1 (k=20) [0-9.]*' "$run/train.log" | awk '{print $2 $NF}' | paste -sd' ')
        final=$(grep -o 'trained teacher [0-9.]*' "$run/train.log" | head -1 | grep -o '[0-9.]*$')
        probe=$(grep -o 'linear probe top-1: trained teacher [0-9.]*' "$run/train.log" | grep -o '[0-9.]*$' || true)
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$name" "$seed" "$seconds" "$init" "$curve" "$final" "$probe" "$args" >> "$results"
        tail -1 "$results"
    done
done
