#!/usr/bin/env bash
# serve_load side by side: HEAD (.gpu/base) against the working tree; 1 and 128 streams, prefix reuse.
mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ARGS="--no_hf --concurrency=1,128 --requests=16,1024 --prefix_tokens=1024 --prefix_requests=32"
for round in 1 2; do
for side in base new; do
  if [ $side = base ]; then dir=$PWD/.gpu/base; else dir=$PWD; fi
  echo "== $side round $round"; date +%T
  (cd $dir && PYTHONPATH=/tmp/site:$dir timeout 110 python3 -m bench.serve_load $ARGS --out=$OUT/serve_${side}_$round.json > $OUT/serve_${side}_$round.log 2>&1; echo "rc=$?")
  python3 - $OUT/serve_${side}_$round.json <<'PY'
import json,sys
r=json.load(open(sys.argv[1])); L=r["levels"]
for c in ("1","128"):
    e=L[c]["engine"]; print(c, "tok/s", e["tokens_per_s"], "ttft p50", e["ttft_ms_p50"], "per-token p50", e["per_token_ms_p50"])
p=r["prefix_reuse"]; print("prefix ttft p50 without", p["without"]["ttft_ms_p50"], "with", p["with"]["ttft_ms_p50"])
PY
done; done
date +%T
