#!/usr/bin/env bash
# prefix-reuse diagnosis (before any fix) 
mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())" | tee -a $OUT/device.txt
echo "== diag sdpa"; timeout 60 python3 .gpu/prefix_diag.py --mode=sdpa --out=$OUT/diag_sdpa.json 2>&1 | tail -20
echo "== diag time"; timeout 120 python3 .gpu/prefix_diag.py --mode=time --out=$OUT/diag_time.json > $OUT/diag_time.log 2>&1; echo rc=$?; head -c 6000 $OUT/diag_time.log
echo "== diag prof"; timeout 120 python3 .gpu/prefix_diag.py --mode=prof --out=$OUT/diag_prof.json > $OUT/diag_prof.log 2>&1; echo rc=$?; grep -v "^  " $OUT/diag_prof.log | head -c 9000
echo "== bench before"; timeout 150 python3 -m bench.serve_load --no_hf --concurrency=32 --requests=64 --prompt_len=512 --max_tokens=128 --prefix_tokens=1024 --out=$OUT/serve_load_prefix_before.json > $OUT/serve_prefix_before.log 2>&1; echo rc=$?
python3 -c "import json;d=json.load(open('$OUT/serve_load_prefix_before.json'))['prefix_reuse'];print({k:(v if not isinstance(v,dict) else {x:v[x] for x in ('ttft_ms_p50','ttft_ms_p99','step_ms','prefilled_tokens','wall_s')}) for k,v in d.items()})"
