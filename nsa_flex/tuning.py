"""GPU tuning knobs, all in one place. None of them changes results beyond rounding."""

from __future__ import annotations

import torch

# Packed-GQA query tile (rows = positions x G) of every branch's BlockMask.
Q_BLOCK = 128
# KV tile of the sliding and compressed branches.
KV_BLOCK = 128
# KV tile of the selected branch; None = the largest power of two dividing l', within [16, 128].
SEL_KV_BLOCK = None
# KV tile of the sliding branch; None = KV_BLOCK. One of 16, 32, 64, 128. A 128-row query tile
# (8 positions at G = 16) sees the w + 7 keys ending at its last position: 5-6 tiles of 128 keys
# (640-768 read for ~519 needed at w = 512) or 9-10 tiles of 64 (576-640); its 64-key backward
# tile is EXTRA_BWD_CONFIG. Measured on an H100 at 64k (tools/bench_branches.py --branches swa,
# paper config, D = 128, bf16; kernel ms fwd / bwd, two calls): 64 gave 3.92 / 14.41 and 3.90 /
# 14.60 against 4.47 / 10.89 and 4.33 / 10.72 with 128 (fwd+bwd 19.28 vs 16.40, 20.06 vs 16.55):
# the forward gains, the backward loses more. None.
SWA_KV_BLOCK: int | None = None
# Query tile of the selected branch; None = Q_BLOCK. A tile of G rows (one position) needs only
# that position's n blocks instead of the union over Q_BLOCK / G positions; below 64 rows it
# also adds a small backward candidate (see install_flex_backward_configs). Measured on an H100
# (paper config, D=128, bf16, fwd+bwd of the operator at 64k; cuDNN 444-457 ms in each run):
# 128 rows 431 ms, 64 rows (with SEL_NARROW_LISTS) 328 ms, 32 rows 269 ms, 16 rows 256 ms
# (+2 GiB peak over 32: the backward's query lists are [Nkv, T·G/16] int32). 16 (one position
# at G = 16) passed the GPU gradient check at T = 4096, Dk = 192; 32 did not finish it (its fp32
# backward autotunes 16x16 tiles at ~0.25-1 s a run). With today's backward (dQ in 64-key steps,
# 2 forward warps), 32 rows at 8k: 15.61 vs 12.04 ms fwd+bwd (forward 5.25 vs 3.51), H100, same run.
SEL_Q_BLOCK: int | None = 16
# Query splits per branch (backends.attend): consecutive query rows run as separate batch
# entries so that FlexAttention's dK/dV loop over the queries of one KV tile runs in parallel.
# cmp = 8: the compressed branch's first KV tiles serve every query; measured on an H100 at 8k
# (paper config, D=128) its backward kernel went 3.9 -> 1.2 ms, the operator 29.4 -> 26.7 ms.
# 16 instead: the compressed backward kernel alone 32.46 vs 32.99 ms at 64k (4: 34.58), and at the
# 1b model's shape (32k, Hq = 32, Hkv = 2, D = 64) 3.13 vs 3.55; but the operator 148.73 vs
# 148.16 ms at 64k and 11.76 vs 11.99 at 8k (--variants), the 1b flavor 37,376 vs 37,090 tokens/s
# (one GPU, one after the other): within run-to-run noise, so 8 stays.
# slc = 8: with 16-row selected tiles the first block's dK/dV program loops over every query
# tile (every position selects that block). Measured on an H100 at 64k (paper config, D=128):
# 225.1 ms fwd+bwd (cuDNN 441.5 in the same process) vs 240.9 with 1 (an earlier call, cuDNN
# 445.0 there); +1.0 GiB peak. GPU gradient check passed (T=2048, Hq=32, Hkv=2, D=64).
# At 8k (--variants, one process each, H100): 12.04 ms with 8, 11.84 with 16 (+132 MiB), 12.14
# with 4 (cuDNN 8.31-8.46 alongside): within noise, 8 stays.
Q_SPLITS: dict[str, int] = {"cmp": 8, "slc": 8, "swa": 1, "forced": 8}
# 1: at batch 1, a branch's query split (Q_SPLITS) is a strided view of the packed queries
# (heads outermost) instead of a concatenated copy, and its output (FlexAttention lays it out
# like the query) merges back by a view: no copies of q and o per split branch. Measured on an
# H100 at 64k (paper config, D = 128, bf16, both in one run): 212.96 ms fwd+bwd and 13315 MiB
# peak vs 220.63 ms and 14339 MiB with 0 (cuDNN 453.0 / 453.8 ms, 11648 MiB). GPU gradient check
# passed (T = 4096, Dk = 192: fp32 1.5e-6, bf16 3.7e-3, 0 recompiles). 1.
SPLIT_VIEWS = 1
# 1: run the selected branch as two FlexAttention calls merged through their log-sum-exp — the
# forced blocks (a static mask, query-split by Q_SPLITS["forced"]) and the data-dependent rest —
# so that no query tile's dynamic list holds the first block, which every tile uses. Measured on
# an H100 at 64k: 447 ms fwd+bwd vs 431 without, +7.8 GiB peak (the selected backward kernel
# 233 vs 238 ms: the first block's loop was not what made it slow). With today's one-position
# selected tiles, at 8k (--variants, one H100, cuDNN 8.31 / 8.39 ms alongside): 13.08 ms fwd+bwd
# and 1613 MiB vs 11.87 ms and 1259 MiB without. 0.
SEL_FORCED_STATIC = 0
# 1: build the selected BlockMask from the block numbers with KV lists P·n wide (P positions per
# query tile) instead of classifying all T/kv_block KV tiles (masks/selected_lists.py). On (see
# SEL_Q_BLOCK for the measurement). With Q_SPLITS["slc"] > 1 it builds the split layout itself
# (tested on CPU against the unsplit lists; GPU gradient check passed with 8).
SEL_NARROW_LISTS = 1
# 1: with SEL_NARROW_LISTS and one position per selected tile (G divisible by SEL_Q_BLOCK), the
# backward's partial query lists hold only the kv_block·G/q_block tiles of each KV tile's own
# positions (the diagonal: the only partial tiles then) instead of all T·G/q_block: at 64k with
# 16-row tiles the selected BlockMask would go from 2082 to 1059 MiB per layer, and a [Nkv, Mq]
# prefix-count pass goes away. Same lists (tested against the generic route on CPU, and equal on
# an H100), but FlexAttention's GPU backward (torch 2.11) gives wrong dK/dV with them: on an
# H100, one FlexAttention call (tools/check_narrow_q.py: T = 1024, fp32) gave dK errors of 21.5
# (relative) with the narrow lists and 6e-7 with the same lists zero-padded to the query tile
# count, so the backward assumes lists that wide. Padded, no memory is saved; hence refused on
# CUDA by the operator. 0.
SEL_NARROW_Q_LISTS = 0
# 1: with SEL_NARROW_LISTS and one position per selected tile, the selected BlockMask's mask_mod
# is causality alone (every key of a listed tile lies in a block of that position's selection),
# so the [B, Hkv, T, Ts] selection table (288 MiB at 64k) is neither built nor saved for the
# backward, and partial tiles read no table. Tested on CPU (compiled FlexAttention against the
# dense path of the table's mask). Measured on an H200 at 64k (paper config, D = 128, bf16, both
# in one run): 204.67 ms fwd+bwd and 13027 MiB peak vs 206.18 ms and 13315 MiB with 0 (cuDNN
# 457.6 / 459.7 ms, 11648 MiB). GPU gradient check passed with it (T = 4096, Dk = 192, with
# SEL_FULL_TILES = 0: fp32 1.8e-6, bf16 3.8e-3, no recompiles). 1.
SEL_CAUSAL_ONLY = 1
# 0: with SEL_NARROW_LISTS, no selected tile is marked full: every listed tile is partial (its
# mask_mod evaluated — causality alone with SEL_CAUSAL_ONLY) and the mask has no full lists.
# The full query-side lists [B, Hkv, Nkv, T·G/q_block] int32 go (1 GiB of the selected
# BlockMask's 2 GiB at 64k with 16-row tiles: FlexAttention's backward needs its query lists
# that wide, see SEL_NARROW_Q_LISTS), for a mask evaluation in every tile. Measured on an H200
# at 64k (paper config, D = 128, bf16, both in one run): 202.68 ms fwd+bwd and 11986 MiB peak vs
# 204.06 ms and 13027 MiB with 1 (cuDNN 456.2 / 451.9 ms, 11648 MiB); the selected BlockMask
# 1041 MiB per layer instead of 2082. GPU gradient check passed (T = 4096, Dk = 192: fp32 1.8e-6,
# bf16 3.8e-3, no recompiles). 0.
SEL_FULL_TILES = 0
# Per branch ("cmp", "slc", "swa"), 1: the gated sum's backward writes that branch's output
# gradient just before the branch's FlexAttention backward (nsa_flex/gating.py,
# nsa_flex/gate_kernel.py) instead of with the others in one fused kernel: at 64k (Hq = 64, bf16)
# those are 1 GiB each, all alive at the peak (during the sliding branch's backward, the first).
# Same values. Measured on an H100 at 64k (paper config, D = 128, bf16; one variant per GPU of
# one four-GPU machine, cuDNN in each process, --profile):
# - cmp alone (the default): 208.97 ms fwd+bwd, 10789 MiB peak vs 207.45 ms, 11781 MiB with none
#   (cuDNN 452.1 / 457.3 ms, 11648 MiB); the FlexAttention kernels' device time is the same
#   (backward 119.9 vs 119.8 ms), the gradient kernel adds 1.1 ms.
# - cmp and slc: 221.69 ms, 10709 MiB; all three (an earlier call): 228.01 ms, 10721 MiB vs 208.73.
#   The selected branch's backward kernel runs 88.0 ms instead of 74.3 when its output gradient
#   comes from the opaque op, and the sliding one 15.2 instead of 10.1; the compressed one is
#   unchanged (32.1). Unexplained (the same strides in the traced graph).
# GPU gradient check passed with cmp (T = 4096, Dk = 192: fp32 1.8e-6, bf16 3.8e-3, no
# recompiles) and with all three. ``GATE_GRADS_APART=1`` in --tune sets all three.
GATE_GRADS_APART: dict[str, int] = {"cmp": 1, "slc": 0, "swa": 0}
# Scoring pass: at most this many fp32 score elements (positions x Hq x Tc) live at once.
SCORE_CHUNK_ELEMS = 1 << 28
# > 0: each chunk of positions scores only the compressed blocks it can see (those complete
# before the chunk's end), their count rounded up to a multiple of ceil(Tc / this), so that at
# most this many chunk shapes exist (each shape compiles its own kernels). Same values; about
# half the scoring matmul and exp work. Measured on an H100 at 64k (32-row selected tiles):
# 4 -> 254 ms fwd+bwd vs 269 ms with 0.
SCORE_CAUSAL_SLICES = 4
# 1 (with SCORE_CAUSAL_SLICES > 0): each chunk also pools and ranks (top-n) only the selection
# blocks its positions can have (j·l' before the chunk's end), rounded the same way, instead of
# all Ts. Same selection. At 64k the top-n is 18.6 ms of radix select over 1024 blocks, of which
# ~40% are past the chunk's end on average with 4 slices. Measured on an H100 at 64k, both in one
# run: 220.3 ms fwd+bwd vs 227.8 with 0 (cuDNN 448.9 / 446.4 there). The GPU gradient check with
# it passed (T=4096, Dk=192: fp32 1.5e-6, no recompiles); that check takes the operator's own
# selection, so the selection itself is tested on CPU only (the same blocks as with 0). 1.
TOPN_CAUSAL = 1
# 1: the top-n (eqs. 11-12) by a float32 torch.topk for each row's n-th largest score, then every
# block above it and the lowest-numbered of those equal to it (selection.top_n_by_value), instead
# of one torch.topk over int64 keys (score bits above the reversed block number; 0). Same blocks
# (tested on CPU against top_n, ties included; on the GPU the two routes agreed on every row at
# 64k). CUDA's radix select takes one pass per byte, 8 for int64 and 4 for float32. Measured on an
# H100 (paper config, D = 128, bf16):
# - scoring + top-n alone at 64k (tools/bench_scoring.py, one process): 17.69 ms vs 21.61.
# - the operator at 64k (--variants, one GPU): 148.91 ms fwd+bwd vs 152.33, forward 52.82 vs
#   56.22, the same peak (10965 MiB); cuDNN 450.6 / 452.8 in the two processes. The 1b flavor at
#   32k: 38,125 tokens/s vs llama3's 30,689 (1.24x; 1.22x before, another call).
# GPU gradient check with it passed (T = 4096, Dk = 192: fp32 1.8e-6, bf16 3.8e-3, 0 recompiles). 1.
TOPN_BY_VALUE = 1
# 1: the selection scores (eqs. 8-10) by one Triton kernel (nsa_flex/score_kernel.py) per chunk
# of positions: q·k̃ᵀ on tensor cores, exp, the sum over the group's heads and the pooling into
# selection blocks in registers, only [positions, Ts] written — no [positions·Hq, Tc] scores
# through memory. CUDA only, where G and l'/d are powers of two (elsewhere the torch route, with a
# warning). Its scores stay float32 where the torch route rounds q·k̃ᵀ to bf16 first, so bf16
# selections are closer to float32 ones (GPU gradient check at T = 4096: 98.5% of selections equal
# to the float32 run's vs 97.1%). Measured on an H100 (paper config, Hq = 64, Hkv = 4, bf16):
# - scoring + top-n alone, both routes in one process (tools/bench_scoring.py): 64k 24.50 ms vs
#   39.26 (Dk = 192: 27.36 vs 39.35), 8k 0.49 vs 0.89; the kernel itself 10.8 ms at 64k.
# - the operator, fwd+bwd: 64k 194.77 ms, 10757 MiB (cuDNN 450.5 in that process) vs 208.12 ms,
#   10789 MiB with 0 (another call; cuDNN 438.6); 8k 16.77 vs 16.82, 16k 35.43 vs 36.35 (earlier).
# - 128k compiled and ran in 101 s wall (519.5 ms fwd+bwd, finite) where the torch route's graph
#   (256 chunks unrolled) did not finish compiling in 530 s.
# GPU gradient check passed with it (T = 4096, Dk = 192: fp32 1.8e-6, bf16 3.8e-3, 0 recompiles). 1.
SCORE_KERNEL = 1
# The scoring kernel's tiles (nsa_flex/score_kernel.py): packed query rows per program, compressed
# blocks per step, warps, pipeline stages. SCORE_TILES for 16-bit inputs at Dk <= 256;
# SCORE_TILES_WIDE for float32 or Dk > 256, where the first would not fit in shared memory
# (float32 runs one stage). rows and blocks are powers of two, at least 16 (a program takes at
# least one position and one selection block). Set one entry from the GPU tools with
# --tune SCORE_TILES.rows=64. Swept on an H100 at 64k (tools/bench_scoring.py --sweep, the kernel
# alone, bf16; rows:blocks:warps:stages -> ms at Dk = 128 / 192):
#   128:128:8:2 10.61 / 13.94   128:128:8:3 9.83 / out of shared memory   128:128:4:2 8.81 / 19.05
#   64:128:4:3 9.58 / 17.99     128:64:8:3 7.97 / 12.96                   64:64:4:3 8.79 / 17.71
SCORE_TILES: dict[str, int] = {"rows": 128, "blocks": 64, "warps": 8, "stages": 3}
SCORE_TILES_WIDE: dict[str, int] = {"rows": 64, "blocks": 64, "warps": 4, "stages": 2}
# 1: the top-n (eqs. 11-12) by one Triton kernel (nsa_flex/topn_kernel.py) per chunk of positions:
# a row of scores in registers, n rounds of "largest score, lowest j among equals", instead of
# torch.topk's radix passes and the placing cumsums of top_n_by_value. The same blocks (tested
# against top_n on CPU under Triton's interpreter, ties included). CUDA only, for rows of at most
# TOPN_KERNEL_MAX_BLOCKS selection blocks (elsewhere the torch route, with a warning). Measured on
# an H100 (torch 2.11, bf16, paper config, Hq = 64, Hkv = 4, D = 128):
# - 16384 positions x 4 KV heads x 1024 blocks (the last chunk at 64k): 0.60 ms vs 6.69 for
#   top_n_by_value (eager), the same blocks in every row (also with scores on 8 levels: ties);
#   2048 blocks (128k): 1.01 vs 11.53 ms.
# - scoring + top-n alone at 64k (tools/bench_scoring.py, compiled, one process): 9.38 ms vs
#   17.73 (top-n by value), the same selection in every row.
# - the operator at 8k, compiled, 1 vs 0: the same blocks and bit-identical output.
# - the 1b flavor at 32k: 37.9k vs 37.5k tokens/s (within the steps' spread), one H100.
# - the operator (tools/bench.py --variants "" "TOPN_KERNEL=0", one process each, cuDNN alongside,
#   one H100): 64k 142.72 vs 149.23 ms fwd+bwd (forward 45.04 vs 52.37; predicted ~8 ms less), the
#   same peak (10965 MiB); 8k 11.76 vs 11.82. GPU gradient check (T = 4096, Dk = 192) with it:
#   fp32 1.8e-6, bf16 3.8e-3, 0 recompiles. 1.
TOPN_KERNEL = 1
# Its limits and launch: the longest row (selection blocks; 4096 is 256k tokens at l' = 64), the
# row elements a program holds (rows per program = TOPN_KERNEL_TILE // the row's power of two), and
# warps per program.
TOPN_KERNEL_MAX_BLOCKS = 4096
TOPN_KERNEL_TILE = 8192
TOPN_KERNEL_WARPS = 4
# > 0: Inductor autotunes FlexAttention kernels (where several configs fit) on fake block counts
# equal to the index lists' width — for the backward's query lists all T·G/q_block tiles per
# KV tile, a dense pass per candidate (at 128k one candidate of the compressed backward measured
# 8.2 s a run, and the compile ran out of a 570 s call). This caps those fake counts at this
# many blocks (FlexAttention's own comment intends 16). Changes only which config is picked and
# how long the compile takes, never a result. With 16 the GPU gradient check passed (T=4096,
# Dk=192) and 128k compiled and ran (660.5 ms fwd+bwd; 522 s wall, compile included; H100); at
# 64k it timed 225.15 ms vs 225.1 without (across calls) and compiled faster. 0 by default all
# the same, because it patches Inductor for the whole process (the cap is installed at import
# or by apply() only when this is set).
AUTOTUNE_BLOCKS = 0
# Dense path (CPU; the visualiser's compile-free forward on CUDA): query rows per chunk such that
# at most this many score elements (batch x heads x rows x keys) live at once.
DENSE_CHUNK_ELEMS = 1 << 28
# Extra FlexAttention kernel options per branch ("cmp", "slc", "swa", and "forced": the forced
# blocks' call under SEL_FORCED_STATIC), merged over the defaults
# below. Keys: fwd_BLOCK_M, fwd_BLOCK_N, fwd_num_stages, fwd_num_warps, bwd_BLOCK_M1, bwd_BLOCK_N1,
# bwd_BLOCK_M2, bwd_BLOCK_N2, bwd_num_stages, bwd_num_warps.
KERNEL_OPTIONS: dict[str, dict] = {"cmp": {}, "slc": {}, "swa": {}, "forced": {}}
# 1: FlexAttention loads K/V (forward) and Q/dO, K/V (backward) by TMA (kernel option USE_TMA,
# Hopper; Inductor falls back to plain loads where a tensor's layout does not allow it), per
# branch, for 16-bit inputs. Measured per branch alone at 64k (tools/bench_branches.py, H100,
# bf16, D = 128; kernel ms from the profiler): selected backward 75.3 -> 65.8 ms (forward 22.3 ->
# 21.7); compressed backward 32.8 -> 35.5 and sliding backward 10.9 -> 11.9, slower, so off there
# (at 8k: 1.34 -> 1.54 and 1.35 -> 1.49). With SMALL_Q_FWD_WARPS (below) and SCORE_TILES, the
# operator at 64k: 185.3 ms fwd+bwd vs 202.9 without the three, one run on one H100 (cuDNN
# 450.6 / 451.9); 10965 vs 10757 MiB. GPU gradient check with the three passed (T = 4096,
# Dk = 192: fp32 1.9e-6, bf16 3.8e-3, 0 recompiles).
TMA: dict[str, int] = {"cmp": 0, "slc": 1, "swa": 0, "forced": 0}
# Per branch: FlexAttention's FLASH backend (kernel option BACKEND="FLASH") for 16-bit inputs:
# Inductor lowers the branch's call to flash-attn-4's CuTe DSL kernels (wgmma, the FA3 design on
# Hopper) instead of its Triton template; same mask_mod and BlockMask. 1 on, 0 off, None: on where
# flash_available() (the package flash-attn-4, ``pip install -e .[flash]``, and a CUDA card of
# compute capability 9.x-11.x), else off with a warning. Needs 128x128 tiles (Q_BLOCK = KV_BLOCK =
# 128, and no SWA_KV_BLOCK other than 128 for the sliding branch), so the selected branch's 16-row
# tiles cannot take it; checked before compute (flash_problem). On torch 2.11 its LSE comes out
# ln 2 times the true one (backends.measure_flash_lse_scale measures and corrects it), and its K/V
# take one batch entry per query split (backends.attend copies them; the Triton kernels
# broadcast). Measured on an H100 (torch 2.11, flash-attn-4 4.0.0b36, paper config, D = 128, bf16):
# - each branch alone at 64k (tools/bench_branches.py, same process; kernel ms fwd / bwd):
#   compressed 7.30 / 24.96 vs Triton's 12.18 / 33.02, fwd+bwd 33.16 vs 46.76 ms; sliding 2.95 /
#   15.00 vs 4.40 / 10.78, fwd+bwd 18.47 vs 16.57 (its backward is slower). Outputs and gradients
#   within 3.1e-3 (relative) of Triton's.
# - the operator at T = 4096 with FLASH["cmp"] = 1 vs 0 (one process): the same selected blocks in
#   every row, output within 1.4e-3, gradients within 3.5e-3.
# - the operator with FLASH["cmp"] = 1 vs 0 (tools/bench.py --variants, one process, cuDNN
#   alongside): 64k 137.96 vs 148.59 ms fwd+bwd, peak 11716 vs 10965 MiB (cuDNN 11616: above it);
#   8k 11.43 vs 11.89 ms, 1465 vs 1259 MiB (cuDNN 1454). The extra memory comes with flash-attn-4's
#   backward (likely its fp32 dQ accumulator, not measured apart) and costs the 64k memory target,
#   so 0 stays the default and 1 (or None) is the user's choice: 7% faster at 64k, 751 MiB more.
# - tools/check_gpu.py at T = 4096, Dk = Dv = 128, FLASH["cmp"] = 1: bf16 within 3.8e-3 of the fp32
#   dense path (98.4% the same selection), no NaN, 0 recompiles.
# - the 1b flavor at 32k (head dim 64): 38.0k vs 37.7k tokens/s (llama3 30.7k), one H100.
# - with the top-n kernel (--variants, one H100): 64k 128.45 vs 141.08 ms, peak 11716 vs 10965 MiB
#   (cuDNN 11616). Not the fp32 dQ buffer alone: the branch as two sequential calls over halves of
#   the query rows (each its own flash-attn-4 backward) took 126.78 ms and peaked higher, 11989 MiB.
# - at Dk = 192 its backward stops ("Block sparsity expects sparse_block_size[1]=96"), see
#   FLASH_MAX_HEAD_DIM.
FLASH: dict[str, int | None] = {"cmp": 0, "swa": 0, "forced": 0}
# The largest head dim (Dk and Dv) a FLASH branch runs at. flash-attn-4's sm90 block-sparse
# backward tiles keys by 128 up to head dim 128 but by 96 above it, and the branches' blocks are
# 128 keys: at Dk = 192 (the paper's shape) its backward stopped with "Block sparsity expects
# sparse_block_size[1]=96" (H100, tools/check_gpu.py). Above it a branch under FLASH None runs on
# Triton; one under 1 is refused before compute (flash_problem).
FLASH_MAX_HEAD_DIM = 128
# Warps of the FlexAttention forward for a query tile under 64 rows (the selected branch's
# one-position tiles), 16-bit inputs; None keeps Inductor's (8, chosen for its 128-row tile).
# Measured at 64k as for TMA: the selected forward 22.1 ms with 8, 17.1 with 4, 16.5 with 2 (with
# TMA: 17.0 with 2 or 1); backward unchanged.
# With it, the selected forward at 64k (tools/bench_branches.py, kernel ms) under further kernel
# options: 17.05 as is, fwd_BLOCK_N = 32 16.72, fwd_num_stages 2 17.02 / 4 19.46, fwd_num_warps = 4
# 17.83; nothing worth a knob.
SMALL_Q_FWD_WARPS: int | None = 2


