# session 17 call A (nvidia-h100-x1; carry .fa4): the operator at 64k and 8k, defaults (Triton) vs FLASH.cmp=1, cuDNN alongside.
T0=$(date +%s)
left() { echo $(( ${1:-570} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r /tmp/fa4site
[ -f /tmp/fa4site/flash_attn/cute/interface.py ] || xz -dc .fa4/site.tar.xz | tar xf - -C /tmp/fa4site || echo "extract failed"
xz -dc .fa4/libtvm_ffi_testing.so.xz > /tmp/fa4site/tvm_ffi/lib/libtvm_ffi_testing.so
echo "extracted at $(( $(date +%s)-T0 )) s"
export FA=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
export PYTHONPATH=$PWD:$FA
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
pip list 2>/dev/null | grep -iE "^(torch|triton) " > $OUT/r/versions.txt
timeout 320 python3 tools/bench.py --dims 128:128 --configs paper --impls nsa_flex sdpa_cudnn --seq 65536 --variants "" "FLASH.cmp=1" --out $OUT/r/b64k.json > $OUT/r/b64k.log 2>&1; echo "64k rc=$? at $(( $(date +%s)-T0 ))"
grep -E "nsa_flex |sdpa_cudnn |Error" $OUT/r/b64k.log | tail -4 | cut -c1-160
python3 -c "
import json; d=json.load(open('$OUT/r/b64k.json'))
for r in d['rows']: print(r.get('variant'), r.get('impl'), r.get('error','')[:600])" 2>&1 | grep -i error | head -3
timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --impls nsa_flex sdpa_cudnn --seq 8192 --variants "" "FLASH.cmp=1" --out $OUT/r/b8k.json > $OUT/r/b8k.log 2>&1; echo "8k rc=$? at $(( $(date +%s)-T0 ))"
grep -E "nsa_flex |sdpa_cudnn |Error" $OUT/r/b8k.log | tail -4 | cut -c1-160
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
