"""Typed signals, operators and role inference (rulesearch.lang.signals)."""

from __future__ import annotations

import pickle

import pytest
import sympy as sp

from rulesearch.errors import InvalidRuleError
from rulesearch.lang.signals import (
    BASE_SIGNALS,
    ROLES,
    Bilinear,
    Constant,
    Contract,
    LayerSum,
    OrderedContract,
    Signal,
    StateDef,
    base_needs,
    bcm_threshold,
    bilinear,
    derived,
    err,
    expand_derived,
    fb,
    join_roles,
    layer_sum,
    loss,
    mod,
    post,
    pre,
    pre_err,
    reward,
    reward_baseline,
    role_of,
    sanger,
    signals_in,
    state,
    state_signals,
    trace,
    w,
    wT,
    wv,
)

# ---------------------------------------------------------------------------------------------------------------
# Base signals and roles


def test_base_signals_have_documented_roles():
    roles = {n: s.role for n, s in BASE_SIGNALS.items()}
    assert roles == {
        "pre": "pre",
        "post": "post",
        "err": "post",
        "pre_err": "pre",
        "w": "synapse",
        "fb": "synapse",
        "mod": "global",
        "reward": "global",
        "loss": "global",
    }
    assert all(s.is_base and not s.is_state and s.is_real for s in BASE_SIGNALS.values())


@pytest.mark.parametrize(
    "roles, expected",
    [
        ((), "global"),
        (("global", "global"), "global"),
        (("post",), "post"),
        (("global", "pre"), "pre"),
        (("post", "post"), "post"),
        (("post", "pre"), "synapse"),
        (("pre", "post", "global"), "synapse"),
        (("synapse", "global"), "synapse"),
        (("post", "synapse"), "synapse"),
    ],
)
def test_join_roles(roles, expected):
    assert join_roles(*roles) == expected


LEGAL = [
    ("y_i + x_j", post + pre, "synapse"),
    ("e_i x_j", err * pre, "synapse"),
    ("2 mod", 2 * mod, "global"),
    ("number", sp.Rational(1, 2), "global"),
    ("pi", sp.pi, "global"),
    ("tanh(W) x", sp.tanh(w) * pre, "synapse"),
    ("exp(y)", sp.exp(post), "post"),
    ("sqrt(x)", sp.sqrt(pre), "pre"),
    ("y^(3/2)", post ** sp.Rational(3, 2), "post"),
    ("x^mod", pre**mod, "pre"),
    ("Abs(e)", sp.Abs(err), "post"),
    ("Max(y, x)", sp.Max(post, pre), "synapse"),
    ("Piecewise", sp.Piecewise((post, pre > 0), (0, True)), "synapse"),
    ("W^T y", wT(post), "pre"),
    ("W^T e through fb", wT(err, fb), "pre"),
    ("W x", wv(pre), "post"),
    ("y_i (W x)_i", post * wv(pre), "post"),
    ("sum_k y_k", layer_sum(post), "global"),
    ("sum_k (x e')_k", layer_sum(pre * pre_err), "global"),
    ("y^T W e'", bilinear(post, pre_err), "global"),
    ("sanger", sanger(), "synapse"),
    ("sanger(e)", sanger(err), "synapse"),
    ("nested", layer_sum(wT(post)) * err * pre, "synapse"),
]


@pytest.mark.parametrize("expr, role", [(e, r) for _, e, r in LEGAL], ids=[i for i, _, _ in LEGAL])
def test_role_of_legal(expr, role):
    assert role_of(expr) == role


