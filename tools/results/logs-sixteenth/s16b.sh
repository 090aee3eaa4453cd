# session 16 call D (nvidia-h100-x1; carry .fa4): FLASH with K/V expanded over the query splits.
# nvidia-cutlass-dsl 4.8.1 cu13) for the static branches: check vs Triton at 4k, operator at 8k and 64k.
T0=$(date +%s)
left() { echo $(( ${1:-565} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r /tmp/fa4site
[ -f /tmp/fa4site/flash_attn/cute/interface.py ] || xz -dc .fa4/site.tar.xz | tar xf - -C /tmp/fa4site || echo "extract failed"
xz -dc .fa4/libtvm_ffi_testing.so.xz > /tmp/fa4site/tvm_ffi/lib/libtvm_ffi_testing.so
echo "extracted at $(( $(date +%s)-T0 )) s"
export FA=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
PYTHONPATH=$PWD:$FA python3 -c "import cutlass, flash_attn.cute, tvm_ffi; print('imports ok')" 2>&1 | tail -4
PYTHONPATH=$PWD:$FA timeout 200 python3 .fa4/flash_check.py 4096 > $OUT/r/flash_check.log 2>&1; echo "flash_check rc=$? at $(( $(date +%s)-T0 ))"
grep -E "first call|max rel|Error|error" $OUT/r/flash_check.log | grep -v Warning | tail -30
V="FLASH=1"; grep -q "cmp dv: max" $OUT/r/flash_check.log || V="FLASH.swa=1"
echo "variant: $V"
PYTHONPATH=$PWD:$FA timeout 190 python3 tools/bench.py --dims 128:128 --configs paper --seq 8192 --impls nsa_flex --variants "" "$V" --out $OUT/r/b8k.json > $OUT/r/b8k.log 2>&1; echo "b8k rc=$? at $(( $(date +%s)-T0 ))"
grep -E "Error|nsa_flex " $OUT/r/b8k.log | tail -6
PYTHONPATH=$PWD:$FA timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --seq 65536 --impls nsa_flex --variants "" "$V" --out $OUT/r/b64k.json > $OUT/r/b64k.log 2>&1; echo "b64k rc=$? at $(( $(date +%s)-T0 ))"
grep -E "Error|nsa_flex " $OUT/r/b64k.log | tail -6
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
