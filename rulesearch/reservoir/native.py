r"""The training steps of :func:`~rulesearch.reservoir.loop.run_reservoir` as one C kernel (``backend="native"``).

The same equations as the torch loop (:mod:`.loop`), per network and step: the reservoir update with :math:`J r`
from the CSR arrays, :math:`r`, both readouts and the exploration noise in one pass over the units; the task error
(arm and joint costs included), :math:`\bar e`, :math:`\beta`; the exploratory rule translated to C
(:func:`~rulesearch.compile.ccode.rule_c`: its states, then :math:`W^{exp} \mathrel{+}= \Delta W`); and every
``every`` steps the RLS update on one triangle of :math:`P`. The kernel runs many steps per call (up to a chunk of
the noise stream), so a step costs no Python. It is built once per rule, task and dtype (:mod:`rulesearch.native`).

It rounds differently from the torch loop (sums in another order: :math:`J r` over four partial sums, the readouts
one unit at a time, :math:`P` through its upper triangle), so the two agree to rounding, not bitwise: 1e-16 to
1e-11 relative in the per-trial errors and weight norms on the runs of ``tests/test_reservoir_native.py`` (which
asserts 1e-9) and after 2 trials of 2000 steps at N = 1000, where learning keeps the chaotic reservoir's
trajectories close.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch
from torch import Tensor

from .. import native
from ..compile.ccode import C_PRELUDE, rule_c
from ..errors import ConfigError
from .tasks import MotorTask

__all__ = ["NativeSteps", "RULE_SIGNALS"]

# the exploratory rule's signals, in the order the kernel passes them (loop.py's sig dict)
RULE_SIGNALS = {"pre": "pre", "post": "post", "w": "synapse", "reward": "global", "loss": "global", "mod": "global"}

_KERNEL = r"""
#include <tgmath.h>
#include <stddef.h>
@DEFS@
typedef @REAL@ real;
@PRELUDE@
@RULE@
static real task_error(const real *z, const real *f, const real *zbar) {
    real px, py;
#if ARM
    static const real L[D] = {LENGTHS};
    real cz = 0, sx = 0, sy = 0;
    for (int k = 0; k < D; k++) {
        cz += z[k];
        real phi = ((real)3.141592653589793) * cz;
        sx += L[k] * sin(phi);
        sy += L[k] * cos(phi);
    }
    px = sx + (real)PIVOT_X;
    py = sy + (real)PIVOT_Y;
#else
    px = z[0];
    py = z[1];
#endif
    real dx = px - f[0], dy = py - f[1];
    real e = dx * dx + dy * dy;
#if COSTS
    if (zbar) {
        static const real c[D] = {COST_VALUES};
        real s = 0;
        for (int k = 0; k < D; k++) s += fabs(z[k] - zbar[k]) * c[k];
        e = e + s;
    }
#endif
    return e;
}