ILLEGAL = [
    ("contract global", lambda: wT(mod), ["Contract(w, mod)", "'global'"]),
    ("contract synapse", lambda: wT(w), ["Contract(w, w)", "'synapse'"]),
    ("contract synapse product", lambda: wT(post * pre), ["post*pre", "'synapse'"]),
    ("contract through a vector", lambda: wT(post, pre), ["Contract(pre, post)", "matrix argument pre"]),
    ("contract through a product", lambda: wT(post, 2 * w), ["matrix argument 2*w"]),
    ("layer sum of synapse", lambda: layer_sum(w), ["LayerSum(w)", "'synapse'"]),
    ("layer sum of synapse product", lambda: layer_sum(post * pre), ["LayerSum(post*pre)", "'synapse'"]),
    ("layer sum of global", lambda: layer_sum(mod), ["LayerSum(mod)", "'global'"]),
    ("bilinear of two post vectors", lambda: bilinear(post, err), ["Bilinear(post, w, err)", "('post', 'post')"]),
    ("bilinear of a synapse", lambda: bilinear(post, w), ["Bilinear(post, w, w)", "'synapse'"]),
    ("sanger of pre", lambda: sanger(pre), ["OrderedContract(pre, w)", "'pre'"]),
    ("unknown symbol", lambda: sp.Symbol("x") * pre, ["Unknown symbol x", "Constant"]),
    ("undefined function", lambda: sp.Function("f")(pre), ["Undefined function f(pre)"]),
    ("matrix", lambda: sp.Matrix([[pre, post]]), ["Matrix"]),
    ("non-expression", lambda: 3, ["got int"]),
    ("non-expression str", lambda: "pre", ["got str"]),
    ("boolean", lambda: sp.And(pre > 0, post > 0), ["got And"]),
    ("integral", lambda: sp.Integral(pre, (pre, 0, 1)), ["Unsupported node Integral"]),
    ("piecewise with And", lambda: sp.Piecewise((pre, sp.And(pre > 0, post > 0)), (0, True)), ["comparison"]),
    ("nan", lambda: sp.nan * pre, ["Non-finite number nan"]),
    ("infinity", lambda: sp.oo * pre, ["Non-finite number oo"]),
    ("Float beyond float64", lambda: sp.Float("1e400") * pre, ["Non-finite number 1.000E+400", "float64"]),
    ("Integer beyond float64", lambda: -(sp.Integer(10) ** 309) * pre, ["Non-finite number -1.000E+309"]),
    ("Rational beyond float64", lambda: sp.Rational(10**400, 7) * pre, ["Non-finite number 1.429E+399"]),
]


@pytest.mark.parametrize("make, fragments", [(m, f) for _, m, f in ILLEGAL], ids=[i for i, _, _ in ILLEGAL])
def test_role_of_rejects_and_names_the_offending_subexpression(make, fragments):
    with pytest.raises(InvalidRuleError) as info:
        role_of(make())
    for frag in fragments:
        assert frag in str(info.value)


def test_signal_construction_errors():
    with pytest.raises(InvalidRuleError, match="role 'neuron'"):
        Signal("x", "neuron")
    with pytest.raises(InvalidRuleError, match="not a Python identifier"):
        Signal("a-b", "pre")
    with pytest.raises(InvalidRuleError, match="not a Python identifier"):
        Constant("__import__('os')")


def test_signal_identity_and_pickle():
    assert Signal("pre", "pre") == pre
    assert Signal("pre", "post") != pre  # equal names, different roles
    assert hash(Signal("post", "post")) == hash(post)
    for s in (pre, w, Constant("c"), trace(pre, 3)):
        back = pickle.loads(pickle.dumps(s))
        assert back == s and back.role == s.role and type(back) is type(s)
    c = Constant("c1")
    assert c.role == "global" and not c.is_base and c.definition is None


# ---------------------------------------------------------------------------------------------------------------
# Operators: canonical forms


def test_bilinear_canonical_form():
    assert bilinear(pre_err, post) == bilinear(post, pre_err)
    b = bilinear(pre_err, post)
    assert isinstance(b, Bilinear) and b.args == (post, w, pre_err)
    assert bilinear(pre, err, fb).args == (err, fb, pre)


def test_operators_are_linear_in_their_vectors():
    assert wT(2 * post) == 2 * wT(post)
    assert wT(post + err) == wT(post) + wT(err)
    assert wT(mod * post) == mod * wT(post)
    assert wT(sp.Integer(0)) == 0
    assert layer_sum(3 * post + pre) == 3 * layer_sum(post) + layer_sum(pre)
    assert bilinear(2 * post, mod * pre_err) == 2 * mod * bilinear(post, pre_err)
    assert bilinear(post + err, pre) == bilinear(post, pre) + bilinear(err, pre)
    # nonlinear vectors stay inside
    assert isinstance(wT(post**2), Contract) and wT(post**2).args[1] == post**2
    assert isinstance(layer_sum(sp.tanh(post)), LayerSum)
    assert isinstance(sanger(), OrderedContract) and sanger().args == (post, w)


