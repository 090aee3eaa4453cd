"""Pure FlexAttention mask and BlockMask builders for NSA, one concern per file."""

from .block_mask import block_mask_from_tiles
from .causal import causal_mask, causal_tiles
from .compressed import (compressed_document_mask, compressed_document_tiles, compressed_mask,
                         compressed_tiles)
from .document import (compressed_block_ends, doc_ids_from_eos, document_ends, document_starts,
                       document_tiles)
from .forced_blocks import is_forced
from .packing import (heads_first, merge_rows, pack_gqa, split_rows, tile_keys, tile_positions,
                      unpack_gqa)
from .readback import computed_mask, dense_mask, tile_states
from .selected import selected_mask, selection_table
from .selected_lists import positions_per_tile, selected_block_mask, tiles_per_block
from .sliding_window import sliding_window_mask, sliding_window_tiles

__all__ = [
    "block_mask_from_tiles", "causal_mask", "causal_tiles", "compressed_block_ends",
    "compressed_document_mask", "compressed_document_tiles", "compressed_mask", "compressed_tiles",
    "computed_mask", "dense_mask", "doc_ids_from_eos", "document_ends", "document_starts",
    "document_tiles", "heads_first", "is_forced", "merge_rows", "pack_gqa", "positions_per_tile",
    "selected_block_mask", "selected_mask", "selection_table", "sliding_window_mask",
    "sliding_window_tiles", "split_rows", "tile_keys", "tile_positions", "tile_states",
    "tiles_per_block", "unpack_gqa",
]
