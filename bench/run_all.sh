#!/usr/bin/env bash
# Every benchmark in turn, then the plot; figures in bench/results/*.json. Pass --quick for a short pass.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
status=0
for bench in latency throughput memory first_token; do
  extra=""
  [ "$bench" = throughput ] && extra="--profile"
  echo "=== $bench"
  $PY bench/$bench.py "$@" $extra || status=1
done
echo "=== load"
$PY bench/load.py "$@" || status=1
echo "=== load --faults"
$PY bench/load.py --faults "$@" || status=1
$PY bench/profile_summary.py bench/results/throughput-profile.txt || true
for kind in "" --stream; do echo "=== scaling $kind"; $PY bench/scaling.py $kind || status=1; done
$PY bench/plot.py || status=1
exit $status
