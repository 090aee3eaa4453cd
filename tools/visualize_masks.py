"""See what each NSA branch attends to: per layer and KV head, PNGs of the compressed, selected
and sliding patterns and their union, the selected branch's FlexAttention tiles and wasted work,
the selection scores and the gates, plus sparsity statistics and an index.html.

    python tools/visualize_masks.py --flavor debug --seq-len 1024 --out viz

The same as ``python -m nsa_flex.viz``; ``--help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # not at import: spawned drawing workers re-import this script
    from nsa_flex.viz.cli import main

    sys.exit(main())
