"""``python -m python_layers.demo`` (``make demo``): a short real experiment through the ``eidetic`` CLI.

Trains 3 tasks of Split MNIST (digits 0/1, 2/3, 4/5) from the shared data with a small MLP (configs/demo.yaml),
about a minute on 2 idle CPU cores (45 s measured), then prints the accuracy matrix with the true task id (oracle) and through the
learned router (no task id), ACC/BWT/FWT/forgetting, and where the plots are. Extra ``key=value`` arguments
override the config; ``--out DIR`` picks the run folder (default ``runs/demo-<date-time>`` in the project).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import cli

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out" in args:
        i = args.index("--out")
        out = args[i + 1]
        del args[i:i + 2]
    if out is None:
        out = str(ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S"))
    config = ROOT / "configs" / "demo.yaml"
    print(f"eidetic demo: 3 tasks of Split MNIST, small MLP ({config.relative_to(ROOT)}) -> {out}", flush=True)
    code = cli.main(["train", "--config", str(config), "--out", out, *args])
    if code == 0:
        print(f"plots are in {out}/: accuracy_matrix.png, routed_accuracy_matrix.png, task_accuracy.png, "
              "capacity.png; numbers in results.json, per-epoch history in history.csv")
    return code


if __name__ == "__main__":
    sys.exit(main())
