"""experiments/oja_followup.py: the tuning grids are fair (equal sizes, eta_Oja = 0 inside the grid with Oja's
term, its eta axis a subset of the one without), grid edges are named, and the same episodes give the same
accuracy under both feedback modes' rows."""

from pathlib import Path

import numpy as np
import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def oja_followup(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import oja_followup

    return oja_followup


def test_grids_equal_sizes_hold_eta_oja_zero_and_nest(oja_followup):
    without, with_oja = oja_followup.grids()
    assert len(without) == len(with_oja) == oja_followup.COARSE_ETAS * (len(oja_followup.OJA_ETAS) + 1)
    assert len(set(without)) == len(without) and len(set(with_oja)) == len(with_oja)
    assert all(o == 0.0 for _, o in without)
    coarse = sorted({e for e, _ in with_oja})
    assert all((e, 0.0) in with_oja for e in coarse)  # eta_Oja = 0 at every eta: the method without Oja's term
    fine = [e for e, _ in without]
    assert all(np.isclose(fine, e).any() for e in coarse)  # every coarse eta is on the fine axis
    assert fine == sorted(fine) and fine[0] == coarse[0] and fine[-1] > coarse[-1]
    assert sorted({o for _, o in with_oja}) == [0.0, *oja_followup.OJA_ETAS]

    small, small_oja = oja_followup.grids(3, (0.01,), low=0.1)
    assert [round(e, 6) for e, _ in small] == [0.1, 0.177828, 0.316228, 0.562341, 1.0, 1.778279]
    assert [(round(e, 6), o) for e, o in small_oja] == [
        (0.1, 0.0), (0.1, 0.01), (0.316228, 0.0), (0.316228, 0.01), (1.0, 0.0), (1.0, 0.01)
    ]  # fmt: skip


def test_edge_names_the_grid_position(oja_followup):
    axis = [0.1, 0.3, 1.0, 0.3]
    assert oja_followup.edge(axis, 0.1) == "low edge"
    assert oja_followup.edge(axis, 1.0) == "high edge"
    assert oja_followup.edge(axis, 0.3) == "inside"
    assert oja_followup.edge([0.5, 0.5], 0.5) == "inside"  # a one-point axis has no edge to report


def test_accuracy_rows_share_episodes_and_count_divergence(oja_followup):
    from rulesearch.networks.feedforward import Network
    from rulesearch.tasks.data import load_dataset
    from rulesearch.tasks.episodes import TaskSampler

    torch.manual_seed(0)
    sampler = TaskSampler(load_dataset("digits"), M=2, K=3, Q=2)
    for mode in ("bp", "plastic"):
        net = Network(sizes=(64, 8, 10), feedback=mode)
        thetas = [(0.05, 0.0), (0.05, 0.0), (1e6, 0.0)]
        acc, div = oja_followup.accuracy(net, sampler, thetas, [0, 1], 2)
        assert acc.shape == div.shape == (3, 2, 2)
        np.testing.assert_array_equal(acc[0], acc[1])  # same episodes, weights and feedback per row
        assert div[2].all() and not div[:2].any()  # eta 1e6 diverges and is scored 0
        assert (acc[2] == 0).all()
