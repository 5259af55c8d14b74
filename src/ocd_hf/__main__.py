"""`python -m ocd_hf ...` runs the `ocd-hf` command line (ocd_hf.cli)."""

import sys

from .cli import main

sys.exit(main())
