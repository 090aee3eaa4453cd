# session 14 call 1 (nvidia-h100-x4; carry .gpu .whl .whl_bench): GPU0 selected branch dQ 64-key
# steps / BLOCK_N1=32 at 64k and 8k; GPU1 gradient check with SEL_DQ_WIDE_STEPS=1; GPU2 check_model
# tool tests + scoring fused top-n; GPU3 fla config 16k/32k vs fla-core, Dk=192 32k.
T0=$(date +%s)
left() { echo $(( 530 - ($(date +%s)-T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "site install failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fla .whl_bench/*.whl || echo "fla install failed"
export PYTHONUNBUFFERED=1 TMPDIR=/tmp HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
K=KERNEL_OPTIONS
BB="python3 tools/bench_branches.py --branches slc"
(export CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD
 timeout $(( $(left) - 60 )) $BB --seq 65536 --sets "" "SEL_DQ_WIDE_STEPS=1" "$K.slc.bwd_BLOCK_N1=32" "SEL_DQ_WIDE_STEPS=1 $K.slc.bwd_BLOCK_N1=32" "SEL_DQ_WIDE_STEPS=1 $K.slc.bwd_num_warps=8" "SEL_DQ_WIDE_STEPS=1 $K.slc.bwd_num_stages=2" --out $OUT/r/br64k.json > $OUT/r/br64k.log 2>&1; echo "br64k rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $BB --seq 8192 --sets "" "SEL_DQ_WIDE_STEPS=1" "$K.slc.bwd_BLOCK_N1=32" --out $OUT/r/br8k.json > $OUT/r/br8k.log 2>&1; echo "br8k rc=$? at $(( $(date +%s)-T0 ))") &
(CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$PWD timeout $(left) python3 tools/check_gpu.py --seq 4096 --tune SEL_DQ_WIDE_STEPS=1 --out $OUT/r/check_gpu_wide.json > $OUT/r/check_gpu_wide.log 2>&1; echo "check_gpu rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=2
 PYTHONPATH=$PWD:/tmp/site timeout 300 python3 -m pytest -q -p no:warnings tests/test_check_model_tool.py > $OUT/r/pytest_cm.log 2>&1; echo "pytest cm rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD timeout $(left) python3 tools/bench_scoring.py --seq 65536 --dims 128:128 192:128 --out $OUT/r/scoring.json > $OUT/r/scoring.log 2>&1; echo "scoring rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=3
 PYTHONPATH=$PWD:/tmp/fla timeout 300 python3 tools/bench.py --dims 128:128 --seq 16384 32768 --configs fla --impls nsa_flex fla --out $OUT/r/b_fla.json > $OUT/r/b_fla.log 2>&1; echo "fla rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD timeout $(left) python3 tools/bench.py --dims 192:128 --configs paper --seq 32768 --impls nsa_flex sdpa_cudnn --out $OUT/r/b_dk192.json > $OUT/r/b_dk192.log 2>&1; echo "dk192 rc=$? at $(( $(date +%s)-T0 ))") &
wait
cat $OUT/r/gpus.txt
for f in br64k br8k; do echo "== $f"; grep -E "^\{|Error" $OUT/r/$f.log | tail -8 | cut -c1-300; done
echo "== check_gpu"; tail -6 $OUT/r/check_gpu_wide.log | cut -c1-300
echo "== pytest cm"; tail -4 $OUT/r/pytest_cm.log
echo "== scoring"; tail -6 $OUT/r/scoring.log | cut -c1-300
for f in b_fla b_dk192; do echo "== $f"; grep -E "^\{\"impl|Error" $OUT/r/$f.log | tail -6 | cut -c1-230; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
