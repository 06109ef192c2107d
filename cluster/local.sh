#!/usr/bin/env bash
# A two-node Ray cluster on one machine: a head node and one worker node, each its own raylet
# with its own resources, as a real multi-node cluster would be (for trying medray submit and
# multi-node training on a laptop).
#
#   cluster/local.sh start     # head: GCS 127.0.0.1:${RAY_PORT:-6390}, dashboard/Jobs API http://127.0.0.1:${DASHBOARD_PORT:-8266}
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Then: medray submit jobs/specs/genomic.yaml --address http://127.0.0.1:8266 --follow
# Each node advertises CPUS_PER_NODE logical CPUs (default 4: more than a 2-core laptop has, so
# Ray Data and the Train controller are not starved; see README "Local Ray on small machines").
set -euo pipefail
RAY=${RAY:-$(dirname "$0")/../.venv/bin/ray}
[ -x "$RAY" ] || RAY=ray
RAY_PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
CPUS_PER_NODE=${CPUS_PER_NODE:-4}
HEAD_TMP=${HEAD_TMP:-/tmp/medray-cluster}

case "${1:-}" in
  start)
    RAY_TRAIN_V2_ENABLED=1 "$RAY" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
      --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --include-dashboard true \
      --num-cpus "$CPUS_PER_NODE" --resources '{"medray_head": 1}' --temp-dir "$HEAD_TMP" --disable-usage-stats
    RAY_TRAIN_V2_ENABLED=1 "$RAY" start --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 \
      --num-cpus "$CPUS_PER_NODE" --resources '{"medray_worker": 1}' --disable-usage-stats
    echo "head GCS 127.0.0.1:$RAY_PORT; Jobs API / dashboard http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  status)
    "$RAY" status --address "127.0.0.1:$RAY_PORT"
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
