#!/usr/bin/env bash
# prefix reuse: before (HEAD app/serve + bench) vs after, same machine, then the speedrun re-check
mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())" | tee -a $OUT/device.txt
rm -rf /tmp/orig && mkdir /tmp/orig && cp -r app bench /tmp/orig/ && cp .gpu/orig/engine.py .gpu/orig/kvcache.py /tmp/orig/app/serve/ && cp .gpu/orig/serve_load.py /tmp/orig/bench/
mkdir -p /tmp/newapp_oldbench && cp -r app bench /tmp/newapp_oldbench/ && cp .gpu/orig/serve_load.py /tmp/newapp_oldbench/bench/
ARGS="--no_hf --concurrency=32 --requests=64 --prompt_len=512 --max_tokens=128 --prefix_tokens=1024"
show() { python3 -c "import json;d=json.load(open('$1'));p=d['prefix_reuse'];print('start_s',d['engine_start_s'],'c32',{k:d['levels']['32']['engine'][k] for k in ('tokens_per_s','ttft_ms_p50','per_token_ms_p50','step_ms')});print({k:(v if not isinstance(v,dict) else {x:v[x] for x in ('ttft_ms_p50','ttft_ms_p99','step_ms','prefilled_tokens','wall_s')}) for k,v in p.items()})"; }
for round in 1 2; do
echo "== before (HEAD) round $round"; (cd /tmp/orig && PYTHONPATH=/tmp/site:/tmp/orig timeout 90 python3 -m bench.serve_load $ARGS --out=$OUT/serve_prefix_before_r$round.json > $OUT/serve_prefix_before_r$round.log 2>&1); echo rc=$?; show $OUT/serve_prefix_before_r$round.json
echo "== after round $round"; PYTHONPATH=/tmp/site:$PWD timeout 90 python3 -m bench.serve_load $ARGS --out=$OUT/serve_prefix_after_r$round.json > $OUT/serve_prefix_after_r$round.log 2>&1; echo rc=$?; show $OUT/serve_prefix_after_r$round.json
done
echo "== new engine, old bench warm-up"; (cd /tmp/newapp_oldbench && PYTHONPATH=/tmp/site:/tmp/newapp_oldbench timeout 90 python3 -m bench.serve_load $ARGS --out=$OUT/serve_prefix_newengine_oldbench.json > $OUT/serve_prefix_newengine_oldbench.log 2>&1); echo rc=$?; show $OUT/serve_prefix_newengine_oldbench.json
export PYTHONPATH=/tmp/site:$PWD
echo "== diag time after"; timeout 60 python3 .gpu/prefix_diag.py --mode=time --out=$OUT/diag_time_after.json > $OUT/diag_time_after.log 2>&1; echo rc=$?; head -60 $OUT/diag_time_after.log
echo "== sdpa no cudnn"; NOCUDNN=1 timeout 40 python3 .gpu/prefix_diag.py --mode=sdpa --out=$OUT/diag_sdpa_nocudnn.json 2>&1 | tail -5
echo "== speedrun"; date +%T; mkdir -p $OUT/speedrun /tmp/speedrun
timeout 260 python3 -m bench.speedrun_shakespeare --text=.bench_data/tinyshakespeare.txt --out=/tmp/speedrun > $OUT/speedrun/speedrun.log 2>&1; echo "rc=$?"; tail -c 1500 $OUT/speedrun/speedrun.log; date +%T
cp /tmp/speedrun/*.json /tmp/speedrun/*.png $OUT/speedrun/ 2>/dev/null; ls -la $OUT/speedrun
