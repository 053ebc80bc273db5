"""``python -m supervisor.cli``: mlxsupd, as service files rendered by earlier versions run it."""

import sys

from supervisor.cli.mlxsupd import main

sys.exit(main())
