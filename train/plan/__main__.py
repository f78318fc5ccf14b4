"""python -m train.plan: the `archscale plan` command."""
import sys

from .report import main

sys.exit(main())
