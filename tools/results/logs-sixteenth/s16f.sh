# session 16 call F (nvidia-h100-x4; carry .fa4): tuning.FLASH["cmp"] = None (auto: on, flash-attn-4
# 4.0.0b36 installed) vs 0, one process per GPU, cuDNN in each process.
# GPU0 64k variants; GPU1 8k then 16k variants; GPU2 gradient check (defaults); GPU3 64k --profile then 128k.
T0=$(date +%s)
left() { echo $(( ${1:-545} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r /tmp/fa4site
[ -f /tmp/fa4site/flash_attn/cute/interface.py ] || xz -dc .fa4/site.tar.xz | tar xf - -C /tmp/fa4site || echo "extract failed"
xz -dc .fa4/libtvm_ffi_testing.so.xz > /tmp/fa4site/tvm_ffi/lib/libtvm_ffi_testing.so
echo "extracted at $(( $(date +%s)-T0 )) s"
export FA=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
export PYTHONPATH=$PWD:$FA
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
B="python3 tools/bench.py --dims 128:128 --configs paper --impls nsa_flex sdpa_cudnn"
(CUDA_VISIBLE_DEVICES=0 timeout $(left) $B --seq 65536 --variants "FLASH.cmp=0" "" --out $OUT/r/b64k.json > $OUT/r/b64k.log 2>&1; echo "64k rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=1
 timeout 230 $B --seq 8192 --variants "FLASH.cmp=0" "" --out $OUT/r/b8k.json > $OUT/r/b8k.log 2>&1; echo "8k rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $B --seq 16384 --variants "FLASH.cmp=0" "" --out $OUT/r/b16k.json > $OUT/r/b16k.log 2>&1; echo "16k rc=$? at $(( $(date +%s)-T0 ))") &
(CUDA_VISIBLE_DEVICES=2 timeout $(left) python3 tools/check_gpu.py --seq 4096 --out $OUT/r/check_gpu.json > $OUT/r/check_gpu.log 2>&1; echo "check_gpu rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=3
 timeout 300 $B --seq 65536 --profile --out $OUT/r/b64k_prof.json > $OUT/r/b64k_prof.log 2>&1; echo "64k prof rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $B --seq 131072 --tune AUTOTUNE_BLOCKS=16 --out $OUT/r/b128k.json > $OUT/r/b128k.log 2>&1; echo "128k rc=$? at $(( $(date +%s)-T0 ))") &
wait
cat $OUT/r/gpus.txt
echo "== check_gpu"; python3 -c "
import json; r=json.load(open('$OUT/r/check_gpu.json'))['rows'][0]; print('fp32', max(r['fp32'].values()), 'bf16', max(r['bf16'][k] for k in r['bf16'] if k!='selection_agreement_with_fp32'), r['bf16']['selection_agreement_with_fp32'], r['finite'], r['recompiles_over_5_calls'])" 2>&1 | tail -2
for f in b8k b16k b64k b64k_prof b128k; do echo "== $f"; grep -E "nsa_flex |sdpa_cudnn |Error" $OUT/r/$f.log | tail -4 | cut -c1-160; done
grep -o '"ms_per_fwdbwd": {[^}]*}' $OUT/r/b64k_prof.json | head -2
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
