"""``python -m rnorm``: the same as the ``rnorm`` console script."""

import sys

from rnorm.cli import main

sys.exit(main())