def apply(items: list[str]) -> dict:
    """Set knobs from ``KNOB=VALUE`` / ``KNOB.key=VALUE`` / ``KNOB.branch.option=VALUE`` strings
    (VALUE an int or None; the last form for KERNEL_OPTIONS), as the GPU tools' ``--tune`` option
    does; returns every knob's value in effect."""
    g = globals()
    for item in items:
        name, _, value = item.partition("=")
        knob, _, key = name.partition(".")
        key, _, option = key.partition(".")
        if not value or knob not in g or not knob.isupper():
            raise ValueError(f"--tune {item!r}: expected KNOB=VALUE with KNOB one of "
                             f"{sorted(n for n in g if n.isupper())}")
        val = None if value == "None" else int(value)
        if key and not isinstance(g[knob], dict):
            raise ValueError(f"--tune {item!r}: {knob} is not a per-branch knob; use {knob}=VALUE")
        if key and key not in g[knob]:
            raise ValueError(f"--tune {item!r}: {knob} has no branch {key!r}; one of {sorted(g[knob])}")
        if option and not isinstance(g[knob][key], dict):
            raise ValueError(f"--tune {item!r}: {knob}.{key} takes a value, not options; "
                             f"use {knob}.{key}=VALUE")
        if option:   # KERNEL_OPTIONS.slc.bwd_num_warps=2 (None removes the option)
            g[knob][key].pop(option, None)
            if val is not None:
                g[knob][key][option] = val
        elif key:
            g[knob][key] = val
        elif isinstance(g[knob], dict) and any(isinstance(v, dict) for v in g[knob].values()):
            raise ValueError(f"--tune {item!r}: {knob} takes options per branch: "
                             f"{knob}.BRANCH.OPTION=VALUE")
        elif isinstance(g[knob], dict):   # a per-branch knob without a branch: every branch
            g[knob] = dict.fromkeys(g[knob], val)
        else:
            g[knob] = val
    if AUTOTUNE_BLOCKS:
        cap_autotune_blocks()
    return {n: g[n] for n in sorted(g) if n.isupper()}


