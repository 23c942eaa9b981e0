"""`python -m drpt_ref ...` is the same as the `drpt` command.

May import: cli.
"""

import sys

from drpt_ref.cli import main

sys.exit(main())
