#!/usr/bin/env bash
# Training-step throughput: dagrad (bench/bench_train) against libtorch (bench/libtorch).
# Builds both (libtorch only when Debian's libtorch-dev is installed), runs each with 5
# repetitions, and prints the medians as a table: workload, dagrad samples/s, libtorch samples/s,
# ratio dagrad/libtorch.
#
#   scripts/bench.sh [extra Google Benchmark flags, e.g. --benchmark_min_time=1]
# Environment: BUILD_DIR (default build), DAGRAD_THREADS (threads for both; 0/unset = all cores),
#              OUT_DIR (where the JSON results go; default $BUILD_DIR/bench-results),
#              WORKLOADS (space-separated benchmark names without the torch_ prefix; default all),
#              ROUNDS (default 1): repeat the whole dagrad-then-libtorch sequence; with more than
#              one round a second table gives, per workload, the median over the rounds of each
#              engine's samples/s and of the ratio, and the smallest and largest ratio (on a
#              noisy machine single rounds moved ratios by up to ±0.3).
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${BUILD_DIR:-build}
OUT_DIR=${OUT_DIR:-$BUILD_DIR/bench-results}
mkdir -p "$OUT_DIR"
WORKLOADS=${WORKLOADS:-"mlp_train_step/32 mlp_train_step/128 mlp_train_step/512 cnn_train_step/64
  cnn_bn_train_step/64 mlp_train_step_threads/128/1 mlp_train_step_threads/128/2"}

with_torch=OFF
if dpkg -s libtorch-dev >/dev/null 2>&1; then
  with_torch=ON
else
  echo "libtorch-dev is not installed (apt-get install -y libtorch-dev): dagrad only" >&2
fi
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" \
  -DDAGRAD_BUILD_BENCH=ON -DDAGRAD_BENCH_LIBTORCH=$with_torch >/dev/null
targets=(bench_train)
if [[ $with_torch == ON ]]; then targets+=(bench_libtorch); fi
make -C "$BUILD_DIR" -j2 "${targets[@]}" >/dev/null

flags=(--benchmark_repetitions=5 --benchmark_report_aggregates_only=true
  --benchmark_out_format=json "$@")
if [[ $with_torch == ON ]]; then
  # libtorch's matmuls go through whatever libblas.so.3 resolves to (Debian's reference BLAS
  # unless OpenBLAS is installed or put on LD_LIBRARY_PATH): say which one.
  echo "libtorch BLAS: $(ldd "$BUILD_DIR/bench/libtorch/bench_libtorch" | awk '/libblas/ { print $3 }' | xargs -r readlink -f)"
fi
echo "threads: ${DAGRAD_THREADS:-all cores}; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
# One workload at a time, dagrad then libtorch, so that both see about the same load on a
# shared machine.
ROUNDS=${ROUNDS:-1}
rm -f "$OUT_DIR"/dagrad-*.json "$OUT_DIR"/libtorch-*.json "$OUT_DIR"/*.summary "$OUT_DIR/rounds.lines"
for round in $(seq 1 "$ROUNDS"); do
  index=0
  for workload in $WORKLOADS; do
    index=$((index + 1))
    "$BUILD_DIR/bench/bench_train" "${flags[@]}" --benchmark_filter="^$workload/" \
      --benchmark_out="$OUT_DIR/dagrad-$round-$index.json"
    if [[ $with_torch == ON ]]; then
      "$BUILD_DIR/bench/libtorch/bench_libtorch" "${flags[@]}" \
        --benchmark_filter="^torch_$workload/" --benchmark_out="$OUT_DIR/libtorch-$round-$index.json"
    fi
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

# Google Benchmark writes one JSON key per line; pick items_per_second of the median and of the
# cv (coefficient of variation over the repetitions) of each benchmark (plain awk, so the script
# needs neither python nor jq). Prints: name median cv.
summary() {
  compgen -G "$1" >/dev/null || return 0
  awk -F'"' '
    /"run_name":/ { name = $4; sub(/^torch_/, "", name); sub(/\/real_time$/, "", name) }
    /"aggregate_name":/ { aggregate = $4 }
    /"items_per_second":/ {
      value = $3; gsub(/[:, ]/, "", value)
      if (aggregate == "median") median[name] = value
      if (aggregate == "cv") cv[name] = value
      if (aggregate == "median" && !(name in seen)) { seen[name] = 1; order[++count] = name }
      aggregate = ""
    }
    END { for (i = 1; i <= count; ++i) print order[i], median[order[i]], cv[order[i]] + 0 }' $1
}
# One line per workload of round $1: name, dagrad median, dagrad cv, libtorch median, libtorch cv
# (0 0 without libtorch).
round_lines() {
  summary "$OUT_DIR/libtorch-$1-*.json" >"$OUT_DIR/libtorch-$1.summary"
  summary "$OUT_DIR/dagrad-$1-*.json" | while read -r name ours our_cv; do
    theirs="" their_cv=""
    read -r theirs their_cv < <(awk -v n="$name" '$1 == n { print $2, $3 }' \
      "$OUT_DIR/libtorch-$1.summary") || true
    echo "$name $ours $our_cv ${theirs:-0} ${their_cv:-0}"
  done
}
for round in $(seq 1 "$ROUNDS"); do
  echo
  [[ $ROUNDS -gt 1 ]] && echo "round $round:"
  echo "| workload | dagrad samples/s | libtorch samples/s | ratio dagrad/libtorch | dagrad cv | libtorch cv |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  round_lines "$round" | tee -a "$OUT_DIR/rounds.lines" | awk '{
    if ($4 > 0) printf "| %s | %.0f | %.0f | %.2f | %.0f%% | %.0f%% |\n", $1, $2, $4, $2 / $4, 100 * $3, 100 * $5
    else printf "| %s | %.0f | n/a | n/a | %.0f%% | n/a |\n", $1, $2, 100 * $3
  }'
done
if [[ $ROUNDS -gt 1 ]]; then
  echo
  echo "over $ROUNDS rounds (medians; the ratio's median, smallest and largest):"
  echo "| workload | dagrad samples/s | libtorch samples/s | ratio dagrad/libtorch | ratio range |"
  echo "| --- | ---: | ---: | ---: | --- |"
  # mawk has no sort function: an insertion sort per list.
  awk '
    function median(list, n,    i, j, v, a) {
      for (i = 1; i <= n; ++i) a[i] = list[i]
      for (i = 2; i <= n; ++i) { v = a[i]; for (j = i - 1; j >= 1 && a[j] > v; --j) a[j + 1] = a[j]; a[j + 1] = v }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
      if (!($1 in count)) order[++names] = $1
      k = ++count[$1]
      ours[$1, k] = $2; theirs[$1, k] = $4; ratio[$1, k] = $4 > 0 ? $2 / $4 : 0
    }
    END {
      for (i = 1; i <= names; ++i) {
        name = order[i]; n = count[name]
        lo = 1e30; hi = 0
        for (k = 1; k <= n; ++k) {
          o[k] = ours[name, k]; t[k] = theirs[name, k]; r[k] = ratio[name, k]
          if (r[k] < lo) lo = r[k]
          if (r[k] > hi) hi = r[k]
        }
        if (median(t, n) > 0)
          printf "| %s | %.0f | %.0f | %.2f | %.2f – %.2f |\n", name, median(o, n), median(t, n), median(r, n), lo, hi
        else printf "| %s | %.0f | n/a | n/a | n/a |\n", name, median(o, n)
      }
    }' "$OUT_DIR/rounds.lines"
fi
