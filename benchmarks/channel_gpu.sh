#!/usr/bin/env bash
# configs/channel.yaml (cnn-large, channel granularity, k = 0.5 / 0.25 / 0.1, HYDRA and L1 filters) over three
# seeds on one GPU. The GPU is mostly idle for a network this small, so every run is a process of its own: first the
# three dense models side by side, then the 18 pruned runs side by side, each a one-run `certprune sweep` into the same
# folder (so names and reuse checks are the sweep's own); a last sweep over everything writes the 3-seed report.
# From the repository root of a lent GPU machine, with the wheels of .whl/ (pydantic, auto_LiRPA, appdirs):
#   bash benchmarks/channel_gpu.sh OUTDIR [SECONDS] [extra certprune options, e.g. --set model=cnn-small]
# SEEDS="0 1 2" and KS="0.5 0.25 0.1" (the config's) choose the runs, RUNS=runs/channel-large the folder.
set -u
seeds=(${SEEDS:-0 1 2}); ks=(${KS:-0.5 0.25 0.1}); methods=(hydra lwm); seed_list=$(IFS=,; echo "${seeds[*]}")
out=${1:?output folder}; shift; limit=${1:-480}; [ $# -gt 0 ] && shift; extra=("$@")
runs=${RUNS:-runs/channel-large}; mkdir -p "$runs"
source "$(dirname "$0")/gpu_common.sh"
sweep() { certprune sweep --config configs/channel.yaml "${extra[@]}" --out "$runs" "$@"; }
verified() { grep -q '"verify' "$runs/$1/metrics.json" 2>/dev/null; }  # trained, and its verify record written
started=$(date +%s)
pids=()  # a plain `wait` would also wait for the GPU monitor, which never ends
for seed in "${seeds[@]}"; do
  certprune pretrain --config configs/channel.yaml "${extra[@]}" --set seed=$seed --out "$runs/dense-s$seed" \
    > "$out/log-dense-s$seed.txt" 2>&1 & pids+=($!)
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
echo "dense models: $(( $(date +%s) - started )) s"
for seed in "${seeds[@]}"; do
  if ! verified "dense-s$seed"; then echo "dense-s$seed unfinished: its pruned runs are not started"; continue; fi
  for k in "${ks[@]}"; do
    for method in "${methods[@]}"; do
      sweep --set "seeds=[$seed]" --set "k=[$k]" --set "prune_methods=[$method]" \
        > "$out/log-$method-k$k-s$seed.txt" 2>&1 & pids+=($!)
    done
  done
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
echo "dense and pruned: $(( $(date +%s) - started )) s"
missing=()
for seed in "${seeds[@]}"; do
  verified "dense-s$seed" || missing+=("dense-s$seed")
  for k in "${ks[@]}"; do for method in "${methods[@]}"; do
    verified "$method-k$k-s$seed" || missing+=("$method-k$k-s$seed")
  done; done
done
rm -f "$runs"/results.md "$runs"/summary.json "$runs"/*.png  # the one-run sweeps' reports, never the 3-seed one
if [ ${#missing[@]} -eq 0 ]; then  # every run trained and verified: this reads them and writes the report
  deadline=$(( started + limit + 50 ))
  sweep --set "seeds=[$seed_list]" --set "k=[$(IFS=,; echo "${ks[*]}")]" > "$out/log-report.txt" 2>&1 \
    || echo "the report sweep failed: see logs.txt"
else
  echo "not verified: ${missing[*]}; no report written (an earlier one in $runs is removed: it would not be these runs)"
fi
python3 - "$runs" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    metrics = json.loads(path.read_text())
    for key, figures in metrics.get("evaluations", {}).items():
        print(path.parent.name, key, {name: figures.get(name) for name in ("clean_acc", "verified_acc", "seconds")})
PY
[ -n "${monitor:-}" ] && kill "$monitor"
for log in "$out"/log-*.txt; do echo "== ${log##*/log-}"; cat "$log"; done > "$out/logs.txt"; rm -f "$out"/log-*.txt
tar czf "$out/channel-large.tgz" "$runs"/results.md "$runs"/*.png "$runs"/summary.json "$runs"/*/metrics.json \
  "$runs"/*/config.yaml "$runs"/*/history.csv "$runs"/*/run.json "$runs"/*/verify*.json 2>/dev/null
for part in dense-s0 "*-k0.25-s0"; do  # seed 0's dense and k = 0.25 models, for benchmarks on another machine
  files=$(ls "$runs"/$part/model.pt 2>/dev/null) && tar czf "$out/models-${part//\*-/}.tgz" $files
done
cat "$runs/results.md" 2>/dev/null
