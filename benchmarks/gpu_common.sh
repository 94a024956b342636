# Sourced by the prepared GPU scripts (channel_gpu.sh, fashion_gpu.sh), after they set $out (the report folder) and
# $limit (seconds): the installed layout on a bare GPU machine, the environment, a GPU memory monitor writing
# $out/gpu.csv (its pid in $monitor), and certprune(), which runs `python -m certprune -q` within the deadline.
if [ -d .whl ] && ! python3 -c "import pydantic, certprune.models" 2>/dev/null; then  # a bare GPU machine: its own site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  mkdir -p /tmp/site && cp -r certprune /tmp/site/ && cp -r models certify /tmp/site/certprune/  # installed layout
  export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1  # the installed layout, not ./certprune, for python -m
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$out"
if nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; then
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader -l 5 > "$out/gpu.csv" & monitor=$!
fi
deadline=$(( $(date +%s) + limit ))
certprune() {  # every command ends by the deadline; one that gets no time says so in its log
  local left=$(( deadline - $(date +%s) ))
  if [ $left -le 0 ]; then echo "no time left for: certprune $*"; return 124; fi
  timeout -k 30 $left python3 -m certprune -q "$@"
}
