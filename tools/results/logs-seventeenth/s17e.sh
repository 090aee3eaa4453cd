# session 17 call E (nvidia-h100-x1; carry .whl .gpu): the top-n kernel: exactness on the GPU, scoring+top-n alone at 8k/64k, the 1b flavor with TOPN_KERNEL=1 and 0.
T0=$(date +%s)
left() { echo $(( ${1:-410} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p $OUT/r /tmp/nsacache && cp -r .gpu/cache/* /tmp/nsacache/
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
PYTHONPATH=$PWD NSA_FLEX_CACHE=/tmp/nsacache timeout 150 python3 .gpu/topn_check.py $OUT/r/topn_check.json > $OUT/r/topn_check.log 2>&1; echo "check rc=$? at $(( $(date +%s)-T0 ))"
grep -vi warn $OUT/r/topn_check.log | tail -7 | cut -c1-400
PYTHONPATH=$PWD NSA_FLEX_CACHE=/tmp/nsacache timeout 100 python3 tools/bench_scoring.py --seq 65536 --out $OUT/r/scoring.json > $OUT/r/scoring.log 2>&1; echo "scoring rc=$? at $(( $(date +%s)-T0 ))"
tail -4 $OUT/r/scoring.log | cut -c1-200
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "site install failed"
TR="--job.config_file configs/1b.toml --training.steps 10 --metrics.log_freq 1 --lr_scheduler.warmup_steps 2 --validation.no-enable --checkpoint.no-enable --metrics.no-enable-tensorboard"
TK='import runpy, sys; import nsa_flex.tuning as t; t.TOPN_KERNEL = 1; sys.argv[0] = "nsa_flex.train"; runpy.run_module("nsa_flex.train", run_name="__main__", alter_sys=True)'
PYTHONPATH=$PWD:/tmp/site NSA_FLEX_CACHE=/tmp/nsacache timeout $(left 380) python3 -c "$TK" $TR --job.dump_folder /tmp/o0 > $OUT/r/train_nsa_topn_kernel.log 2>&1; echo "train nsa topn rc=$? at $(( $(date +%s)-T0 ))"
PYTHONPATH=$PWD:/tmp/site NSA_FLEX_CACHE=/tmp/nsacache timeout $(left 415) python3 -m nsa_flex.train $TR --job.dump_folder /tmp/o1 > $OUT/r/train_nsa.log 2>&1; echo "train nsa rc=$? at $(( $(date +%s)-T0 ))"
for m in nsa_topn_kernel nsa; do echo "== $m"; sed 's/\x1b\[[0-9;]*m//g' $OUT/r/train_$m.log | grep -E "step:|Error" | sed 's/.*INFO - //' | cut -c1-140 | tail -3; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
