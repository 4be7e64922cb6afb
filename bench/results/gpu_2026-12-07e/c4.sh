# prefix reuse, parent commit (.gpu/pfx/base_head: git archive <commit>^ app bench) vs this one; copy pr.py,
# diag.py and this file into .gpu/pfx/ first. Not run yet (no GPU could be started).
mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
R=$PWD; B=$PWD/.gpu/pfx/base_head
for i in 1 2; do for side in base new; do
  if [ $side = base ]; then dir=$B; else dir=$R; fi
  (cd $dir && PYTHONPATH=/tmp/site:$dir timeout 45 python3 $R/.gpu/pfx/pr.py $side 3 $OUT/prefix_${side}_$i.json 2>&1 | grep -v Warn | tail -4)
done; done
mkdir -p $OUT/diag_new; echo "== diag new $(date +%T)"
(OUT=$OUT/diag_new PYTHONPATH=/tmp/site:$R timeout 50 python3 $R/.gpu/pfx/diag.py > $OUT/diag_new.log 2>&1; echo rc=$?)
grep -E "^==|micro|sdpa" $OUT/diag_new.log; grep -E "'(admit|fwd|load|prefill)'" $OUT/diag_new.log | head -30
date +%T
