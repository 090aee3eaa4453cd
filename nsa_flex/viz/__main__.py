"""``python -m nsa_flex.viz``: the mask visualiser (see ``--help``)."""

import sys

if __name__ == "__main__":  # not at import: spawned drawing workers re-import this module
    from nsa_flex.viz.cli import main

    sys.exit(main())
