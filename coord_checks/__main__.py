"""``python -m coord_checks``: see ``coord_checks.cli``."""
from coord_checks.cli import main

raise SystemExit(main())
