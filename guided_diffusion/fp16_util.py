"""Precision helpers: OpenAI's fp16 torso conversion (``--use_fp16``) and mixed-precision training.

``convert_module_to_f16`` is applied by ``UNetModel.convert_to_fp16()`` to the convolutions of
the input blocks, middle block and output blocks only; linear layers (the ResBlocks' embedding
projections), norms, the time/label embeddings and the output head stay in float32, exactly as
in OpenAI's released code.
"""

import torch.nn as nn


def convert_module_to_f16(module):
    """Cast the parameters of a convolution to float16 (other modules are left alone)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Undo :func:`convert_module_to_f16`."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


# --- Mixed-precision training (OpenAI semantics) -------------------------------------------------
# With use_fp16 the torso runs in float16 while the optimizer updates float32 "master" copies:
# parameters are grouped into vectors (ndim <= 1) and matrices (ndim > 1), each group flattened
# into one float32 tensor. The loss is multiplied by 2**lg_loss_scale before backward; a step
# whose gradient norm is inf/NaN is skipped and lg_loss_scale drops by 1, every other step raises
# it by fp16_scale_growth. Checkpoints always hold float32 per-parameter tensors.

import numpy as np  # noqa: E402
import torch as th  # noqa: E402
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors  # noqa: E402

from . import logger  # noqa: E402

INITIAL_LOG_LOSS_SCALE = 20.0


def get_param_groups_and_shapes(named_model_params):
    """``[(scalar_vector_named_params, (-1,)), (matrix_named_params, (1, -1))]``."""
    named = list(named_model_params)
    vectors = [(n, p) for n, p in named if p.ndim <= 1]
    matrices = [(n, p) for n, p in named if p.ndim > 1]
    return [(vectors, (-1,)), (matrices, (1, -1))]


def make_master_params(param_groups_and_shapes):
    """One flat float32 ``nn.Parameter`` per group."""
    masters = []
    for named, shape in param_groups_and_shapes:
        flat = _flatten_dense_tensors([p.detach().float() for _, p in named]).view(shape)
        masters.append(th.nn.Parameter(flat.clone(), requires_grad=True))
    return masters


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    for master, (named, shape) in zip(master_params, param_groups_and_shapes):
        master.grad = _flatten_dense_tensors([_grad_or_zeros(p).float() for _, p in named]).view(shape)


def _grad_or_zeros(p):
    return p.grad if p.grad is not None else th.zeros_like(p)


def master_params_to_model_params(param_groups_and_shapes, master_params):
    for master, (named, _) in zip(master_params, param_groups_and_shapes):
        for (_, p), value in zip(named, unflatten_master_params(named, master.view(-1))):
            p.detach().copy_(value)


def unflatten_master_params(param_group, master_param):
    return _unflatten_dense_tensors(master_param, [p for _, p in param_group])


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """A float32 state_dict of ``model`` whose parameters are taken from ``master_params``."""
    state_dict = model.state_dict()
    if use_fp16:
        for master, (named, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(named, unflatten_master_params(named, master.view(-1))):
                state_dict[name] = value.detach().float().clone()
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            state_dict[name] = value.detach().clone()
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    params = [state_dict[name] for name, _ in model.named_parameters()]
    if use_fp16:
        named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
        return make_master_params(get_param_groups_and_shapes(named))
    return params


def zero_master_grads(master_params):
    for p in master_params:
        p.grad = None


def zero_grad(model_params):
    for p in model_params:
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()


def param_grad_or_zeros(param):
    return param.grad.data.detach() if param.grad is not None else th.zeros_like(param)


def check_overflow(value):
    return value == float("inf") or value == -float("inf") or value != value


class MixedPrecisionTrainer:
    """Owns the master parameters the optimizer updates (see the comment above)."""

    def __init__(self, *, model, use_fp16=False, fp16_scale_growth=1e-3,
                 initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale
        if use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            model.convert_to_fp16()

    def zero_grad(self):
        zero_grad(self.model_params)

    def backward(self, loss):
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt):
        """Step ``opt`` on the master params; return False if the step was skipped (overflow)."""
        return self._optimize_fp16(opt) if self.use_fp16 else self._optimize_normal(opt)

    def _optimize_fp16(self, opt):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        grad_norm, param_norm = self._compute_norms(grad_scale=2**self.lg_loss_scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        for p in self.master_params:
            p.grad.mul_(1.0 / 2**self.lg_loss_scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt):
        grad_norm, param_norm = self._compute_norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def _compute_norms(self, grad_scale=1.0):
        grad_sq, param_sq = 0.0, 0.0
        with th.no_grad():
            for p in self.master_params:
                param_sq += th.norm(p, p=2, dtype=th.float32).item() ** 2
                if p.grad is not None:
                    grad_sq += th.norm(p.grad, p=2, dtype=th.float32).item() ** 2
        return np.sqrt(grad_sq) / grad_scale, np.sqrt(param_sq)

    def master_params_to_state_dict(self, master_params):
        return master_params_to_state_dict(self.model, self.param_groups_and_shapes, master_params,
                                           self.use_fp16)

    def state_dict_to_master_params(self, state_dict):
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)
