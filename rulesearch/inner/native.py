r"""``method="native"``: the online steps of a feedforward :class:`~rulesearch.networks.Network` and their adjoint as
one C kernel (``kernel.c`` beside this module, built by :mod:`rulesearch.native`).

It runs the equations of the fast path (:mod:`.adjoint`) for rules whose every term is a sum of numbers times an
outer product of the vocabulary below, optionally times one global factor, or the weights themselves:

.. math::

    \Delta W_l = a_l W_l + \sum_{j,p,q} g_j C_{l,jpq}\, u_p v_q^\top, \qquad
    u \in (1,\ y_{l+1},\ e_{l+1}), \quad v \in (1,\ y_l,\ e_l,\ W_l^\top y_{l+1}),

with ``g`` = 1, the layer sums and means of ``post``, ``err``, ``pre``, ``pre_err``, and the bilinear forms
``post^T W pre``, ``err^T W pre``, ``post^T W pre_err`` (:data:`NATIVE_G`), and ``C`` and ``a`` linear in ``theta``
(:func:`term_tables`: ``C = theta T``, ``a = theta d``). The whole paper pool (F0-F9) fits, so F^bio does. The kernel
runs all steps of an episode, then the next episode (its weights stay in the cache), with no Python per step: the
forward pass, loss, errors (feedback alignment or backprop), ``W^T post`` and the global factors, the update in
place; divergence checks every ``check_every`` steps. With a gradient it keeps each step's vectors and a weight
snapshot every ``checkpoint_every`` steps, and the adjoint sweep (:class:`_NativeEpisodes`) reverses the weights step
by step (reset at the snapshots) while it carries ``G = dL/dW`` back: ``dL/dC`` and ``dL/da`` summed over the steps,
then autograd takes them to ``theta``. Per step and layer the adjoint makes one pass over ``W`` (its reversal, with
``<G, W_s>`` and ``W_s`` times the cotangent of ``W^T post``) and one over ``G`` (its update, with the factor
products ``G Vt`` and ``G^T u`` of the step before).

It rounds differently from the torch paths (sums in another order), so they agree to rounding: float64 to 1e-10
relative (``tests/test_inner_native.py``). Float32 and float64, CPU only.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import sympy as sp
import torch
from torch import Tensor

from .. import native
from ..errors import BackendUnavailableError, ConfigError
from .matrices import _first_order_only

__all__ = ["NATIVE_U", "NATIVE_V", "NATIVE_G", "NotNative", "term_tables", "native_reason", "native_ready",
           "run_native"]  # fmt: skip

NATIVE_U = ("1", "post", "err")
"""The post vectors of the kernel's outer products, in its order."""

NATIVE_V = ("1", "pre", "pre_err", "wT(post)")
"""The pre vectors of the kernel's outer products, in its order."""

NATIVE_G = ("1", "layer_sum(post)", "layer_sum(err)", "layer_sum(pre)", "layer_sum(pre_err)", "layer_mean(post)",
            "layer_mean(err)", "layer_mean(pre)", "layer_mean(pre_err)", "bilinear(post, pre)", "bilinear(err, pre)",
            "bilinear(post, pre_err)")  # fmt: skip
"""The global factors of the kernel's outer products, in its order (``bilinear(u, v)`` is ``u^T W v``)."""

_ACT = {"softplus": 0, "tanh": 1, "sigmoid": 2, "linear": 3}
_NEEDS = frozenset({"pre", "post", "err", "pre_err", "w"})
_MAX_LAYERS = 32  # MAXL in kernel.c


class NotNative(Exception):
    """A rule, network or option the kernel does not cover (the reason is the message)."""


def _global_index(f) -> int:
    """The kernel's index of a global factor (:data:`NATIVE_G`), or 0 if ``f`` is not one."""
    from ..lang.signals import Bilinear, LayerMean, LayerSum, err, post, pre, pre_err, w

    vec = {post: 0, err: 1, pre: 2, pre_err: 3}
    if isinstance(f, (LayerSum, LayerMean)) and f.args[0] in vec:
        return 1 + vec[f.args[0]] + (4 if isinstance(f, LayerMean) else 0)
    if isinstance(f, Bilinear) and f.args[1] == w:
        return {(post, pre): 9, (err, pre): 10, (post, pre_err): 11}.get((f.args[0], f.args[2]), 0)
    return 0


