"""``python -m nsa_flex.viz``: the mask visualiser (see ``--help``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
