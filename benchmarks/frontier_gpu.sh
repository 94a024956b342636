#!/usr/bin/env bash
# The certified-accuracy-vs-sparsity frontier of issue 11 on one GPU: the demo recipe (configs/demo.yaml) under each
# layer allocation, and ERK with the paper's SGD score schedule, 3 seeds; every (variant, seed) is a process of its
# own (the GPU is mostly idle for a network this small), then one 3-seed report per variant.
# From the repository root of a lent GPU machine, with the wheels of .whl/ (pydantic, auto_LiRPA, appdirs):
#   bash benchmarks/frontier_gpu.sh OUTDIR [SECONDS]
set -u
out=${1:?output folder}; limit=${2:-420}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p /tmp/site && cp -r certprune /tmp/site/ && cp -r models certify /tmp/site/certprune/  # the installed layout, no build
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
declare -A variants=(
  [layerwise]="--set prune.allocation=layerwise"
  [erk]="--set prune.allocation=erk"
  [global]="--set prune.allocation=global"
  [learned]="--set prune.allocation=learned"
  [erk-sgd]="--set prune.allocation=erk --set prune.optimizer=sgd --set prune.lr=0.1 --set prune.momentum=0.9"
)
started=$(date +%s)
for name in "${!variants[@]}"; do
  for seed in 0 1 2; do
    timeout "$limit" python3 -m certprune -q sweep --config configs/demo.yaml --device cuda --set "seeds=[$seed]" \
      ${variants[$name]} --out runs/frontier-$name > log-$name-$seed.txt 2>&1 &
  done
done
wait
echo "training and verification, all processes: $(( $(date +%s) - started )) s"
for name in "${!variants[@]}"; do  # every run is finished: this reads them and writes the 3-seed report
  python3 -m certprune -q sweep --config configs/demo.yaml --device cuda --set "seeds=[0,1,2]" ${variants[$name]} \
    --out runs/frontier-$name > /dev/null 2>> log-report.txt
done
tail -n 2 log-*.txt
tar czf "$out/frontier.tgz" runs/frontier-*/results.md runs/frontier-*/sparsity.png runs/frontier-*/*/metrics.json \
  runs/frontier-*/*/config.yaml runs/frontier-*/*/history.csv log-*.txt 2>/dev/null
for name in "${!variants[@]}"; do echo "== $name"; sed -n '/Mean/,/Every run/p' runs/frontier-$name/results.md; done
