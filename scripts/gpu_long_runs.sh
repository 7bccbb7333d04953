#!/usr/bin/env bash
# Long adapter runs on a lent GPU machine (docs/tiny_backend.md, "G1"): does head pose come with
# 5-10 times the steps a CPU adapter gets (~1700, not 170-340)? Three jobs side by side on the one
# GPU, each with its own rendering processes (the machine's 16 cores), each stopping at STEPS steps
# or MINUTES:
#   g_lora_dc1      LoRA (the default adapter settings) on DC1's base (dense tower + circular rows)
#   g_lora_default  LoRA on the default base
#   g_full_dc1      every weight of DC1's base, lr 5e-4
# SET=sweep STEPS=400: three 400-step adapters on DC1's base (learning rate, rank) instead.
# SET=fast STEPS=900 (G3): seven adapters with the cheaper step (see the SET=fast branch below).
# SET=eff STEPS=900 (G4): eight such adapters, for what learns more pose in the same steps (below).
# Carried: the two bases' model folders, data/assets/menpo3d, and (the device tool's notes) .gl and .whl.
# Writes $OUT/results.tgz (each run's history, metrics and adapter) and $OUT/log.txt.
set -u
STEPS=${STEPS:-6000}
MINUTES=${MINUTES:-6.5}
WORKERS=${WORKERS:-4}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu LOCAL=1 STEPS=4: a dry run of this script here
LOG=${OUT:-/tmp}/log.txt
exec > >(tee -a "$LOG") 2>&1

source scripts/gpu_env.sh
export TQDM_MININTERVAL=20 DEVICE

