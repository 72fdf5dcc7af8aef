"""Meta-training throughput and memory: the seed code's naive loop vs the package's fast inner loop.

Paper configuration (784-170-130-100-70-47, M=5, K=50, Q=10: 250 online steps and 50 queries per episode,
feedback alignment), rules ``bio`` and the 10-term ``pool``. Every configuration runs in a fresh child process
(``subprocess``) and prints one line: meta-training episodes per second (online steps + query loss + meta-gradient),
memory per episode ((child peak RSS - baseline) / B, the peak reset after the warm-up; on CUDA also the torch
allocator peak), for

* ``naive``: :func:`rulesearch.reference.seed_loop.seed_meta_gradient` (one episode at a time),
* ``fast``: :func:`rulesearch.inner.run_episodes` + ``backward`` (batched, in place, hand-written adjoint; with
  ``--method native`` the C kernel),
* ``floor``: the online steps alone, in place, under ``torch.no_grad`` (the forward-only floor),

at B in {1, 8, 32}, with the fast/naive speed-up, fast/floor time ratio and fast/naive memory ratio. The fast/floor
ratio is from ``--repeats`` pairs of a fast and a floor run back to back in the fast child (the fastest of each: a
drifting machine speed and interference spikes cancel); the floor row's own timing is from its child. A last child
checks that fast and naive meta-gradients agree (relative error < 1e-4, float64). The last lines give a PASS/FAIL
verdict for each target of issue 6 (``TARGETS``). Memory needs Linux (``/proc/self/status``).

    python experiments/bench_meta.py                 # full run (tens of minutes on a busy 2-core machine)
    python experiments/bench_meta.py --quick         # 25 online steps, B in {1, 8}: a minute or two
    python experiments/bench_meta.py --device cuda   # GPU (torch allocator peak as memory)
    python experiments/bench_meta.py --paper-code PATH   # then the paper's own code beside rulesearch
                                                         # (experiments/bench_paper_code.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

TARGETS = {"speedup_bio_B32": 4.0, "floor_ratio": 3.0, "memory_ratio": 0.25, "rel_error": 1e-4}


# ---- child: one configuration --------------------------------------------------------------------------------


def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last :func:`_reset_peak_rss`) of this process, in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"/proc/self/status has no {field}; the memory figures need Linux.")


def _reset_peak_rss() -> None:
    """Reset the peak RSS to the current RSS (Linux), so allocations below an earlier peak count too."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _make_batch(cfg, torch, dtype, device, b, seed=0):
    """Synthetic images of the right shape (or EMNIST episodes with --data emnist)."""
    n_train, n_query = cfg["M"] * cfg["K"], cfg["M"] * cfg["Q"]
    if cfg["data"] == "emnist":
        from rulesearch.tasks.data import load_dataset
        from rulesearch.tasks.episodes import TaskSampler

        ds = load_dataset("emnist", path=cfg["emnist_path"], per_class=400)
        batch = TaskSampler(ds, M=cfg["M"], K=cfg["K"], Q=cfg["Q"]).sample(seed=seed, t=0, ks=range(b))
        return batch.to(device=device, dtype=dtype)
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    sizes = cfg["sizes"]
    return SimpleNamespace(
        x_train=torch.rand(b, n_train, sizes[0], generator=g, dtype=dtype).to(device),
        y_train=torch.randint(sizes[-1], (b, n_train), generator=g).to(device),
        x_query=torch.rand(b, n_query, sizes[0], generator=g, dtype=dtype).to(device),
        y_query=torch.randint(sizes[-1], (b, n_query), generator=g).to(device),
        seed=seed,
        t=0,
        ks=tuple(range(b)),
    )


