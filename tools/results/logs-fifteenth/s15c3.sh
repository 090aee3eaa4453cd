# session 15 call 3 (nvidia-h100-x4; carry .gpu .whl .whl_bench): the defaults with TOPN_BY_VALUE=1.
# GPU0 paper 8k/16k/32k then Dk=192 32k; GPU1 128k then fla config 16k/32k; GPU2 64k with
# Q_SPLITS.cmp 8 vs 16; GPU3 1b@32k with Q_SPLITS.cmp=16 (a patched copy) then the default, then 8k
# with Q_SPLITS.cmp 8 vs 16.
T0=$(date +%s)
left() { echo $(( 490 - ($(date +%s)-T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "site install failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fla .whl_bench/*.whl || echo "fla install failed"
export PYTHONUNBUFFERED=1 TMPDIR=/tmp HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
B="python3 tools/bench.py"
(export CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD
 timeout 260 $B --dims 128:128 --configs paper --seq 8192 16384 32768 --impls nsa_flex sdpa_cudnn sdpa_flash --out $OUT/r/b8k32k.json > $OUT/r/b8k32k.log 2>&1; echo "8k-32k rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $B --dims 192:128 --configs paper --seq 32768 --impls nsa_flex sdpa_cudnn --out $OUT/r/b_dk192.json > $OUT/r/b_dk192.log 2>&1; echo "dk192 rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=1
 PYTHONPATH=$PWD timeout 200 $B --dims 128:128 --configs paper --seq 131072 --impls nsa_flex sdpa_cudnn --tune AUTOTUNE_BLOCKS=16 --out $OUT/r/b128k.json > $OUT/r/b128k.log 2>&1; echo "128k rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD:/tmp/fla timeout $(left) $B --dims 128:128 --seq 16384 32768 --configs fla --impls nsa_flex fla --out $OUT/r/b_fla.json > $OUT/r/b_fla.log 2>&1; echo "fla rc=$? at $(( $(date +%s)-T0 ))") &
(CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$PWD timeout $(left) $B --dims 128:128 --configs paper --seq 65536 --impls nsa_flex sdpa_cudnn --variants "" "Q_SPLITS.cmp=16" --out $OUT/r/b64k_cmp16.json > $OUT/r/b64k_cmp16.log 2>&1; echo "64k cmp16 rc=$? at $(( $(date +%s)-T0 ))") &
(g=3; mkdir -p /tmp/nsacache$g && cp -r .gpu/cache/* /tmp/nsacache$g/
 rm -rf /tmp/alt && mkdir /tmp/alt && cp -r nsa_flex masks configs /tmp/alt/
 sed -i 's/^Q_SPLITS: dict\[str, int\] = {"cmp": 8,/Q_SPLITS: dict[str, int] = {"cmp": 16,/' /tmp/alt/nsa_flex/tuning.py
 grep -n "^Q_SPLITS" /tmp/alt/nsa_flex/tuning.py > $OUT/r/alt_knob.txt
 TR="--job.config_file configs/1b.toml --training.steps 10 --metrics.log_freq 1 --lr_scheduler.warmup_steps 2 --validation.no-enable --checkpoint.no-enable --metrics.no-enable-tensorboard"
 export CUDA_VISIBLE_DEVICES=$g NSA_FLEX_CACHE=/tmp/nsacache$g
 (cd /tmp/alt && PYTHONPATH=/tmp/alt:/tmp/site timeout 150 python3 -m nsa_flex.train $TR --job.dump_folder /tmp/q$g > $OUT/r/train_nsa_cmp16.log 2>&1); echo "train nsa cmp16 rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD:/tmp/site timeout 150 python3 -m nsa_flex.train $TR --job.dump_folder /tmp/o$g > $OUT/r/train_nsa.log 2>&1; echo "train nsa rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD timeout $(left) $B --dims 128:128 --configs paper --seq 8192 --impls nsa_flex sdpa_cudnn --variants "" "Q_SPLITS.cmp=16" --out $OUT/r/b8k_cmp16.json > $OUT/r/b8k_cmp16.log 2>&1; echo "8k cmp16 rc=$? at $(( $(date +%s)-T0 ))") &
wait
cat $OUT/r/gpus.txt $OUT/r/alt_knob.txt
for f in b8k32k b_dk192 b128k b_fla; do echo "== $f"; grep -E "^\{\"impl|Error" $OUT/r/$f.log | tail -6 | cut -c1-200; done
for f in b64k_cmp16 b8k_cmp16; do echo "== $f"; tail -7 $OUT/r/$f.log | cut -c1-200; done
for m in nsa_cmp16 nsa; do echo "== $m"; sed 's/\x1b\[[0-9;]*m//g' $OUT/r/train_$m.log | grep -E "step:|Error" | sed 's/.*INFO - //' | cut -c1-120 | tail -3; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
