"""`python -m peftkit ...`: the `peftkit` command, for environments whose scripts folder is not on PATH."""

import sys

from peftkit.cli import main
from peftkit.utils.command_name import started_as_module

started_as_module()  # the command lines peftkit prints to copy name it so
sys.exit(main())
