# next session, call A (nvidia-h100-x1; carry .fa4, built here by logs-sixteenth/make_fa4_carry.sh):
# what is live at the 64k peak with FLASH["cmp"] = 1 and with the defaults (tools/bench.py --memory).
# The carry and the tracked files must stay under 64 MiB: copy this file to tools/next-s19a.sh, move
# tools/results and docs/viz_branches_example.png aside, run `bash tools/next-s19a.sh`, move them back.
T0=$(date +%s)
left() { echo $(( ${1:-560} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r /tmp/fa4site
[ -f /tmp/fa4site/flash_attn/cute/interface.py ] || xz -dc .fa4/site.tar.xz | tar xf - -C /tmp/fa4site || echo "extract failed"
xz -dc .fa4/libtvm_ffi_testing.so.xz > /tmp/fa4site/tvm_ffi/lib/libtvm_ffi_testing.so
export PYTHONPATH=$PWD:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
B="python3 tools/bench.py --dims 128:128 --configs paper --impls nsa_flex --seq 65536 --memory"
timeout 280 $B --tune FLASH.cmp=1 --out $OUT/r/mem_flash.json > $OUT/r/mem_flash.log 2>&1; echo "flash rc=$? at $(( $(date +%s)-T0 ))"
timeout $(left) $B --out $OUT/r/mem_default.json > $OUT/r/mem_default.log 2>&1; echo "default rc=$? at $(( $(date +%s)-T0 ))"
for f in mem_flash mem_default; do echo "== $f"; python3 -c "
import json; r=json.load(open('$OUT/r/$f.json'))['rows'][0]; m=r.get('memory_at_peak', {})
print(r['fwdbwd_ms'], r['peak_mem_mib'], m.get('before_mib'), m.get('peak_mib'))
for t in m.get('top', [])[:12]: print(' ', str(t)[:200])" 2>&1 | tail -14; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