def _theta(torch, rule, dtype, device, jitter=0.0):
    theta = torch.zeros(rule.n_params, dtype=dtype)
    theta[0] = 1e-3  # the paper's initialization
    if jitter:
        theta = theta + jitter * torch.randn(rule.n_params, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return theta.to(device)


def _child(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    from rulesearch.compile.compiler import compile_rule
    from rulesearch.inner import run_episodes
    from rulesearch.lang.pools import named_rule
    from rulesearch.networks.feedforward import Network
    from rulesearch.reference.seed_loop import seed_meta_gradient

    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    dtype = torch.float64 if cfg["impl"] == "check" else torch.float32
    net = Network(sizes=tuple(cfg["sizes"]), feedback="fa")
    rule = named_rule(cfg["rule"])
    upd = compile_rule(rule)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if cfg["impl"] == "check":  # fast vs naive meta-gradients, float64
        batch = _make_batch(cfg, torch, dtype, device, cfg["B"])
        theta = _theta(torch, rule, dtype, device, jitter=1e-4)
        ref = seed_meta_gradient(net, batch, rule, theta, seed=0, t=0, ks=range(cfg["B"]))
        leaf = theta.clone().requires_grad_(True)
        res = run_episodes(net, batch, upd, leaf, seed=0, t=0, ks=range(cfg["B"]), metrics=False,
                           method=cfg["method"])  # fmt: skip
        res.loss.mean().backward()
        err = float((leaf.grad - ref.grad).norm() / ref.grad.norm())
        return {"rel_error": err, "grad_naive": ref.grad.tolist(), "grad_fast": leaf.grad.tolist()}

    b = cfg["B"]
    batch = _make_batch(cfg, torch, dtype, device, b)
    theta = _theta(torch, rule, dtype, device)

    def run_fast(bt, grad=True):
        leaf = theta.clone().requires_grad_(grad)
        if grad:
            res = run_episodes(net, bt, upd, leaf, seed=0, metrics=False, checkpoint_every=cfg["checkpoint_every"],
                               method=cfg["method"])  # fmt: skip
            res.loss.mean().backward()
        else:
            with torch.no_grad():
                run_episodes(net, bt, upd, leaf, seed=0, metrics=False, method=cfg["method"])

    def run_naive(bt):
        seed_meta_gradient(net, bt, rule, theta, seed=0)

    # warm-up on a tiny batch (lazy initialization, first-call costs, the naive loop's cached symbolic term
    # matching), then the baseline
    from types import SimpleNamespace

    tiny = SimpleNamespace(**{k: getattr(batch, k)[:1, :3] for k in ("x_train", "y_train", "x_query", "y_query")})
    if cfg["impl"] == "naive":
        run_naive(tiny)
    else:
        run_fast(tiny, grad=cfg["impl"] == "fast")
    sync()
    _reset_peak_rss()
    base = _rss_mb("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device) / 2**20

    def timed(fn, *args, **kw):
        t0 = time.perf_counter()
        fn(*args, **kw)
        sync()
        return time.perf_counter() - t0

    run = run_naive if cfg["impl"] == "naive" else lambda bt: run_fast(bt, grad=cfg["impl"] == "fast")
    times = [timed(run, batch) for _ in range(cfg["repeats"])]
    seconds = statistics.median(times)
    out = {
        "eps_per_s": b / seconds,
        "seconds": seconds,
        "times": times,
        # the kernel syncs per-thread RSS counters lazily: VmHWM can read a few pages below VmRSS when nothing grew
        "mem_mb_per_episode": max(0.0, _rss_mb("VmHWM") - base) / b,
    }
    if cuda:
        out["cuda_mb_per_episode"] = (torch.cuda.max_memory_allocated(device) / 2**20 - base_cuda) / b
    if cfg["impl"] == "fast":  # fast/floor from runs interleaved in this process, the fastest of each
        pairs = [(timed(run_fast, batch), timed(run_fast, batch, grad=False)) for _ in range(cfg["repeats"])]
        out["floor_ratio"] = min(f for f, _ in pairs) / min(q for _, q in pairs)
        out["pairs"] = pairs
    return out


# ---- parent: run every configuration in its own process -------------------------------------------------------


@functools.cache
def _paper_code():
    """``experiments/bench_paper_code.py`` as a module (standard library imports only at its top)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_paper_code", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_paper_code.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spawn(cfg: dict, timeout: float) -> dict:
    return _paper_code().spawn_child(os.path.abspath(__file__), cfg, timeout)


def _mem(r: dict) -> float:
    """Memory per episode that the ratio uses: the torch allocator peak on CUDA, else RSS."""
    return r.get("cuda_mb_per_episode", r["mem_mb_per_episode"])


def _verdicts(table: dict, errors: dict) -> list[str]:
    """One PASS/FAIL line per target: ``table[(rule, B)][impl]`` holds the results, ``errors[rule]`` the check."""

    def ratios(num, den, value):  # per measured (rule, B)
        ok = [k for k, r in table.items() if "eps_per_s" in r.get(num, {}) and "eps_per_s" in r.get(den, {})]
        return {k: value(table[k][num], table[k][den]) for k in ok}

    def line(text, target, found, passed):
        verdict = ("PASS" if passed else "FAIL") if found else "n/a (not measured)"
        return f"# {text}: {found or '-'} (target {target}) {verdict}"

    speed = ratios("fast", "naive", lambda f, n: f["eps_per_s"] / n["eps_per_s"]).get(("bio", 32))
    floor = {k: r["fast"]["floor_ratio"] for k, r in table.items() if "floor_ratio" in r.get("fast", {})}
    memory = ratios("fast", "naive", lambda f, n: _mem(f) / _mem(n) if _mem(n) > 0 else float("inf"))
    out = [line("speed-up fast/naive, bio, B=32", ">= 4x, stretch 10x", speed and f"{speed:.1f}x",
                speed is not None and speed >= TARGETS["speedup_bio_B32"])]  # fmt: skip
    for text, target, values, limit, spec in (
        ("fast s/episode / floor s/episode, worst", "<= 3", floor, TARGETS["floor_ratio"], ".2f"),
        ("memory per episode fast/naive, worst", "<= 25%", memory, TARGETS["memory_ratio"], ".1%"),
        ("meta-gradient relative error fast vs naive (float64), worst", "< 1e-4", errors, None, ".2e"),
    ):
        if not values:
            out.append(line(text, target, None, False))
            continue
        where, worst = max(values.items(), key=lambda kv: kv[1])
        where = f"{where[0]} B={where[1]}" if isinstance(where, tuple) else where
        passed = worst < TARGETS["rel_error"] if limit is None else worst <= limit
        out.append(line(text, target, f"{worst:{spec}} ({where})", passed))
    return out


def run_paper_code(path: str, threads: int = 1) -> int:
    """The comparison with the paper's own code at ``path``: ``experiments/bench_paper_code.py`` (it says what to
    pass, and returns 0, when ``path`` is not a checkout of that repository)."""
    return _paper_code().main(["--paper-code", path, "--threads", str(threads)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="25 online steps (K=5), 5 queries, B in {1, 8}")
    p.add_argument("--rules", default="bio,pool")
    p.add_argument("--batches", default=None, help="comma-separated B values (default 1,8,32; quick: 1,8)")
    p.add_argument("--impls", default="naive,fast,floor")
    p.add_argument("--K", type=int, default=None, help="training samples per class (default 50; quick: 5)")
    p.add_argument("--Q", type=int, default=None, help="query samples per class (default 10; quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1: robust on a "
                   "shared machine; 2 uses both cores)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repeats of fast/floor (median s/episode), and "
        "interleaved fast + floor pairs for fast/floor (fastest of each); naive runs once",
    )
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--method", default="adjoint", choices=("adjoint", "native"),
                   help="the fast and floor runs' inner loop: the torch fast path (default; the committed table) or "
                   "the C kernel")  # fmt: skip
    p.add_argument("--check-B", type=int, default=2, help="episodes of the float64 agreement check")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--data", choices=("synthetic", "emnist"), default="synthetic")
    p.add_argument("--emnist-path", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                         "emnist_bymerge_test.npz"))  # fmt: skip
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--paper-code", default=None, metavar="PATH", help="afterwards, time the paper's own code "
                   "(a checkout at PATH) beside rulesearch: experiments/bench_paper_code.py")  # fmt: skip
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0

    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]
    K = args.K if args.K is not None else (5 if args.quick else 50)
    Q = args.Q if args.Q is not None else (1 if args.quick else 10)
    common = {
        "sizes": [784, 170, 130, 100, 70, 47], "M": 5, "K": K, "Q": Q, "threads": args.threads,
        "device": args.device, "checkpoint_every": args.checkpoint_every, "data": args.data, "method": args.method,
        "emnist_path": os.path.abspath(args.emnist_path),
    }  # fmt: skip
    impls = args.impls.split(",")
    print(f"# bench_meta: sizes 784-170-130-100-70-47, M=5 K={K} Q={Q} ({5 * K} online steps), fa, float32, "
          f"{args.data} data, device {args.device}, {args.threads} thread(s), "
          f"s/episode: median of {args.repeats}, fast/floor: fastest of {args.repeats} interleaved pairs")  # fmt: skip
    print(f"# {'rule':<5} {'impl':<6} {'B':>3} {'episodes/s':>11} {'s/episode':>10} {'RSS MB/ep':>10} "
          f"{'GPU MB/ep':>10} {'fast/naive':>10} {'fast/floor':>10} {'mem f/n':>8}")  # fmt: skip
    results, table, errors = [], {}, {}
    for rule in args.rules.split(","):
        for b in batches:
            row = table.setdefault((rule, b), {})
            for impl in ("naive", "fast", "floor"):
                if impl not in impls:
                    continue
                cfg = dict(common, rule=rule, impl=impl, B=b, repeats=1 if impl == "naive" else args.repeats)
                r = _spawn(cfg, args.timeout)
                row[impl] = r
                results.append({"rule": rule, "impl": impl, "B": b, **r})
                if "error" in r:
                    print(f"  {rule:<5} {impl:<6} {b:>3} ERROR {r['error']}", flush=True)
                    continue
                extra = ["-", "-", "-"]
                if impl == "fast" and "eps_per_s" in row.get("naive", {}):
                    extra[0] = f"{r['eps_per_s'] / row['naive']['eps_per_s']:.1f}x"
                    extra[2] = f"{_mem(r) / _mem(row['naive']):.1%}" if _mem(row["naive"]) > 0 else "-"
                if impl == "fast" and "floor_ratio" in r:
                    extra[1] = f"{r['floor_ratio']:.2f}"
                gpu = f"{r['cuda_mb_per_episode']:.1f}" if "cuda_mb_per_episode" in r else "-"
                print(f"  {rule:<5} {impl:<6} {b:>3} {r['eps_per_s']:>11.3f} {1 / r['eps_per_s']:>10.3f} "
                      f"{r['mem_mb_per_episode']:>10.1f} {gpu:>10} {extra[0]:>10} {extra[1]:>10} {extra[2]:>8}",
                      flush=True)  # fmt: skip
    if not args.no_check:
        for rule in args.rules.split(","):
            cfg = dict(common, rule=rule, impl="check", B=args.check_B, repeats=1)
            r = _spawn(cfg, args.timeout)
            results.append({"rule": rule, "impl": "check", "B": args.check_B, **r})
            if "error" in r:
                print(f"  {rule:<5} check  ERROR {r['error']}")
                continue
            errors[rule] = r["rel_error"]
            print(f"  {rule:<5} check  {args.check_B:>3} meta-gradient relative error fast vs naive (float64): "
                  f"{r['rel_error']:.2e}")  # fmt: skip
    print("# targets (issue 6); memory ratio: GPU allocator peak on CUDA, RSS otherwise")
    print("\n".join(_verdicts(table, errors)), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    if args.paper_code is not None:
        print(flush=True)
        return run_paper_code(args.paper_code, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
