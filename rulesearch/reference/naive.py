r"""The naive broadcasting evaluator: the test oracle of :mod:`rulesearch.compile.compiler`.

Every subexpression is materialized as a full ``(B, n_post, n_pre)`` tensor; contractions are
broadcast-multiply-sum over that tensor. Nothing is factored, fused or shared. Slow by design.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp
import torch

from ..compile.compiler import _RELATIONS, TORCH_FUNCTIONS
from ..errors import UnsupportedNodeError
from ..lang.rule import Rule
from ..lang.signals import (
    BUILTIN_SIGNALS,
    Bilinear,
    Constant,
    Contract,
    LayerMean,
    LayerSum,
    OrderedContract,
    Reindex,
    Signal,
    expand_derived,
    role_of,
    signals_in,
)

__all__ = ["naive_update", "naive_eval"]


def _full(t: torch.Tensor, role: str, shape) -> torch.Tensor:
    B, n_post, n_pre = shape
    if role == "global":
        t = t.reshape(-1, 1, 1)
    elif role == "post":
        t = t.reshape(B, n_post, 1)
    elif role == "pre":
        t = t.reshape(B, 1, n_pre)
    return t.expand(B, n_post, n_pre)


def naive_eval(expr, signals: Mapping, params: Mapping, shape) -> torch.Tensor:
    """Evaluate ``expr`` as a full ``(B, n_post, n_pre)`` tensor."""
    ref = next(v for v in signals.values() if isinstance(v, torch.Tensor))

    def ev(e):
        if isinstance(e, Constant):
            return _full(torch.as_tensor(params[e.name]).to(ref), "global", shape)
        if isinstance(e, Signal):
            return _full(signals[e.name], e.role, shape)
        if not e.free_symbols:
            return torch.full(shape, float(e.evalf()), dtype=ref.dtype, device=ref.device)
        if isinstance(e, sp.Add):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out + ev(a)
            return out
        if isinstance(e, sp.Mul):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out * ev(a)
            return out
        if isinstance(e, sp.Pow):
            return torch.pow(ev(e.args[0]), ev(e.args[1]))
        if isinstance(e, Contract):  # role of u decides the contracted index
            M, u = ev(e.args[0]), ev(e.args[1])
            if role_of(e.args[1]) == "post":
                return (M * u).sum(dim=1, keepdim=True).expand(shape)
            return (M * u).sum(dim=2, keepdim=True).expand(shape)
        if isinstance(e, LayerSum):
            u = ev(e.args[0])
            dim = 1 if role_of(e.args[0]) == "post" else 2
            return u.sum(dim=dim, keepdim=True).sum(dim=3 - dim, keepdim=True).expand(shape) / shape[3 - dim]
        if isinstance(e, LayerMean):
            return ev(LayerSum(e.args[0])) / shape[1 if role_of(e.args[0]) == "post" else 2]
        if isinstance(e, Bilinear):
            u, M, v = (ev(a) for a in e.args)
            return (u * M * v).sum(dim=(1, 2), keepdim=True).expand(shape)
        if isinstance(e, Reindex):  # u_i -> u_j (n_post == n_pre): the full tensor transposed
            return ev(e.args[0]).transpose(1, 2)
        if isinstance(e, OrderedContract):
            u, M = ev(e.args[0]), ev(e.args[1])
            return torch.cumsum(u * M, dim=1)
        if isinstance(e, sp.Piecewise):
            out = torch.full(shape, float("nan"), dtype=ref.dtype, device=ref.device)
            for val, cond in reversed(e.args):
                if cond is sp.true:
                    out = ev(val)
                else:
                    op = _RELATIONS[type(cond).__name__]
                    out = torch.where(op(ev(cond.lhs), ev(cond.rhs)), ev(val), out)
            return out
        name = type(e).__name__
        if name in TORCH_FUNCTIONS:
            return TORCH_FUNCTIONS[name](*(ev(a) for a in e.args))
        raise UnsupportedNodeError(f"naive evaluator: unsupported node {name}")

    return ev(expand_derived(expr))


def naive_update(rule: Rule, signals: Mapping, params) -> torch.Tensor:
    r""":math:`\Delta W = \sum_r \theta_r T^r` term by term, each a full tensor (theta ``(R,)`` or ``(B, R)``)."""
    exprs = [t.expr for t in rule.terms] if rule.is_linear else [rule.expr]
    roles = {n: s.role for n, s in BUILTIN_SIGNALS.items()}
    roles.update({s.name: s.role for e in exprs for s in signals_in(expand_derived(e))})
    dims = {}
    for name, t in signals.items():  # (B, n_post, n_pre) from whichever signals carry them
        role = roles.get(name)
        if role is None or not isinstance(t, torch.Tensor):
            continue
        dims["B"] = t.shape[0]
        if role in ("post", "synapse"):
            dims["n_post"] = t.shape[1]
        if role in ("pre", "synapse"):
            dims["n_pre"] = t.shape[-1]
    shape = (dims["B"], dims["n_post"], dims["n_pre"])
    if not rule.is_linear:
        return naive_eval(rule.expr, signals, params, shape).clone()
    out = 0
    for r, t in enumerate(rule.terms):
        th = params[..., r]
        th = th.reshape(-1, 1, 1) if th.dim() else th
        out = out + th * naive_eval(t.expr, signals, {}, shape)
    return out * torch.ones(shape, dtype=params.dtype, device=params.device)
