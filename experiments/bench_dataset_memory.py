"""Peak memory of a process that loads EMNIST and draws episodes: the images kept compact (the file's uint8 and a
scale, divided per episode in ``TaskSampler.sample``) against the whole array converted to float32 at load time (the
layout before datasets were kept compact). Each layout runs in a fresh process; prints the resident memory after the
imports, after loading and the process peak (``ru_maxrss``). A figure to read, not a timed or memory test.

    python experiments/bench_dataset_memory.py --data ../shared/data/emnist_bymerge_test.npz --episodes 20 --batch 8
    python experiments/bench_dataset_memory.py --per-class 400   # the paper's 47 x 400 subset (streamed from the npz)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(layout: str, data: str, episodes: int, batch: int, per_class: int | None) -> dict:
    import resource

    import torch

    from rulesearch.tasks.data import Dataset, load_dataset
    from rulesearch.tasks.episodes import TaskSampler

    torch.set_num_threads(1)
    imported = _rss_mib()
    ds = load_dataset("emnist", data, per_class=per_class)
    if layout == "float":
        ds = Dataset(ds.name, ds.inputs(), ds.labels, ds.n_classes, ds.image_shape, class_names=ds.class_names)
    loaded = _rss_mib()
    sampler = TaskSampler(ds, M=5, K=50, Q=10)
    total = 0.0
    for t in range(episodes):
        b = sampler.sample(0, t, batch)
        total += float(b.x_train.sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stored = ds.images.element_size() * ds.images.nelement() / 2**20
    return {"layout": layout, "dtype": str(ds.images.dtype), "images_mib": stored, "after_imports_mib": imported,
            "after_load_mib": loaded, "peak_mib": peak, "checksum": total}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/emnist_bymerge_test.npz", help="EMNIST npz or folder")
    parser.add_argument("--episodes", type=int, default=20, help="meta-steps drawn")
    parser.add_argument("--batch", type=int, default=8, help="episodes per meta-step (5-way, K=50, Q=10)")
    parser.add_argument("--per-class", type=int, default=None, help="keep the first N images per class (paper: 400)")
    parser.add_argument("--child", choices=["compact", "float"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.episodes, args.batch, args.per_class)))
        return
    rows = []
    for layout in ("float", "compact"):
        cmd = [sys.executable, __file__, "--child", layout, "--data", args.data, "--episodes", str(args.episodes),
               "--batch", str(args.batch)]  # fmt: skip
        cmd += ["--per-class", str(args.per_class)] if args.per_class else []
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    subset = f", the first {args.per_class} images per class" if args.per_class else ""
    print(f"EMNIST {args.data}{subset}: {args.episodes} meta-steps of {args.batch} episodes (5-way, K=50, Q=10)")
    print(f"{'layout':<9} {'images':>16} {'after imports':>14} {'after load':>11} {'peak':>9}")
    for r in rows:
        print(f"{r['layout']:<9} {r['dtype'][6:]:>7} {r['images_mib']:>5.0f} MiB {r['after_imports_mib']:>10.0f} MiB "
              f"{r['after_load_mib']:>7.0f} MiB {r['peak_mib']:>5.0f} MiB")  # fmt: skip
    same = rows[0]["checksum"] == rows[1]["checksum"]
    print(f"episodes identical in both layouts (sum of x_train): {same}")


if __name__ == "__main__":
    main()