def kernel_options(branch: str, dtype: torch.dtype, qk_dim: int, kv_block: int,
                   q_block: int | None = None, v_dim: int | None = None) -> dict:
    """FlexAttention kernel options for one branch call.

    - float32: Inductor's sm90 default forward tile for head dims it has no entry for (64x64,
      3 stages) needs more shared memory than the card has at Dk=192, so use 32x32, 2 stages.
    - a KV tile below 128 (the selected branch with l' = 64): a forward tile of at most 64 keys;
      the backward tile comes from :func:`install_flex_backward_configs`.
    - 16-bit inputs under FLASH for the branch, head dims (qk_dim, v_dim; None: qk_dim) at most
      FLASH_MAX_HEAD_DIM: the FLASH backend (its own tiles; Triton's options do not apply).
    - 16-bit inputs: TMA loads where tuning.TMA says so for the branch, SMALL_Q_FWD_WARPS
      forward warps for a query tile under 64 rows, and under SEL_DQ_WIDE_STEPS its dQ steps
      of 64 keys.
    """
    opts: dict = {}
    rows = q_block or Q_BLOCK
    if flash_on(branch) and dtype != torch.float32 and flash_fits(qk_dim, v_dim):
        return {"BACKEND": "FLASH", **KERNEL_OPTIONS.get(branch, {})}
    if dtype == torch.float32:
        opts.update(fwd_BLOCK_M=32, fwd_BLOCK_N=32, fwd_num_stages=2, fwd_num_warps=4)
    else:
        if kv_block < 128:
            opts.update(fwd_BLOCK_N=min(64, kv_block))
        if TMA.get(branch):
            opts["USE_TMA"] = True
        if rows < 64 and SMALL_Q_FWD_WARPS:
            opts["fwd_num_warps"] = SMALL_Q_FWD_WARPS
        if rows < 64 and SEL_DQ_WIDE_STEPS and kv_block > rows:
            # as a kernel option, not only as the offered candidate: compiled graphs are cached
            # by what they trace, and the candidate list is not traced
            opts["bwd_BLOCK_N2"] = min(64, kv_block)
    if rows < 128:  # a small query tile: the kernel's row block (128 by default
        # for bf16 at D <= 128 on sm90) must divide it
        opts["fwd_BLOCK_M"] = min(opts.get("fwd_BLOCK_M", 64), rows)
    opts.update(KERNEL_OPTIONS.get(branch, {}))
    return opts or None


