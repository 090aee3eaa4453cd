# session 16 call A (nvidia-h100-x1; carry .fa4): FlexAttention's FLASH backend (flash-attn-4 4.0.0b36,
# nvidia-cutlass-dsl 4.8.1 cu13) for the static branches: check vs Triton at 4k, branches at 64k, operator at 8k.
T0=$(date +%s)
left() { echo $(( ${1:-560} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r /tmp/fa4site
xz -dc .fa4/site.tar.xz | tar xf - -C /tmp/fa4site || echo "extract failed"
echo "extracted at $(( $(date +%s)-T0 )) s"
export FA=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
python3 -m pip show cuda-bindings protobuf 2>/dev/null | grep -E "^(Name|Version)" | tr '\n' ' '; echo
PYTHONPATH=$PWD:$FA python3 -c "import cutlass, flash_attn.cute, tvm_ffi; print('imports ok')" 2>&1 | tail -4
PYTHONPATH=$PWD:$FA timeout 240 python3 .fa4/flash_check.py 4096 > $OUT/r/flash_check.log 2>&1; echo "flash_check rc=$? at $(( $(date +%s)-T0 ))"
grep -vE "Warning|warn\(|^\s*$" $OUT/r/flash_check.log | tail -40
if grep -q "cmp o: max" $OUT/r/flash_check.log; then
PYTHONPATH=$PWD:$FA timeout $(left 430) python3 tools/bench_branches.py --seq 65536 --branches cmp swa --sets "" "FLASH=1" --out $OUT/r/br64k.json > $OUT/r/br64k.log 2>&1; echo "br64k rc=$? at $(( $(date +%s)-T0 ))"
grep -E "^\{\"branch" $OUT/r/br64k.log | python3 -c "
import sys,json
for l in sys.stdin:
  r=json.loads(l); print(r['branch'], r['set'] or 'defaults', 'fwd', round(r.get('fwd_ms',-1),3), 'fwdbwd', round(r.get('fwdbwd_ms',-1),2), 'diff', r.get('max_rel_diff_vs_first'), r.get('error','')[:300])"
PYTHONPATH=$PWD:$FA timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --seq 8192 --impls nsa_flex sdpa_cudnn --variants "" "FLASH=1" --out $OUT/r/b8k.json > $OUT/r/b8k.log 2>&1; echo "b8k rc=$? at $(( $(date +%s)-T0 ))"
tail -8 $OUT/r/b8k.log
else
PYTHONPATH=$PWD timeout 200 python3 tools/bench_branches.py --seq 65536 --branches swa --sets "" "SWA_KV_BLOCK=64" --out $OUT/r/br64k_swa.json > $OUT/r/br64k_swa.log 2>&1; echo "br64k swa rc=$? at $(( $(date +%s)-T0 ))"
tail -4 $OUT/r/br64k_swa.log
PYTHONPATH=$PWD timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --seq 8192 --impls nsa_flex sdpa_cudnn --variants "" "SEL_FORCED_STATIC=1" --out $OUT/r/b8k_forced.json > $OUT/r/b8k_forced.log 2>&1; echo "b8k forced rc=$? at $(( $(date +%s)-T0 ))"
tail -5 $OUT/r/b8k_forced.log
fi
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
