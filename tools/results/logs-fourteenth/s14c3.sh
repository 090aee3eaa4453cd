# session 14 call 3 (nvidia-h100-x4; carry .gpu .whl .whl_bench): the defaults with dQ in 64-key
# steps. GPU0 gradient check 4k then Dk=192 32k; GPU1 64k --profile then 128k; GPU2 8k/16k/32k
# then fla config 8k/64k; GPU3 1b@32k nsa then llama3.
T0=$(date +%s)
left() { echo $(( 500 - ($(date +%s)-T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "site install failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fla .whl_bench/*.whl || echo "fla install failed"
export PYTHONUNBUFFERED=1 TMPDIR=/tmp HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
B="python3 tools/bench.py"
(export CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD
 timeout 300 python3 tools/check_gpu.py --seq 4096 --out $OUT/r/check_gpu.json > $OUT/r/check_gpu.log 2>&1; echo "check_gpu rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $B --dims 192:128 --configs paper --seq 32768 --impls nsa_flex sdpa_cudnn --out $OUT/r/b_dk192.json > $OUT/r/b_dk192.log 2>&1; echo "dk192 rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$PWD
 timeout 300 $B --dims 128:128 --configs paper --seq 65536 --impls nsa_flex sdpa_cudnn --profile --out $OUT/r/b64k_prof.json > $OUT/r/b64k_prof.log 2>&1; echo "64k prof rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $B --dims 128:128 --configs paper --seq 131072 --impls nsa_flex sdpa_cudnn --tune AUTOTUNE_BLOCKS=16 --out $OUT/r/b128k.json > $OUT/r/b128k.log 2>&1; echo "128k rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=2
 PYTHONPATH=$PWD timeout 240 $B --dims 128:128 --configs paper --seq 8192 16384 32768 --impls nsa_flex sdpa_cudnn sdpa_flash --out $OUT/r/b8k32k.json > $OUT/r/b8k32k.log 2>&1; echo "8k-32k rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD:/tmp/fla timeout $(left) $B --dims 128:128 --seq 8192 65536 --configs fla --impls nsa_flex fla --out $OUT/r/b_fla.json > $OUT/r/b_fla.log 2>&1; echo "fla rc=$? at $(( $(date +%s)-T0 ))") &
(g=3; mkdir -p /tmp/nsacache$g && cp -r .gpu/cache/* /tmp/nsacache$g/
 TR="--job.config_file configs/1b.toml --training.steps 10 --metrics.log_freq 1 --lr_scheduler.warmup_steps 2 --validation.no-enable --checkpoint.no-enable --metrics.no-enable-tensorboard"
 export CUDA_VISIBLE_DEVICES=$g PYTHONPATH=$PWD:/tmp/site NSA_FLEX_CACHE=/tmp/nsacache$g
 timeout 230 python3 -m nsa_flex.train $TR --job.dump_folder /tmp/o$g > $OUT/r/train_nsa.log 2>&1; echo "train nsa rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) python3 -m nsa_flex.train $TR --model.name llama3_dense --job.dump_folder /tmp/p$g > $OUT/r/train_llama3_dense.log 2>&1; echo "train llama3 rc=$? at $(( $(date +%s)-T0 ))") &
wait
cat $OUT/r/gpus.txt
echo "== check_gpu"; python3 -c "
import json; r=json.load(open('$OUT/r/check_gpu.json'))['rows'][0]; print('fp32', max(r['fp32'].values()), 'bf16', max(r['bf16'][k] for k in r['bf16'] if k!='selection_agreement_with_fp32'), r['bf16']['selection_agreement_with_fp32'], r['finite'], r['recompiles_over_5_calls'])" 2>&1 | tail -2
for f in b64k_prof b128k b8k32k b_fla b_dk192; do echo "== $f"; grep -E "^\{\"impl|Error" $OUT/r/$f.log | tail -6 | cut -c1-200; done
grep -A25 "breakdown\|kernel" $OUT/r/b64k_prof.log | tail -30 | cut -c1-160
for m in nsa llama3_dense; do echo "== $m"; sed 's/\x1b\[[0-9;]*m//g' $OUT/r/train_$m.log | grep -E "step:|Error" | sed 's/.*INFO - //' | cut -c1-120 | tail -3; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
