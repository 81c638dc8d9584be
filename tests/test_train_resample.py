"""Timestep samplers: uniform and loss-second-moment importance sampling."""

import numpy as np
import pytest
import torch

from guided_diffusion.resample import (
    LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler,
)

torch.set_num_threads(1)


class _Diffusion:
    num_timesteps = 4


def test_uniform_sampler():
    s = create_named_schedule_sampler("uniform", _Diffusion())
    assert isinstance(s, UniformSampler)
    t, w = s.sample(100, "cpu")
    assert t.dtype == torch.int64 and t.shape == (100,) and 0 <= t.min() and t.max() < 4
    assert torch.all(w == 1) and w.dtype == torch.float32


def test_loss_second_moment_warms_up_then_weights_by_rms_loss():
    s = create_named_schedule_sampler("loss-second-moment", _Diffusion())
    assert isinstance(s, LossSecondMomentResampler)
    assert np.all(s.weights() == 1)
    for _ in range(9):
        s.update_with_all_losses([0, 1, 2, 3], [1.0, 1.0, 2.0, 4.0])
    assert np.all(s.weights() == 1)  # one loss short of a full history
    s.update_with_local_losses(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    rms = np.array([1.0, 1.0, 2.0, 4.0])
    expect = rms / rms.sum() * (1 - 0.001) + 0.001 / 4
    assert np.allclose(s.weights(), expect)
    s.update_with_all_losses([3] * 10, [0.0] * 10)  # history of t=3 is replaced (oldest first)
    assert s.weights()[3] == pytest.approx(0.001 / 4)
    np.random.seed(0)
    t, w = s.sample(1000, "cpu")
    p = s.weights() / s.weights().sum()
    assert torch.allclose(w, torch.from_numpy(1 / (4 * p[t.numpy()])).float())


def test_unknown_sampler():
    with pytest.raises(NotImplementedError):
        create_named_schedule_sampler("nope", _Diffusion())
