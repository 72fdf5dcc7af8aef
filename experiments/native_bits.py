"""Whether two versions of the native inner-loop kernel give the same bits: run a fixed set of configurations through
``run_episodes(method="native")`` and save, or compare against a saved file, the divergence flags, query losses,
final weights and gradients (theta and the initial weights), bit for bit.

Configurations: F^bio, the 10-term pool and a rule with a decay, W^T post and a global factor; fa and bp;
softplus, tanh, sigmoid; CE and MSE; float32 and float64; a 784-170-130-47 network, 2 episodes of 60 steps,
snapshots every 7 steps. A kernel change meant to keep the results (a fused loop, other vector flags) is checked
by saving at the commit before and comparing at the commit after:

    python experiments/native_bits.py --save /tmp/before.pt     # at the old commit
    python experiments/native_bits.py --compare /tmp/before.pt  # at the new one: one line per configuration
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.inner import run_episodes
from rulesearch.lang.pools import named_rule
from rulesearch.lang.rule import Rule, Term
from rulesearch.lang.signals import err, layer_sum, post, pre, pre_err, w, wT
from rulesearch.networks import Network

SIZES = (784, 170, 130, 47)
CASES = (  # rule, activation, feedback, loss
    ("bio", "softplus", "fa", "ce"),
    ("pool", "tanh", "bp", "mse"),
    ("pool", "sigmoid", "fa", "ce"),
    ("decay", "softplus", "bp", "ce"),
)


def _rule(name: str) -> Rule:
    if name != "decay":
        return named_rule(name)
    terms = [
        Term("F0", -err * pre),
        Term("D", w),
        Term("O", post * wT(post)),
        Term("G", layer_sum(err) * post * pre_err),
    ]
    return Rule(terms, "decay")


def outputs() -> dict[str, list[torch.Tensor]]:
    """Per configuration: diverged flags, query losses, final weights, then the gradients."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        for name, act, fb, loss in CASES:
            net = Network(sizes=SIZES, feedback=fb, activation=act, loss=loss)
            rule = _rule(name)
            g = torch.Generator().manual_seed(0)
            b, n, nq = 2, 60, 20
            batch = SimpleNamespace(
                x_train=torch.rand(b, n, SIZES[0], generator=g, dtype=dtype),
                y_train=torch.randint(SIZES[-1], (b, n), generator=g),
                x_query=torch.rand(b, nq, SIZES[0], generator=g, dtype=dtype),
                y_query=torch.randint(SIZES[-1], (b, nq), generator=g),
            )
            theta = (1e-4 * torch.randn(rule.n_params, generator=g, dtype=dtype)).requires_grad_(True)
            ws, fbs = net.init_episodes(0, 0, range(b), dtype=dtype)
            ws = [x.requires_grad_(True) for x in ws]
            res = run_episodes(net, batch, compile_rule(rule), theta, ws, fbs, method="native", checkpoint_every=7,
                               raise_on_divergence=False)  # fmt: skip
            grads = torch.autograd.grad(res.loss[~res.diverged].sum(), [theta, *ws])
            key = f"{name} {act} {fb} {loss} {str(dtype).removeprefix('torch.')}"
            out[key] = [res.diverged, res.loss.detach(), *(x.detach() for x in res.weights), *grads]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", metavar="FILE", help="write this version's outputs to FILE")
    g.add_argument("--compare", metavar="FILE", help="compare this version's outputs with FILE, bit for bit")
    args = p.parse_args()
    out = outputs()
    if args.save:
        torch.save(out, args.save)
        print(f"saved {len(out)} configurations to {args.save}")
        return
    ref = torch.load(args.compare)
    same = True
    for key, got in out.items():
        want = ref.get(key)
        equal = want is not None and len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(got, want))
        worst = max((float((a.double() - b.double()).abs().max()) for a, b in zip(got[1:], want[1:])), default=0.0) \
            if want is not None else float("nan")  # fmt: skip
        print(f"{'same bits' if equal else 'DIFFERENT'}  {key}  (largest difference {worst:.3g})")
        same &= equal
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