def _monomial(m) -> tuple[float, int, int, int]:
    """``(coefficient, j, p, q)`` of one monomial of a term: ``g_j u_p v_q^T`` (``p = q = -1``: the weights, a
    decay)."""
    from ..lang.signals import Contract, err, post, pre, pre_err, w

    u_of, v_of = {post: 1, err: 2}, {pre: 1, pre_err: 2}
    coef, factors = m.as_coeff_mul()
    j = p = q = 0
    decay = False
    for f in factors:
        base, ex = f.as_base_exp()
        if ex != 1:
            raise NotNative(f"the factor {f} (only first powers of signals)")
        if base in u_of and p == 0:
            p = u_of[base]
        elif base in v_of and q == 0:
            q = v_of[base]
        elif isinstance(base, Contract) and base.args == (w, post) and q == 0:
            q = 3
        elif base == w and not decay:
            decay = True
        elif j == 0 and _global_index(base):
            j = _global_index(base)
        else:
            raise NotNative(
                f"the factor {f} in {m} (products of one of {NATIVE_U}, one of {NATIVE_V} and one of {NATIVE_G}, or W)"
            )
    if not coef.is_Number:
        raise NotNative(f"the coefficient {coef} of {m}")
    if decay:
        if p or q or j:
            raise NotNative(f"{m}: the weights times other signals")
        return float(coef), 0, -1, -1
    return float(coef), j, p, q


def term_tables(rule) -> tuple[Tensor, Tensor]:
    """``(T, d)`` of a linear rule: ``T`` ``(R, 12, 3, 4)`` float64, the coefficient of ``g_j u_p v_q^T`` in each
    term (:data:`NATIVE_G`, :data:`NATIVE_U`, :data:`NATIVE_V`), and ``d`` ``(R,)``, the coefficient of ``W``;
    raises :class:`NotNative` for a rule outside the kernel's vocabulary."""
    from ..lang.signals import expand_derived

    if not rule.is_linear:
        raise NotNative(f"rule {rule.name!r} is not a weighted sum of terms")
    T = torch.zeros(rule.n_params, len(NATIVE_G), len(NATIVE_U), len(NATIVE_V), dtype=torch.float64)
    d = torch.zeros(rule.n_params, dtype=torch.float64)
    for r, term in enumerate(rule.terms):
        for m in sp.Add.make_args(sp.expand(expand_derived(term.expr))):
            if m == 0:
                continue
            c, j, p, q = _monomial(m)
            if p < 0:
                d[r] += c
            else:
                T[r, j, p, q] += c
    return T, d


def native_reason(net, plan, observe, modulator, fbs, x: Tensor) -> str:
    """Why the kernel cannot run this inner loop ('' if it can)."""
    from ..compile.compiler import CompiledRule
    from ..networks.feedforward import Network

    if type(net) is not Network:
        return f"{type(net).__name__} is not a feedforward Network"
    if net.activation not in _ACT or net.feedback not in ("fa", "bp") or net.loss not in ("ce", "mse"):
        return (f"activation {net.activation!r}, feedback {net.feedback!r}, loss {net.loss!r} (the kernel has "
                f"activations {sorted(_ACT)}, feedback 'fa' or 'bp', loss 'ce' or 'mse')")  # fmt: skip
    if net.n_layers > _MAX_LAYERS:
        return f"{net.n_layers} layers (at most {_MAX_LAYERS})"
    if observe is not None or modulator is not None or plan.fb_updates is not None:
        return "an observer, a modulator or plastic feedback"
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return f"tensors on {x.device} of dtype {x.dtype} (CPU, float32 or float64)"
    if any(f.requires_grad for f in fbs):
        return "the feedback matrices require grad"
    for i, u in enumerate(plan.updates):
        if not isinstance(u, CompiledRule) or u.states:
            return f"layer {i}: not a compiled rule without states"
        if not u.needs <= _NEEDS:
            return f"layer {i} reads {sorted(u.needs - _NEEDS)}"
        try:
            _tables(u.rule)
        except NotNative as e:
            return f"layer {i}: {e}"
    return ""


@functools.lru_cache(maxsize=64)
def _tables(rule):
    return term_tables(rule)


# ---- the kernel ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _kernel(real: str):
    """The kernel for ``real`` (``"float"`` or ``"double"``): one build per dtype; the network's activation, loss,
    feedback and softplus sharpness come with each call."""
    return build_kernel((Path(__file__).with_name("kernel.c")).read_text(), real)


