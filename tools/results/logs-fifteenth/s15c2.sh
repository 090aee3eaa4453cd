# session 15 call 2 (nvidia-h100-x4; carry .gpu .whl): TOPN_BY_VALUE=1 default. GPU0 gradient check;
# GPU1/GPU2 the branches at the 1b model's shape (32k, Hq=32, Hkv=2, D=64) under kernel options;
# GPU3 1b@32k nsa then llama3, then 64k --profile.
T0=$(date +%s)
left() { echo $(( 520 - ($(date +%s)-T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "site install failed"
export PYTHONUNBUFFERED=1 TMPDIR=/tmp HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
K=KERNEL_OPTIONS
BB="python3 tools/bench_branches.py --seq 32768 --hq 32 --hkv 2 --dims 64:64"
(CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD timeout $(left) python3 tools/check_gpu.py --seq 4096 --out $OUT/r/check_gpu.json > $OUT/r/check_gpu.log 2>&1; echo "check_gpu rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$PWD
 timeout 200 $BB --branches slc --sets "" "TMA.slc=0" "SMALL_Q_FWD_WARPS=4" "$K.slc.bwd_num_stages=2" "$K.slc.bwd_num_stages=4" "SEL_DQ_WIDE_STEPS=0" --out $OUT/r/b1_slc.json > $OUT/r/b1_slc.log 2>&1; echo "1b slc rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $BB --branches swa --sets "" "TMA.swa=1" "Q_SPLITS.swa=4" "$K.swa.bwd_num_stages=2" --out $OUT/r/b1_swa.json > $OUT/r/b1_swa.log 2>&1; echo "1b swa rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$PWD
 timeout $(left) $BB --branches cmp --sets "" "TMA.cmp=1" "Q_SPLITS.cmp=16" "Q_SPLITS.cmp=4" "$K.cmp.bwd_num_stages=2" "$K.cmp.fwd_num_stages=2" --out $OUT/r/b1_cmp.json > $OUT/r/b1_cmp.log 2>&1; echo "1b cmp rc=$? at $(( $(date +%s)-T0 ))") &
(g=3; mkdir -p /tmp/nsacache$g && cp -r .gpu/cache/* /tmp/nsacache$g/
 TR="--job.config_file configs/1b.toml --training.steps 10 --metrics.log_freq 1 --lr_scheduler.warmup_steps 2 --validation.no-enable --checkpoint.no-enable --metrics.no-enable-tensorboard"
 export CUDA_VISIBLE_DEVICES=$g PYTHONPATH=$PWD:/tmp/site NSA_FLEX_CACHE=/tmp/nsacache$g
 timeout 170 python3 -m nsa_flex.train $TR --job.dump_folder /tmp/o$g > $OUT/r/train_nsa.log 2>&1; echo "train nsa rc=$? at $(( $(date +%s)-T0 ))"
 timeout 120 python3 -m nsa_flex.train $TR --model.name llama3_dense --job.dump_folder /tmp/p$g > $OUT/r/train_llama3_dense.log 2>&1; echo "train llama3 rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --seq 65536 --impls nsa_flex sdpa_cudnn --profile --out $OUT/r/b64k_prof.json > $OUT/r/b64k_prof.log 2>&1; echo "64k prof rc=$? at $(( $(date +%s)-T0 ))") &
wait
cat $OUT/r/gpus.txt
echo "== check_gpu"; python3 -c "
import json; r=json.load(open('$OUT/r/check_gpu.json'))['rows'][0]; print('fp32', max(r['fp32'].values()), 'bf16', max(r['bf16'][k] for k in r['bf16'] if k!='selection_agreement_with_fp32'), r['bf16']['selection_agreement_with_fp32'], r['finite'], r['recompiles_over_5_calls'])" 2>&1 | tail -2
for f in b1_slc b1_swa b1_cmp; do echo "== $f"; grep -E "^\{\"branch|Error" $OUT/r/$f.log | python3 -c "
import sys,json
for l in sys.stdin:
  try: r=json.loads(l); print(r['set'] or 'defaults', 'fwd', round(r['flex_fwd_kernel_ms'],3), 'bwd', round(r['flex_bwd_kernel_ms'],3), 'fwdbwd', round(r['fwdbwd_ms'],2), 'diff', r['max_rel_diff_vs_first'])
  except Exception as e: print(l[:200])"; done
echo "== 64k"; grep -E "^\{\"impl|Error" $OUT/r/b64k_prof.log | tail -3 | cut -c1-300
for m in nsa llama3_dense; do echo "== $m"; sed 's/\x1b\[[0-9;]*m//g' $OUT/r/train_$m.log | grep -E "step:|Error" | sed 's/.*INFO - //' | cut -c1-120 | tail -3; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
