# (ran as tools/s18c.sh with tools/s18c_parts_check.py beside it and tools/results moved aside, with the
# q_parts.patch of this folder applied; both moved here after the call. The patch is not on main.)
# session 18 call C (nvidia-h100-x1; carry .fa4 = flash-attn-4 4.0.0b36): the compressed branch in two
# sequential query parts under FLASH (tuning.Q_PARTS, None = 2 under FLASH): accuracy at 8k, then the
# operator at 64k: defaults vs FLASH.cmp=1 (2 parts) vs FLASH.cmp=1 Q_PARTS.cmp=1, cuDNN in each process.
T0=$(date +%s)
left() { echo $(( ${1:-560} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r /tmp/fa4site
[ -f /tmp/fa4site/flash_attn/cute/interface.py ] || xz -dc .fa4/site.tar.xz | tar xf - -C /tmp/fa4site || echo "extract failed"
xz -dc .fa4/libtvm_ffi_testing.so.xz > /tmp/fa4site/tvm_ffi/lib/libtvm_ffi_testing.so
echo "extracted at $(( $(date +%s)-T0 )) s"
export PYTHONPATH=$PWD:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
timeout 150 python3 tools/s18c_parts_check.py 8192 $OUT/r/parts_check.json > $OUT/r/parts_check.log 2>&1; echo "parts check rc=$? at $(( $(date +%s)-T0 ))"
grep -E "^(triton|flash)_" $OUT/r/parts_check.log | cut -c1-300
timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --impls nsa_flex sdpa_cudnn --seq 65536 --variants "" "FLASH.cmp=1" "FLASH.cmp=1 Q_PARTS.cmp=1" --out $OUT/r/b64k.json > $OUT/r/b64k.log 2>&1; echo "64k rc=$? at $(( $(date +%s)-T0 ))"
tail -9 $OUT/r/b64k.log | cut -c1-120
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