def build_kernel(src: str, real: str, name: str = "inner"):
    """The library of a kernel source (``kernel.c``'s text, e.g. of another commit for a benchmark) for ``real``,
    with its entry points' argument types."""
    lib = native.load(f"typedef {real} real;\n" + src, name, simd=True)
    ptr, num = ctypes.c_void_p, ctypes.c_double if real == "double" else ctypes.c_float
    lib.rs_forward.argtypes = [ptr, num, num] + [ptr] * 13
    lib.rs_adjoint.argtypes = [ptr, num] + [ptr] * 11
    lib.rs_sizes.argtypes = [ptr, ptr]
    return lib


def _real(dtype) -> str:
    """The C type of ``dtype``."""
    return "double" if dtype == torch.float64 else "float"


@functools.lru_cache(maxsize=2)
def _builds(real: str) -> bool:
    try:
        _kernel(real)
    except BackendUnavailableError:
        return False
    return True


def native_ready(dtype) -> bool:
    """Whether the kernel for ``dtype`` is built or can be (a C compiler is there and the build succeeds;
    tried once per process and dtype): what ``method="auto"`` asks before it takes the kernel."""
    return native.available() and _builds(_real(dtype))


def _p(t: Tensor | None):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _ptrs(ts) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[0 if t is None else t.data_ptr() for t in ts])


