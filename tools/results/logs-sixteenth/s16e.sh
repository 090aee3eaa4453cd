# session 16 call E (nvidia-h100-x1; carry .fa4): the operator under FLASH at 4k (errors traced), then the
# static branches at 64k under FLASH vs Triton (bench_branches).
T0=$(date +%s)
left() { echo $(( ${1:-570} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r /tmp/fa4site
[ -f /tmp/fa4site/flash_attn/cute/interface.py ] || xz -dc .fa4/site.tar.xz | tar xf - -C /tmp/fa4site || echo "extract failed"
xz -dc .fa4/libtvm_ffi_testing.so.xz > /tmp/fa4site/tvm_ffi/lib/libtvm_ffi_testing.so
echo "extracted at $(( $(date +%s)-T0 )) s"
export FA=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
PYTHONPATH=$PWD:$FA timeout 230 python3 .fa4/flash_op.py 4096 "FLASH.swa=1" "FLASH.cmp=1" > $OUT/r/flash_op.log 2>&1; echo "flash_op rc=$? at $(( $(date +%s)-T0 ))"
grep -vE "Warning|warn|^\s*$|Autotune|best_kernel|storage" $OUT/r/flash_op.log | tail -60
PYTHONPATH=$PWD:$FA timeout $(left) python3 tools/bench_branches.py --seq 65536 --branches swa cmp --sets "" "FLASH=1" --out $OUT/r/br64k.json > $OUT/r/br64k.log 2>&1; echo "br64k rc=$? at $(( $(date +%s)-T0 ))"
grep -E "^\{\"branch" $OUT/r/br64k.log | python3 -c "
import sys,json
for l in sys.stdin:
  r=json.loads(l); print(r['branch'], r['set'] or 'defaults', 'fwd', round(r.get('fwd_ms',-1),3), 'fwdbwd', round(r.get('fwdbwd_ms',-1),2), 'kern', r.get('flex_fwd_kernel_ms'), r.get('flex_bwd_kernel_ms'), 'diff', r.get('max_rel_diff_vs_first'), r.get('error','')[:300])"
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
