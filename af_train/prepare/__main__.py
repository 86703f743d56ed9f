"""``python3 -m af_train.prepare`` = ``af-prepare``."""

import sys

from af_train.prepare.cli import main

sys.exit(main())
