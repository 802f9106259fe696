#!/usr/bin/env bash
# On the lent GPU machine, after the vLLM parts were assembled into /tmp/site: install gpumesh
# and its missing dependencies (wheels carried in .whl/ and .gpurun/), then run, detached from
# the device call, everything issue 20 asks for, into /tmp/gm/out; /tmp/gm/done marks the end.
#   usage (repo root): bash bench/gpu_run.sh start | wait SECONDS
set -u
case "${1:-}" in
start)
    mkdir -p /tmp/gm/out
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 \
        .whl/*.whl .gpurun/*.whl > /tmp/gm/out/install.log 2>&1 || { cat /tmp/gm/out/install.log; exit 1; }
    cp -r bench tests pyproject.toml /tmp/gm/    # pyproject: the pytest markers
    setsid nohup bash /tmp/gm/bench/gpu_run.sh run > /tmp/gm/out/run.log 2>&1 < /dev/null &
    echo "started $!"
    ;;
run)
    export PYTHONPATH=/tmp/site2:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    cd /tmp/gm
    set -x
    nvidia-smi; nvidia-smi topo -m
    python3 -c "import vllm, torch, gpumesh, pynvml; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    timeout 240 python3 -m pytest -q -m gpu -rs -s tests/test_gpu.py -p no:cacheprovider > out/pytest-gpu.log 2>&1
    timeout 120 python3 bench/telemetry.py --seconds 20 --fast-samples 1000 > out/telemetry.log 2>&1
    timeout 1500 python3 bench/gpu_cluster_check.py --out out --work /tmp/gm/work
    touch /tmp/gm/done
    ;;
wait)
    deadline=$((SECONDS + ${2:-500}))
    while [ ! -e /tmp/gm/done ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
    [ -e /tmp/gm/done ] && echo "run finished" || echo "run still going"
    tail -n 5 /tmp/gm/out/check.log 2>/dev/null
    for f in /tmp/gm/out/*; do [ -f "$f" ] && cp "$f" "$OUT/"; done
    ls -la "$OUT"
    ;;
*)
    echo "usage: $0 start | run | wait SECONDS" >&2; exit 2 ;;
esac
