"""Copy a finished `v2l-fast replicate` run into the package as the embedded default.

    python scripts/ship_toy_default.py RUN_DIR [--clips 4]

Writes ``v2l_fast/assets/toy/`` (`v2l_fast.data.embedded.write_embedded`): the run's toy VLM,
its best hypernetwork, the first held-out clips with their questions, and the run's report
(settings, timings and the held-out table, without the per-question records).
"""

from __future__ import annotations

import argparse
import json
import os

from v2l_fast.data.embedded import write_embedded
from v2l_fast.train.replicate import REPORT_FILE, hypernet_dir, vlm_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished `v2l-fast replicate` folder")
    parser.add_argument("--clips", type=int, default=4, help="held-out clips to ship (default: 4)")
    args = parser.parse_args()
    report_path = os.path.join(args.run_dir, REPORT_FILE)
    if not os.path.isfile(report_path):
        raise SystemExit(f"run_dir: expected a finished replicate run with {REPORT_FILE}, got {args.run_dir!r}")
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    with open(os.path.join(args.run_dir, "settings.json"), encoding="utf-8") as f:
        report["settings"] = dict(report.get("settings", {}), replicate=json.load(f))
    dest = write_embedded(vlm_dir(args.run_dir), hypernet_dir(args.run_dir),
                          os.path.join(args.run_dir, "world", "heldout.jsonl"), report, num_clips=args.clips)
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(dest) for name in names)
    print(f"wrote {dest} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