_FLASH_AVAILABLE: bool | None = None


def flash_available() -> bool:
    """Whether FlexAttention's FLASH backend can run here: flash-attn-4 importable and a CUDA card
    of compute capability 9.x-11.x (flash-attn-4's block-sparse backward). Found once, outside
    any trace (operator.prepare_flash), then read."""
    global _FLASH_AVAILABLE
    if _FLASH_AVAILABLE is None:
        _FLASH_AVAILABLE = (torch.cuda.is_available() and _flash_package()
                            and torch.cuda.get_device_capability()[0] in (9, 10, 11))
    return _FLASH_AVAILABLE


def _flash_package() -> bool:
    """Whether flash-attn-4 (flash_attn.cute) is installed; a broken flash_attn counts as none."""
    import importlib.util
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        return False


def flash_on(branch: str) -> bool:
    """FLASH's setting for a branch, None resolved by flash_available() (found before any trace:
    operator.prepare_flash, which nsa_attention and the model's parallelize call)."""
    value = FLASH.get(branch, 0)
    if value is None and _FLASH_AVAILABLE is None and torch.compiler.is_compiling():
        raise RuntimeError(f"tuning.FLASH[{branch!r}] is None (automatic): call "
                           "nsa_flex.operator.prepare_flash(device) before compiling a model that "
                           "calls nsa_attention, or set it to 0 or 1")
    return flash_available() if value is None else bool(value)


