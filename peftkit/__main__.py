"""`python -m peftkit ...`: the `peftkit` command, for environments whose scripts folder is not on PATH."""

import sys

from peftkit.cli import main

sys.exit(main())
