#!/usr/bin/env bash
# configs/fashion-mnist-gpu.yaml on one lent GPU: the dense cnn-large (CROWN-IBP, full Fashion-MNIST), verified with
# IBP then CROWN on all 10,000 test images, then HYDRA and LWM at each k side by side, every run a process of its own
# pruned from that verified dense run, each a one-run `certprune sweep` into the same folder (so names and reuse
# checks are the sweep's own); a last sweep over them all writes the report, only when every planned run is verified.
# From the repository root of a lent GPU machine, with the wheels of .whl/ (pydantic, auto_LiRPA, appdirs) and the
# four Fashion-MNIST idx files in DATA (copy /usr/share/datasets/fashion-mnist/* to data/fashion-mnist: 30 MB,
# untracked, so they travel with the working tree):
#   DATA=data/fashion-mnist bash benchmarks/fashion_gpu.sh OUTDIR [SECONDS] [extra certprune options]
# KS="0.1 0.05 0.01" (the config's) chooses the pruned runs, KS= none (the dense run alone); RUNS=runs/fashion-gpu
# the folder. SECONDS (default 540) bounds every command; the report may take 50 more.
#
# Time estimate, one H200, NOT YET MEASURED for this config (no session with a GPU has run it). From the H200 runs of
# configs/channel.yaml (cnn-large, channel-large-h200*.json / .md): 3 dense processes side by side each trained
# 67 natural + 536 CROWN-IBP + 737 IBP steps of 128 in 32 s, and 18 pruned ones 1,072 IBP steps in ~100 s (about
# 5 ms of GPU per 128-image IBP step, all processes together); bench_gpu-h200.json: a CROWN-IBP step costs 3.7 IBP
# steps (cnn-7layer); together ~10 and ~38 ms per 128-image IBP / CROWN-IBP step with 3 processes sharing, and one
# process alone at 256 is taken to be about as fast. Verification at batch 8 there: IBP 4.7 ms per image, CROWN 53 ms
# per image IBP left to it.
#   dense, 30 epochs x 235 steps of 256: 18 ramp epochs at ~30 ms a step (CROWN-IBP) + 11 at ~8 ms (IBP) ~ 150 s
#     (100-220 s); its verification: IBP on 10,000 + CROWN on the ~1,000-1,500 images IBP leaves ~ 90 s (50-130 s);
#   6 pruned runs side by side, 6 epochs each at IBP price (~10 ms of GPU per 256-image step) ~ 90 s (60-150 s),
#     then their verifications together ~ 100 s (60-160 s);
#   start-ups (imports, data to the GPU) 2 x 15 s, the report ~ 20 s.
# Total ~ 480 s (320-700 s) of the lease's 15 minutes, which also pay for the machine's start. Past SECONDS, the
# commands still running are stopped (timeout -k) and no report is written; the dense run is kept whatever happens.
# Give the call that runs this SECONDS + 60 (the report's 50 and the packing).
set -u
ks=(${KS-0.1 0.05 0.01}); methods=(hydra lwm); config=configs/fashion-mnist-gpu.yaml
out=${1:?output folder}; shift; limit=${1:-540}; [ $# -gt 0 ] && shift; extra=("$@")
data=${DATA:-/usr/share/datasets/fashion-mnist}
if [ ! -d "$data" ]; then  # before anything starts
  echo "no data folder $data: set DATA to the folder of the four Fashion-MNIST idx files"; exit 2
fi
runs=${RUNS:-runs/fashion-gpu}; mkdir -p "$runs"
source "$(dirname "$0")/gpu_common.sh"
sweep() { certprune sweep --config $config --data-dir "$data" "${extra[@]}" --out "$runs" "$@"; }
verified() { grep -q '"verify' "$runs/$1/metrics.json" 2>/dev/null; }  # trained, and its verify record written
started=$(date +%s)
certprune pretrain --config $config --data-dir "$data" "${extra[@]}" --out "$runs/dense" > "$out/log-dense.txt" 2>&1
echo "dense run: $(( $(date +%s) - started )) s"
pids=()  # a plain `wait` would also wait for the GPU monitor, which never ends
if verified dense; then
  for k in "${ks[@]}"; do
    for method in "${methods[@]}"; do
      sweep --set "k=[$k]" --set "prune_methods=[$method]" > "$out/log-$method-k$k.txt" 2>&1 & pids+=($!)
    done
  done
else
  echo "dense unfinished: its pruned runs are not started"
fi
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
echo "dense and pruned: $(( $(date +%s) - started )) s"
missing=()
verified dense || missing+=(dense)
for k in "${ks[@]}"; do for method in "${methods[@]}"; do
  verified "$method-k$k" || missing+=("$method-k$k")
done; done
rm -f "$runs"/results.md "$runs"/summary.json "$runs"/*.png  # the one-run sweeps' reports, never the whole one
if [ ${#missing[@]} -gt 0 ]; then
  echo "not verified: ${missing[*]}; no report written (an earlier one in $runs is removed: it would not be these runs)"
elif [ ${#ks[@]} -gt 0 ]; then  # every run trained and verified: this reads them and writes the report
  deadline=$(( started + limit + 50 ))
  sweep --set "k=[$(IFS=,; echo "${ks[*]}")]" > "$out/log-report.txt" 2>&1 \
    || echo "the report sweep failed: see logs.txt"
fi
python3 - "$runs" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    metrics = json.loads(path.read_text())
    for key, figures in metrics.get("evaluations", {}).items():
        print(path.parent.name, key, {name: figures.get(name) for name in
                                      ("clean_acc", "verified_acc", "verified_acc_ibp", "seconds")})
PY
[ -n "${monitor:-}" ] && kill "$monitor"
[ -s "$out/gpu.csv" ] && echo "GPU memory at most $(sort -n "$out/gpu.csv" | tail -n 1)"
for log in "$out"/log-*.txt; do echo "== ${log##*/log-}"; cat "$log"; done > "$out/logs.txt"; rm -f "$out"/log-*.txt
tar czf "$out/fashion-gpu.tgz" "$runs"/results.md "$runs"/*.png "$runs"/summary.json "$runs"/*/metrics.json \
  "$runs"/*/config.yaml "$runs"/*/history.csv "$runs"/*/run.json "$runs"/*/verify*.json "$runs"/*/verify*.tsv \
  2>/dev/null  # the per-image verdicts (.tsv) too: stronger verifiers can take up the unknown images elsewhere
[ -f "$runs/dense/model.pt" ] && tar czf "$out/model-dense.tgz" "$runs/dense/model.pt"  # for stronger verifiers
cat "$runs/results.md" 2>/dev/null
