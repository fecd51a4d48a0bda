"""`python -m peftkit ...`: the `peftkit` command, for environments whose scripts folder is not on PATH."""

import sys
from pathlib import Path

from peftkit import cli

cli.COMMAND[:] = [Path(sys.executable).name, "-m", "peftkit"]  # the resume and next-step lines name it so
sys.exit(cli.main())