# a quick check first: one scene rendered, one step of each base on the GPU
[ -n "${SKIP_CHECK:-}" ] || $PYTHON - <<'EOF' || exit 3
import os, time, torch
from hpelib.config import make_config
from hpelib.data import render, tasks
from hpelib import train
from hpelib.backends.tiny import TinyBackend
dev = os.environ["DEVICE"]
print("GL:", render.check_egl(), "| torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))
config = make_config("default", {"model.device": dev})
stream = tasks.SampleStream(train.make_renderer(config), tasks.lora_mix(0.2), 32, seed=1)
t = time.time(); batch = stream.batch(0); print(f"one batch rendered in {time.time() - t:.2f} s")
for key in ("96289dffbd1e", "cf8ff0410dca"):
    if not os.path.isdir(f"data/cache/base-{key}/model"):
        print(key, "not carried: skipped")
        continue
    b = TinyBackend.load(f"data/cache/base-{key}/model", device=dev)
    enc = b.collate([b.encode(s) for s in batch])
    out = b.model(**{k: v.to(dev) for k, v in enc.items()})
    out.loss.backward(); print(key, "loss", float(out.loss))
EOF

common=(--threads 1 --set "model.device=\"$DEVICE\"" lora.train.prefetch=true lora.train.prefetch_workers=$WORKERS
        lora.train.max_steps=$STEPS lora.train.minutes=$MINUTES lora.train.eval_every=500 lora.train.eval_samples=64
        lora.train.checkpoint_every=100000)
DC1=data/cache/base-96289dffbd1e/model
jobs_=()
job() {  # job NAME BASE_DIR [tiny_experiment.py arguments ...] [--set-more k=v ...]
    local name=$1 base=$2; shift 2
    local extra=() more=()
    while [ $# -gt 0 ] && [ "$1" != --set-more ]; do extra+=("$1"); shift; done
    [ $# -gt 0 ] && shift && more=("$@")
    $PYTHON scripts/tiny_experiment.py lora "${extra[@]}" --name "$name" --base-dir "$base" "${common[@]}" "${more[@]}" \
        > "${OUT:-/tmp}/$name.log" 2>&1 &
    jobs_+=($!)
}
# the cheaper step (G3 onwards): language model only, no LoRA dropout, bf16 autocast
fast=(lora.target_vision=false lora.dropout=0 lora.train.autocast_bf16=true lora.train.eval_every=300)
if [ "${SET:-long}" = long ]; then
    job g_lora_dc1 $DC1
    job g_lora_default data/cache/base-cf8ff0410dca/model
    job g_full_dc1 $DC1 --full --set-more lora.train.lr=5e-4
elif [ "${SET}" = sweep ]; then  # SET=sweep STEPS=400: what an adapter of the CPU bar's length (8 min, ~400 steps) reaches
    job g_s_lr5 $DC1
    job g_s_lr10 $DC1 --set-more lora.train.lr=1e-2
    job g_s_lr10_r32 $DC1 --set-more lora.train.lr=1e-2 lora.rank=32 lora.alpha=64
elif [ "${SET}" = eff ]; then  # SET=eff STEPS=900 (G4): more pose per step? The default adapter (G3's lr 1e-2
    # recipe) twice (seeds 0, 1: the noise), soft angle targets (sigma 3, 6 deg), LoRA+ (B's rate x4; x16 at
    # a quarter of the rate), LoRA on the projector (the mergers), and the three together
    fast+=(lora.train.lr=1e-2)
    job g4_ref $DC1 --set-more "${fast[@]}"
    job g4_ref_s1 $DC1 --set-more "${fast[@]}" lora.train.seed=1
    job g4_sig3 $DC1 --set-more "${fast[@]}" lora.train.angle_sigma=3
    job g4_sig6 $DC1 --set-more "${fast[@]}" lora.train.angle_sigma=6
    job g4_plus4 $DC1 --set-more "${fast[@]}" lora.train.lora_plus_ratio=4
    job g4_plus16 $DC1 --set-more "${fast[@]}" lora.train.lora_plus_ratio=16 lora.train.lr=2.5e-3
    job g4_proj $DC1 --set-more "${fast[@]}" lora.target_projector=true
    job g4_all $DC1 --set-more "${fast[@]}" lora.target_projector=true lora.train.angle_sigma=3 \
        lora.train.lora_plus_ratio=4
elif [ "${SET}" = eff2 ]; then  # SET=eff2 STEPS=900 (G4, second batch): G4's two best, sigma 6 and the
    # projector, with another seed, and the two together with both seeds
    fast+=(lora.train.lr=1e-2)
    job g5_sig6_s1 $DC1 --set-more "${fast[@]}" lora.train.angle_sigma=6 lora.train.seed=1
    job g5_proj_s1 $DC1 --set-more "${fast[@]}" lora.target_projector=true lora.train.seed=1
    job g5_projsig6 $DC1 --set-more "${fast[@]}" lora.target_projector=true lora.train.angle_sigma=6
    job g5_projsig6_s1 $DC1 --set-more "${fast[@]}" lora.target_projector=true lora.train.angle_sigma=6 \
        lora.train.seed=1
else  # SET=fast STEPS=900 (G3): the cheaper step (language model only, no LoRA dropout, bf16 autocast)
    # at the step count an 8-min CPU adapter reaches with it; the learning rate, rank, vision targets,
    # fp32 and a half batch beside it
    job g3_lr10 $DC1 --set-more "${fast[@]}" lora.train.lr=1e-2
    job g3_lr5 $DC1 --set-more "${fast[@]}" lora.train.lr=5e-3
    job g3_lr20 $DC1 --set-more "${fast[@]}" lora.train.lr=2e-2
    job g3_lr10_r16 $DC1 --set-more "${fast[@]}" lora.train.lr=1e-2 lora.rank=16 lora.alpha=32
    job g3_lr10_vis $DC1 --set-more "${fast[@]}" lora.train.lr=1e-2 lora.target_vision=true
    job g3_lr10_fp32 $DC1 --set-more "${fast[@]}" lora.train.lr=1e-2 lora.train.autocast_bf16=false
    job g3_b16_lr7 $DC1 --set-more "${fast[@]}" lora.train.lr=7e-3 lora.train.batch_size=16 \
        lora.train.max_steps=$((2 * STEPS)) lora.train.eval_every=600
fi
wait "${jobs_[@]}"  # not a bare wait: that would also wait for the log's tee
[ -z "${LOCAL:-}" ] && nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
grep -h '"hpe/mae_mean"' runs/experiments/g*_*/experiment.json
tar czf "${OUT:-/tmp}/results.tgz" --exclude='checkpoint*' runs/experiments/g*_*
echo done
