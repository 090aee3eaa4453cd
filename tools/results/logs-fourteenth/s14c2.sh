# session 14 call 2 (nvidia-h100-x4; carry .gpu .whl_bench): GPU0 selected branch with dQ 64-key
# steps (cache off per set) at 64k/8k; GPU1 operator 64k defaults vs wide dQ + 2 bwd stages;
# GPU2 same pair 8k/16k/32k; GPU3 fla config 128k vs fla-core, Dk=192 64k.
T0=$(date +%s)
left() { echo $(( 535 - ($(date +%s)-T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fla .whl_bench/*.whl || echo "fla install failed"
export PYTHONUNBUFFERED=1 TMPDIR=/tmp HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
K=KERNEL_OPTIONS
W="SEL_DQ_WIDE_STEPS=1"
BB="python3 tools/bench_branches.py --branches slc"
(export CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD
 timeout 300 $BB --seq 65536 --sets "" "$W" "$W $K.slc.bwd_num_stages=2" "$W $K.slc.bwd_num_stages=4" "$W $K.slc.bwd_num_stages=2 $K.slc.bwd_num_warps=8" "$W $K.slc.bwd_num_stages=2 TMA.slc=0" --out $OUT/r/br64k.json > $OUT/r/br64k.log 2>&1; echo "br64k rc=$? at $(( $(date +%s)-T0 ))"
 timeout $(left) $BB --seq 8192 --sets "" "$W" "$W $K.slc.bwd_num_stages=2" --out $OUT/r/br8k.json > $OUT/r/br8k.log 2>&1; echo "br8k rc=$? at $(( $(date +%s)-T0 ))") &
(CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$PWD timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --seq 65536 --impls nsa_flex sdpa_cudnn --gpu-lock /tmp/gl1 --variants "" "$W $K.slc.bwd_num_stages=2" --out $OUT/r/b64k_var.json > $OUT/r/b64k_var.log 2>&1; echo "64k variants rc=$? at $(( $(date +%s)-T0 ))") &
(CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$PWD timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --seq 8192 16384 32768 --impls nsa_flex sdpa_cudnn sdpa_flash --gpu-lock /tmp/gl2 --variants "" "$W $K.slc.bwd_num_stages=2" --out $OUT/r/b8k32k_var.json > $OUT/r/b8k32k_var.log 2>&1; echo "8k-32k variants rc=$? at $(( $(date +%s)-T0 ))") &
(export CUDA_VISIBLE_DEVICES=3
 PYTHONPATH=$PWD timeout 200 python3 tools/bench.py --dims 192:128 --configs paper --seq 65536 --impls nsa_flex sdpa_cudnn --out $OUT/r/b_dk192.json > $OUT/r/b_dk192.log 2>&1; echo "dk192 rc=$? at $(( $(date +%s)-T0 ))"
 PYTHONPATH=$PWD:/tmp/fla timeout $(left) python3 tools/bench.py --dims 128:128 --seq 131072 --configs fla --impls nsa_flex fla --tune AUTOTUNE_BLOCKS=16 --out $OUT/r/b_fla128k.json > $OUT/r/b_fla128k.log 2>&1; echo "fla128k rc=$? at $(( $(date +%s)-T0 ))") &
wait
cat $OUT/r/gpus.txt
python3 - <<'PY'
import json, os
for f in ["br64k", "br8k"]:
    try:
        for r in json.load(open(f"{os.environ['OUT']}/r/{f}.json"))["rows"]:
            print(f, r["set"][:70].ljust(70), round(r.get("fwdbwd_ms", -1), 2), r.get("flex_fwd_kernel_ms"), r.get("flex_bwd_kernel_ms"), r.get("max_rel_diff_vs_first"), r.get("wall_s"), r.get("error", "")[:150])
    except Exception as e: print(f, "no json", e)
PY
for f in b64k_var b8k32k_var b_dk192 b_fla128k; do echo "== $f"; grep -E "^\{\"impl|Error|^variant|^defaults|^SEL" $OUT/r/$f.log | tail -14 | cut -c1-230; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
