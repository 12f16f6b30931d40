"""A plain-torch stand-in for TRL 1.15's Triton kernel `trl.kernels.ChunkedLogProbFunction`.

TRL 1.15's `DPOTrainer` scores tokens through `add_fused_lm_head` (trl/trainer/utils.py), which calls
`trl.trainer.utils._ChunkedLogProbFunction.apply(...)`. That name is bound to the Triton kernel, and to
`None` where Triton is absent (every CPU-only torch), so on CPU the trainer fails with
`'NoneType' object has no attribute 'apply'`. `use_cpu_kernel()` binds it to `CpuChunkedLogProbFunction`
for the duration of a `with` block (or of a test, through the `cpu_kernel` fixture), so a real
`DPOTrainer` can run on CPU.

The contract copied from trl/kernels/chunked_logprob.py:

    apply(hidden[N, H], weight[V, H], bias[V] | None, targets[N] (each in [0, V)), temperature,
          chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)
      -> (logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)

* compute dtype: the autocast dtype when autocast is on for hidden's device, else `hidden.dtype`.
  The projection `y = hidden @ weight.T (+ bias)` runs in the compute dtype and is ROUNDED to it
  (the kernel writes it into a compute-dtype tile; the bias is added in that dtype too).
* then, in float32: `z = y * logit_scale`; with softcapping `z = cap * tanh(z / cap)`; `z = z * (1/T)`.
* logprobs = z[target] - logsumexp(z)                          float32, differentiable
  entropy = logsumexp(z) - sum_v p_v z_v = -sum p log p        float32, differentiable ("entropy")
  log_sum_sq_probs = log(sum_v p_v^2)                          float32, not differentiable
  mean_logits = mean_v z_v (the transformed logits)            float32, not differentiable
  is_top1 = target is the FIRST argmax of z (a tie with an earlier token is not top-1), bool
  Each optional output is None unless its name is in `outputs` ("log_probs" there is ignored:
  log-probs are always computed).
* backward: only logprobs and entropy carry gradients (an unused one arrives as None, since the
  kernel sets `set_materialize_grads(False)`). dL/dz = g_lp (onehot - p) - g_ent p (log p + H),
  chained through 1/T, the softcap's (1 - tanh^2) and logit_scale, ROUNDED to the compute dtype
  (the kernel overwrites the compute-dtype tile with it), then multiplied into grad_hidden,
  grad_weight and grad_bias with float32 accumulation, and returned in each input's own dtype.
  `targets`, temperature and the rest get no gradient.

`chunk_size` is accepted and ignored: tiling only changes float32 summation order.

One deliberate difference: float64 inputs stay in float64 throughout (statistics, outputs and
gradient accumulation), where the Triton kernel would round to float32. Nobody runs the kernel on
float64, and it lets CPU equivalence tests compare at float64 precision. For every other dtype the
working precision is float32, exactly as the kernel's. `use_cpu_kernel(work_dtype=torch.float32)`
forces the kernel's float32 rounding even for float64 inputs.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
PATCHED_NAME = "_ChunkedLogProbFunction"


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _project(hidden, weight, bias, compute_dtype):
    """`hidden @ weight.T (+ bias)` in the compute dtype, rounded to it like the kernel's tile."""
    y = torch.mm(hidden.to(compute_dtype), weight.to(compute_dtype).t())
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y


def _transform(y, work_dtype, logit_scale, softcap, temperature):
    """z = (cap * tanh(y * scale / cap) if cap else y * scale) * (1/T), in the working dtype.

    Returns z and tanh(.) (None without softcapping), which the backward needs.
    """
    z = y.to(work_dtype) * logit_scale
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    return z * (1.0 / temperature), t


