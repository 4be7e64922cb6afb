#!/usr/bin/env bash
# Speedrun per-step regression: c4ab96b vs HEAD vs HEAD + the tracking fix, same card, two rounds
mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
ROOT=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
PYTHONPATH=/tmp/site python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" | tee -a $OUT/device.txt
nproc; python3 --version
run() {  # tree tag
  mkdir -p $OUT/$2; rm -rf /tmp/sr_$2
  (cd $ROOT/.gpu/$1 && PYTHONPATH=/tmp/site:$ROOT/.gpu/$1 timeout ${TMO:-150} python3 -m bench.speedrun_shakespeare --text=$ROOT/.bench_data/tinyshakespeare.txt --out=/tmp/sr_$2 --no_baseline > $OUT/$2/speedrun.log 2>&1); echo "rc=$? $(date +%T)"
  cp /tmp/sr_$2/speedrun_shakespeare.json $OUT/$2/ 2>/dev/null && python3 .gpu/srsum.py $OUT/$2/speedrun_shakespeare.json $2 || tail -20 $OUT/$2/speedrun.log
}
date +%T
for r in 1 2; do
  run sr_old old_r$r
  run sr_head head_r$r
  run sr_fix fix_r$r
done
