#!/usr/bin/env bash
# The checks that need a GPU, on a lent GPU machine (README "Tests"): the tests marked `gpu` (every
# notebook on a CUDA device, the hub path in bf16 as the `gpu` profile runs it), then the default
# test suite with the GPU visible (HPE_TEST_CUDA=1; `model.device = "auto"` then picks it).
#
# That machine has its own python3 with a CUDA torch and no package index; carry (the device tool's
# `carry`): .whl (this project's transformers / peft and the Jupyter packages its image lacks, as
# wheels: `pip download --only-binary :all: --python-version 3.12 ...`), .gl (the EGL loaders, for
# the renderer) and data/assets/menpo3d (the head scan). Writes $OUT/gpu_check.log and the two
# pytest reports, $OUT/gpu.xml and $OUT/suite.xml.
#   LOCAL=1 bash scripts/gpu_check.sh     # a dry run here, with .venv (the gpu tests are skipped)
set -u
OUT=${OUT:-/tmp}
SUITE_S=${SUITE_S:-330}  # the whole suite's time limit (0: not run); the gpu tests come first
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

source scripts/gpu_env.sh
export OMP_NUM_THREADS=2
$PYTHON -c "import torch, transformers, peft, papermill; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.is_available() and torch.cuda.get_device_name(0), '| transformers', transformers.__version__,
      '| peft', peft.__version__, '| papermill', papermill.__version__)" || exit 3

cur=
if [ -n "${CURRICULA:-}" ]; then  # experiments beside the checks (scripts/gpu_curricula.sh)
    bash scripts/gpu_curricula.sh &
    cur=$!
fi

t0=$(date +%s)
timeout "${GPU_S:-330}" $PYTHON -m pytest -q -rA -p no:cacheprovider -m gpu tests --junitxml="$OUT/gpu.xml"
echo "gpu tests: rc $? in $(( $(date +%s) - t0 )) s"

# the default selection (not slow, not gpu), 8 files at a time where pytest-xdist is installed
par=()
$PYTHON -c "import xdist" 2>/dev/null && par=(-n 8 --dist loadfile)
if [ "$SUITE_S" -gt 0 ]; then
    t0=$(date +%s)
    # HPE_TEST_CUDA=1: the default tier keeps the GPU (tests/conftest.py hides it otherwise); -v names
    # each result as it comes, so a run cut short by the time limit still says which failed
    HPE_TEST_CUDA=1 timeout "$SUITE_S" $PYTHON -m pytest -v -p no:cacheprovider "${par[@]}" tests \
        --junitxml="$OUT/suite.xml" | grep -E "FAILED|ERROR|passed|failed" 
    echo "default suite: rc $? in $(( $(date +%s) - t0 )) s"
fi
[ -n "$cur" ] && wait "$cur"