class CpuChunkedLogProbFunction(torch.autograd.Function):
    """Same arguments, outputs, dtypes and gradients as `trl.kernels.ChunkedLogProbFunction`, in plain torch."""

    # None: float32, or float64 for float64 inputs. A subclass made by `use_cpu_kernel` may fix it.
    work_dtype: torch.dtype | None = None

    @classmethod
    def _work_dtype(cls, compute_dtype: torch.dtype) -> torch.dtype:
        if cls.work_dtype is not None:
            return cls.work_dtype
        return torch.float64 if compute_dtype == torch.float64 else torch.float32

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
    ):
        ctx.set_materialize_grads(False)
        compute_dtype = _compute_dtype(hidden)
        # `forward` is a staticmethod, so find the (possibly subclassed) class through ctx
        work_dtype = ctx._forward_cls._work_dtype(compute_dtype)
        targets = targets.long()
        with torch.autocast(hidden.device.type, enabled=False):
            y = _project(hidden, weight, bias, compute_dtype)
            z, _ = _transform(y, work_dtype, logit_scale, final_logit_softcapping, temperature)
            log_z = torch.logsumexp(z, dim=-1)
            log_p = z - log_z[:, None]
            target_z = z.gather(1, targets[:, None]).squeeze(1)
            logprobs = target_z - log_z

            entropy = log_sum_sq_probs = mean_logits = is_top1 = None
            if "entropy" in outputs:
                entropy = -(log_p.exp() * log_p).sum(-1)
            if "log_sum_sq_probs" in outputs:
                log_sum_sq_probs = torch.logsumexp(2 * log_p, dim=-1)
            if "mean_logits" in outputs:
                mean_logits = z.mean(-1)
            if "is_top1" in outputs:
                # The kernel's test: the target's logit reaches the maximum and beats every earlier token
                cols = torch.arange(z.shape[1], device=z.device)
                before = torch.where(cols[None, :] < targets[:, None], z, -float("inf")).amax(-1)
                is_top1 = (target_z >= z.amax(-1)) & (target_z > before)

        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.compute_dtype = compute_dtype
        ctx.work_dtype = work_dtype
        ctx.transform = (logit_scale, final_logit_softcapping, temperature)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq_probs, mean_logits, is_top1) if x is not None))
        return logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = grad_weight = grad_bias = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 9
        compute_dtype, work_dtype = ctx.compute_dtype, ctx.work_dtype
        logit_scale, softcap, temperature = ctx.transform
        with torch.autocast(hidden.device.type, enabled=False):
            # Recompute the logits, as the kernel does
            y = _project(hidden, weight, bias, compute_dtype)
            z, t = _transform(y, work_dtype, logit_scale, softcap, temperature)
            log_p = z - log_z[:, None]
            p = log_p.exp()
            grad_z = torch.zeros_like(z)
            if grad_logprobs is not None:
                # d log p_target / dz_j = 1[j = target] - p_j
                g = grad_logprobs.to(work_dtype)[:, None]
                grad_z -= g * p
                grad_z.scatter_add_(1, targets[:, None], g)
            if grad_entropy is not None:
                # d entropy / dz_j = -p_j (log p_j + entropy)
                grad_z -= grad_entropy.to(work_dtype)[:, None] * p * (log_p + entropy[:, None])
            grad_z = grad_z * (1.0 / temperature)
            if t is not None:
                grad_z = grad_z * (1 - t * t)
            grad_z = grad_z * logit_scale
            # The kernel stores this gradient in the compute-dtype tile, then accumulates in float32
            acc_dtype = torch.promote_types(work_dtype, torch.float32)
            grad_y = grad_z.to(compute_dtype).to(acc_dtype)
            if needs_hidden:
                grad_hidden = (grad_y @ weight.to(compute_dtype).to(acc_dtype)).to(hidden.dtype)
            if needs_weight:
                grad_weight = (grad_y.t() @ hidden.to(compute_dtype).to(acc_dtype)).to(weight.dtype)
            if needs_bias:
                grad_bias = grad_y.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _function_for(work_dtype: torch.dtype | None) -> type[CpuChunkedLogProbFunction]:
    if work_dtype is None:
        return CpuChunkedLogProbFunction
    return type(
        f"CpuChunkedLogProbFunction_{str(work_dtype).removeprefix('torch.')}",
        (CpuChunkedLogProbFunction,),
        {"work_dtype": work_dtype},
    )


class _Counting:
    """What `use_cpu_kernel` yields: the function bound into TRL, and how often TRL called it."""

    def __init__(self, fn):
        self.function = fn
        self.calls = 0

    def apply(self, *args, **kwargs):
        self.calls += 1
        return self.function.apply(*args, **kwargs)


@contextlib.contextmanager
def use_cpu_kernel(work_dtype: torch.dtype | None = None) -> Iterator[_Counting]:
    """Bind TRL's `_ChunkedLogProbFunction` to the plain-torch substitute inside the block.

    TRL looks the name up in `trl.trainer.utils` at call time (in `add_fused_lm_head`'s forward); no
    other TRL 1.15 module imports it. Any other already imported module that holds the name in its
    globals (a copy of TRL's code, such as a compiled Unsloth trainer) is patched too. The old values
    come back on exit. Yields an object with `.calls` (how many times TRL called the kernel) and
    `.function` (the autograd Function).
    """
    import trl.trainer.utils  # noqa: F401  (so that it is in sys.modules)

    counting = _Counting(_function_for(work_dtype))
    saved = []
    for name, module in list(sys.modules.items()):
        # Look in the module's own dict: getattr could trigger a lazy module's imports
        module_dict = getattr(module, "__dict__", None)
        if not isinstance(module_dict, dict) or PATCHED_NAME not in module_dict:
            continue
        if name.startswith("trl") or "unsloth" in name.lower() or "DPOTrainer" in name:
            saved.append((module, module_dict[PATCHED_NAME]))
            setattr(module, PATCHED_NAME, counting)
    try:
        yield counting
    finally:
        for module, old in reversed(saved):
            setattr(module, PATCHED_NAME, old)


try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def cpu_kernel():
        """Runs the test with TRL's chunked log-prob kernel replaced by the plain-torch substitute."""
        with use_cpu_kernel() as counting:
            yield counting