class _Kernel:
    """One inner loop's configuration, its kernel and its buffers."""

    def __init__(self, net, plan, x, target, labels, fbs, tracker, snap_every):
        self.x, self.tracker = x.contiguous(), tracker
        self.b, self.n_steps, sizes = int(x.shape[0]), int(x.shape[1]), list(net.sizes)
        self.L, self.dtype = net.n_layers, x.dtype
        self.lib = _kernel(_real(x.dtype))
        self.tables = [_tables(u.rule) for u in plan.updates]
        self.fbs = [f.contiguous() for f in fbs] if net.feedback == "fa" else [None] * self.L
        need_err = bool(plan.any_err)
        err_lo = min(plan.err_layers, default=self.L) if need_err else self.L
        layer_cfg = []
        for T, d in self.tables:
            use = (T != 0).any(0)  # (12, 3, 4)
            wtp = bool(use[:, :, 3].any() or use[11].any())  # the rule reads W^T post
            layer_cfg += [int(v) for v in use.flatten()] + [int(bool((d != 0).any())), int(wtp)]
        self.head = [self.L, self.n_steps, self.b, int(need_err), err_lo, snap_every, tracker.check_every]
        self.net_ints = [_ACT[net.activation], int(net.loss == "ce"), int(net.feedback == "bp")]
        self.beta = float(net.beta)
        self.tail = sizes + layer_cfg
        cfg, out = self.cfg(False), (ctypes.c_long * 2)()  # cfg held: the kernel reads it
        _check_rc(self.lib.rs_sizes(_p(cfg), out))
        self.S, self.wtot = out  # the numbers in one step's record and in one weight snapshot
        self.n_snap = -(-self.n_steps // snap_every)
        self.checks = [s for s in range(self.n_steps) if tracker.is_check(s)]
        # sigma'(x) of the input where e_0 is needed (the kernel reads it), by the network's own map, as the torch paths
        self.dx = net.input_derivative(self.x).contiguous() if need_err and err_lo == 0 else None
        t = target.contiguous()
        self.tgt = t if t.dtype == x.dtype else t.to(x.dtype)
        self.lab = None if labels is None else labels.to(torch.int64).contiguous()

    def cfg(self, record: bool) -> Tensor:
        return torch.tensor(self.head + [int(record)] + self.net_ints + self.tail, dtype=torch.int32)

    def coefficients(self, params) -> tuple[Tensor, Tensor]:
        """``C`` ``(B, L, 12 * 12)`` (per global factor, the 3 x 4 coefficients) and ``a`` ``(B, L)`` from the
        layers' ``theta`` (differentiable)."""
        Cs, As = [], []
        for (T, d), theta in zip(self.tables, params):
            T, d = T.to(theta.dtype).flatten(1), d.to(theta.dtype)
            Cs.append((theta @ T).expand(self.b, -1))
            As.append((theta @ d).expand(self.b))
        return torch.stack(Cs, 1), torch.stack(As, 1)

    def forward(self, ws: list[Tensor], C: Tensor, A: Tensor, record: bool):
        """Run the steps in place on ``ws``; returns ``(tape, snaps)`` (None without ``record``)."""
        b, N, f = self.b, self.n_steps, {"dtype": self.dtype}
        tape = torch.empty(b, N, self.S, **f) if record else None
        snaps = torch.empty(b, self.n_snap, self.wtot, **f) if record else None
        loss = torch.empty(b, N, **f)
        correct = torch.empty(b, N, **f)
        bad = torch.zeros(b, len(self.checks), self.L, dtype=torch.uint8)
        cfg = self.cfg(record)
        rc = self.lib.rs_forward(
            _p(cfg), self.beta, float(self.tracker.bound), _ptrs(ws), _ptrs(self.fbs), _p(self.x), _p(self.dx),
            _p(self.tgt), _p(self.lab), _p(C), _p(A), _p(tape), _p(snaps), _p(loss), _p(correct), _p(bad),
        )  # fmt: skip
        _check_rc(rc)
        tr = self.tracker
        if tr.curves:
            tr.train_loss.extend(loss.unbind(1))
            tr.train_acc.extend(correct.unbind(1))
        for j, s in enumerate(self.checks):
            tr.record_bad(s, bad[:, j].bool())
        return tape, snaps

    def adjoint(self, ws: list[Tensor], G: list[Tensor], C: Tensor, A: Tensor, tape: Tensor, snaps: Tensor):
        """``(dL/dC, dL/da)``; ``ws`` (final weights) are reversed to the initial ones and ``G`` (``dL/dW_N``) is
        carried back to ``dL/dW_0``, in place."""
        dC, dA = torch.zeros_like(C), torch.zeros_like(A)
        cfg = self.cfg(True)  # held: the kernel reads it
        rc = self.lib.rs_adjoint(
            _p(cfg), self.beta, _ptrs(ws), _ptrs(self.fbs), _ptrs(G), _p(self.x), _p(self.dx), _p(C), _p(A),
            _p(tape), _p(snaps), _p(dC), _p(dA),
        )  # fmt: skip
        _check_rc(rc)
        return dC, dA


def _check_rc(rc: int) -> None:
    if rc == 1:
        raise ConfigError(f"The native inner-loop kernel refused its configuration (1 to {_MAX_LAYERS} layers and one "
                          f"of the activations {sorted(_ACT)}).")  # fmt: skip
    if rc == 2:
        raise MemoryError("The native inner-loop kernel could not allocate its work space.")


class _NativeEpisodes(torch.autograd.Function):
    """``(C, a, W_0...) -> W_N`` by the kernel's forward, with its adjoint as backward."""

    @staticmethod
    def forward(ctx, k, C, A, *ws):
        C, A = C.detach().contiguous(), A.detach().contiguous()
        out = [w.detach().clone(memory_format=torch.contiguous_format) for w in ws]
        tape, snaps = k.forward(out, C, A, record=True)
        ctx.k, ctx.tape, ctx.snaps = k, tape, snaps
        ctx.save_for_backward(C, A, *out)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        _first_order_only("native adjoint")
        if ctx.tape is None:
            raise RuntimeError("run_episodes' native adjoint was already used; backward through it only once.")
        C, A, *out = ctx.saved_tensors
        ws = [w.clone() for w in out]
        G = [torch.zeros_like(w) if g is None else g.detach().clone(memory_format=torch.contiguous_format)
             for w, g in zip(ws, grads)]  # fmt: skip
        dC, dA = ctx.k.adjoint(ws, G, C, A, ctx.tape, ctx.snaps)
        ctx.tape = ctx.snaps = None
        return (None, dC, dA, *G)


def run_native(net, plan, ws, x, target, labels, fbs, tracker, snap_every) -> list[Tensor]:
    """The final weights of the inner loop run by the kernel (differentiable w.r.t. the rule's ``theta`` and the
    initial weights when grad is enabled)."""
    k = _Kernel(net, plan, x, target, labels, fbs, tracker, snap_every)
    params = [u._params(p, k.b, x) for u, p in zip(plan.updates, plan.params)]  # validated once per run
    C, A = k.coefficients(params)
    needs_grad = torch.is_grad_enabled() and (C.requires_grad or A.requires_grad or any(w.requires_grad for w in ws))
    if needs_grad:
        return list(_NativeEpisodes.apply(k, C, A, *ws))
    with torch.no_grad():
        out = [w.detach().clone(memory_format=torch.contiguous_format) for w in ws]
        k.forward(out, C.contiguous(), A.contiguous(), record=False)
    return out
