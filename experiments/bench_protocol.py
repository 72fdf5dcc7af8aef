"""Wall time of the paper's full protocol (600 meta-steps x 20 runs, one episode per run and meta-step, EMNIST 47
classes x 400 images, 784-170-130-100-70-47, 5-way K=50 Q=10, feedback alignment) on this machine, for the rules
``bio`` and ``pool``, from a shorter run of the same configuration.

Each setting runs ``rulesearch discover`` in a fresh process (or ``torchrun`` processes) for ``--steps`` meta-steps
and reads the per-step wall times from its ``metrics.csv``; the protocol's time is the whole timed run (start-up,
then the ``--steps`` steps with their one-time costs: a kernel's build, ``meta.term_scale``'s probe episode) + the
600 - ``--steps`` steps left at the median step time after ``--warmup`` steps ('start-up' printed is process start to
the first step); the peak RSS is the largest process's. Settings:
one process with one thread ('1 thread'; the 20 episodes of a meta-step in inner loops of at most 8, ``meta.chunk``'s
default on a CPU), the same with all 20 in one inner loop ('one group'), one process with all cores as threads, and
data parallelism with ``torchrun`` (one process per core, one thread each; each process runs its block of the 20
episodes). A figure to read, not a timed test.

    python experiments/bench_protocol.py                       # bio and pool, every setting, 20 steps each
    python experiments/bench_protocol.py --rules bio --steps 10 --settings torchrun
    python experiments/bench_protocol.py --rules bio --settings torchrun --methods auto,native   # the C kernel too
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_STEPS, RUNS = 600, 20


def _config(data_dir: str, rule: str) -> dict:
    """The paper's protocol as a discover config: reproduce_paper.py's EMNIST task; bio as in its 'rules' item
    (lambda 0), the pool as in its 20-run Fig. 4 item (proximal L1 3, capped term steps, clip 10)."""
    meta = {"runs": RUNS, "l1": 0.0, "compare": False}
    if rule != "bio":
        meta.update(l1=3.0, l1_mode="proximal", term_scale="capped", clip=10.0)
    return {
        "rule": rule,
        "task": {"dataset": "emnist", "data_dir": data_dir, "options": {"per_class": 400}},
        "network": {"feedback": "fa"},
        "meta": meta,
    }


def _command(setting: str, cores: int, cfg: Path, out: Path, steps: int, chunk: int | None, method: str) -> list[str]:
    args = ["-m", "rulesearch.cli", "discover", "-c", str(cfg), "--episodes", str(steps), "--out", str(out),
            "--no-progress", "--set", f"meta.method={method}"]  # fmt: skip
    if chunk is not None and setting != "one group":
        args += ["--set", f"meta.chunk={chunk}"]
    if setting == "torchrun":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cores}"]
        return [*torchrun, *args, "--threads", "1"]
    if setting == "one group":
        return [sys.executable, *args, "--threads", "1", "--set", f"meta.chunk={RUNS}"]
    return [sys.executable, *args, "--threads", "1" if setting in ("1 thread", "one group") else str(cores)]


_PEAK = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)
"""A wrapper process around a setting's command: its children's largest peak RSS (the discover process, or the
largest of the torchrun processes), in KiB, as the last line of stderr."""


def _read_metrics(out: Path) -> tuple[list[float], int]:
    """Per meta-step wall time from metrics.csv (one row per run and step) and the episodes skipped (diverged)."""
    seconds: dict[int, float] = {}
    skipped = 0
    with open(out / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            seconds[int(row["step"])] = float(row["seconds"])
            skipped += int(row["skipped"])
    return [seconds[k] for k in sorted(seconds)], skipped


def measure(
    setting: str, rule: str, cores: int, steps: int, warmup: int, data_dir: str, chunk=None, method: str = "auto"
) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_protocol_"))
    try:
        cfg = work / "config.json"
        cfg.write_text(json.dumps(_config(data_dir, rule)))
        out = work / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1" if setting != f"{cores} threads" else str(cores)}
        t0 = time.perf_counter()
        cmd = [sys.executable, "-c", _PEAK, *_command(setting, cores, cfg, out, steps, chunk, method)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                              text=True)  # fmt: skip
        total = time.perf_counter() - t0
        # exit 3 (torchrun: 1) is a finished fit in which some runs stopped on divergence: timed all the same
        secs, skipped = _read_metrics(out) if (out / "metrics.csv").exists() else ([], 0)
        if proc.returncode not in (0, 3) and len(secs) != steps:
            raise RuntimeError(f"{setting} {rule} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        peak = int(proc.stderr.strip().splitlines()[-1].split()[-1]) / 1024
    finally:
        shutil.rmtree(work, ignore_errors=True)
    step = statistics.median(secs[warmup:])
    startup = total - sum(secs)
    protocol = total + (PROTOCOL_STEPS - len(secs)) * step  # all that was timed, then the steps left at the median
    core_s = step * (1 if setting in ("1 thread", "one group") else cores) / RUNS
    return {"setting": setting, "rule": rule, "method": method, "steps": len(secs), "s_per_step": step,
            "startup_s": startup, "protocol_min": protocol / 60, "core_s_per_episode": core_s,
            "skipped": skipped, "peak_mib": peak}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", default="bio,pool")
    p.add_argument("--settings", default="1 thread,threads,torchrun",
                   help="comma-separated: '1 thread', 'one group' (1 thread, all 20 episodes in one inner loop), "
                        "'threads' (all cores in one process), 'torchrun'")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="meta-steps timed per setting (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk", type=int, default=None, help="meta.chunk for every setting but 'one group' (default: 8)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--methods", default="auto",
                   help="comma-separated meta.method values, a row per rule, setting and method: 'auto' (the torch "
                        "fast path), 'native' (the C kernel; rules of its vocabulary only, such as bio)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args()
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    settings = [f"{a.cores} threads" if s == "threads" else s for s in a.settings.split(",")]
    print(f"# the paper's protocol ({PROTOCOL_STEPS} meta-steps x {RUNS} runs, EMNIST 47 x 400, F^bio / F^pool under "
          f"FA) on {a.cores} cores, load average {os.getloadavg()[0]:.2f}; each setting timed for {a.steps} "
          f"meta-steps (median after {a.warmup}), extrapolated; meta.chunk {a.chunk or 'default (8)'}",
          flush=True)  # fmt: skip
    rows = []
    for rule in a.rules.split(","):
        for setting, method in [(s, m) for m in a.methods.split(",") for s in settings]:
            r = measure(setting, rule, a.cores, a.steps, a.warmup, a.data_dir, a.chunk, method)
            rows.append(r)
            print(f"{rule:<5} {setting:<10} {method:<6} {r['s_per_step']:.2f} s per meta-step ({RUNS} episodes; "
                  f"{r['core_s_per_episode']:.3f} core-s per episode), start-up {r['startup_s']:.1f} s -> "
                  f"protocol {r['protocol_min']:.1f} min ({r['skipped']} of {RUNS * r['steps']} episodes skipped); "
                  f"peak RSS {r['peak_mib']:.0f} MiB per process",
                  flush=True)  # fmt: skip
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