def flash_fits(qk_dim: int, v_dim: int | None = None) -> bool:
    """Whether a branch's head dims (v_dim None: qk_dim) are ones the FLASH backend runs
    (FLASH_MAX_HEAD_DIM)."""
    return max(qk_dim, v_dim or qk_dim) <= FLASH_MAX_HEAD_DIM


def flash_problem(qk_dim: int | None = None, v_dim: int | None = None,
                  package: bool = True) -> str | None:
    """Why the FLASH settings cannot run here (None when they can): a branch set to 1 needs the
    flash-attn-4 package (looked for unless ``package`` is False: not inside a trace) and head dims
    within FLASH_MAX_HEAD_DIM (where given), and any branch under FLASH 128x128 tiles. Called by
    the operator before compute."""
    forced = sorted(b for b, v in FLASH.items() if v)
    if forced and qk_dim is not None and not flash_fits(qk_dim, v_dim):
        return (f"tuning.FLASH is 1 for {forced} but the head dims are Dk={qk_dim}, "
                f"Dv={v_dim or qk_dim}: flash-attn-4's block-sparse backward runs the branches' "
                f"128-key blocks only up to {FLASH_MAX_HEAD_DIM} (FLASH_MAX_HEAD_DIM); set FLASH "
                "to 0 for those branches (or None: Triton at these head dims)")
    if forced and package and not _flash_package():
        return (f"tuning.FLASH is 1 for {forced} but the flash-attn-4 package (flash_attn.cute) "
                "is not installed; pip install -e .[flash] (or set FLASH to 0 or None for those "
                "branches)")
    on = sorted(b for b in FLASH if flash_on(b))
    tiles = {"Q_BLOCK": Q_BLOCK, "KV_BLOCK": KV_BLOCK}
    if "swa" in on and SWA_KV_BLOCK not in (None, 128):
        tiles["SWA_KV_BLOCK"] = SWA_KV_BLOCK
    bad = {k: v for k, v in tiles.items() if v != 128}
    if on and bad:
        return (f"tuning.FLASH is on for {on}, whose kernels take 128x128 tiles, but "
                + ", ".join(f"{k}={v}" for k, v in bad.items()) + "; set those to 128 or FLASH to 0")
    return None


