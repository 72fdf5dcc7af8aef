"""Start-up time of the command line: ``rulesearch --help``, ``terms``, ``terms --grammar default`` and ``export RULE``
in fresh processes (the wall time of the whole command, median of ``--repeats``), beside the interpreter alone and
``import sympy`` and ``import torch`` on the same machine, against the second performance issue's target (< 1.5 s).
``--help`` loads neither SymPy nor torch; ``terms`` and ``export`` print SymPy's LaTeX, so SymPy's import is their
floor. A figure to read, not a timed test.

    python experiments/bench_cli.py
    python experiments/bench_cli.py --repeats 9
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 1.5


def _rule_file(folder: Path) -> Path:
    """A trained-rule JSON of the pool (two runs), as ``rulesearch discover`` writes it, for ``export``."""
    import numpy as np

    from rulesearch import pool
    from rulesearch.train import trained_rule_json

    runs = np.linspace(-1, 1, 2 * pool.n_terms).reshape(2, pool.n_terms)
    data = trained_rule_json(pool.with_values(runs.mean(0)), runs=runs, intervals=np.stack([runs[0], runs[1]], 1))
    path = folder / "rule.json"
    path.write_text(json.dumps(data))
    return path


def _seconds(cmd: list[str], repeats: int) -> float:
    """Median wall time of ``cmd`` over ``repeats`` fresh processes (after one unmeasured run)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    exe = shutil.which("rulesearch") or ""
    cli = [exe] if exe else [sys.executable, "-m", "rulesearch.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        rule = _rule_file(Path(tmp))
        rows = [
            ("python -c pass", [sys.executable, "-c", "pass"], False),
            ("python -c 'import sympy'", [sys.executable, "-c", "import sympy"], False),
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"], False),
            ("rulesearch --help", [*cli, "--help"], True),
            ("rulesearch terms", [*cli, "terms"], True),
            ("rulesearch terms --grammar default", [*cli, "terms", "--grammar", "default"], True),
            ("rulesearch export RULE", [*cli, "export", str(rule)], True),
        ]
        how = "the rulesearch script" if exe else "python -m rulesearch.cli"
        print(f"# bench_cli: wall time of each command in a fresh process, median of {args.repeats} after one "
              f"unmeasured run; {os.cpu_count()} CPUs; {how}")  # fmt: skip
        worst = 0.0
        for label, cmd, target in rows:
            s = _seconds(cmd, args.repeats)
            if target:
                worst = max(worst, s)
            print(f"{label:<38} {s:6.2f} s")
    print(f"# target (issue 21): every command < {TARGET_S} s: worst {worst:.2f} s "
          f"{'PASS' if worst < TARGET_S else 'FAIL'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
