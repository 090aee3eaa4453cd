# session 15 call 1 (nvidia-h100-x4; carry .gpu .whl .whl_bench): GPU0 TOPN_BY_VALUE (scoring alone,
# then the operator at 64k both ways); GPU1 selected forward tiles at 64k, 8k --profile, fla 64k;
# GPU2 compressed query splits at 64k; GPU3 1b@32k training-step profiles (nsa, llama3), then
# compressed backward stages.
T0=$(date +%s)
left() { echo $(( 545 - ($(date +%s)-T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "site install failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fla .whl_bench/*.whl || echo "fla install failed"
export PYTHONUNBUFFERED=1 TMPDIR=/tmp HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
K=KERNEL_OPTIONS
B="python3 tools/bench.py"
(export CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD
 timeout 120 python3 tools/bench_scoring.py --seq 65536 --dims 128:128 --out $OUT/r/scoring.json > $OUT/r/scoring.log 2>&1; echo "scoring rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $B --dims 128:128 --configs paper --seq 65536 --impls nsa_flex sdpa_cudnn --variants "" "TOPN_BY_VALUE=1" --out $OUT/r/b64k_byvalue.json > $OUT/r/b64k_byvalue.log 2>&1; echo "64k byvalue rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=1
 PYTHONPATH=$PWD timeout 150 python3 tools/bench_branches.py --branches slc --seq 65536 --sets "" "$K.slc.fwd_BLOCK_N=32" "$K.slc.fwd_num_stages=2" "$K.slc.fwd_num_stages=4" "$K.slc.fwd_num_warps=4" "$K.slc.fwd_BLOCK_N=32 $K.slc.fwd_num_stages=4" --out $OUT/r/br_slc_fwd.json > $OUT/r/br_slc_fwd.log 2>&1; echo "slc fwd rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD timeout 150 $B --dims 128:128 --configs paper --seq 8192 --impls nsa_flex sdpa_cudnn --profile --out $OUT/r/b8k_prof.json > $OUT/r/b8k_prof.log 2>&1; echo "8k prof rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD:/tmp/fla timeout $(left) $B --dims 128:128 --seq 65536 --configs fla --impls nsa_flex fla --out $OUT/r/b_fla64k.json > $OUT/r/b_fla64k.log 2>&1; echo "fla64k rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$PWD
 timeout $(left) python3 tools/bench_branches.py --branches cmp --seq 65536 --sets "" "Q_SPLITS.cmp=16" "Q_SPLITS.cmp=4" "$K.cmp.bwd_num_stages=2" --out $OUT/r/br_cmp.json > $OUT/r/br_cmp.log 2>&1; echo "cmp rc=$? at $(( $(date +%s)-T0 ))") &
(g=3; mkdir -p /tmp/nsacache$g && cp -r .gpu/cache/* /tmp/nsacache$g/
 TR="--job.config_file configs/1b.toml --training.steps 9 --metrics.log_freq 1 --lr_scheduler.warmup_steps 2 --validation.no-enable --checkpoint.no-enable --metrics.no-enable-tensorboard --profiling.enable_profiling --profiling.profile_freq 8 --profiling.profiler_warmup 1 --profiling.profiler_active 1"
 export CUDA_VISIBLE_DEVICES=$g PYTHONPATH=$PWD:/tmp/site NSA_FLEX_CACHE=/tmp/nsacache$g
 timeout 200 python3 -m nsa_flex.train $TR --job.dump_folder /tmp/o$g > $OUT/r/train_nsa.log 2>&1; echo "train nsa rc=$? at $(( $(date +%s)-T0 ))"
 python3 .gpu/trace_sum.py $(find /tmp/o$g -name "rank0_trace.json" | head -1) > $OUT/r/trace_nsa.txt 2>&1
 timeout 170 python3 -m nsa_flex.train $TR --model.name llama3_dense --job.dump_folder /tmp/p$g > $OUT/r/train_llama3_dense.log 2>&1; echo "train llama3 rc=$? at $(( $(date +%s)-T0 ))"
 python3 .gpu/trace_sum.py $(find /tmp/p$g -name "rank0_trace.json" | head -1) > $OUT/r/trace_llama3.txt 2>&1
 PYTHONPATH=$PWD timeout $(left) python3 tools/bench_branches.py --branches cmp --seq 65536 --sets "" "$K.cmp.bwd_num_stages=4" "$K.cmp.fwd_num_stages=2" --out $OUT/r/br_cmp2.json > $OUT/r/br_cmp2.log 2>&1; echo "cmp2 rc=$? at $(( $(date +%s)-T0 ))") &
wait
cat $OUT/r/gpus.txt
echo "== scoring"; tail -4 $OUT/r/scoring.log | cut -c1-400
for f in br_slc_fwd br_cmp br_cmp2; do echo "== $f"; grep -E "^\{|Error" $OUT/r/$f.log | tail -8 | cut -c1-300; done
for f in b64k_byvalue b8k_prof b_fla64k; do echo "== $f"; grep -E "^\{\"impl|Error" $OUT/r/$f.log | tail -6 | cut -c1-230; done
grep -A12 "ms_per_fwdbwd" $OUT/r/b8k_prof.log | head -14 | cut -c1-160
for m in nsa llama3_dense; do echo "== $m"; sed 's/\x1b\[[0-9;]*m//g' $OUT/r/train_$m.log | grep -E "step:|Error" | sed 's/.*INFO - //' | cut -c1-120 | tail -3; done
for m in nsa llama3; do echo "== trace $m"; head -22 $OUT/r/trace_$m.txt | cut -c1-140; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
