"""`python -m qiusuo` is the `qiusuo` command."""

import sys

from qiusuo.cli import main

sys.exit(main())
