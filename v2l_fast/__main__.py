"""``python -m v2l_fast``: the ``v2l-fast`` command line (see `v2l_fast.cli`)."""

from v2l_fast.cli import main

raise SystemExit(main())
