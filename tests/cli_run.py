"""Running the ``v2l-fast`` command inside a test: the one helper every CLI test uses."""

from __future__ import annotations

from v2l_fast.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)``: (exit code, stdout, stderr); argparse's own exits count as exit codes."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
