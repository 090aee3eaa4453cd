# How this session carried flash-attn-4 to the device machine (its image lacks it; the working tree
# that travels is capped at 64 MiB). Run here, in the repo root; then name .fa4 in `carry` and start the
# command with the two xz lines of s16f2-and-h.sh. The cu13 compiler library alone is 92 MB as a wheel.
set -e
W=/tmp/fa4w; mkdir -p $W/site
P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
pip download --pre --no-deps $P -d $W flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
    apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
for w in $W/*.whl; do unzip -q -o $w -d $W/site; done   # (cuda-bindings, protobuf, einops: in the image)
# not needed there: aarch64/QNX stubs, the iket profiler (cutlass stubs it when absent), tvm-ffi sources
rm -rf $W/site/nvidia_cutlass_dsl/cu13/lib/stubs $W/site/nvidia_cutlass_dsl/dsl_packages/iket \
       $W/site/tvm_ffi/3rdparty $W/site/tvm_ffi/src
# tvm-ffi's core links libtvm_ffi_testing.so: carried apart, so the big archive stays one xz stream
mkdir -p .fa4 && xz -9e -c $W/site/tvm_ffi/lib/libtvm_ffi_testing.so > .fa4/libtvm_ffi_testing.so.xz
rm $W/site/tvm_ffi/lib/libtvm_ffi_testing.so
(cd $W/site && tar cf - .) | xz -9e -T1 > .fa4/site.tar.xz    # ~66.0 MB (62.9 MiB), ~5 min on 2 cores
# .fa4 + the tracked files must stay under 64 MiB: this session moved tools/results and
# docs/viz_branches_example.png aside (back after the call); with them it is ~1.4 MB over.
# There: PYTHONPATH=$PWD:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages (the wheel's .pth
# file is not read from a --target folder). /tmp/fa4site stays while the machine is warm (30 s).