/* steps [step0, step0 + n) of B networks of N units, D outputs; arrays row-major, batch first */
void run_steps(int B, int N, long n, long step0, int every, int keep,
               const int *crow, const int *col, const real *val, const real *Q,
               const real *xi, const real *f, real alpha, real leak, real kz, real ke,
               real *x, real *r, real *z, real *zexp, real *zmst, real *W_exp, real *W_mst, real *P,
               real *zbar, real *ebar, real *beta, real *st, int st_size, const real *prm, int n_prm,
               const real *gate_on, real *k_buf, real *out_e, real *out_em, real *out_z, real *g_sum) {
    /* the networks are independent (J block-diagonal, noise per row): each runs its n steps in turn, so that its J,
       weights and P stay in the cache */
    for (int b = 0; b < B; b++) {
        real *xb = x + (size_t)b * N, *rb = r + (size_t)b * N, *zb = z + b * D;
        real *ze = zexp + b * D, *zm = zmst + b * D, *Wb = W_exp + (size_t)b * D * N;
        real *Mb = W_mst + (size_t)b * D * N, *zbb = zbar + b * D;
        const real *Qb = Q + (size_t)b * N * D;
        const int *rows = crow + (size_t)b * N;
        for (long t = 0; t < n; t++) {
            long step = step0 + t;
            const real *ft = f + 2 * t;
            const real *xib = xi + ((size_t)t * B + b) * (N + D);
            /* x <- x + leak (-x + J r + Q z) */
            for (int i = 0; i < N; i++) {
                int hi = rows[i + 1], q = rows[i];
                real s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                for (; q + 3 < hi; q += 4) {
                    s0 += val[q] * r[col[q]];
                    s1 += val[q + 1] * r[col[q + 1]];
                    s2 += val[q + 2] * r[col[q + 2]];
                    s3 += val[q + 3] * r[col[q + 3]];
                }
                for (; q < hi; q++) s0 += val[q] * r[col[q]];
                real qz = 0;
                for (int k = 0; k < D; k++) qz += Qb[i * D + k] * zb[k];
                xb[i] = (((s0 + s1) + (s2 + s3)) + qz - xb[i]) * leak + xb[i];
            }
            /* r = tanh(x) + alpha xi; z_exp = W_exp r + beta xi'; z_mst = W_mst r */
            real ae[D], am[D];
            for (int k = 0; k < D; k++) ae[k] = am[k] = 0;
            for (int i = 0; i < N; i++) {
                real ri = tanh(xb[i]) + alpha * xib[i];
                rb[i] = ri;
                for (int k = 0; k < D; k++) {
                    ae[k] += Wb[(size_t)k * N + i] * ri;
                    am[k] += Mb[(size_t)k * N + i] * ri;
                }
            }
            for (int k = 0; k < D; k++) {
                ze[k] = EXPLORE ? ae[k] + beta[b] * xib[N + k] : 0;
                zm[k] = am[k];
                zb[k] = ze[k] + zm[k];
                zbb[k] = zbb[k] + kz * (ze[k] - zbb[k]);
            }
            real e = task_error(zb, ft, zbb);
            ebar[b] = step == 0 ? e : ebar[b] + ke * (e - ebar[b]);
            out_e[t * B + b] = e;
            out_em[t * B + b] = task_error(zm, ft, zbb);
            if (keep) for (int k = 0; k < D; k++) out_z[(t * B + b) * D + k] = zb[k];
#if EXPLORE
            real u = 10 * ebar[b];
            if (CLAMP && u < 0) u = 0;
            beta[b] = pow(u, (real)BETA_POWER) * (real)BETA_GAIN;
            real reward = -e, loss = e;
            const real *sig[6] = {rb, ze, Wb, &reward, &loss, &reward};
            rule_update(D, N, sig, prm + (size_t)b * n_prm, st + (size_t)b * st_size, step == 0, Wb);
#endif
            if (every && (step + 1) % every == 0) {
                real gate = 1, tgt[D];
#if MASTERY
                gate = (real)0.5 - (real)0.5 * tanh((real)SHARPNESS * (ebar[b] - (real)THRESHOLD));
                gate = gate * gate_on[b];
                g_sum[b] += gate > (real)0.5;
                for (int k = 0; k < D; k++) tgt[k] = -(TARGET_ZBAR ? zbb[k] : ze[k]);
#else
                for (int k = 0; k < D; k++) tgt[k] = zb[k] - ft[k];
#endif
                if (gate != 0) {
                    /* k = P r, c = 1 / (1 + r.k), P <- P - g c k k^T: P symmetric, its upper triangle stored */
                    real *Pb = P + (size_t)b * N * N, *kv = k_buf + (size_t)b * N;
                    for (int i = 0; i < N; i++) kv[i] = 0;
                    for (int i = 0; i < N; i++) {
                        const real *Pi = Pb + (size_t)i * N;
                        real s = 0, ri = rb[i];
#pragma omp simd reduction(+ : s)
                        for (int j = i + 1; j < N; j++) {
                            s += Pi[j] * rb[j];
                            kv[j] += Pi[j] * ri;
                        }
                        kv[i] += Pi[i] * ri + s;
                    }
                    real rk = 0;
                    for (int i = 0; i < N; i++) rk += rb[i] * kv[i];
                    real c = 1 / (1 + rk), a = -c * gate;
                    for (int i = 0; i < N; i++) {
                        real *Pi = Pb + (size_t)i * N, aki = a * kv[i];
                        for (int j = i; j < N; j++) Pi[j] += aki * kv[j];
                    }
                    for (int k = 0; k < D; k++) {
                        real g = -(c * gate * tgt[k]) * (real)RLS_SCALE;
                        for (int i = 0; i < N; i++) Mb[(size_t)k * N + i] += g * kv[i];
                    }
                }
            }
        }
    }
}
"""


def _c_float(x: float) -> str:
    return repr(float(x))


@functools.lru_cache(maxsize=32)
def _kernel(rule, task: MotorTask, explore: tuple, mastery: tuple | None, dtype: torch.dtype):
    """The loaded ``run_steps`` of a rule, task, exploration ``(beta_gain, beta_power, clamp)`` and mastery
    ``(sharpness, threshold, target_zbar, scale)`` (None: FORCE)."""
    real = {torch.float64: "double", torch.float32: "float"}[dtype]
    crule = rule_c(rule, RULE_SIGNALS) if rule is not None else None
    arm, costs = task.arm, task.joint_costs
    defs = {
        "D": str(task.n_out),
        "ARM": str(int(arm is not None)),
        "LENGTHS": ", ".join(map(_c_float, arm.lengths)) if arm else "0",
        "PIVOT_X": _c_float(arm.pivot[0]) if arm else "0",
        "PIVOT_Y": _c_float(arm.pivot[1]) if arm else "0",
        "COSTS": str(int(costs is not None)),
        "COST_VALUES": ", ".join(map(_c_float, costs)) if costs else "0",
        "EXPLORE": str(int(rule is not None)),
        "CLAMP": str(int(explore[2])),
        "BETA_GAIN": _c_float(explore[0]),
        "BETA_POWER": _c_float(explore[1]),
        "MASTERY": str(int(mastery is not None)),
        "SHARPNESS": _c_float(mastery[0]) if mastery else "0",
        "THRESHOLD": _c_float(mastery[1]) if mastery else "0",
        "TARGET_ZBAR": str(int(bool(mastery and mastery[2]))),
        "RLS_SCALE": _c_float(mastery[3]) if mastery else "1",
    }
    head = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    src = _KERNEL.replace("@DEFS@", head).replace("@REAL@", real).replace("@PRELUDE@", C_PRELUDE)
    lib = native.load(src.replace("@RULE@", crule.code if crule else ""), "reservoir")
    fn = lib.run_steps
    fn.restype = None
    return fn, crule


class NativeSteps:
    """Training steps of ``B`` reservoirs in the C kernel, on the torch tensors of the loop (updated in place).

    ``prm`` ``(B, P)`` holds the exploratory rule's parameters per row (``theta`` of a linear rule, else its constants
    and ``scale``; None for FORCE); :meth:`run` takes the RLS matrix ``P`` ``(B, N, N)`` (its upper triangle is used),
    or None without RLS.
    """

    def __init__(self, J: Tensor, Q: Tensor, task: MotorTask, learning, prm: Tensor | None, gate_on: Tensor,
                 alpha: float, leak: float, dtype: torch.dtype):  # fmt: skip
        if J.layout != torch.sparse_csr or J.device.type != "cpu":
            raise ConfigError("backend='native' runs on the CPU with a sparse J (Reservoir(sparse=True), n >= 500).")
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"backend='native' takes float32 or float64, not {dtype}.")
        ex, ms = learning.exploration, learning.mastery
        clamp = task.joint_costs is not None and min(task.joint_costs) < 0
        explore = (ex.beta_gain, ex.beta_power, clamp) if ex is not None else (0.0, 1.0, False)
        mastery = (ms.sharpness, ms.threshold, ms.target == "zbar", ms.scale) if ms is not None else None
        self.fn, self.crule = _kernel(ex.rule if ex is not None else None, task, explore, mastery, dtype)
        self.B, self.N, self.d = Q.shape[0], Q.shape[1], task.n_out
        rls = ms or learning.force
        self.every, self.gated = (rls.every if rls is not None else 0), ms is not None
        self.dtype, self.np_dtype = dtype, torch.empty(0, dtype=dtype).numpy().dtype
        self._keep = [J.crow_indices(), J.col_indices(), J.values(), Q.contiguous(), gate_on.to(dtype).contiguous()]
        n_st = self.crule.state_size(self.d, self.N) if self.crule else 0
        self.st = torch.zeros(self.B, max(n_st, 1), dtype=dtype)
        self.prm = (prm if prm is not None else torch.zeros(self.B, 1)).to(dtype).contiguous()
        self.zexp = torch.zeros(self.B, self.d, dtype=dtype)
        self.zmst = torch.zeros(self.B, self.d, dtype=dtype)
        self.k_buf = torch.zeros(self.B, self.N, dtype=dtype)
        self.g_sum = torch.zeros(self.B, dtype=dtype)
        self._consts = (alpha, leak)

    def gated_updates(self, step0: int, n: int) -> int:
        """How many mastery (gated) RLS updates steps ``step0 .. step0 + n - 1`` make (0 without a mastery pathway):
        the steps ``s`` with ``(s + 1) % every == 0``."""
        return (step0 + n) // self.every - step0 // self.every if self.gated else 0

    def run(self, step0: int, xi: Tensor, f: Tensor, x, r, z, W_exp, W_mst, P, zbar, ebar, beta, kz, ke,
            out_e: np.ndarray, out_em: np.ndarray, out_z: Tensor | None) -> None:  # fmt: skip
        """Steps ``step0 .. step0 + len(xi) - 1`` with noise draws ``xi`` ``(n, B, N + d)`` and targets ``f``
        ``(n, 2)``; writes each step's error and mastery error to ``out_e``, ``out_em`` ``(n, B)`` and, given
        ``out_z`` ``(n, B, d)``, the output."""
        n = xi.shape[0]
        for t in (x, r, z, W_exp, W_mst, zbar, ebar, beta, xi, f, *([] if P is None else [P])):
            if not t.is_contiguous() or t.dtype != self.dtype:
                raise ConfigError("NativeSteps.run: every tensor must be contiguous and of the kernel's dtype.")
        if out_e.shape != (n, self.B) or out_em.shape != (n, self.B) or out_e.dtype != self.np_dtype:
            raise ConfigError("NativeSteps.run: out_e and out_em must be (n, B) arrays of the kernel's dtype.")
        crow, col, val, Q, gate_on = self._keep
        real = ctypes.c_double if self.dtype == torch.float64 else ctypes.c_float
        p = lambda t: ctypes.c_void_p(t.data_ptr() if isinstance(t, Tensor) else t.ctypes.data)  # noqa: E731
        alpha, leak = self._consts
        self.fn(
            ctypes.c_int(self.B), ctypes.c_int(self.N), ctypes.c_long(n), ctypes.c_long(step0),
            ctypes.c_int(self.every), ctypes.c_int(int(out_z is not None)),
            p(crow), p(col), p(val), p(Q), p(xi), p(f), real(alpha), real(leak), real(kz), real(ke),
            p(x), p(r), p(z), p(self.zexp), p(self.zmst), p(W_exp), p(W_mst),
            p(P) if P is not None else ctypes.c_void_p(0), p(zbar), p(ebar), p(beta),
            p(self.st), ctypes.c_int(self.st.shape[1]), p(self.prm), ctypes.c_int(self.prm.shape[1]), p(gate_on),
            p(self.k_buf), p(out_e), p(out_em), p(out_z) if out_z is not None else ctypes.c_void_p(0), p(self.g_sum),
        )  # fmt: skip
