"""`python -m mrhp ...`: the same as the `mrhp` console script."""
import sys

from mrhp.cli import main

sys.exit(main())