def test_wv_and_wt_build_the_same_operator_class():
    assert wv(pre) == Contract(w, pre)
    assert wT(post) == Contract(w, post)
    assert role_of(wv(pre)) == "post" and role_of(wT(post)) == "pre"


# ---------------------------------------------------------------------------------------------------------------
# Derived and stateful signals


def test_derived_signal_role_and_substitution():
    hebb = derived("hebb", post * pre, latex="H")
    dec = derived("dec", hebb - post**2 * w)
    assert hebb.role == "synapse" and dec.role == "synapse"
    assert not hebb.is_base and not hebb.is_state
    assert expand_derived(dec * mod) == (post * pre - post**2 * w) * mod
    assert signals_in(dec) == {dec}
    assert base_needs(dec * mod) == frozenset({"post", "pre", "w", "mod"})
    with pytest.raises(InvalidRuleError, match="LayerSum"):
        derived("bad", layer_sum(hebb))


def test_derived_cycle_is_reported():
    a = Signal("cyc_a", "post")
    a.definition = 2 * a  # cannot be built with derived(); forced here
    with pytest.raises(InvalidRuleError, match="cycle"):
        expand_derived(a + 1)


def test_trace_definition_name_and_role():
    xb = trace(pre, tau=4)
    assert (xb.name, xb.role, xb.is_state, xb.is_base) == ("pre_trace4", "pre", True, False)
    assert isinstance(xb.definition, StateDef)
    assert sp.expand(xb.definition.update - (sp.Rational(3, 4) * xb + pre / 4)) == 0
    assert xb.definition.init == 0
    assert trace(err, tau=2.5).name == "err_trace2p5"
    assert trace(err, tau=3, name="eb").name == "eb"
    with pytest.raises(InvalidRuleError, match="tau=0.5"):
        trace(pre, tau=0.5)


def test_bcm_threshold_and_reward_baseline():
    th = bcm_threshold(tau=5)
    assert (th.name, th.role) == ("theta_bcm", "post")
    assert sp.expand(th.definition.update - (sp.Rational(4, 5) * th + post**2 / 5)) == 0
    rb = reward_baseline(tau=2)
    assert (rb.name, rb.role) == ("reward_bar", "global")
    assert sp.expand(rb.definition.update - (rb / 2 + reward / 2)) == 0


def test_same_name_different_definition_is_a_different_signal():
    """SymPy caches expressions by structure; signals sharing a name must not be swapped for one another."""
    slow, fast = reward_baseline(tau=4), reward_baseline(tau=2)
    assert slow.name == fast.name and slow != fast
    assert (reward - slow) != (reward - fast)
    (got,) = [s for s in signals_in(reward - fast) if s.is_state]
    assert got.definition.update == fast / 2 + reward / 2
    assert derived("dd_same", post * pre) != derived("dd_same", post * pre_err)
    assert derived("dd_same", post * pre) == derived("dd_same", post * pre)
    assert trace(pre, 3) == trace(pre, 3)


def test_state_role_inferred_from_update_and_init():
    s = state("s_glob", lambda s: s / 2 + loss)
    assert s.role == "global"
    s = state("s_post", lambda s: s / 2, init=post)
    assert s.role == "post"
    s = state("s_syn", lambda s: s + post * pre)
    assert s.role == "synapse"
    assert s.definition.update == s + post * pre


def test_state_signals_dependencies_first_and_base_needs():
    xb = trace(pre, tau=4)
    s2 = state("s2_dep", lambda s: s / 2 + xb, init=1)
    assert state_signals(s2 * post) == [xb, s2]
    assert state_signals(post * pre) == []
    assert base_needs(s2 * post) == frozenset({"post", "pre"})
    rb = reward_baseline(tau=3)
    assert base_needs((reward - rb) * err * pre) == frozenset({"reward", "err", "pre"})


def test_signals_in_sees_inside_operators():
    assert signals_in(bilinear(post, pre_err, fb) * err) == {post, pre_err, fb, err}
    assert signals_in(sp.Integer(3)) == set()


def test_roles_tuple():
    assert ROLES == ("global", "post", "pre", "synapse")
