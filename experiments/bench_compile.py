"""Benchmark the rule compiler against the naive broadcasting evaluator on the paper's network.

For the 10-term paper pool on the 784-170-130-100-70-47 network (5 weight layers) and episode batches B in
{1, 16}, one update call per layer is timed (median of ``--repeats`` calls after warm-up, compiled and naive
called round-robin so both see the same load of a shared machine; forward only, no autograd graph; the speedup
of the minima is printed too, as the least load-sensitive figure) and its peak temporary memory is measured,
for ``compile_rule(pool)`` and for :func:`rulesearch.reference.naive.naive_update`.
Targets (issue "Rule language and compiler"):

* speed: compiled >= 5x faster than naive at B = 16 (summed over the five layers);
* memory: compiled peak temporaries <= 2 * B * n_post * n_pre * itemsize in every layer.

Peak temporary memory is measured on CPU with ``torch.profiler.profile(profile_memory=True, record_shapes=True,
with_stack=True)`` and the profiler's memory timeline (``prof._memory_profile().timeline``): the running sum of
the sizes of tensors created minus those destroyed during the call, maximized over time. It counts every
allocation made by the call, the returned dW included (so 1.0x is the minimum for any update); the inputs exist
before the call and are not counted.

Usage::

    python experiments/bench_compile.py                 # float32, 2 threads
    python experiments/bench_compile.py --threads 1 --dtype float64 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.lang.pools import pool
from rulesearch.reference.naive import naive_update

SIZES = (784, 170, 130, 100, 70, 47)


def make_signals(B: int, n_pre: int, n_post: int, dtype, gen: torch.Generator) -> dict:
    """Random inputs for one layer: everything the pool needs, in the shapes of ``CompiledRule``."""
    return {
        "pre": torch.rand(B, n_pre, generator=gen, dtype=dtype),
        "post": torch.rand(B, n_post, generator=gen, dtype=dtype),
        "err": torch.randn(B, n_post, generator=gen, dtype=dtype) * 0.1,
        "pre_err": torch.randn(B, n_pre, generator=gen, dtype=dtype) * 0.1,
        "w": torch.randn(B, n_post, n_pre, generator=gen, dtype=dtype) / n_pre**0.5,
    }


def paired_times(fns, repeats: int, warmup: int = 2) -> list[tuple[float, float]]:
    """(median, min) wall time in seconds of each function, called round-robin so that all of them see the same
    load on a shared machine."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [(statistics.median(ts), min(ts)) for ts in times]


def peak_memory(fn) -> int | None:
    """Peak bytes allocated and alive during ``fn()`` (output included), from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action
    except ImportError:  # private API; report n/a rather than a wrong number
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    cur = peak = 0
    for _t, action, _key, size in p._memory_profile().timeline:
        if action == Action.CREATE:
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak


def _fmt_mem(m: int | None, unit: int) -> str:
    return "n/a" if m is None else f"{m / unit:.2f}x"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="episode batch sizes B")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(args.seed)
    update = compile_rule(pool)
    print(f"rule: {pool.name} ({pool.n_terms} terms), compile paths {sorted(update.paths)}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}; time per update call: "
        f"median of {args.repeats} round-robin calls ('(min)': speedup of the minima), forward, no autograd"
    )
    print("memory: peak bytes alive during one call (output included) from the torch.profiler memory timeline; "
          "'x' = multiples of one B*n_post*n_pre*itemsize array")  # fmt: skip
    ok = True
    for B in args.batches:
        theta = torch.randn(B, pool.n_terms, generator=gen, dtype=dtype) * 1e-2
        print(f"\nB = {B}")
        print(f"{'layer':>10} {'compiled ms':>12} {'naive ms':>10} {'speedup':>8} {'(min)':>7} {'comp mem':>9} "
              f"{'naive mem':>9} {'rel err':>8}  targets")  # fmt: skip
        tc_sum = tn_sum = tcm_sum = tnm_sum = 0.0
        for n_pre, n_post in zip(SIZES[:-1], SIZES[1:]):
            sig = make_signals(B, n_pre, n_post, dtype, gen)
            with torch.no_grad():
                a, b = update(sig, theta), naive_update(pool, sig, theta)
                err = float((a - b).abs().max() / b.abs().max())
                (tc, tc_min), (tn, tn_min) = paired_times(
                    [lambda: update(sig, theta), lambda: naive_update(pool, sig, theta)],  # noqa: B023
                    args.repeats,
                )
                mc = peak_memory(lambda: update(sig, theta))  # noqa: B023
                mn = peak_memory(lambda: naive_update(pool, sig, theta))  # noqa: B023
            tc_sum, tn_sum, tcm_sum, tnm_sum = tc_sum + tc, tn_sum + tn, tcm_sum + tc_min, tnm_sum + tn_min
            unit = B * n_post * n_pre * itemsize
            checks = []
            if mc is not None:
                mem_ok = mc <= 2 * unit
                ok &= mem_ok
                checks.append(f"mem<=2x {'PASS' if mem_ok else 'FAIL'}")
            print(f"{f'{n_pre}->{n_post}':>10} {tc * 1e3:12.3f} {tn * 1e3:10.3f} {tn / tc:7.1f}x "
                  f"{tn_min / tc_min:6.1f}x {_fmt_mem(mc, unit):>9} {_fmt_mem(mn, unit):>9} {err:8.1e}  "
                  f"{', '.join(checks)}")  # fmt: skip
        line = f"{'total':>10} {tc_sum * 1e3:12.3f} {tn_sum * 1e3:10.3f} {tn_sum / tc_sum:7.1f}x "
        line += f"{tnm_sum / tcm_sum:6.1f}x"
        if B == 16:
            speed_ok = tn_sum / tc_sum >= 5
            ok &= speed_ok
            line += f"{'':>28}  speedup>=5x (medians) {'PASS' if speed_ok else 'FAIL'}"
        print(line)
    print(f"\nall targets {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
