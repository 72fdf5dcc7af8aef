"""Time `rulesearch distill` on the quick-start run: `rulesearch discover` with its defaults (the paper's pool on
digits, 64-170-130-100-70-10, 5-way 50-shot) for a few meta-steps, then `rulesearch distill` with its defaults.

    python experiments/distill_quickstart.py                 # 10 meta-steps (the distill does not depend on them)
    python experiments/distill_quickstart.py --episodes 100  # the full quick-start run

Both commands run as subprocesses, as a user types them; the wall time and the CPU time (user + system of the
child) of each are measured. Writes results/distill_quickstart.md (times, stage times, formula size, held-out error,
closed-loop check); the run directory goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str]) -> tuple[float, float, str]:
    """Run ``python -m rulesearch.cli ARGS``; wall seconds, CPU seconds of the child, its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rulesearch.cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"rulesearch {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=10, help="meta-steps of the discover run (default 10)")
    p.add_argument("--out", default="results", help="folder of distill_quickstart.md")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "quickstart"
        d_wall, d_cpu, _ = timed(["discover", "--episodes", str(a.episodes), "--out", str(run), "--no-progress"])
        wall, cpu, _ = timed(["distill", str(run), "--quiet"])
        summary = json.loads((run / "distill" / "summary.json").read_text())
        rule = json.loads((run / "distill" / "rule.json").read_text())
    n_terms = len(rule["terms"]) if rule["kind"] == "linear" else None
    cl = summary["closed_loop"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items())
    lines = [
        "# `rulesearch distill` on the quick-start run",
        "",
        f"`rulesearch discover --episodes {a.episodes}` (the quick-start defaults otherwise: the paper's pool on "
        f"digits) took {d_wall:.0f} s wall ({d_cpu:.0f} s CPU); then `rulesearch distill RUN` with its defaults "
        f"(sparse backend, the classic grammar fitted to the rule, 8 + 16 fresh episodes, 1 torch thread):",
        "",
        "| | value |",
        "|---|---|",
        f"| wall time | {wall:.0f} s |",
        f"| CPU time (user + system) | {cpu:.0f} s |",
        f"| stages (wall) | {stages} |",
        f"| library | {summary['n_features']} atom columns, {summary['n_samples']} rows |",
        f"| formula | {n_terms} terms, complexity {summary['complexity']} |",
        f"| held-out relative error | {summary['heldout_relative_error']:.1e} |",
        f"| closed loop | accuracy {cl['accuracy_original']:.4f} (original) vs {cl['accuracy_distilled']:.4f} "
        f"(distilled), update cosine {cl['cosine']:.6f} |",
        f"| identities on the data | {len(summary['identities'])} |",
        "",
        f"Machine: {os.cpu_count()} CPU cores, shared (load average {os.getloadavg()[0]:.1f} at the end); wall "
        "times vary with the load, CPU times less.",
        "",
        f"Formula: `{summary['formula']}`",
        "",
        "Regenerate: `python experiments/distill_quickstart.py`.",
        "",
    ]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "distill_quickstart.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
