#!/usr/bin/env bash
# The fixed speedrun (HEAD + app/tracking.py) with the nanoGPT baseline, twice; HEAD without the fix once
mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
ROOT=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
PYTHONPATH=/tmp/site python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__)" | tee -a $OUT/device.txt
mkdir -p /tmp/res
run() {  # tree tag extra-args
  mkdir -p /tmp/res/$2; rm -rf /tmp/sr_$2
  (cd $ROOT/.gpu/$1 && PYTHONPATH=/tmp/site:$ROOT/.gpu/$1 timeout ${TMO:-200} python3 -m bench.speedrun_shakespeare --text=$ROOT/.bench_data/tinyshakespeare.txt --out=/tmp/sr_$2 $3 > /tmp/res/$2/speedrun.log 2>&1); echo "rc=$? $(date +%T)"
  cp /tmp/sr_$2/speedrun_shakespeare.* /tmp/res/$2/ 2>/dev/null; python3 .gpu/srsum.py /tmp/res/$2/speedrun_shakespeare.json $2 || tail -20 /tmp/res/$2/speedrun.log
}
date +%T
run sr_fix fix_full_r1 ""
run sr_head head_nb "--no_baseline"
run sr_fix fix_full_r2 ""
cp $OUT/device.txt /tmp/res/; (cd /tmp/res && tar czf $OUT/res.tgz .)
