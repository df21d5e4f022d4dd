"""``python -m v2l_fast``: the ``v2l-fast`` command line (see `v2l_fast.cli`).

Started in a source checkout's root, `v2l_fast` (imported before this module) has already taken
that root off ``sys.path``, so its ``kernels/`` does not shadow the package transformers imports.
"""

from v2l_fast.cli import main

raise SystemExit(main())
