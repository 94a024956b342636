#!/usr/bin/env bash
# configs/channel.yaml (cnn-large, channel granularity, k = 0.5 / 0.25 / 0.1, HYDRA and L1 filters) over three
# seeds on one GPU. The GPU is mostly idle for a network this small, so every run is a process of its own: first the
# three dense models side by side, then the 18 pruned runs side by side, each a one-run `certprune sweep` into the same
# folder (so names and reuse checks are the sweep's own); a last sweep over everything writes the 3-seed report.
# From the repository root of a lent GPU machine, with the wheels of .whl/ (pydantic, auto_LiRPA, appdirs):
#   bash benchmarks/channel_gpu.sh OUTDIR [SECONDS] [extra certprune options, e.g. --set model=cnn-small]
# SEEDS="0 1 2" and KS="0.5 0.25 0.1" (the config's) choose the runs, RUNS=runs/channel-large the folder.
set -u
seeds=(${SEEDS:-0 1 2}); ks=(${KS:-0.5 0.25 0.1}); seed_list=$(IFS=,; echo "${seeds[*]}")
out=${1:?output folder}; limit=${2:-480}; shift 2 || true; extra=("$@")
if [ -d .whl ] && ! python3 -c "import pydantic, certprune.models" 2>/dev/null; then  # a bare GPU machine: its own site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/site && cp -r certprune /tmp/site/ && cp -r models certify /tmp/site/certprune/  # installed layout
  export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1  # the installed layout, not ./certprune, for python -m
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
runs=${RUNS:-runs/channel-large}; mkdir -p "$runs" "$out"
deadline=$(( $(date +%s) + limit ))
certprune() { local left=$(( deadline - $(date +%s) )); [ $left -gt 0 ] && timeout $left python3 -m certprune -q "$@"; }
sweep() { certprune sweep --config configs/channel.yaml "${extra[@]}" --out "$runs" "$@"; }
started=$(date +%s)
for seed in "${seeds[@]}"; do
  certprune pretrain --config configs/channel.yaml "${extra[@]}" --set seed=$seed --out "$runs/dense-s$seed" \
    > "$out/log-dense-s$seed.txt" 2>&1 &
done
wait
echo "dense models, trained and verified: $(( $(date +%s) - started )) s"
for seed in "${seeds[@]}"; do
  for k in "${ks[@]}"; do
    for method in hydra lwm; do
      sweep --set "seeds=[$seed]" --set "k=[$k]" --set "prune_methods=[$method]" \
        > "$out/log-$method-k$k-s$seed.txt" 2>&1 &
    done
  done
done
wait
echo "dense and pruned, trained and verified: $(( $(date +%s) - started )) s"
finished=$(ls "$runs"/*/metrics.json | wc -l); planned=$(( ${#seeds[@]} * (1 + 2 * ${#ks[@]}) ))
echo "$finished of $planned runs finished"
if [ "$finished" -eq "$planned" ]; then  # this only reads the runs and writes the report (complexity timed alone)
  deadline=$(( started + limit + 50 )); sweep --set "seeds=[$seed_list]" --set "k=[$(IFS=,; echo "${ks[*]}")]" 2>&1 | tail -n 3
fi
python3 - "$runs" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    metrics = json.loads(path.read_text())
    for key, figures in metrics.get("evaluations", {}).items():
        print(path.parent.name, key, {name: figures.get(name) for name in ("clean_acc", "verified_acc", "seconds")})
PY
cat "$out"/log-*.txt > "$out/logs.txt"; rm -f "$out"/log-*.txt
tar czf "$out/channel-large.tgz" "$runs"/results.md "$runs"/*.png "$runs"/summary.json "$runs"/*/metrics.json "$runs"/*/config.yaml \
  "$runs"/*/history.csv "$runs"/*/run.json "$runs"/*/verify*.json 2>/dev/null
tar czf "$out/models-dense-s0.tgz" "$runs"/dense-s0/model.pt 2>/dev/null
tar czf "$out/models-k0.25-s0.tgz" "$runs"/*-k0.25-s0/model.pt 2>/dev/null
cat "$runs/results.md" 2>/dev/null
