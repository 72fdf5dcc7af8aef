"""Fig. 6's channel claim on a tiny float64 network (experiments/fig6_channel.py's Jacobian code): under F^0 with
fixed random feedback, B_{2,1} (``feedback[1]``) does not act on W_{1,2} (``weights[1]``) in the first online step
(the Jacobian block is exactly zero) but does from the second; with eHebb on that layer it acts in the first."""

import importlib.util
from pathlib import Path

import torch

from rulesearch.networks import Network

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "fig6_channel.py"


def _script():
    spec = importlib.util.spec_from_file_location("fig6_channel", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ehebb_opens_a_same_step_channel_from_b21_to_w12():
    fig6 = _script()
    net = Network(sizes=(6, 5, 4, 3), feedback="fa")
    weights, feedback = net.init_episodes(0, 0, [0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.rand(1, 2, 6, generator=g, dtype=torch.float64),
        torch.tensor([[0, 2]]),
        torch.rand(1, 2, 6, generator=g, dtype=torch.float64),
        torch.tensor([[1, 0]]),
    )
    rules = fig6.settings(net.n_layers)

    def norms(setting, steps):
        return fig6.jacobian_blocks(net, batch, weights, feedback, rules[setting], steps)

    f0_1, f0_2 = norms("F0", 1), norms("F0", 2)
    assert f0_1[1, 1] == 0.0  # exactly: no computation connects them in one step
    assert f0_2[1, 1] > 0  # through W_{0,1} and y_1 in the second step
    assert f0_1[0, 1] > 0  # the layer below hears B_{2,1} at once (through e_1)
    assert (f0_1[:, 0] == 0).all() and (f0_2[:, 0] == 0).all()  # B_{1,0} only forms e_0, which F^0 never reads
    for setting in ("Fig. 6b (eHebb on W_{1,2})", "F0 + eHebb"):
        assert norms(setting, 1)[1, 1] > 1e-8
