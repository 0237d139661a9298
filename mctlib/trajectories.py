"""Expert trajectories: the MTT full buffer and the MCT convexified record (METHOD.md, chapter 3).

One recorder builds a convexified record from a stream of checkpoints theta_0, theta_1, ...,
theta_E, whether they arrive while an expert trains or are read back from a full buffer; it
holds a few parameter vectors at a time, never the whole trajectory (except for the
'projected' schedule, which needs the current segment, see `ConvexRecorder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def waypoint_epochs(epochs: int, num_waypoints: int) -> tuple[int, ...]:
    """w_0 = 0 < ... < w_{K-1} = E: the authors' range(0, E+1, (E+1)//(K-1)), cut to K-1 entries, then E."""
    if not 2 <= num_waypoints <= epochs + 1:
        raise ValueError(f"num_waypoints K = {num_waypoints} must lie in [2, epochs + 1 = {epochs + 1}]")
    step = (epochs + 1) // (num_waypoints - 1)
    return tuple(i * step for i in range(num_waypoints - 1)) + (epochs,)


def layer_index(layer_slices: tuple[slice, ...], numel: int) -> torch.Tensor:
    """For each entry of a flat parameter vector, the index of its layer (parameter tensor)."""
    index = torch.empty(numel, dtype=torch.long)
    for i, s in enumerate(layer_slices):
        index[s] = i
    return index


@dataclass
class FullBuffer:
    """MTT's record: every epoch's parameters, theta_0 ... theta_E, as an (E+1, D) tensor."""

    params: torch.Tensor

    @property
    def epochs(self) -> int:
        return self.params.shape[0] - 1

    def point(self, tau: float) -> torch.Tensor:
        """theta_tau for an integer epoch tau (a full buffer has nothing in between)."""
        if tau != int(tau) or not 0 <= tau <= self.epochs:
            raise ValueError(f"a full buffer has points only at integer epochs 0..{self.epochs}, not tau = {tau}")
        return self.params[int(tau)]

    def to(self, device) -> "FullBuffer":
        return FullBuffer(self.params.to(device))

    def checkpoints(self):
        """(epoch, theta_epoch) in order, the stream a `ConvexRecorder` consumes."""
        return enumerate(self.params)


@dataclass
class ConvexRecord:
    """MCT's record: K waypoint vectors and the (E+1, L) per-layer progress table beta.

    The point at tau in segment [w_i, w_{i+1}] is, per layer l,
    theta_l(tau) = lerp(W_{i,l}, W_{i+1,l}, beta_l(tau)), beta interpolated linearly in tau.
    """

    waypoints: torch.Tensor                 # (K, D)
    waypoint_epochs: tuple[int, ...]        # w, length K
    beta: torch.Tensor                      # (E+1, L); row e: progress within the segment that starts at or before e
    layer_slices: tuple[slice, ...]

    def __post_init__(self) -> None:
        self.waypoint_epochs = tuple(int(w) for w in self.waypoint_epochs)
        self._layer_of = layer_index(self.layer_slices, self.waypoints.shape[1]).to(self.waypoints.device)

    @property
    def epochs(self) -> int:
        return self.waypoint_epochs[-1]

    def segment(self, tau: float) -> int:
        """Index i of the segment [w_i, w_{i+1}] holding tau (the last segment holds tau = E)."""
        if not 0 <= tau <= self.epochs:
            raise ValueError(f"tau = {tau} lies outside the trajectory [0, {self.epochs}]")
        i = 0
        while i < len(self.waypoint_epochs) - 2 and tau >= self.waypoint_epochs[i + 1]:
            i += 1
        return i

    def beta_at(self, tau: float) -> tuple[int, torch.Tensor]:
        """(segment, per-layer beta) at continuous tau: linear between floor(tau) and floor(tau) + 1."""
        i = self.segment(tau)
        end = self.waypoint_epochs[i + 1]
        e0 = min(int(math.floor(tau)), end)
        e1 = min(e0 + 1, end)
        frac = float(tau) - e0

        def row(e: int) -> torch.Tensor:
            return torch.ones_like(self.beta[0]) if e == end else self.beta[e]

        return i, row(e0) * (1 - frac) + row(e1) * frac if frac else row(e0)

    def point(self, tau: float) -> torch.Tensor:
        """theta(tau) on the convexified trajectory (METHOD.md, "Point at continuous time")."""
        i, beta = self.beta_at(tau)
        start, end = self.waypoints[i], self.waypoints[i + 1]
        return torch.lerp(start, end, beta.to(start)[self._layer_of])

    def to(self, device) -> "ConvexRecord":
        return ConvexRecord(self.waypoints.to(device), self.waypoint_epochs, self.beta.to(device),
                            self.layer_slices)


