"""``python -m oscar``: the same as the ``oscar`` console script."""

from .cli import main

raise SystemExit(main())
