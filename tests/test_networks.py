"""Tests of rulesearch.networks.feedforward: configuration, initialization, forward pass, error pathways, metrics."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from rulesearch.errors import ConfigError, ShapeError
from rulesearch.networks.feedforward import (
    ACTIVATIONS,
    DIGITS,
    FEEDBACK_MODES,
    PAPER,
    Network,
    alignment_angles,
    backprop_errors,
    errors,
    feedback_matrices,
    forward,
    init_params,
    make_targets,
    orthonormality,
    query_loss_accuracy,
    sample_loss,
)

F64 = torch.float64
SMALL = (6, 5, 4, 3)


def _act(net, z):
    return {
        "softplus": lambda z: F.softplus(z, beta=net.beta),
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
        "linear": lambda z: z,
    }[net.activation](z)


def _autograd_output_and_dz(net, weights, x, y):
    """Reference: per-sample dL/dz_l for every layer via autograd (einsum forward, torch losses)."""
    zs = []
    h = x
    weights = [w.detach().requires_grad_() for w in weights]
    for i, w in enumerate(weights):
        z = torch.einsum("bij,bj->bi", w, h)
        z.retain_grad()
        zs.append(z)
        h = _act(net, z) if i < len(weights) - 1 else z
    if net.loss == "ce":
        loss = F.cross_entropy(h, y, reduction="sum")
    else:
        target = F.one_hot(y, net.n_out).to(h.dtype) if not y.is_floating_point() else y
        loss = 0.5 * ((h - target) ** 2).sum()
    loss.backward()
    return [z.grad for z in zs]


# ---- configuration -----------------------------------------------------------------------------------------


def test_presets():
    assert Network().sizes == PAPER
    assert Network(sizes=DIGITS).n_layers == 5
    assert PAPER == (784, 170, 130, 100, 70, 47)
    assert DIGITS == (64, 170, 130, 100, 70, 10)


def test_sizes_list_coerced_and_properties():
    net = Network(sizes=[6, 5, 3])
    assert net.sizes == (6, 5, 3)
    assert (net.n_in, net.n_out, net.n_layers) == (6, 3, 2)
    assert net.weight_shapes == ((5, 6), (3, 5))
    assert net.bounds[0] == pytest.approx(math.sqrt(6 / 11))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "relu"}, "relu'' = 0"),
        ({"activation": "swish"}, "Allowed values: 'softplus', 'tanh'"),
        ({"feedback": "kp"}, "Allowed values: 'bp', 'fa', 'sign', 'dfa', 'plastic'"),
        ({"feedback": "sgn"}, "Did you mean 'sign'"),
        ({"loss": "nll"}, "Allowed values: 'ce', 'mse'"),
        ({"init": "he"}, "Allowed values: 'xavier'"),
        ({"beta": 0.0}, "beta must be a finite number > 0"),
        ({"gain": float("nan")}, "gain must be"),
        ({"sizes": (6,)}, "at least two positive integers"),
        ({"sizes": (6, 0, 3)}, "at least two positive integers"),
        ({"sizes": "6,3"}, "sequence of layer widths"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Network(**{"sizes": SMALL, **kwargs})


def test_dict_round_trip():
    net = Network(sizes=SMALL, activation="tanh", feedback="sign", loss="mse", gain=0.1)
    assert Network.from_dict(net.to_dict()) == net
    with pytest.raises(ConfigError, match="Did you mean 'feedback'"):
        Network.from_dict({"sizes": SMALL, "feedbak": "fa"})


# ---- initialization ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", FEEDBACK_MODES)
def test_init_shapes_and_bounds(mode):
    net = Network(sizes=SMALL, feedback=mode, gain=0.5, feedback_gain=2.0)
    ws, fbs = init_params(net, 3, 1, [0, 1, 2], dtype=F64)
    assert [tuple(w.shape) for w in ws] == [(3, 5, 6), (3, 4, 5), (3, 3, 4)]
    for w, bound in zip(ws, net.bounds):
        assert w.dtype == F64 and w.abs().max() <= bound
        assert w.abs().max() > 0.5 * bound
    if mode in ("bp", "sign"):
        assert fbs == []
    elif mode == "dfa":
        assert [tuple(f.shape) for f in fbs] == [(3, 3, 6), (3, 3, 5), (3, 3, 4)]
    else:
        assert [tuple(f.shape) for f in fbs] == [tuple(w.shape) for w in ws]
    for f, bound in zip(fbs, net.feedback_bounds):
        assert f.abs().max() <= bound


def test_init_batched_equals_separate_and_dtype_consistent():
    net = Network(sizes=SMALL, feedback="fa")
    ws, fbs = init_params(net, 7, 2, [4, 9, 1], dtype=F64)
    for j, k in enumerate([4, 9, 1]):
        w1, f1 = init_params(net, 7, 2, [k], dtype=F64)
        for a, b in zip(ws + fbs, w1 + f1):
            assert torch.equal(a[j], b[0])
    w32, _ = init_params(net, 7, 2, [4, 9, 1], dtype=torch.float32)
    assert torch.equal(w32[0], ws[0].float())
    w_other, _ = init_params(net, 7, 3, [4, 9, 1], dtype=F64)
    assert not torch.equal(w_other[0], ws[0])


def test_bp_and_fa_share_initial_weights():
    wa, _ = init_params(Network(sizes=SMALL, feedback="bp"), 0, 0, [0, 1], dtype=F64)
    wb, _ = init_params(Network(sizes=SMALL, feedback="fa"), 0, 0, [0, 1], dtype=F64)
    for a, b in zip(wa, wb):
        assert torch.equal(a, b)


def test_xavier_normal_init():
    net = Network(sizes=(200, 300, 3), init="xavier_normal")
    ws, _ = init_params(net, 0, 0, [0], dtype=F64)
    assert ws[0].std().item() == pytest.approx(math.sqrt(2 / 500), rel=0.05)


# ---- forward and errors ------------------------------------------------------------------------------------


def _setup(gen, mode="bp", activation="softplus", loss="ce", b=3, sizes=SMALL):
    net = Network(sizes=sizes, feedback=mode, activation=activation, loss=loss)
    ws, fbs = init_params(net, 0, 0, range(b), dtype=F64)
    x = 0.5 * torch.rand(b, sizes[0], generator=gen, dtype=F64)
    y = torch.randint(sizes[-1], (b,), generator=gen)
    return net, ws, fbs, x, y


def test_forward_shapes_and_batched_samples(gen):
    net, ws, _, x, _ = _setup(gen)
    ys = forward(net, ws, x)
    assert [tuple(y.shape) for y in ys] == [(3, 6), (3, 5), (3, 4), (3, 3)]
    torch.testing.assert_close(ys[-1].sum(-1), torch.ones(3, dtype=F64))
    xs = torch.stack([x, 2 * x], dim=1)  # (B, N, n_in)
    ys2 = forward(net, ws, xs)
    torch.testing.assert_close(ys2[-1][:, 0], ys[-1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_bp_errors_equal_autograd(gen, activation, loss):
    net, ws, _, x, y = _setup(gen, "bp", activation, loss)
    es = errors(net, ws, [], forward(net, ws, x), y)
    ref = _autograd_output_and_dz(net, ws, x, y)
    for got, want in zip(es[1:], ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # e_0: the input treated as a softplus activity
    e0 = torch.einsum("bi,bij->bj", es[1], ws[0]) * (1 - torch.exp(-net.beta * x))
    torch.testing.assert_close(es[0], e0, rtol=1e-12, atol=1e-15)


def test_mse_float_targets(gen):
    net, ws, _, x, _ = _setup(gen, "bp", loss="mse")
    target = torch.randn(3, 3, generator=gen, dtype=F64)
    es = errors(net, ws, [], forward(net, ws, x), target)
    ref = _autograd_output_and_dz(net, ws, x, target)
    torch.testing.assert_close(es[-1], ref[-1], rtol=1e-12, atol=0)
    torch.testing.assert_close(sample_loss(net, ws, x, target), 0.5 * ((forward(net, ws, x)[-1] - target) ** 2).sum(-1))


def test_fa_errors_use_feedback(gen):
    net, ws, fbs, x, y = _setup(gen, "fa")
    ys = forward(net, ws, x)
    es = errors(net, ws, fbs, ys, y)
    torch.testing.assert_close(es[-1], ys[-1] - F.one_hot(y, 3).to(F64))
    for i in range(3):
        want = torch.einsum("bi,bij->bj", es[i + 1], fbs[i])
        d = (1 - torch.exp(-net.beta * ys[i])) if i > 0 else (1 - torch.exp(-net.beta * x))
        torch.testing.assert_close(es[i], want * d, rtol=1e-12, atol=1e-15)
    # fa with fb = W is bp
    es_bp = backprop_errors(net, ws, ys, y)
    es_same = errors(net, ws, [w.clone() for w in ws], ys, y)
    for a, b in zip(es_bp, es_same):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_dfa_errors(gen):
    net, ws, ds, x, y = _setup(gen, "dfa")
    ys = forward(net, ws, x)
    es = errors(net, ws, ds, ys, y)
    for i in range(3):
        d = (1 - torch.exp(-net.beta * ys[i])) if i > 0 else (1 - torch.exp(-net.beta * x))
        torch.testing.assert_close(es[i], torch.einsum("bi,bij->bj", es[-1], ds[i]) * d, rtol=1e-12, atol=1e-15)


def test_sign_feedback_from_current_weights(gen):
    net, ws, _, x, y = _setup(gen, "sign")
    mats = feedback_matrices(net, ws, [])
    for m, w, bound in zip(mats, ws, net.feedback_bounds):
        torch.testing.assert_close(m, torch.sign(w) * bound)
    ws2 = [-w for w in ws]
    assert torch.equal(feedback_matrices(net, ws2, [])[1], -mats[1])
    es = errors(net, ws, [], forward(net, ws, x), y)
    ys = forward(net, ws, x)
    torch.testing.assert_close(es[2], torch.einsum("bi,bij->bj", es[3], mats[2]) * (1 - torch.exp(-10 * ys[2])))


def test_silu_errors_with_and_without_z(gen):
    net, ws, _, x, y = _setup(gen, "bp", "silu")
    ys = forward(net, ws, x)
    zs = [None] + [torch.einsum("bij,bj->bi", w, a) for w, a in zip(ws, ys[:-1])]
    a = errors(net, ws, [], ys, y)
    b = errors(net, ws, [], ys, y, z=zs)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=0)


# ---- validation --------------------------------------------------------------------------------------------


def test_bad_inputs(gen):
    net, ws, fbs, x, y = _setup(gen, "fa")
    with pytest.raises(ShapeError, match="n_in = 6"):
        forward(net, ws, torch.rand(3, 7, dtype=F64))
    with pytest.raises(ShapeError, match="weights must be a list of 3"):
        forward(net, ws[:2], x)
    with pytest.raises(ShapeError, match=r"weights\[1\] has shape"):
        forward(net, [ws[0], ws[1].transpose(1, 2), ws[2]], x)
    with pytest.raises(ShapeError, match="feedback must be a list of 3"):
        errors(net, ws, [], forward(net, ws, x), y)
    with pytest.raises(ConfigError, match=r"labels range over \[0, 5\].*n_out = 3"):
        make_targets(net, torch.tensor([0, 5]), F64)
    with pytest.raises(ConfigError, match="labels range over"):
        make_targets(net, torch.tensor([-1, 0]), F64)
    with pytest.raises(ShapeError, match="loss 'ce' needs integer class labels"):
        make_targets(net, torch.rand(2, 3, dtype=F64), F64)
    with pytest.raises(ShapeError, match="expected"):
        make_targets(dataclasses.replace(net, loss="mse"), torch.rand(2, 4, dtype=F64), F64)


# ---- metrics -----------------------------------------------------------------------------------------------


def _query(gen, b=3, n=20, sizes=SMALL):
    return 0.5 * torch.rand(b, n, sizes[0], generator=gen, dtype=F64), torch.randint(sizes[-1], (b, n), generator=gen)


def test_evaluate_matches_cross_entropy(gen):
    net, ws, _, _, _ = _setup(gen, "fa")
    xq, yq = _query(gen)
    loss, acc = query_loss_accuracy(net, ws, xq, yq)
    logits = torch.einsum(
        "bij,bnj->bni",
        ws[2],
        F.softplus(
            torch.einsum("bij,bnj->bni", ws[1], F.softplus(torch.einsum("bij,bnj->bni", ws[0], xq), beta=10)),
            beta=10,
        ),
    )
    for e in range(3):
        torch.testing.assert_close(loss[e], F.cross_entropy(logits[e], yq[e]), rtol=1e-12, atol=0)
        torch.testing.assert_close(acc[e], (logits[e].argmax(-1) == yq[e]).double().mean())


def test_alignment_angles(gen):
    xq, yq = _query(gen)
    net, ws, fbs, _, _ = _setup(gen, "fa")
    a_bp, a_bp_ps = alignment_angles(dataclasses.replace(net, feedback="bp"), ws, [], xq, yq)
    assert a_bp.shape == (3, 2) and a_bp_ps.shape == (3, 2)
    assert a_bp.abs().max() < 1e-5 and a_bp_ps.abs().max() < 1e-5
    a_fa, a_fa_ps = alignment_angles(net, ws, fbs, xq, yq)
    assert ((a_fa > 1) & (a_fa < 179)).all()
    # reference: arccos of the cosine of query-means, and mean of per-sample angles
    ys = forward(net, ws, xq)
    e_fb = errors(net, ws, fbs, ys, yq)
    e_bp = backprop_errors(net, ws, ys, yq)
    for i in (1, 2):
        cos = F.cosine_similarity(e_fb[i].mean(1), e_bp[i].mean(1), dim=-1)
        torch.testing.assert_close(a_fa[:, i - 1], torch.rad2deg(torch.arccos(cos)), rtol=1e-9, atol=1e-9)
        cps = F.cosine_similarity(e_fb[i], e_bp[i], dim=-1)
        torch.testing.assert_close(a_fa_ps[:, i - 1], torch.rad2deg(torch.arccos(cps)).mean(-1), rtol=1e-9, atol=1e-9)


def test_orthonormality(gen):
    xq, _ = _query(gen)
    net, ws, _, _, _ = _setup(gen, "fa")
    ew = orthonormality(net, ws, xq)
    assert ew.shape == (3, 3) and (ew > 0).all()
    ys = forward(net, ws, xq)
    for i, w in enumerate(ws):
        z = torch.einsum("bij,bnj->bni", w, ys[i])
        ybar = torch.einsum("bij,bni->bnj", w, ys[i + 1])
        want = ((z - torch.einsum("bij,bnj->bni", w, ybar)) ** 2).sum(-1).mean(-1)
        torch.testing.assert_close(ew[:, i], want, rtol=1e-12, atol=0)
    # orthonormal rows and identity activation: E_W = 0 on the hidden layers
    lin = Network(sizes=(6, 4, 3), activation="linear")
    q = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=F64))[0].T  # (4, 6), orthonormal rows
    w2 = torch.randn(1, 3, 4, generator=gen, dtype=F64)
    ew_lin = orthonormality(lin, [q[None], w2], xq[:1])
    assert ew_lin[0, 0] < 1e-20
