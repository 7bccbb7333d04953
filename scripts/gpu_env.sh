# Sourced by the scripts that run on a lent GPU machine (gpu_check.sh, gpu_long_runs.sh): sets
# PYTHON to that machine's own python3 (a CUDA torch, no package index) with this project's wheels
# carried in .whl installed beside it (PYTHONPATH), and the EGL loaders carried in .gl unpacked for
# the renderer. LOCAL=1: a dry run here, with .venv's python instead.
PYTHON=python3
if [ -z "${LOCAL:-}" ]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    # the project never imports torchvision (it does not import beside the pinned torch); with it
    # installed, transformers resolved its torchvision image processor, which broke encode's arrays (G1)
    python3 -m pip uninstall -y -q torchvision
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD
    vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    [ -f "$vendor" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
    nvidia-smi -L
else
    PYTHON=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
