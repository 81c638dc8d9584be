"""Timestep samplers for training (importance sampling of t), with OpenAI's names and semantics.

``sample`` draws t with probability p(t) from ``weights()`` via ``np.random`` and returns the
importance weights ``1 / (T * p(t))`` that keep the loss estimate unbiased.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """``"uniform"`` or ``"loss-second-moment"``."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler: {name}")


class ScheduleSampler(ABC):
    @abstractmethod
    def weights(self):
        """Unnormalised, positive per-timestep weights (numpy array of length T)."""

    def sample(self, batch_size, device):
        """Return ``(timesteps, weights)``: long and float tensors of shape [batch_size]."""
        w = self.weights()
        p = w / np.sum(w)
        idx = np.random.choice(len(p), size=(batch_size,), p=p)
        weights = 1.0 / (len(p) * p[idx])
        return th.from_numpy(idx).long().to(device), th.from_numpy(weights).float().to(device)


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """Gather (t, loss) pairs from every rank and call ``update_with_all_losses`` with all of
        them, in the same order on every rank (works without a process group too)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), [float(x) for x in local_losses])
            return
        world = dist.get_world_size()
        sizes = [th.zeros([1], dtype=th.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(sizes, th.tensor([len(local_ts)], dtype=th.int32, device=local_ts.device))
        sizes = [int(s.item()) for s in sizes]
        n = max(sizes)
        ts_bufs = [th.zeros(n).to(local_ts) for _ in sizes]
        loss_bufs = [th.zeros(n).to(local_losses) for _ in sizes]
        dist.all_gather(ts_bufs, th.cat([local_ts, th.zeros(n - len(local_ts)).to(local_ts)]))
        dist.all_gather(loss_bufs, th.cat([local_losses, th.zeros(n - len(local_losses)).to(local_losses)]))
        ts = [int(x) for buf, k in zip(ts_bufs, sizes) for x in buf[:k].tolist()]
        losses = [float(x) for buf, k in zip(loss_bufs, sizes) for x in buf[:k].tolist()]
        self.update_with_all_losses(ts, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from lists of timesteps and their losses."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) over the last ``history_per_term`` losses of each t,
    mixed with ``uniform_prob`` of the uniform distribution; uniform until every t has a full
    history."""

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=int)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w = w / np.sum(w) * (1 - self.uniform_prob)
        return w + self.uniform_prob / len(w)

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]  # drop the oldest
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())