# A 64x64 FlexAttention backward tile for bf16/fp16 on CUDA. Inductor filters its backward configs
# by the BlockMask's sparse block sizes *before* kernel options apply, and on sm90 at D <= 128 its
# only default (BLOCK_N1 = 128) cannot run a 64-key sparse block (NoValidChoicesError). Adding this
# candidate lets the selected branch use l' = 64 tiles; where several candidates fit, Inductor
# benchmarks them once at compile time.
EXTRA_BWD_CONFIG = (64, 64, 64, 64)  # BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2


# 1: the selected branch's backward computes dQ in steps of 64 keys (its KV tile) instead of
# steps as small as its query tile (16 keys with one-position tiles: 64 steps per query tile, 16M
# steps at 64k). Inductor's FlexAttention backward template asserts BLOCK_M2 % BLOCK_N2 == 0,
# which its dQ loop over a tile's sparse KV blocks does not need (the loop steps BLOCK_N2 keys
# at a time within each listed block; nothing else relates the two); this knob removes that one
# line from the template (allow_wide_dq_steps) and offers (q, 64, q, 64) instead of (q, 64, q, q)
# — for 16-bit inputs also as the kernel option bwd_BLOCK_N2 (kernel_options), so that compiled
# graphs cached without it are not reused. Measured on an H100 (paper config, D = 128, bf16):
# - the selected branch alone (tools/bench_branches.py, each set compiled afresh; kernel ms): 64k
#   backward 65.9 -> 42.0 (2 stages 51.3, 4 stages 42.4, 8 warps 99.9); 8k 7.95 -> 4.87. Same
#   outputs and gradients (max relative difference 0: an MMA over 64 keys accumulates as four
#   over 16 do).
# - the operator (--variants, one GPU, cuDNN in each process; with 2 backward stages, the worse
#   setting): 64k 161.47 ms fwd+bwd vs 175.84; 8k 12.46 vs 14.84; 16k 27.35 vs 31.96; 32k 63.74
#   vs 71.86; the same peaks. With the default stages (--profile, its own GPU): 64k 152.16 ms
#   (cuDNN 453.16 in that process), the selected backward kernel 40.4.
# GPU gradient check with it passed (T = 4096, Dk = 192: fp32 1.9e-6, bf16 3.7e-3, 0 recompiles;
# there fp32 autotuning kept 16-key steps for the selected branch, and ran the patched template
# with 64-key steps on the 128-row tiles of the other two). 1.
SEL_DQ_WIDE_STEPS = 1
DQ_STEP_ASSERT = "tl.static_assert(BLOCK_M2 % BLOCK_N2 == 0)"


