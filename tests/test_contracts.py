"""The extension contracts, each exercised by adding a toy implementation through the public API only (the recipes of
ARCHITECTURE.md): a network (2-layer linear, fixed random feedback), a task (a linear teacher with float targets per
step), an objective (query loss plus a weight penalty), a learner (per-layer learning rates in log space) and a
distillation backend (least squares on a fixed library)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import sympy as sp
import torch

import rulesearch as rs
from rulesearch.distill import Candidate, DistillBackend, get_backend
from rulesearch.errors import ConfigError, ShapeError
from rulesearch.inner import run_episodes
from rulesearch.networks import Activity, LayeredNetwork
from rulesearch.tasks import Task, episode_generator
from rulesearch.train import (
    DiscoverConfig,
    Learner,
    MetaConfig,
    NetworkConfig,
    Objective,
    Problem,
    QueryLoss,
    TaskConfig,
    Trainer,
    resolve_rule,
)

D = torch.float64


# ---- a network: z_l = W_l y_{l-1}, y_l = z_l, MSE loss, errors through fixed random B_l --------------------------


@dataclasses.dataclass(frozen=True)
class LinearFA(LayeredNetwork):
    sizes: tuple = (4, 3, 2)

    @property
    def feedback_shapes(self):
        return self.weight_shapes

    def init_episodes(self, seed, t, ks, dtype=torch.float32, device=None):
        ws, fbs = [[] for _ in self.weight_shapes], [[] for _ in self.weight_shapes]
        for k in ks:
            g = episode_generator(seed, t, k, "init")
            for lst in (ws, fbs):
                for i, shape in enumerate(self.weight_shapes):
                    lst[i].append(0.3 * torch.randn(shape, generator=g, dtype=D))
        return [torch.stack(w).to(dtype) for w in ws], [torch.stack(f).to(dtype) for f in fbs]

    def targets(self, y, dtype, batch_shape=None):
        if not y.is_floating_point() or y.shape[-1] != self.n_out:
            raise ShapeError(f"LinearFA needs float targets (..., {self.n_out}); received {tuple(y.shape)}.")
        return y.to(dtype)

    def forward(self, weights, x):
        ys, zs = [x], [None]
        for w in weights:
            z = torch.einsum("bij,b...j->b...i", w, ys[-1])
            ys.append(z)
            zs.append(z)
        return Activity(ys, zs)

    def loss_per_sample(self, act, target):
        return 0.5 * (act.ys[-1] - target).pow(2).sum(-1)

    def feedback_matrices(self, weights, feedback, layers):
        return [feedback[i] if i in layers else None for i in range(self.n_layers)]

    def propagate(self, act, e_out, mats, layers):
        es = [None] * (self.n_layers + 1)
        es[-1] = e_out
        for i in layers:  # e_i = B_i^T e_{i+1} (fb in W's layout: e_{i+1}^T fb); linear: sigma' = 1
            es[i] = torch.einsum("b...i,bij->b...j", es[i + 1], mats[i])
        return es


# ---- a task: per episode a random linear teacher y = A x, one sample per step -----------------------------------


class LinearTeacher(Task):
    def __init__(self, n_in=4, n_out=2, n_train=12, n_query=6):
        self.n_in, self.n_out, self.n_train, self.n_query = n_in, n_out, n_train, n_query

    @property
    def n_inputs(self):
        return self.n_in

    @property
    def n_outputs(self):
        return self.n_out

    def sample(self, seed, t, ks):
        ks = list(range(ks)) if isinstance(ks, int) else list(ks)
        xs, ys = [], []
        for k in ks:
            g = episode_generator(seed, t, k, "task")
            A = torch.randn(self.n_out, self.n_in, generator=g, dtype=D) / self.n_in**0.5
            x = torch.randn(self.n_train + self.n_query, self.n_in, generator=g, dtype=D)
            xs.append(x)
            ys.append(x @ A.T)
        x, y = torch.stack(xs), torch.stack(ys)
        n = self.n_train
        return SimpleNamespace(
            x_train=x[:, :n], y_train=y[:, :n], x_query=x[:, n:], y_query=y[:, n:], seed=seed, t=t, ks=tuple(ks)
        )


def hand_loop(net, batch, rule, theta, weights, feedback):
    """The online loop written out: W_l <- W_l + rule(pre, post, err, pre_err, w) with FA errors."""
    ws = [w.clone() for w in weights]
    for s in range(batch.x_train.shape[1]):
        x, target = batch.x_train[:, s], batch.y_train[:, s]
        ys = [x]
        for w in ws:
            ys.append(torch.einsum("bij,bj->bi", w, ys[-1]))
        es = [None] * 3
        es[2] = ys[2] - target
        es[1] = torch.einsum("bi,bij->bj", es[2], feedback[1])
        es[0] = torch.einsum("bi,bij->bj", es[1], feedback[0])
        for i in range(2):
            sig = {"pre": ys[i], "post": ys[i + 1], "err": es[i + 1], "pre_err": es[i], "w": ws[i]}
            ws[i] = ws[i] + rule(sig, theta)
    q = [batch.x_query]
    for w in ws:
        q.append(torch.einsum("bij,bnj->bni", w, q[-1]))
    return 0.5 * (q[-1] - batch.y_query).pow(2).sum(-1).mean(-1)


@pytest.mark.parametrize("method", ["auto", "autograd"])
def test_toy_network_and_task_through_the_contracts(method):
    net, task = LinearFA(), LinearTeacher()
    batch = task.sample(seed=3, t=0, ks=2)
    update = rs.compile_rule(rs.bio)  # reads pre, post, err, pre_err (e_0) and the weights (Oja's W^T y)
    theta = torch.tensor([0.05, -0.02, 0.01], dtype=D, requires_grad=True)
    res = run_episodes(net, batch, update, theta, seed=3, metrics=True, method=method)
    weights, feedback = net.init_episodes(3, 0, [0, 1], dtype=D)
    want = hand_loop(net, batch, update, theta, weights, feedback)
    torch.testing.assert_close(res.loss, want, rtol=1e-12, atol=0)
    assert res.accuracy.isnan().all() and res.angles.shape == (2, 0)  # regression; default diagnostics
    (g,) = torch.autograd.grad(res.loss.sum(), theta)
    (g_want,) = torch.autograd.grad(want.sum(), theta)
    torch.testing.assert_close(g, g_want, rtol=1e-10, atol=0)


def test_toy_network_has_no_fast_path():
    net, task = LinearFA(), LinearTeacher()
    with pytest.raises(ConfigError, match="method='adjoint' needs"):
        run_episodes(net, task.sample(0, 0, 1), rs.compile_rule(rs.f0), torch.tensor(0.1, dtype=D), method="adjoint")


# ---- a learner and an objective, trained by the Trainer on a tiny teacher task ---------------------------------

TASK = TaskConfig(dataset="teacher", options={"n_in": 6, "n_classes": 3, "n_samples": 200}, M=3, K=4, Q=2)
NET = NetworkConfig(sizes=(6, 5, 3), feedback="fa")


def tiny_config(rule="f0", **meta):
    m = dict(episodes=1, l1=0.0, dtype="float64", compare=False, threads=1, lr=1e-2)
    m.update(meta)
    return DiscoverConfig(rule=rule, task=TASK, network=NET, meta=MetaConfig(**m))


class LogRates(Learner):
    """Per-layer learning rates of the pseudo-gradient rule f0, meta-learned in log space: dW_l = exp(s_l) (-e x^T)."""

    def __init__(self, n_layers, lr0=0.01):
        self.n_layers, self.lr0 = n_layers, lr0
        self._update = rs.compile_rule(rs.f0)

    def init(self, seeds, dtype, device):
        return {"log_lr": torch.full((len(seeds), self.n_layers), math.log(self.lr0), dtype=dtype, device=device)}

    def update(self, net):
        return self._update

    def layer_params(self, expanded):
        return [expanded["log_lr"][:, layer].exp().unsqueeze(-1) for layer in range(self.n_layers)]

    def columns(self, params, s):
        return {f"lr.{layer}": float(params["log_lr"][s, layer].exp()) for layer in range(self.n_layers)}

    def trained(self, params, s=None):
        return params["log_lr"].exp()[0 if s is None else s]


def test_toy_learner_trains_through_problem_and_trainer():
    cfg = tiny_config(per_layer=True, init=(0.01,))
    log_tr = Trainer(Problem(cfg, LogRates(2)))
    lin_tr = Trainer(Problem(cfg, resolve_rule("f0")))  # the same rule with per-layer coefficients theta_l
    log_st, lin_st = log_tr.fresh_state(), lin_tr.fresh_state()
    (log_row,), (lin_row,) = log_tr.step(log_st), lin_tr.step(lin_st)
    assert log_row["meta_loss"] == pytest.approx(lin_row["meta_loss"], rel=1e-12)  # the same episodes and rates
    assert set(log_row) >= {"lr.0", "lr.1"} and not any(k.startswith("theta") for k in log_row)
    # d/ds = theta d/dtheta (theta > 0): Adam's first step moves s and theta the same way, by lr each
    d_log = log_st.params["log_lr"][0] - math.log(0.01)
    d_lin = lin_st.params["theta"][0, :, 0] - 0.01
    assert torch.equal(d_log.sign(), d_lin.sign()) and bool((d_log.abs() - 1e-2).abs().max() < 1e-6)


def test_toy_network_and_task_meta_train_through_problem_and_trainer():
    """A Problem of one's own task and network: the Trainer's meta-loss is the mean query loss of the hand loop."""
    cfg = tiny_config(meta_batch=2)
    trainer = Trainer(Problem(cfg, resolve_rule("bio"), task=LinearTeacher(), network=LinearFA()))
    st = trainer.fresh_state()
    trainer.validate(st)
    theta = st.params["theta"][0].clone()
    (row,) = trainer.step(st)
    batch = LinearTeacher().sample(cfg.meta.seed, 0, [0, 1])
    weights, feedback = LinearFA().init_episodes(cfg.meta.seed, 0, [0, 1], dtype=D)
    want = hand_loop(LinearFA(), batch, rs.compile_rule(rs.bio), theta, weights, feedback)
    assert row["meta_loss"] == pytest.approx(float(want.mean()), rel=1e-12)
    assert not torch.equal(st.params["theta"][0], theta) and math.isnan(row["meta_accuracy"])


class WeightPenalty(Objective):
    """The query loss plus ``c sum_l ||W_l||^2`` of the adapted weights."""

    name = "penalized"

    def __init__(self, c):
        self.c, self.last = c, None

    def __call__(self, result, batch):
        penalty = sum(w.pow(2).sum((1, 2)) for w in result.weights)
        self.last = penalty.detach()
        return result.loss + self.c * penalty


def test_toy_objective_sets_the_meta_loss_and_its_gradient():
    rule = rs.Rule([rs.Term("F0", -rs.err * rs.pre), rs.Term("decay", -rs.w)], "f0+decay")
    cfg = tiny_config(init=(0.01, 0.0), meta_batch=2)
    moves = {}
    for c in (-1.0, 1.0):
        objective = WeightPenalty(c)
        trainer = Trainer(Problem(cfg, rule), objective=objective)
        st = trainer.fresh_state()
        (row,) = trainer.step(st)
        assert row["meta_loss"] == pytest.approx(row["query_loss"] + c * float(objective.last.mean()), rel=1e-12)
        moves[c] = float(st.params["theta"][0, 1])  # the decay's coefficient after one step
    assert moves[1.0] > 0 > moves[-1.0]  # penalizing weights raises the decay; rewarding them lowers it
    assert repr(QueryLoss()) == "QueryLoss()"


# ---- a distillation backend: least squares over the features and their pairwise products -----------------------


def test_toy_backend_registered_and_fitted():
    from rulesearch.distill import BACKENDS

    try:

        class PairwiseLSQ(DistillBackend, name="toy-pairwise-lsq"):
            def __init__(self, tol: float = 1e-8):
                self.tol = tol

            def _search(self, X, y, weights):
                feats = self.features_
                cols = [(f, X[:, i]) for i, f in enumerate(feats)]
                cols += [
                    (feats[i] * feats[j], X[:, i] * X[:, j]) for i in range(len(feats)) for j in range(i, len(feats))
                ]
                A = np.stack([c for _, c in cols], 1) * np.sqrt(weights)[:, None]
                coef = np.linalg.lstsq(A, y * np.sqrt(weights), rcond=None)[0]
                expr = sum(float(c) * e for (e, _), c in zip(cols, coef) if abs(c) > self.tol)
                pred = np.stack([c for _, c in cols], 1) @ coef
                loss = float(np.average((pred - y) ** 2, weights=weights))
                return [Candidate(expr, 2 * len(expr.args), loss, len(expr.args), "toy")]

        rng = np.random.default_rng(0)
        X = rng.normal(size=(300, 3))
        y = 0.7 * X[:, 0] * X[:, 1] - 0.2 * X[:, 2]
        backend = get_backend("toy-pairwise-lsq").fit(X, y, ["err", "pre", "post"])
        assert len(sp.Add.make_args(backend.best_.expr)) == 2  # exactly the two planted terms
        np.testing.assert_allclose(backend.predict(X), y, atol=1e-9)
        assert backend.get_params() == {"tol": 1e-8} and backend.clone().tol == 1e-8
    finally:
        BACKENDS.pop("toy-pairwise-lsq", None)
