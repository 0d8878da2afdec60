"""``python -m coord_checks``: see ``coord_checks.cli``."""
import sys

try:
    from coord_checks.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and matplotlib load: the line main() prints later
    print("python -m coord_checks: interrupted", file=sys.stderr)
    raise SystemExit(130)

raise SystemExit(main())
