"""``python -m v2l_fast``: the ``v2l-fast`` command line (see `v2l_fast.cli`).

Run from a source checkout's root, ``python -m`` puts that root first on ``sys.path``, where the
Triton sources' directory ``kernels/`` (installed as `v2l_fast.kernels`) would shadow the PyPI
package ``kernels`` that transformers (5.25 and later) imports: the root leaves ``sys.path``
before the command line imports anything. Only a checkout's root (``setup.py`` beside our
``kernels/``) is removed, never an installed copy's parent (site-packages). `v2l_fast` itself is
imported by then, and its submodules resolve through the package, not through ``sys.path``.
"""

import sys
from pathlib import Path

checkout_root = Path(__file__).resolve().parent.parent
if (checkout_root / "setup.py").is_file() and (checkout_root / "kernels" / "lora_sgmv.py").is_file():
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != checkout_root]

from v2l_fast.cli import main  # noqa: E402  (after the sys.path fix above)

raise SystemExit(main())
