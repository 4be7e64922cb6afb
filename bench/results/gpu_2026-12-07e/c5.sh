mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/device.txt
R=$PWD; B=$PWD/.gpu/pfx/base_head
for side in base new; do
  if [ $side = base ]; then dir=$B; else dir=$R; fi
  (cd $dir && PYTHONPATH=/tmp/site:$dir timeout 50 python3 $R/.gpu/pfx/pr.py $side 3 $OUT/prefix_${side}.json 2>&1 | grep -v Warn | tail -4)
done
mkdir -p $OUT/diag_new; (OUT=$OUT/diag_new PYTHONPATH=/tmp/site:$R timeout 40 python3 $R/.gpu/pfx/diag.py > $OUT/diag_new.log 2>&1; echo rc=$?)
grep -E "^==|micro" $OUT/diag_new.log; grep -E "'(admit|fwd|load)'" $OUT/diag_new.log | head -24