def small_q_bwd_config(q_block: int) -> tuple[int, int, int, int]:
    """Backward tile offered too while the selected query tile is under 64 rows (16 rows: one
    position at G = 16). The flex backward template asserts BLOCK_N1 % BLOCK_M1 == 0 and
    BLOCK_M2 % BLOCK_N2 == 0, and a tile must divide its sparse block: (q, 64, q, q); with
    SEL_DQ_WIDE_STEPS (which lifts the second assert) (q, 64, q, 64)."""
    return (q_block, 64, q_block, 64 if SEL_DQ_WIDE_STEPS else q_block)


def allow_wide_dq_steps() -> None:
    """Remove DQ_STEP_ASSERT from Inductor's FlexAttention backward template (idempotent; see
    SEL_DQ_WIDE_STEPS). Raises where this torch has no such template or the template lacks the
    line (a torch this was not written for), rather than offer 64-key steps unpatched."""
    refuse = RuntimeError(f"tuning.SEL_DQ_WIDE_STEPS=1: this torch's FlexAttention backward "
                          f"template does not assert {DQ_STEP_ASSERT!r} once; set it to 0")
    try:
        from torch._inductor.kernel.flex import flex_attention as fa
        from torch._inductor.kernel.flex.common import load_flex_template
        template = fa.flex_attention_backward_template
    except (ImportError, AttributeError) as e:
        raise refuse from e
    if getattr(template, "_nsa_flex_wide_dq", False):
        return
    source = load_flex_template("flex_backwards") + load_flex_template("utilities")
    if source.count(DQ_STEP_ASSERT) != 1:
        raise refuse
    import hashlib
    source = source.replace(DQ_STEP_ASSERT, "pass  # nsa_flex: dQ steps may be wider than the query tile")
    template.template = template._template_from_string(source)
    template._hash = hashlib.sha256(source.encode("utf-8")).hexdigest()   # new kernels, new cache keys
    template._nsa_flex_source = source
    template._nsa_flex_wide_dq = True


