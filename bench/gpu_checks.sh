#!/usr/bin/env bash
# The GPU checks of issue 11 in one go, for a session that has a GPU (nothing else needs one):
#   1. `python -m bench gpu`   — dense / search (exact and fused step) / retrain epoch times of the authors' ResNet-20 recipe,
#      the recipe's pipeline extrapolated, 4 trials per GPU, peak memory per trial;
#   2. `python -m bench paper` — one real CTS ticket, ResNet-20 / CIFAR-10-JPEG, 9 dense + 80 search +
#      151 retraining epochs at density 0.0074, sized to finish within 9 minutes (it times a dense and
#      a search epoch first and shortens only the retraining if it must, saying so), beside the
#      paper's 74.0 % in 7.9 min.
#   3. `python -m bench data --device cuda` — in memory vs streamed folder data on the GPU (issue 25: the
#      loader must keep a GPU busy; its GPU-decode rows, nvJPEG batches against a CPU process at 32 and
#      224 px, say whether decoding on the GPU would pay: it is not used until they do).
#   4. `python -m bench ddp --device cuda` — data parallelism (issue 26): ResNet-20 images/s in-process against a
#      1-rank nccl world (what a world of one costs) and, with 2 GPUs or more, a 2-rank nccl world (one GPU a rank).
# All append their tables to bench/RESULTS.md. CIFAR-10-JPEG (55 MB) is copied into data/ (ignored
# by git) if it is not there: pass `data/CIFAR-10-JPEG` along with the checkout to a machine
# without ../shared (the device tool: carry ["data/CIFAR-10-JPEG"]).
#
#   bench/gpu_checks.sh            # on a CUDA machine: ~2-3 min (gpu, 1 round) + ≤ 9 min (paper) + ~2 min (data)
#                                  #   + ~1 min (ddp; estimated, not yet run on a GPU)
#   bench/gpu_checks.sh --quick    # CPU smoke test of the same four steps; records nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
DATA=data/CIFAR-10-JPEG
if [ ! -d "$DATA/train" ]; then
    mkdir -p data
    cp -r "${CIFAR_JPEG:-../shared/datasets/CIFAR-10-JPEG}" "$DATA"
fi
"$PY" -c "import torch; print('[gpu_checks] torch', torch.__version__, '| CUDA:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
if [ "${1:-}" = "--quick" ]; then
    "$PY" -m bench gpu --quick --device cpu --repeats 1 --threads 1
    "$PY" -m bench paper --quick --data "$DATA" --threads 1
    "$PY" -m bench data --quick --device cpu --data "$DATA" --threads 1
    "$PY" -m bench ddp --quick --device cpu --data "$DATA" --repeats 1
else
    "$PY" -m bench gpu --repeats 1     # one round: the device time is short, and paper times its own epochs
    "$PY" -m bench paper --data "$DATA"
    "$PY" -m bench data --device cuda --repeats 1 --data "$DATA"
    "$PY" -m bench ddp --device cuda --data "$DATA"
fi
