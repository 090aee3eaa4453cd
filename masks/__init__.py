"""Pure FlexAttention mask and BlockMask builders for NSA, one concern per file."""

from .block_mask import block_mask_from_tiles
from .causal import causal_mask, causal_tiles
from .compressed import compressed_mask, compressed_tiles
from .document import and_document, document_mask, document_tiles
from .forced_blocks import forced_blocks_mask, forced_blocks_tiles, is_forced, without_forced
from .readback import computed_mask, dense_mask, tile_states
from .packing import (heads_first, merge_rows, pack_gqa, split_rows, tile_keys, tile_positions,
                      unpack_gqa)
from .selected import selected_mask, selected_tiles, selection_table
from .selected_lists import selected_block_mask
from .sliding_window import sliding_window_mask, sliding_window_tiles

__all__ = [
    "and_document", "block_mask_from_tiles", "causal_mask", "causal_tiles", "compressed_mask",
    "compressed_tiles", "computed_mask", "dense_mask", "document_mask", "document_tiles",
    "forced_blocks_mask", "forced_blocks_tiles", "heads_first", "is_forced", "merge_rows",
    "pack_gqa", "selected_block_mask", "selected_mask", "selected_tiles", "selection_table",
    "sliding_window_mask", "sliding_window_tiles", "split_rows", "tile_keys", "tile_positions",
    "tile_states", "unpack_gqa", "without_forced",
]