def sel_q_block() -> int:
    return SEL_Q_BLOCK or Q_BLOCK


def install_flex_backward_configs() -> bool:
    """Add EXTRA_BWD_CONFIG to Inductor's CUDA flex backward candidates (idempotent).

    Returns False where this torch lacks the heuristic it extends; the selected branch then uses
    128-key tiles.
    """
    global SEL_KV_BLOCK
    try:
        from torch._inductor.template_heuristics import triton as heuristics
        cls = heuristics.CUDAConfigHeuristic
        original = cls.get_flex_attn_bwd_configs
    except (ImportError, AttributeError):
        if SEL_KV_BLOCK is None:
            SEL_KV_BLOCK = 128
        return False
    if getattr(original, "_nsa_flex_extra", False):
        return True

    def get_flex_attn_bwd_configs(self, head_dim, dtype):
        if SEL_DQ_WIDE_STEPS and sel_q_block() < 64:
            allow_wide_dq_steps()
        configs = list(original(self, head_dim, dtype))
        have = {(c.block_m1, c.block_n1, c.block_m2, c.block_n2) for c in configs}
        extra = ([EXTRA_BWD_CONFIG] if dtype != torch.float32 else []) + \
            ([small_q_bwd_config(sel_q_block())] if sel_q_block() < 64 else [])
        stages = 2 if dtype == torch.float32 or head_dim > 128 else 3
        for blocks in extra:
            if blocks not in have:
                configs.append(heuristics.FlexBwDConfig(*blocks, stages, 4))
        return configs

    get_flex_attn_bwd_configs._nsa_flex_extra = True
    cls.get_flex_attn_bwd_configs = get_flex_attn_bwd_configs
    return True


def fix_scalar_tree_block_shape() -> bool:
    """Let Inductor's Triton codegen size an index expression over a tree without a tensor
    dimension (idempotent).

    Split scans (long cumsums; Inductor's ``TritonSplitScanKernel``) and persistent reductions in
    no-X-dim mode run their X range as a scalar (``tensor_dim`` None). On torch 2.11,
    ``TritonSymbols.get_block_shape`` indexes a shape list with that None and fails with
    "TypeError: list indices must be integers or slices, not NoneType" whenever an index
    expression of the X range is fused into such a kernel — which the BlockMask builders do
    (tile lists by prefix counts, tile classifications from position ranges). Later torch treats
    such a tree as a scalar; this does the same where the installed torch does not, by sizing the
    expression with those trees' symbols replaced by 0 (a scalar has shape ()). Only the shape
    computation changes, never an index. Returns whether the fix was needed and installed.
    """
    import inspect
    try:
        from torch._inductor.codegen.triton import TritonSymbols
        from torch._inductor.virtualized import V
        original = TritonSymbols.get_block_shape.__func__
    except (ImportError, AttributeError):
        return False
    if getattr(original, "_nsa_flex_scalar_trees", False):
        return True
    try:
        if "tensor_dim is None" in inspect.getsource(original):
            return False                                   # this torch handles it already
    except (OSError, TypeError):
        pass
    TritonSymbols.get_block_shape = classmethod(scalar_trees_as_constants(original, lambda: V.kernel))
    return True


def scalar_trees_as_constants(get_block_shape, kernel):
    """``get_block_shape(cls, expr)`` with the symbols of the kernel's range trees that have no
    tensor dimension replaced by 0 first (see :func:`fix_scalar_tree_block_shape`)."""
    def patched(cls, expr):
        scalar = [t.prefix for t in kernel().range_trees if t.tensor_dim is None]
        if scalar:
            zero = {v: 0 for v in expr.free_symbols if any(v.name.startswith(p) for p in scalar)}
            expr = expr.subs(zero) if zero else expr
        return get_block_shape(cls, expr)

    patched._nsa_flex_scalar_trees = True
    return patched


def cap_autotune_blocks() -> bool:
    """Make Inductor's fake block counts for FlexAttention autotuning respect AUTOTUNE_BLOCKS
    (read at each compile, so --tune works after import; 0 leaves them as they are). Idempotent;
    returns False where this torch lacks the generator it wraps."""
    import importlib
    try:
        common = importlib.import_module("torch._inductor.kernel.flex.common")
        original = common.create_num_blocks_fake_generator
    except (ImportError, AttributeError):
        return False
    if getattr(original, "_nsa_flex_cap", False):
        return True
    capped = capped_num_blocks_generator(original, lambda: AUTOTUNE_BLOCKS)
    for name in ("common", "flex_attention", "flex_decoding", "flex_flash_attention"):
        try:
            mod = importlib.import_module(f"torch._inductor.kernel.flex.{name}")
        except ImportError:
            continue
        if getattr(mod, "create_num_blocks_fake_generator", None) is original:
            mod.create_num_blocks_fake_generator = capped
    return True


def capped_num_blocks_generator(generator, cap):
    """``generator(sparse_indices) -> fake(x)`` with fake's counts clamped to ``cap()`` when > 0."""
    def capped(sparse_indices):
        fake = generator(sparse_indices)

        def fake_capped(x):
            counts, limit = fake(x), cap()
            return counts.clamp_(max=limit) if limit > 0 else counts
        return fake_capped

    capped._nsa_flex_cap = True
    return capped
