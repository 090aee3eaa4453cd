# session 18 call B (nvidia-h100-x4; carry .whl = fla-core 0.6.0): the defaults (top-n kernel on) at
# every T, selected-branch knobs at 8k, the GPU check with the defaults, fla's configuration at 8k.
# GPU0 8k variants then 16k; GPU1 32k then 64k --profile; GPU2 128k then fla 8k; GPU3 check_gpu then Dk=192 32k.
T0=$(date +%s)
left() { echo $(( ${1:-500} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fla .whl/fla_core*.whl || echo "fla install failed"
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
B="python3 tools/bench.py --dims 128:128"
(export CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD
 timeout 270 $B --configs paper --impls nsa_flex sdpa_cudnn --seq 8192 --variants "" "SEL_Q_BLOCK=32" "Q_SPLITS.slc=16" "Q_SPLITS.slc=4" --out $OUT/r/b8k_var.json > $OUT/r/b8k_var.log 2>&1; echo "8k variants rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $B --configs paper --impls nsa_flex sdpa_cudnn sdpa_flash --seq 16384 --out $OUT/r/b16k.json > $OUT/r/b16k.log 2>&1; echo "16k rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$PWD
 timeout 220 $B --configs paper --impls nsa_flex sdpa_cudnn sdpa_flash --seq 32768 --out $OUT/r/b32k.json > $OUT/r/b32k.log 2>&1; echo "32k rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $B --configs paper --impls nsa_flex sdpa_cudnn --seq 65536 --profile --out $OUT/r/b64k_prof.json > $OUT/r/b64k_prof.log 2>&1; echo "64k prof rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=2
 PYTHONPATH=$PWD timeout 260 $B --configs paper --impls nsa_flex sdpa_cudnn --seq 131072 --tune AUTOTUNE_BLOCKS=16 --out $OUT/r/b128k.json > $OUT/r/b128k.log 2>&1; echo "128k rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD:/tmp/fla timeout $(left) $B --configs fla --impls nsa_flex fla --seq 8192 --out $OUT/r/b_fla8k.json > $OUT/r/b_fla8k.log 2>&1; echo "fla8k rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=3 PYTHONPATH=$PWD
 timeout 330 python3 tools/check_gpu.py --seq 4096 --out $OUT/r/check_gpu.json > $OUT/r/check_gpu.log 2>&1; echo "check_gpu rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) python3 tools/bench.py --dims 192:128 --configs paper --impls nsa_flex sdpa_cudnn --seq 32768 --out $OUT/r/b_dk192.json > $OUT/r/b_dk192.log 2>&1; echo "dk192 rc=$? at $(( $(date +%s)-T0 ))") &
wait
cat $OUT/r/gpus.txt
echo "== check_gpu"; python3 -c "
import json; r=json.load(open('$OUT/r/check_gpu.json'))['rows'][0]; print('fp32', max(r['fp32'].values()), 'bf16', max(r['bf16'][k] for k in r['bf16'] if k!='selection_agreement_with_fp32'), r['bf16']['selection_agreement_with_fp32'], r['finite'], r['recompiles_over_5_calls'])" 2>&1 | tail -2
echo "== b8k_var"; tail -9 $OUT/r/b8k_var.log | cut -c1-120
for f in b16k b32k b64k_prof b128k b_fla8k b_dk192; do echo "== $f"; grep -E "^(nsa_flex|sdpa_|fla) |Error" $OUT/r/$f.log | tail -4 | cut -c1-160; done
grep -o '"ms_per_fwdbwd": {[^}]*}' $OUT/r/b64k_prof.json | head -1
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
