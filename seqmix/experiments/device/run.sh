#!/usr/bin/env bash
# Runs seqmix's GPU work on a GPU machine, stage by stage, each stage's log under $OUT.
# Run it from the repository root; wheels in .whl/ (if any) are installed first.
#
#   seqmix/experiments/device/run.sh test peers bench:attention tune:attention ...
#
# Stages: test[:pytest args] | peers[:op,op] | bench:<op> | bench_quick:<op> | tune:<op>
#         | final[:sections] | model[:flags] | recall[:flags] | recall_probe[:flags]
#         | mgpu[:sections] | profile[:op,op] | compare[:op,op] | sp[:flags]
#         | masking[:op:impl,...] | time:<time_ops op>
#         (flags separated by spaces, the stage quoted)
#   test   every kernel's cases natively on the GPU against the float32 oracle:
#          python -m pytest -m gpu tests (args default: -n 8 -q; needs pytest, pytest-xdist;
#          quoted args stay whole: "test:-n 8 -q -k 'delta_rule or cross'")
#   peers  comparisons with PyTorch SDPA and flash-linear-attention (experiments/gpu_check.py)
#   compare  bench_kernels --quick of this tree beside the tree in .old/ (or $COMPARE_OTHER),
#          A B A in separate processes (experiments/device/compare_revisions.py)
#   time   time_ops.py --op=<op>: the public op at fixed shapes, in this tree
#   masking  exact NaN masking's cost per chunked kernel (experiments/device/masking_cost.py)
#   sp     bench_sequence_parallel (flags default: --mode=overhead, one GPU)
#   tune   the autotuner's winners for <op> go to $OUT/tuning.json, which every later stage
#          applies through SEQMIX_TUNING (the tables themselves are unchanged)
# A stage may be given a time limit in seconds after '@' (default 600): bench:attention@240.
# '{OUT}' in a stage's flags stands for $OUT, so a stage can read what an earlier one wrote:
#   "recall:--out_dir={OUT}/pilot --lrs=1e-3,1e-2" "recall:--lrs_from={OUT}/pilot/recall.json"
set -u
export PYTHONUNBUFFERED=1
# Results go to $OUT (default runs/device/ under the repository root), read by every stage.
export OUT=${OUT:-$PWD/runs/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
# (a caller that runs two of these at once gives each its share)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
for stage in "$@"; do
  limit=600; case $stage in *@*) limit=${stage##*@}; stage=${stage%@*} ;; esac
  name=${stage%%:*}; arg=${stage#*:}; [ "$arg" = "$stage" ] && arg=""
  # INT first (scripts write what they have), KILL 45 s later if that did not end it
  T="timeout -k 45 -s INT $limit"
  tag=${arg//[^A-Za-z0-9_.]/_}
  log="$OUT/${name}_${tag:0:60}.log"
  arg=${arg//\{OUT\}/$OUT}
  echo "=== $stage" | tee -a "$OUT/summary.txt"
  start=$(date +%s)
  case $name in
    # the args as the shell would split them (quotes kept): "test:-n 8 -k 'a or b'"
    test) eval "targs=(${arg:--n 8 -q})"
          $T python3 -m pytest -m gpu "${targs[@]}" tests > "$log" 2>&1 ;;
    peers) $T python3 -m seqmix.experiments.gpu_check ${arg:+--only=$arg} > "$log" 2>&1 ;;
    bench) $T python3 -m seqmix.experiments.bench_kernels --op="$arg" --out_dir="$OUT" > "$log" 2>&1 ;;
    bench_quick) $T python3 -m seqmix.experiments.bench_kernels --op="$arg" --quick --out_dir="$OUT" > "$log" 2>&1 ;;
    tune) $T python3 -m seqmix.experiments.bench_kernels --op="$arg" --tune \
            --tuning_out="$OUT/tuning.json" > "$log" 2>&1
          [ -f "$OUT/tuning.json" ] && export SEQMIX_TUNING=$OUT/tuning.json ;;
    model) $T python3 -m seqmix.experiments.bench_model ${arg:+$arg} --out_dir="$OUT" > "$log" 2>&1 ;;
    sp) $T python3 -m seqmix.experiments.bench_sequence_parallel ${arg:---mode=overhead} \
          --out_dir="$OUT" > "$log" 2>&1 ;;
    recall_probe) $T python3 -m seqmix.experiments.device.recall_probe ${arg:+$arg} > "$log" 2>&1 ;;
    recall) $T python3 -m seqmix.experiments.recall_sweep --out_dir="$OUT" ${arg:+$arg} > "$log" 2>&1 ;;
    profile) $T python3 -m seqmix.experiments.device.profile_ops ${arg:+--ops=$arg} > "$log" 2>&1 ;;
    time) $T python3 seqmix/experiments/device/time_ops.py --op="$arg" --iters=5 \
            --out="$OUT/time_$arg.json" > "$log" 2>&1 ;;
    masking) $T python3 -m seqmix.experiments.device.masking_cost ${arg:+--ops=$arg} \
               --out="$OUT/masking_cost.json" > "$log" 2>&1 ;;
    compare) n=$(( ${#arg} ? $(tr -cd , <<<"$arg" | wc -c) + 1 : 5 ))
             JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache $T python3 -m \
             seqmix.experiments.device.compare_revisions --other="${COMPARE_OTHER:-.old}" \
             ${arg:+--ops=$arg} --limit_s=$(( (limit - 40) / (3 * n) )) > "$log" 2>&1 ;;
    mgpu) $T python3 -m seqmix.experiments.device.mgpu_linear_attention ${arg:+--sections=$arg} \
            --deadline_s=$((limit - 90)) > "$log" 2>&1 ;;
    final) $T python3 -m seqmix.experiments.device.final --sections="${arg:-targets}" \
             --deadline_s=$((limit - 100)) > "$log" 2>&1 ;;
    *) echo "unknown stage $stage"; continue ;;
  esac
  rc=$?
  echo "rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
  # the table printed last by each stage (pytest: its summary lines)
  awk '/^\| |^best |^(FAILED|ERROR|SKIPPED) |passed|failed/' "$log" | tail -60 | tee -a "$OUT/summary.txt"
  [ $rc -ne 0 ] && tail -30 "$log" | tee -a "$OUT/summary.txt"
done
# Everything but the summary in one archive, so the results travel as two files (written
# outside $OUT first: an archive growing in the folder it reads makes tar fail).
cd "$OUT" && tar czf "/tmp/bundle.$$.tgz" --exclude=summary.txt . && \
  mv "/tmp/bundle.$$.tgz" bundle.tgz && \
  find . -mindepth 1 ! -name bundle.tgz ! -name summary.txt -delete
ls -la "$OUT"
