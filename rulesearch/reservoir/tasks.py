r"""Motor tasks: draw the butterfly curve with the output itself (Task 1) or with the end effector of an arm whose
joint angles are the output (Tasks 2 and 3), as in Pyle & Rosenbaum (2019).

Butterfly: :math:`\rho(\theta) = 9 - \sin\theta + 2\sin 3\theta + 2\sin 5\theta - \sin 7\theta + 3\cos 2\theta
- 2\cos 4\theta`, target :math:`f(\theta) = (\rho\cos\theta, \rho\sin\theta) / \max\rho` over one traversal
:math:`\theta \in [0, 2\pi]` per trial. Arm with segment lengths :math:`L_k` pivoting at :math:`(0, -2)`, joint
angles :math:`z_k` in units of :math:`\pi`: the end effector is
:math:`\left(\sum_k L_k \sin(\pi \sum_{j \le k} z_j),\; -2 + \sum_k L_k \cos(\pi \sum_{j \le k} z_j)\right)`.
The per-step error is :math:`e = \lVert p(z) - f \rVert^2 + \sum_k c_k |z_k - \bar z_k|` (joint costs :math:`c`,
Task 3 only; :math:`\bar z` the low-passed exploratory output), and the reward is :math:`R = -e`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["butterfly", "Arm", "MotorTask", "TASKS", "get_task"]

RHO_MAX = 14.4734  # "max rho" in the authors' scripts (the true maximum is 0.3% larger)


def butterfly(n_steps: int, dtype=torch.float64) -> Tensor:
    """The butterfly target over one traversal, ``(n_steps, 2)``, with ``theta = linspace(0, 2 pi, n_steps)``."""
    th = torch.linspace(0, 2 * math.pi, n_steps, dtype=torch.float64)
    rho = (
        9 - torch.sin(th) + 2 * torch.sin(3 * th) + 2 * torch.sin(5 * th) - torch.sin(7 * th)
        + 3 * torch.cos(2 * th) - 2 * torch.cos(4 * th)
    )  # fmt: skip
    return (torch.stack([rho * torch.cos(th), rho * torch.sin(th)], -1) / RHO_MAX).to(dtype)


@dataclass(frozen=True)
class Arm:
    """A planar arm: segment ``lengths`` from ``pivot``; joint angles in units of pi, each relative to the last."""

    lengths: tuple[float, ...]
    pivot: tuple[float, float] = (0.0, -2.0)

    def joints(self, z: Tensor) -> Tensor:
        """Positions of the joints after each segment, ``(..., n_segments, 2)``, for angles ``z`` ``(..., n)``."""
        phi = math.pi * torch.cumsum(z, -1)
        L = torch.tensor(self.lengths, dtype=z.dtype)
        xs = torch.cumsum(L * torch.sin(phi), -1) + self.pivot[0]
        ys = torch.cumsum(L * torch.cos(phi), -1) + self.pivot[1]
        return torch.stack([xs, ys], -1)

    def end_effector(self, z: Tensor) -> Tensor:
        """End-effector position ``(..., 2)``."""
        return self.joints(z)[..., -1, :]


@dataclass(frozen=True)
class MotorTask:
    """A trajectory task: ``n_out`` outputs drawn through ``arm`` (None: the output is the pen position), with joint
    costs ``joint_costs`` (one per output, or None). ``test_feedback`` is what the reservoir is fed in the test phase:
    ``"target"`` (teacher forcing, Task 1) or ``"delayed_output"`` (its own output from five trials earlier, at the
    same phase, Tasks 2-3), as in the authors' scripts."""

    name: str
    n_out: int
    arm: Arm | None = None
    joint_costs: tuple[float, ...] | None = None
    test_feedback: str = "target"

    def __post_init__(self):
        if self.arm is not None and len(self.arm.lengths) != self.n_out:
            raise ConfigError(f"Task {self.name}: {len(self.arm.lengths)} segments but n_out={self.n_out}.")
        if self.arm is None and self.n_out != 2:
            raise ConfigError(f"Task {self.name}: without an arm the output is the pen position (n_out=2).")
        if self.joint_costs is not None and len(self.joint_costs) != self.n_out:
            raise ConfigError(f"Task {self.name}: joint_costs needs {self.n_out} values, got {self.joint_costs}.")
        if self.test_feedback not in ("target", "delayed_output"):
            raise ConfigError(f"Task {self.name}: test_feedback={self.test_feedback!r}; use target|delayed_output.")

    def position(self, z: Tensor) -> Tensor:
        """The pen position ``(B, 2)`` drawn by output ``z`` ``(B, n_out)``."""
        return z if self.arm is None else self.arm.end_effector(z)

    def error(self, z: Tensor, target: Tensor, zbar: Tensor | None = None) -> Tensor:
        r""":math:`\lVert p(z) - f \rVert^2 + \sum_k c_k |z_k - \bar z_k|`, shape ``(B,)``."""
        e = ((self.position(z) - target) ** 2).sum(-1)
        if self.joint_costs is not None and zbar is not None:
            e = e + ((z - zbar).abs() * torch.tensor(self.joint_costs, dtype=z.dtype)).sum(-1)
        return e


TASKS = {
    "butterfly": MotorTask("butterfly", 2),
    "arm2": MotorTask("arm2", 2, Arm((1.8, 1.8)), test_feedback="delayed_output"),
    "arm3": MotorTask("arm3", 3, Arm((1.8, 1.2, 0.6)), (0.1, 0.05, 0.0), "delayed_output"),
}


def get_task(name: str) -> MotorTask:
    """One of :data:`TASKS`: ``butterfly`` (Task 1), ``arm2`` (Task 2), ``arm3`` (Task 3)."""
    if name not in TASKS:
        raise ConfigError(f"Unknown motor task {name!r}; expected one of {sorted(TASKS)}.")
    return TASKS[name]
