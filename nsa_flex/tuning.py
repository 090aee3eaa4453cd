"""GPU tuning knobs, all in one place. None of them changes results beyond rounding."""

# Packed-GQA query tile (rows = positions x G) of every branch's BlockMask.
Q_BLOCK = 128
# KV tile of the sliding and compressed branches.
KV_BLOCK = 128
# KV tile of the selected branch; None = the selection block l' clipped to [16, 128].
SEL_KV_BLOCK = None
# Scoring pass: at most this many fp32 score elements (positions x Hq x Tc) live at once.
SCORE_CHUNK_ELEMS = 1 << 27
# FlexAttention kernel options per branch (None = FlexAttention's defaults).
KERNEL_OPTIONS = {"cmp": None, "slc": None, "swa": None}
