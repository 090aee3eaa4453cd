# next session, call A (nvidia-h100-x1; no carry needed): the defaults (TOPN_KERNEL=1) vs TOPN_KERNEL=0,
# whole operator, 64k then 8k, cuDNN in each process. Run from the repository root: bash tools/results/logs-seventeenth/next-s18a.sh
T0=$(date +%s)
left() { echo $(( ${1:-570} - ($(date +%s)-T0) )); }
export PYTHONUNBUFFERED=1 TMPDIR=/tmp
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
PYTHONPATH=$PWD timeout 320 python3 tools/bench.py --dims 128:128 --configs paper --impls nsa_flex sdpa_cudnn --seq 65536 --variants "" "TOPN_KERNEL=0" --out $OUT/r/b64k.json > $OUT/r/b64k.log 2>&1; echo "64k rc=$? at $(( $(date +%s)-T0 ))"
grep -E "nsa_flex |sdpa_cudnn |Error" $OUT/r/b64k.log | tail -4 | cut -c1-160
PYTHONPATH=$PWD timeout $(left) python3 tools/bench.py --dims 128:128 --configs paper --impls nsa_flex sdpa_cudnn --seq 8192 --variants "" "TOPN_KERNEL=0" --out $OUT/r/b8k.json > $OUT/r/b8k.log 2>&1; echo "8k rc=$? at $(( $(date +%s)-T0 ))"
grep -E "nsa_flex |sdpa_cudnn |Error" $OUT/r/b8k.log | tail -4 | cut -c1-160
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
