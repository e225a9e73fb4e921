"""`python -m sparse_lens ...`: the `sparse-lens` command."""

import sys

from sparse_lens.cli import main

sys.exit(main())
