r"""The trial loop of reward-modulated reservoir learning: FORCE, RMHL and SUPER-TREX (Pyle & Rosenbaum 2019).

Per step, for ``B`` reservoirs at once (:mod:`.model`), with :math:`\beta` the exploration amplitude:

.. math::

    z^{exp} = W^{exp} r + U(-\beta, \beta)^d, \quad z^{mst} = W^{mst} r, \quad z = z^{exp} + z^{mst},\\
    e = \lVert p(z) - f_t \rVert^2 (+\text{joint costs}), \quad \bar e \leftarrow 0.8\,\bar e + 0.2\,e, \quad
    \beta \leftarrow \beta_g (10 \bar e)^{\beta_p}.

* **Exploratory pathway**: :math:`W^{exp} \leftarrow W^{exp} + \eta\, g_{DA}\, \Delta W`, with :math:`\Delta W` a
  compiled rule of the toolkit (:mod:`.rules`) fed ``pre = r``, ``post = z^{exp}``, ``reward = -e``,
  ``loss = e``, ``mod = -e`` and ``w = W^{exp}``; its traces are the rule's states. :math:`g_{DA}` (``dopamine``)
  scales the reward modulation (1: intact).
* **Mastery pathway** (every ``every`` steps): RLS (:mod:`.rls`) with gate
  :math:`\gamma = \tfrac12 - \tfrac12\tanh(5\cdot10^5(\bar e - \theta_T))` and error :math:`-u`, :math:`u` the
  exploratory output (:math:`z^{exp}`) or its trace :math:`\bar z` (``Mastery.target``), scaled by ``s``: the
  mastery readout absorbs what the exploratory pathway adds.
* **FORCE**: the same RLS on the supervised error :math:`z - f_t`, without exploration.

Trials are one traversal of the target each: ``n_train`` learning trials, then ``n_test`` test trials with weights
frozen, no noise and the reservoir driven by the target (``test_feedback="target"``) or by its own output from five
trials earlier (``"delayed_output"``), as in the authors' scripts. The test-phase reservoir trajectory does not
depend on the test output, so both readouts are scored on it: *full* (:math:`W^{exp} r + W^{mst} r`) and *mastery*
(:math:`W^{mst} r`: the exploratory pathway removed, the lesion). The reported deviation is the mean over test steps
of :math:`\sqrt{\overline{mse}}`, :math:`\overline{mse} \leftarrow 0.9998\,\overline{mse} + 0.0002\, e`, of the
mastery readout for SUPER-TREX and FORCE and of the full readout for RMHL (the replication's metric).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..batched import matvec
from ..compile.compiler import compile_rule
from ..errors import ConfigError, SignalError
from ..lang.rule import Rule
from .model import NoiseStream, Reservoir, recurrent_matvec
from .rls import SymmetricRLS, rls_delta, rls_gain_, rls_init
from .rules import node_perturbation
from .tasks import MotorTask, butterfly, get_task

__all__ = [
    "Exploration",
    "Mastery",
    "Force",
    "Learning",
    "ReservoirResult",
    "paper_learning",
    "run_reservoir",
    "RESERVOIR_SIGNALS",
    "DIVERGENCE_BOUND",
]

RESERVOIR_SIGNALS = frozenset({"pre", "post", "reward", "loss", "mod", "w"})
DIVERGENCE_BOUND = 1e4  # |W| or |x| beyond this (or non-finite) marks a run diverged
_STACK_EVERY = 4096  # the training loop stacks its per-step values this often (bounded memory per step)


@dataclass(frozen=True)
class Exploration:
    """The exploratory pathway: its plasticity ``rule`` and the exploration noise amplitude
    :math:`\\beta = \\beta_g (10\\bar e)^{\\beta_p}` (``beta0`` before the first step). A linear rule's term
    coefficients are ``lr``; a general rule's output is scaled by ``lr`` and its constants are given per row to
    :func:`run_reservoir` (``rule_constants``), so one batch can hold a family of rules."""

    rule: Rule
    lr: float = 5e-4
    beta0: float = 0.01
    beta_gain: float = 0.025
    beta_power: float = 0.25

    def __post_init__(self):
        if not isinstance(self.rule, Rule):
            raise ConfigError(f"Exploration.rule must be a Rule, got {type(self.rule).__name__}.")
        extra = sorted(self.rule_needs - RESERVOIR_SIGNALS)
        if extra:
            raise SignalError(
                f"Rule {self.rule.name!r} reads {extra}, which the reservoir setting does not provide; available: "
                f"{sorted(RESERVOIR_SIGNALS)} (pre = rates, post = exploratory output, reward = -error)."
            )

    @property
    def rule_needs(self) -> frozenset:
        return compile_rule(self.rule).needs


@dataclass(frozen=True)
class Mastery:
    """The mastery pathway: RLS every ``every`` steps toward the exploratory output (``target="z_exp"``) or its
    trace (``"zbar"``), scaled by ``scale``, gated open when the running error is below ``threshold``."""

    scale: float = 0.5
    threshold: float = 1.5e-3
    target: str = "z_exp"
    sharpness: float = 5e5
    every: int = 10
    gamma: float = 10.0

    def __post_init__(self):
        if self.target not in ("z_exp", "zbar"):
            raise ConfigError(f"Mastery.target={self.target!r}; expected 'z_exp' or 'zbar'.")
        if self.every < 1:
            raise ConfigError(f"Mastery.every={self.every}; expected >= 1 (steps between RLS updates).")


@dataclass(frozen=True)
class Force:
    """FORCE: RLS on the supervised error every ``every`` steps, :math:`P_0 = I/\\gamma`."""

    every: int = 10
    gamma: float = 10.0


@dataclass(frozen=True)
class Learning:
    """An algorithm: SUPER-TREX (exploration + mastery), RMHL (exploration) or FORCE (force). ``zbar_tau`` is the
    time constant (steps) of :math:`\\bar z`, the trace of :math:`z^{exp}` used by the mastery target and the joint
    costs; ``ebar_tau`` that of the running error :math:`\\bar e`."""

    name: str
    exploration: Exploration | None = None
    mastery: Mastery | None = None
    force: Force | None = None
    zbar_tau: float = 5.0
    ebar_tau: float = 5.0

    def __post_init__(self):
        if (self.force is None) == (self.exploration is None):
            raise ConfigError(f"Learning {self.name!r}: give exactly one of exploration (RMHL, SUPER-TREX) or force.")
        if self.mastery is not None and self.exploration is None:
            raise ConfigError(f"Learning {self.name!r}: a mastery pathway needs an exploratory pathway to absorb.")
        if self.zbar_tau < 1 or self.ebar_tau < 1:
            raise ConfigError(f"Learning {self.name!r}: zbar_tau and ebar_tau must be >= 1 (steps).")


# the authors' per-task settings (Task1_ST.m, Task2_ST_Seg2.m, Task3_ST.m)
_PAPER = {
    "butterfly": dict(one_sided=True, tau=5.0, beta=(0.025, 0.25), lr=5e-4, mastery=(0.5, 1.5e-3, "z_exp")),
    "arm2": dict(one_sided=False, tau=10.0, beta=(0.01, 0.2), lr=5e-4, mastery=(0.5, 1.5e-3, "zbar")),
    "arm3": dict(one_sided=False, tau=5.0, beta=(0.005, 0.25), lr=2.5e-4, mastery=(0.9, 1.5e-2, "zbar")),
}


# the replication's two fixes (Sankar et al. 2021, "modified re-implementation"): (1) the exploratory update is
# scaled by 0.1/n_segs (Task 2) or 0.5/n_segs (Task 3) instead of 1 or 0.5 when the arm has more than 2 segments
# (Task 3: lr 5e-4 * 0.5/3 instead of 5e-4 * 0.5); (2) Task 2's transfer threshold is 1.5e-2 instead of 1.5e-3
_REPLICATION_FIXES = {"arm2": dict(threshold=1.5e-2), "arm3": dict(lr=5e-4 * 0.5 / 3)}


def paper_learning(algorithm: str, task: str, rule: Rule | None = None, replication_fixes: bool = False) -> Learning:
    """``"supertrex"``, ``"rmhl"`` or ``"force"`` with the published settings for ``task``; ``rule`` replaces the
    exploratory rule (default: :func:`~.rules.node_perturbation`, one-sided on the butterfly task).

    ``replication_fixes=True`` applies the ReScience replication's two fixes (default False: the authors' scripts):
    the exploratory learning rate scaled by 0.5/n_segs instead of 0.5 on Task 3 (``lr`` 5e-4/6 instead of 2.5e-4;
    Task 2's arm has 2 segments, so its rate is unchanged) and Task 2's mastery gate threshold 1.5e-2 instead of
    1.5e-3. Nothing else changes; the butterfly task has no fix."""
    if task not in _PAPER:
        raise ConfigError(f"paper_learning: unknown task {task!r}; expected one of {sorted(_PAPER)}.")
    if algorithm == "force":
        if task != "butterfly":
            raise ConfigError("FORCE needs the target output, which only the butterfly task (Task 1) gives.")
        return Learning("force", force=Force())
    if algorithm not in ("supertrex", "rmhl"):
        raise ConfigError(f"paper_learning: algorithm={algorithm!r}; expected supertrex, rmhl or force.")
    s = _PAPER[task]
    fix = _REPLICATION_FIXES.get(task, {}) if replication_fixes else {}
    rule = rule or node_perturbation(tau_z=s["tau"], one_sided=s["one_sided"])
    exploration = Exploration(rule, fix.get("lr", s["lr"]), 0.01, *s["beta"])
    scale, threshold, target = s["mastery"]
    mastery = Mastery(scale, fix.get("threshold", threshold), target) if algorithm == "supertrex" else None
    return Learning(algorithm, exploration, mastery, zbar_tau=s["tau"])


@dataclass(frozen=True, eq=False)
class ReservoirResult:
    """What :func:`run_reservoir` returns for ``B`` runs (``n = n_train + n_test`` trials).

    Attributes
    ----------
    deviation : (B,) the replication's metric (module docstring); NaN for diverged runs
    deviation_full, deviation_mastery : (B,) the same for the full and the mastery-only (lesioned) readout
    trial_error : (B, n) mean error per trial (training: the learner's output; test: the reported readout)
    trial_error_mastery : (B, n_train) mean error the mastery readout alone would make on the training states
    w_exp_norm, w_mst_norm : (B, n) Frobenius norms at the end of each trial
    gate_open : (B, n_train) fraction of mastery updates with gate > 0.5
    drawn : (B, T', 2) pen position of the reported readout in the last test trial, every ``record_every`` steps
    target : (T', 2) the target at those steps
    diverged : (B,) bool
    """

    seeds: tuple[int, ...]
    deviation: np.ndarray
    deviation_full: np.ndarray
    deviation_mastery: np.ndarray
    trial_error: np.ndarray
    trial_error_mastery: np.ndarray
    w_exp_norm: np.ndarray
    w_mst_norm: np.ndarray
    gate_open: np.ndarray
    drawn: np.ndarray
    target: np.ndarray
    diverged: np.ndarray
    wall_s: float
    steps: int
    extra: dict = field(default_factory=dict)


def run_reservoir(
    reservoir: Reservoir,
    task: MotorTask | str,
    learning: Learning,
    seeds: Sequence[int],
    *,
    n_train: int = 10,
    n_test: int = 5,
    trial_steps: int = 50_000,
    dopamine: float | Sequence[float] = 1.0,
    mastery_on: bool | Sequence[bool] = True,
    rule_constants: Mapping[str, float | Sequence[float]] | None = None,
    record_every: int = 10,
    dtype=torch.float64,
    symmetric_rls: bool = False,
    backend: str = "torch",
    log: Callable[[str], None] | None = None,
) -> ReservoirResult:
    """Run ``n_train`` learning and ``n_test`` test trials of ``trial_steps`` Euler steps for each seed (a batch).

    ``dopamine`` (a number or one per seed) scales the exploratory update's reward modulation; ``mastery_on`` (one
    per seed, or one for all) False keeps a row's mastery gate shut, so that row is RMHL inside a SUPER-TREX batch
    (its reported deviation is then the full readout's). ``rule_constants`` gives a general exploratory rule's
    constants (a number or one per seed). Deterministic per seed: row ``b`` depends on ``seeds[b]``
    and its own arguments only. ``log`` receives a line per training trial.

    ``symmetric_rls=True`` runs the RLS updates (mastery pathway, FORCE) on one triangle of ``P``
    (:class:`~.rls.SymmetricRLS`, 1.5x to 1.7x faster per update at N = 1000): the same equations, rounded
    differently, so the chaotic trajectories part from the default's (``tests/test_reservoir.py`` bounds the
    difference on short runs). The default keeps the results bitwise those of the straightforward loop.

    ``backend="native"`` runs the training steps in a C kernel built on first use (:mod:`.native`; needs a C
    compiler, a CPU and a sparse ``J``): the same equations, the exploratory rule translated to C, about 3x faster
    per step for one network than the torch backend (``experiments/bench_reservoir.py``); rounded differently, so
    its results agree with the torch backend's to rounding, not bitwise. The test trials run in torch either way.
    """
    if backend not in ("torch", "native"):
        raise ConfigError(f"run_reservoir: backend={backend!r}; expected 'torch' or 'native' (a C kernel).")
    if backend == "native" and symmetric_rls:
        raise ConfigError("symmetric_rls is a torch-backend option; the native backend always updates one triangle.")
    task = get_task(task) if isinstance(task, str) else task
    seeds = tuple(seeds)
    B, d, N = len(seeds), task.n_out, reservoir.n
    if n_train < 1 or n_test < 0 or trial_steps < 10:
        raise ConfigError(f"n_train={n_train}, n_test={n_test}, trial_steps={trial_steps}: need >= 1, >= 0, >= 10.")
    if task.test_feedback == "delayed_output" and n_test > n_train:
        raise ConfigError(f"Task {task.name}: the test feeds back outputs of earlier trials; need n_test <= n_train.")
    gda = _per_row(dopamine, B, "dopamine").to(dtype)
    gate_on = _per_row(mastery_on, B, "mastery_on").to(dtype)
    t0 = time.perf_counter()
    params = reservoir.init(seeds, d, dtype)
    noise = NoiseStream(seeds, N + d, dtype)
    f = butterfly(trial_steps, dtype)
    ex, ms, fo = learning.exploration, learning.mastery, learning.force
    update = compile_rule(ex.rule) if ex is not None else None
    theta = _rule_params(ex, gda, rule_constants, B, dtype) if ex is not None else None
    scale = None if ex is None or ex.rule.is_linear else (ex.lr * gda).reshape(B, 1, 1)
    rls = ms or fo
    gain_ = None
    if rls is not None and symmetric_rls:
        gain_ = SymmetricRLS(B, N, rls.gamma, dtype).gain_
    elif rls is not None:
        P = rls_init(B, N, rls.gamma, dtype)
        gain_ = functools.partial(rls_gain_, P)

    steps_c = None
    if backend == "native":
        from .native import NativeSteps  # builds the kernel (once per rule, task and dtype)

        prm = None
        if ex is not None:
            prm = theta if ex.rule.is_linear else torch.stack([*theta.values(), scale.reshape(B)], -1)
        steps_c = NativeSteps(params.J, params.Q, task, learning, prm, gate_on, reservoir.alpha, reservoir.leak, dtype)

    x = params.x0.clone()
    r = torch.tanh(x)
    z = x.new_zeros(B, d)
    W_exp, W_mst = x.new_zeros(B, d, N), x.new_zeros(B, d, N)
    zbar, ebar, msebar = x.new_zeros(B, d), (x.new_zeros(B) if steps_c is not None else None), None
    beta = x.new_full((B,), ex.beta0 if ex is not None else 0.0)
    kz, ke = 1.0 / learning.zbar_tau, 1.0 / learning.ebar_tau
    states: dict[str, Tensor] = {}
    n_trials = n_train + n_test
    trial_err = np.full((B, n_trials), np.nan)
    trial_err_m = np.full((B, n_train), np.nan)
    wn_exp, wn_mst = np.zeros((B, n_trials)), np.zeros((B, n_trials))
    gate_open = np.zeros((B, n_train))
    history = []  # outputs of the last n_test training trials, for delayed-output feedback
    diverged = torch.zeros(B, dtype=torch.bool)

    # the training steps' hot loop: the same operations on the same values as the equations above, with fewer of
    # them per step: constants and views hoisted; W_exp, W_mst updated in place (read through the transposed views
    # W_expT, W_mstT); J r through recurrent_matvec (bitwise the sparse product); the exploration noise scaled once
    # per chunk (NoiseStream.next_split); ebar and beta updated in place; what is read only at a trial's end (the
    # error sums, msebar, and zbar where nothing else reads it) formed there from the step values, one operation
    # at a time as the steps would; the compiled rule bound once (BoundRule); RLS skipped where every gate is
    # exactly 0, where its update is zero. tests/test_reservoir.py checks the result bitwise against a plain loop.
    f_rows = f.unbind(0)
    W_expT, W_mstT = W_exp.transpose(1, 2), W_mst.transpose(1, 2)
    QT = params.Q.transpose(1, 2)
    jr = recurrent_matvec(params.J)
    alpha, leak, error = reservoir.alpha, reservoir.leak, task.error
    zbar_target = ms is not None and ms.target == "zbar"
    # zbar is read during training only by the mastery target "zbar" and by joint costs; otherwise it is formed at the
    # end of each trial from the trial's z_exp (the same operations, element by element)
    zbar_late = ex is not None and not zbar_target and task.joint_costs is None
    every = ms.every if ms is not None else fo.every if fo is not None else 0
    beta1 = beta.unsqueeze(-1)  # a view: beta is updated in place
    if ex is not None:
        b_gain, b_power = ex.beta_gain, ex.beta_power
        # ebar >= 0 when every error is (rounding keeps ebar + ke (e - ebar) >= 0 for 0 < ke <= 1), so the clamp
        # of 10 ebar at 0 changes nothing unless a joint cost is negative
        clamp = task.joint_costs is not None and min(task.joint_costs) < 0
        needs = update.needs
        signed = "reward" in needs or "mod" in needs
        with torch.no_grad():
            example = {"pre": r, "post": z, "reward": z.new_zeros(B), "loss": z.new_zeros(B), "mod": z.new_zeros(B)}
            example["w"] = W_exp
            bound = update.bind({k: example[k] for k in needs}, theta)
    # while W_mst is all zero (before the first RLS update) z_mst = W_mst r is zero (z = z_exp); the mastery readout's
    # error (a diagnostic) is taken for the whole trial at once where it depends on z_mst and the target alone (no
    # arm, no joint costs: ||z_mst - f_t||^2 elementwise, then a sum of d = 2 terms: the per-step values)
    z_zero = x.new_zeros(B, d)
    em_late = task.arm is None and task.joint_costs is None
    mst_zero = True
    with torch.inference_mode():  # fewer bookkeeping per operation than no_grad; the same values
        for trial in range(n_train):
            steps = ([], [], [])  # the step values e, z_mst (or its error), z_exp for the trial's end
            es, ems, zexps = steps
            parts = ([], [], [])  # the same, stacked every _STACK_EVERY steps
            g_sum, g_n = x.new_zeros(B), 0
            keep = task.test_feedback == "delayed_output" and trial >= n_train - n_test
            zs = x.new_empty(trial_steps, B, d) if keep else None
            if steps_c is not None:
                state = (x, r, z, W_exp, W_mst, P if rls is not None else None, zbar, ebar, beta, kz, ke)
                E, EM = _native_trial(steps_c, noise, f, trial * trial_steps, trial_steps, state, zs)
                g_n = steps_c.gated_updates(trial * trial_steps, trial_steps)
                g_sum = steps_c.g_sum.clone()
            else:
                for t in range(trial_steps):
                    ft = f_rows[t]
                    # x <- x + leak (-x + J r + Q z) (reservoir_step)
                    x = jr(r).add_(torch.bmm(z.unsqueeze(1), QT).squeeze(1)).sub_(x).mul_(leak).add_(x)
                    xa, xb = noise.next_split(N, alpha)
                    r = torch.tanh(x).add_(xa)
                    r1 = r.unsqueeze(1)
                    z_mst = z_zero if mst_zero else torch.bmm(r1, W_mstT).squeeze(1)
                    if ex is not None:
                        z_exp = torch.bmm(r1, W_expT).squeeze(1).add_(beta1 * xb)
                        z = z_exp if mst_zero else z_exp + z_mst
                        if zbar_late:
                            zexps.append(z_exp)
                        else:
                            zbar.add_(kz * (z_exp - zbar))
                    else:
                        z_exp, z = None, z_mst
                    e = error(z, ft, zbar)
                    if ebar is None:
                        ebar = e.clone()
                    else:
                        ebar.add_(ke * (e - ebar))
                    es.append(e)
                    ems.append(z_mst if em_late else error(z_mst, ft, zbar))
                    if keep:
                        zs[t] = z
                    if ex is not None:
                        torch.mul(ebar, 10, out=beta)
                        (beta.clamp_min_(0) if clamp else beta).pow_(b_power).mul_(b_gain)
                        sig = {"pre": r, "post": z_exp, "w": W_exp, "loss": e}
                        if signed:
                            sig["reward"] = sig["mod"] = -e
                        bound.advance(states, sig)
                        dW = bound(sig)
                        W_exp.add_(dW if scale is None else scale * dW)
                    if every and (trial * trial_steps + t + 1) % every == 0:
                        if ms is not None:
                            gate = (0.5 - 0.5 * torch.tanh(ms.sharpness * (ebar - ms.threshold))) * gate_on
                            if bool(gate.any()):  # else P and W_mst stay as they are (a zero update)
                                k, c = gain_(r, gate)
                                W_mst.add_(ms.scale * rls_delta(k, c, -(zbar if zbar_target else z_exp), gate))
                                mst_zero = False
                            g_sum += (gate > 0.5).to(dtype)
                            g_n += 1
                        else:
                            k, c = gain_(r)
                            W_mst.add_(rls_delta(k, c, z - ft))
                            mst_zero = False
                    if (t + 1) % _STACK_EVERY == 0 or t == trial_steps - 1:
                        for values, part in zip(steps, parts):
                            if values:
                                part.append(torch.stack(values))
                                values.clear()
                E, EM = torch.cat(parts[0]).numpy(), torch.cat(parts[1])
                EM = (error(EM, f.unsqueeze(1)) if em_late else EM).numpy()
            msebar = _running_mse(msebar, E)
            if parts[2]:
                zbar = _trace_rows(zbar, torch.cat(parts[2]).numpy(), kz)
            trial_err[:, trial] = (_sequential_sum(E) / trial_steps).numpy()
            trial_err_m[:, trial] = (_sequential_sum(EM) / trial_steps).numpy()
            gate_open[:, trial] = (g_sum / max(g_n, 1)).numpy()
            wn_exp[:, trial], wn_mst[:, trial] = _norm(W_exp), _norm(W_mst)
            diverged |= _diverged(W_exp, W_mst, x)
            if keep:
                history.append(zs)
            if log is not None:
                log(
                    f"trial {trial + 1}/{n_train}: mean error {np.nanmean(trial_err[:, trial]):.4g}, "
                    f"{time.perf_counter() - t0:.0f} s"
                )

        # test: weights frozen, no noise, reservoir driven by the target or by the stored outputs
        T_rec = len(range(0, trial_steps, record_every))
        drawn = np.zeros((B, T_rec, 2))
        readouts = ("full", "mastery")
        msebars = {k: msebar.clone() for k in readouts}
        zbars = {k: zbar.clone() for k in readouts}
        dev_sum = {k: x.new_zeros(B) for k in readouts}
        full_rows = (gate_on == 0).numpy() if ms is not None else np.full(B, fo is None)
        for j in range(n_test):
            e_sum = x.new_zeros(B)
            for t in range(trial_steps):
                fb = f[t].expand(B, d) if task.test_feedback == "target" else history[j][t]
                x = jr(r).add_(matvec(params.Q, fb)).sub_(x).mul_(leak).add_(x)  # reservoir_step
                r = torch.tanh(x)
                z_m, z_e = matvec(W_mst, r), matvec(W_exp, r)
                for name, (zr, ze) in (("full", (z_m + z_e, z_e)), ("mastery", (z_m, 0.0))):
                    zbars[name] = zbars[name] + kz * (ze - zbars[name])
                    e = task.error(zr, f[t], zbars[name])
                    msebars[name] = 0.9998 * msebars[name] + 0.0002 * e
                    dev_sum[name] += msebars[name].sqrt()
                    rows = torch.as_tensor(full_rows == (name == "full"))
                    e_sum += torch.where(rows, e, 0.0)
                    if j == n_test - 1 and t % record_every == 0:
                        drawn[rows.numpy(), t // record_every] = task.position(zr)[rows].numpy()
            trial_err[:, n_train + j] = (e_sum / trial_steps).numpy()
            wn_exp[:, n_train + j], wn_mst[:, n_train + j] = _norm(W_exp), _norm(W_mst)
        diverged |= _diverged(W_exp, W_mst, x)

    n_steps_test = max(n_test * trial_steps, 1)
    dev = {k: (v / n_steps_test).numpy() for k, v in dev_sum.items()}
    div = diverged.numpy()
    for v in dev.values():
        v[div] = np.nan
    return ReservoirResult(
        seeds=seeds,
        deviation=np.where(full_rows, dev["full"], dev["mastery"]),
        deviation_full=dev["full"],
        deviation_mastery=dev["mastery"],
        trial_error=trial_err,
        trial_error_mastery=trial_err_m,
        w_exp_norm=wn_exp,
        w_mst_norm=wn_mst,
        gate_open=gate_open,
        drawn=drawn,
        target=f[::record_every].numpy(),
        diverged=div,
        wall_s=time.perf_counter() - t0,
        steps=n_trials * trial_steps,
    )


def _native_trial(
    steps_c, noise: NoiseStream, f: Tensor, step0: int, T: int, state: tuple, zs: Tensor | None
) -> tuple[np.ndarray, np.ndarray]:
    """One training trial in the C kernel (:class:`.native.NativeSteps`), the state tensors updated in place; returns
    the step errors ``E`` and mastery-readout errors ``EM`` ``(T, B)``."""
    E = np.empty((T, steps_c.B), dtype=steps_c.np_dtype)
    EM = np.empty_like(E)
    steps_c.g_sum.zero_()
    t = 0
    while t < T:
        xi = noise.take(T - t)
        m = xi.shape[0]
        steps_c.run(
            step0 + t, xi, f[t : t + m], *state, E[t : t + m], EM[t : t + m], zs[t : t + m] if zs is not None else None
        )
        t += m
    return E, EM


def _sequential_sum(E: np.ndarray) -> Tensor:
    """``0 + E[0] + E[1] + ...`` over the rows of ``E`` ``(T, B)``, one addition at a time in ``E``'s precision: the
    values of a per-step ``total += e``."""
    return torch.from_numpy(np.add.accumulate(E, 0)[-1].copy())


def _per_element(m: Tensor | None, X: np.ndarray, step: Callable) -> Tensor:
    """``m <- step(m, x)`` over the rows ``x`` of ``X`` ``(T, ...)``, element by element, from ``m`` (None: the first
    row), each operation rounded once in ``X``'s precision (Python floats for float64, NumPy float32 scalars for
    float32): the values a per-step tensor update gives."""
    f32 = X.dtype == np.float32
    cols = X.reshape(len(X), -1)
    start = None if m is None else m.reshape(-1).numpy()
    out = []
    for j in range(cols.shape[1]):
        col = list(cols[:, j]) if f32 else cols[:, j].tolist()
        if start is None:
            mj, col = col[0], col[1:]
        else:
            mj = start[j] if f32 else float(start[j])
        for x in col:
            mj = step(mj, x)
        out.append(mj)
    return torch.from_numpy(np.array(out, dtype=X.dtype).reshape(X.shape[1:]))


def _trace_rows(m: Tensor, X: np.ndarray, k: float) -> Tensor:
    """``m <- m + k (x - m)`` over the rows ``x`` of ``X`` ``(T, ...)`` from ``m`` (:func:`_per_element`)."""
    k = np.float32(k) if X.dtype == np.float32 else k
    return _per_element(m, X, lambda mj, x: mj + k * (x - mj))


def _running_mse(m: Tensor | None, E: np.ndarray) -> Tensor:
    r""":math:`\overline{mse} \leftarrow 0.9998\,\overline{mse} + 0.0002\,e` over the rows ``e`` of ``E``
    ``(T, B)`` from ``m`` (None: the first row; :func:`_per_element`)."""
    a, b = (np.float32(0.9998), np.float32(0.0002)) if E.dtype == np.float32 else (0.9998, 0.0002)
    return _per_element(m, E, lambda mj, e: a * mj + b * e)


def _rule_params(ex: Exploration, gda: Tensor, constants, B: int, dtype):
    """``theta`` ``(B, R)`` = lr * g_DA for a linear rule; the constants ``{name: (B,)}`` for a general one."""
    if ex.rule.is_linear:
        if constants:
            raise ConfigError(f"rule_constants given, but rule {ex.rule.name!r} is linear (no constants).")
        return (ex.lr * gda).unsqueeze(-1).expand(B, ex.rule.n_params).to(dtype)
    names = [c.name for c in ex.rule.constants]
    missing = sorted(set(names) - set(constants or {}))
    if missing:
        raise ConfigError(f"Rule {ex.rule.name!r} needs rule_constants {missing} (a number or one per seed).")
    return {n: _per_row(constants[n], B, f"rule_constants[{n!r}]").to(dtype) for n in names}


def _per_row(value, B: int, name: str) -> Tensor:
    if np.ndim(value) == 0:
        return torch.full((B,), float(value), dtype=torch.float64)
    if len(value) != B:
        raise ConfigError(f"{name} has {len(value)} values for {B} seeds; give one per seed or one for all.")
    return torch.as_tensor([float(v) for v in value], dtype=torch.float64)


def _norm(W: Tensor) -> np.ndarray:
    return torch.linalg.matrix_norm(W).numpy()


def _diverged(W_exp: Tensor, W_mst: Tensor, x: Tensor) -> Tensor:
    big = torch.stack([W_exp.abs().amax((1, 2)), W_mst.abs().amax((1, 2)), x.abs().amax(1)], -1)
    return ~(torch.isfinite(big).all(-1) & (big < DIVERGENCE_BOUND).all(-1))
