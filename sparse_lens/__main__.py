"""`python -m sparse_lens ...` (and `torchrun ... -m sparse_lens train ...`): the `sparse-lens` command."""

import sys

from sparse_lens.cli import main

sys.exit(main())
