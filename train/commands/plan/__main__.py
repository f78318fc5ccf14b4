"""python -m train.commands.plan: the `archscale plan` command."""
import sys

from .report import main

sys.exit(main())
