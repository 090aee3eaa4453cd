"""``python -m nsa_flex.eval``: see nsa_flex/eval/cli.py."""

from .cli import main

raise SystemExit(main())
