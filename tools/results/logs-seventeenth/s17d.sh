# session 17 call D (nvidia-h100-x1, right after C on the same machine; carry .whl .gpu): the 1b flavor at 32k, FLASH["cmp"]=1 (flash-attn-4 from call C in /tmp/fa4site) and the default, then llama3.
T0=$(date +%s)
[ -f /tmp/fa4site/flash_attn/cute/interface.py ] || { echo "no /tmp/fa4site: the machine was not kept"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "site install failed"
export PYTHONUNBUFFERED=1 TMPDIR=/tmp HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export FA=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
mkdir -p $OUT/r /tmp/nsacache && cp -r .gpu/cache/* /tmp/nsacache/
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpus.txt
TR="--job.config_file configs/1b.toml --training.steps 10 --metrics.log_freq 1 --lr_scheduler.warmup_steps 2 --validation.no-enable --checkpoint.no-enable --metrics.no-enable-tensorboard"
FL='import runpy, sys; import nsa_flex.tuning as t; t.FLASH["cmp"] = 1; sys.argv[0] = "nsa_flex.train"; runpy.run_module("nsa_flex.train", run_name="__main__", alter_sys=True)'
PYTHONPATH=$PWD:/tmp/site:$FA NSA_FLEX_CACHE=/tmp/nsacache timeout 230 python3 -c "$FL" $TR --job.dump_folder /tmp/o0 > $OUT/r/train_nsa_flash.log 2>&1; echo "train nsa flash rc=$? at $(( $(date +%s)-T0 ))"
PYTHONPATH=$PWD:/tmp/site NSA_FLEX_CACHE=/tmp/nsacache timeout 170 python3 -m nsa_flex.train $TR --job.dump_folder /tmp/o1 > $OUT/r/train_nsa.log 2>&1; echo "train nsa rc=$? at $(( $(date +%s)-T0 ))"
PYTHONPATH=$PWD:/tmp/site NSA_FLEX_CACHE=/tmp/nsacache timeout $(( 590 - ($(date +%s)-T0) )) python3 -m nsa_flex.train $TR --model.name llama3_dense --job.dump_folder /tmp/o2 > $OUT/r/train_llama3_dense.log 2>&1; echo "train llama3 rc=$? at $(( $(date +%s)-T0 ))"
for m in nsa_flash nsa llama3_dense; do echo "== $m"; sed 's/\x1b\[[0-9;]*m//g' $OUT/r/train_$m.log | grep -E "step:|Error|FLASH|flash" | sed 's/.*INFO - //' | cut -c1-140 | tail -4; done
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
echo "total $(( $(date +%s)-T0 )) s"
