#!/usr/bin/env bash
# Base curricula side by side on a lent GPU (docs/tiny_backend.md, "Objects listed"): each trains
# the curriculum of one `base.mix` on the default's tower (the vision stage copied in from `.gpu/vision`,
# a copy of the default base's `training/vision` without its optimizer state: the stage does not depend
# on the curriculum), STEPS steps or MINUTES, then answers 300 held-out object prompts
# (`object_answers.py`). Started by scripts/gpu_check.sh with CURRICULA=1, after it set up python;
# writes $OUT/curricula.tgz (each run's log, history and training_done.json).
#   LOCAL=1 DEVICE=cpu STEPS=3 N=4 bash scripts/gpu_curricula.sh     # a dry run here
set -u
OUT=${OUT:-/tmp}
STEPS=${STEPS:-1300}
MINUTES=${MINUTES:-7}
WORKERS=${WORKERS:-3}
DEVICE=${DEVICE:-cuda}
N=${N:-300}
PYTHON=python3
[ -n "${LOCAL:-}" ] && PYTHON=.venv/bin/python
LOGS=$(mktemp -d)

declare -A MIX=(
    [g_oa]='{"box": 0.4, "box_object": 0.2, "orient": 0.2, "colour": 0.1, "count": 0.1}'
    [g_la]='{"box": 0.4, "box_object": 0.2, "box_list": 0.2, "orient": 0.1, "colour": 0.05, "count": 0.05}'
    [g_lb]='{"box": 0.4, "box_list": 0.4, "orient": 0.1, "colour": 0.05, "count": 0.05}'
)
[ -n "${ONLY:-}" ] && for k in "${!MIX[@]}"; do [[ " $ONLY " == *" $k "* ]] || unset "MIX[$k]"; done

curriculum() {  # curriculum NAME MIX
    local name=$1 mix=$2
    local sets=("model.device=\"$DEVICE\"" "base.prefetch_workers=$WORKERS" "base.max_steps=$STEPS"
                "base.minutes=$MINUTES" "base.mix=$mix")
    local cache  # the base's cache folder (its key) under these settings
    cache=$($PYTHON -c 'import json, sys
from hpelib import train
from hpelib.config import make_config
print(train.base_cache_dir(make_config("default", {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])})))' \
        "${sets[@]}") || return 1
    mkdir -p "$cache/training" && cp -r .gpu/vision "$cache/training/vision"
    echo "$name: $cache, mix $mix" > "$LOGS/$name.log"
    $PYTHON scripts/tiny_experiment.py base --name "$name" --threads 2 --set "${sets[@]}" >> "$LOGS/$name.log" 2>&1
    $PYTHON scripts/object_answers.py "$cache/model" --n "$N" --device "$DEVICE" >> "$LOGS/$name.log" 2>&1
    cp "$cache/training/history.csv" "$LOGS/$name.history.csv"
    cp "$cache/training_done.json" "$LOGS/$name.done.json"
}

t0=$(date +%s)
for name in "${!MIX[@]}"; do curriculum "$name" "${MIX[$name]}" & done
wait
echo "curricula: $(( $(date +%s) - t0 )) s" >> "$LOGS/times.txt"
tar czf "$OUT/curricula.tgz" -C "$LOGS" .