class ConvexRecorder:
    """Builds a `ConvexRecord` from theta_0, ..., theta_E fed in order to `update`.

    Holds the previous checkpoint (for per-layer step norms and smoothing), the waypoints and
    an (E+1, L) table of step norms. The 'projected' schedule also holds the checkpoints of the
    current segment, because its progress is measured along a chord whose end arrives last.
    """

    def __init__(self, layer_slices: tuple[slice, ...], epochs: int, num_waypoints: int = 4,
                 schedule: str = "arc_length", smooth: bool = True) -> None:
        if schedule not in ("arc_length", "uniform", "projected"):
            raise ValueError(f"beta schedule {schedule!r} unknown; choose arc_length, uniform or projected")
        self.layer_slices = tuple(layer_slices)
        self.epochs = epochs
        self.w = waypoint_epochs(epochs, num_waypoints)
        self.schedule, self.smooth = schedule, smooth
        self.step_norms = torch.zeros(epochs + 1, len(self.layer_slices), dtype=torch.float64)
        self.beta = torch.zeros(epochs + 1, len(self.layer_slices), dtype=torch.float64)
        self.raw: dict[int, torch.Tensor] = {}       # unsmoothed waypoints (for beta)
        self.smoothed: dict[int, torch.Tensor] = {}
        self._prev: torch.Tensor | None = None       # theta_{e-1}
        self._prev2: torch.Tensor | None = None      # theta_{e-2}, for smoothing the waypoint at e-1
        self._segment_points: list[torch.Tensor] = []
        self._next = 0

    def update(self, epoch: int, theta: torch.Tensor) -> None:
        """Take checkpoint theta_epoch (epochs must arrive as 0, 1, ..., E)."""
        if epoch != self._next:
            raise ValueError(f"checkpoints must arrive in order: expected epoch {self._next}, got {epoch}")
        self._next += 1
        theta = theta.detach().to(torch.float32)
        if self._prev is not None:
            diff = (theta - self._prev).double()
            self.step_norms[epoch] = torch.stack([diff[s].norm() for s in self.layer_slices]).cpu()
        if self.schedule == "projected":
            self._segment_points.append(theta.clone())
        if epoch in self.w:
            self.raw[epoch] = theta.clone()
            if epoch > 0:
                self._close_segment(self.w.index(epoch) - 1)
            if self.schedule == "projected":
                self._segment_points = [theta.clone()]
        # Smoothing (authors' code): interior waypoint w -> mean(theta_{w-1}, theta_{w+1}); last -> mean(theta_{E-1}, theta_E).
        if epoch - 1 in self.w[1:-1]:
            self.smoothed[epoch - 1] = (self._prev2 + theta) / 2
        if epoch == self.epochs and self._prev is not None:
            self.smoothed[epoch] = (self._prev + theta) / 2
        self._prev2, self._prev = self._prev, theta.clone()

    def _close_segment(self, i: int) -> None:
        a, b = self.w[i], self.w[i + 1]
        epochs = torch.arange(a, b + 1, dtype=torch.float64)
        if self.schedule == "uniform":
            progress = ((epochs - a) / (b - a)).unsqueeze(1).expand(-1, len(self.layer_slices))
        elif self.schedule == "arc_length":
            cumulative = self.step_norms[a + 1:b + 1].cumsum(0)
            cumulative = torch.cat([torch.zeros_like(cumulative[:1]), cumulative])
            total = cumulative[-1]
            uniform = ((epochs - a) / (b - a)).unsqueeze(1).expand_as(cumulative)
            # A layer that never moved has no arc length; its progress is taken as uniform.
            progress = torch.where(total > 0, cumulative / total.clamp_min(1e-300), uniform)
        else:
            start, end = self._segment_points[0].double(), self._segment_points[-1].double()
            chord = end - start
            denom = chord.dot(chord).clamp_min(1e-300)
            scalar = torch.stack([(p.double() - start).dot(chord) / denom for p in self._segment_points])
            progress = scalar.cpu().unsqueeze(1).expand(-1, len(self.layer_slices))
        self.beta[a:b] = progress[:-1]
        if i == len(self.w) - 2:
            self.beta[b] = 1.0

    def finish(self) -> ConvexRecord:
        if self._next != self.epochs + 1:
            raise ValueError(f"recorder got {self._next} checkpoints; needs all {self.epochs + 1} (epochs 0..{self.epochs})")
        points = [self.smoothed.get(w, self.raw[w]) if self.smooth and w > 0 else self.raw[w] for w in self.w]
        return ConvexRecord(torch.stack(points), self.w, self.beta.float(), self.layer_slices)


def convexify(buffer: FullBuffer, layer_slices: tuple[slice, ...], num_waypoints: int = 4,
              schedule: str = "arc_length", smooth: bool = True) -> ConvexRecord:
    """The convexified record of a stored full buffer (the same recorder the experts use)."""
    recorder = ConvexRecorder(layer_slices, buffer.epochs, num_waypoints, schedule, smooth)
    for epoch, theta in buffer.checkpoints():
        recorder.update(epoch, theta)
    return recorder.finish()


def sample_window(generator: torch.Generator, sampling: str, expert_epochs: float, max_start_epoch: float,
                  epochs: int) -> tuple[float, float]:
    """(tau_start, tau_target): MTT's integer start s ~ randint(0, max_start) with target s + M, or
    MCT's continuous tau_s ~ U(0, max_start) with tau_t = min(tau_s + M, E)."""
    if sampling == "integer":
        # MTT draws randint(0, max_start); starts past E - M would leave the trajectory, so they are cut.
        high = int(min(max_start_epoch, epochs - expert_epochs + 1))
        start = float(torch.randint(max(high, 1), (1,), generator=generator))
        return start, min(start + float(expert_epochs), float(epochs))
    high = min(float(max_start_epoch), float(epochs))
    start = float(torch.rand((), generator=generator, dtype=torch.float64)) * high
    return start, min(start + float(expert_epochs), float(epochs))
