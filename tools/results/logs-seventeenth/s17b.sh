# session 17 call B (nvidia-h100-x1, right after A; carry .fa4): the gradient/selection check at 4k with FLASH.cmp=1.
T0=$(date +%s)
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r /tmp/fa4site
[ -f /tmp/fa4site/flash_attn/cute/interface.py ] && echo "fa4site kept" || { xz -dc .fa4/site.tar.xz | tar xf - -C /tmp/fa4site || echo "extract failed"; }
xz -dc .fa4/libtvm_ffi_testing.so.xz > /tmp/fa4site/tvm_ffi/lib/libtvm_ffi_testing.so
echo "extracted at $(( $(date +%s)-T0 )) s"
export FA=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
export PYTHONPATH=$PWD:$FA
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
timeout $(( 580 - ($(date +%s)-T0) )) python3 tools/check_gpu.py --seq 4096 --tune FLASH.cmp=1 --out $OUT/r/check_gpu.json > $OUT/r/check_gpu.log 2>&1; echo "check rc=$? at $(( $(date +%s)-T0 ))"
grep -vE "Warning|warn|exe_args|current_out_size|Autotune|num_choices" $OUT/r/check_gpu.log | tail -25 | cut -c1-200
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
