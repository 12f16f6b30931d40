"""The plain-torch substitute for TRL's Triton log-prob kernel equals the direct formulas, and lets a
real `trl.DPOTrainer` train on CPU.

The direct formulas are written here from scratch: logits = hidden @ weight.T (+ bias) in the
compute dtype, then scale / softcap / temperature and log_softmax in the working precision
(float32, or float64 for float64 inputs), then gather.
"""

from __future__ import annotations

import math

import pytest
import torch

from .trl_cpu_kernel import (  # noqa: F401  (cpu_kernel is a fixture)
    OPTIONAL_OUTPUTS,
    CpuChunkedLogProbFunction,
    cpu_kernel,
    use_cpu_kernel,
)

ALL = OPTIONAL_OUTPUTS
# (temperature, final_logit_softcapping, logit_scale): the plain case, and each transform on its own and together
TRANSFORMS = [(1.0, None, 1.0), (0.7, None, 1.0), (1.0, 3.0, 1.0), (1.0, None, 0.25), (1.3, 5.0, 2.0)]


def make_inputs(n=13, h=8, v=37, dtype=torch.float64, bias=True, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    for t in (hidden, weight, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return hidden, weight, b, targets


def direct_logits(hidden, weight, bias, temperature, softcap, scale, compute_dtype=None, work_dtype=None):
    compute_dtype = compute_dtype or hidden.dtype
    if work_dtype is None:
        work_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    z = logits.to(work_dtype) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def direct(hidden, weight, bias, targets, temperature=1.0, softcap=None, scale=1.0, **kw):
    z = direct_logits(hidden, weight, bias, temperature, softcap, scale, **kw)
    log_p = torch.log_softmax(z, dim=-1)
    return {
        "z": z,
        "logprobs": log_p.gather(1, targets[:, None]).squeeze(1),
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "log_sum_sq_probs": torch.log((log_p.exp() ** 2).sum(-1)),
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == targets,
    }


def run(hidden, weight, bias, targets, temperature=1.0, softcap=None, scale=1.0, outputs=ALL, chunk_size=16):
    out = CpuChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, scale, outputs)
    return dict(zip(("logprobs",) + OPTIONAL_OUTPUTS, out))


@pytest.mark.parametrize("temperature,softcap,scale", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_values_equal_direct_formulas(dtype, bias, temperature, softcap, scale):
    hidden, weight, b, targets = make_inputs(dtype=dtype, bias=bias, requires_grad=False)
    got = run(hidden, weight, b, targets, temperature, softcap, scale)
    want = direct(hidden, weight, b, targets, temperature, softcap, scale)
    # Both sides round the logits to the same compute dtype and then work in float32 (float64 for
    # float64 inputs), so they differ only by float32 / float64 summation order.
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], atol=tol, rtol=tol, msg=name)
    assert got["is_top1"].dtype == torch.bool
    assert torch.equal(got["is_top1"], want["is_top1"])
    # log-probs also equal the plain spelling of the brief: log_softmax(logits.float()).gather
    if dtype != torch.float64 and (temperature, softcap, scale) == (1.0, None, 1.0):
        logits = hidden @ weight.T + (b if b is not None else 0)
        plain = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(got["logprobs"], plain, atol=2e-6, rtol=2e-6)


def test_output_dtypes_follow_the_kernel():
    for dtype, stat in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32)]:
        hidden, weight, b, targets = make_inputs(dtype=dtype, requires_grad=False)
        got = run(hidden, weight, b, targets)
        for name in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logits"):
            assert got[name].dtype == stat, (dtype, name)
        assert got["is_top1"].dtype == torch.bool


def test_unrequested_outputs_are_none():
    hidden, weight, b, targets = make_inputs(requires_grad=False)
    out = CpuChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, 16, None, 1.0, ("log_probs",))
    assert len(out) == 5 and out[0] is not None and all(x is None for x in out[1:])
    out = CpuChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, 16, None, 1.0, ("log_probs", "is_top1"))
    assert out[1] is None and out[2] is None and out[3] is None and out[4] is not None
    # Defaults: every optional output, no softcap, scale 1
    out = CpuChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, 16)
    assert all(x is not None for x in out)


def test_is_top1_counts_only_the_first_of_tied_maxima():
    # The weight rows 3 and 5 are equal, so tokens 3 and 5 always tie; with a large norm they win
    hidden = torch.ones(4, 2, dtype=torch.float64)
    weight = torch.zeros(8, 2, dtype=torch.float64)
    weight[3] = weight[5] = 10.0
    targets = torch.tensor([3, 5, 0, 3])
    got = run(hidden, weight, None, targets)
    assert got["is_top1"].tolist() == [True, False, False, True]
    # In bf16 ties are common: compare with argmax (which returns the first maximum) on many random rows
    hidden, weight, _, _ = make_inputs(n=500, h=4, v=64, dtype=torch.bfloat16, bias=False, requires_grad=False)
    z = (hidden @ weight.T).float()
    targets = z.argmax(-1)
    # Move half of the targets onto a later tie where one exists
    for i in range(0, 500, 2):
        ties = (z[i] == z[i].max()).nonzero().flatten()
        targets[i] = ties[-1]
    got = run(hidden, weight, None, targets)
    assert torch.equal(got["is_top1"], z.argmax(-1) == targets)
    assert (~got["is_top1"]).any() and got["is_top1"].any()


def test_non_differentiable_outputs():
    hidden, weight, b, targets = make_inputs()
    got = run(hidden, weight, b, targets)
    assert got["logprobs"].requires_grad and got["entropy"].requires_grad
    for name in ("log_sum_sq_probs", "mean_logits", "is_top1"):
        assert not got[name].requires_grad, name


@pytest.mark.parametrize("temperature,softcap,scale", TRANSFORMS)
@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_equal_autograd_float64(which, bias, temperature, softcap, scale):
    hidden, weight, b, targets = make_inputs(bias=bias)
    params = [t for t in (hidden, weight, b) if t is not None]
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(hidden.shape[0], generator=g, dtype=torch.float64)
    g_ent = torch.randn(hidden.shape[0], generator=g, dtype=torch.float64)

    def loss_of(d):
        loss = 0
        if which in ("logprobs", "both"):
            loss = loss + (d["logprobs"] * g_lp).sum()
        if which in ("entropy", "both"):
            loss = loss + (d["entropy"] * g_ent).sum()
        return loss

    outputs = ALL if which != "logprobs" else ("log_probs", "mean_logits")
    got = torch.autograd.grad(loss_of(run(hidden, weight, b, targets, temperature, softcap, scale, outputs)), params)
    want = torch.autograd.grad(loss_of(direct(hidden, weight, b, targets, temperature, softcap, scale)), params)
    for gg, ww in zip(got, want):
        assert gg.dtype == ww.dtype == torch.float64
        torch.testing.assert_close(gg, ww, atol=1e-12, rtol=1e-10)


def test_gradcheck_float64():
    hidden, weight, b, targets = make_inputs(n=5, h=3, v=7)

    def f(h, w, bb):
        lp, ent, *_ = CpuChunkedLogProbFunction.apply(h, w, bb, targets, 0.9, 4, 2.0, 1.5, ALL)
        return lp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight, b))


def test_only_the_inputs_that_need_it_get_gradients():
    hidden, weight, b, targets = make_inputs()
    weight.requires_grad_(False)
    b.requires_grad_(False)
    run(hidden, weight, b, targets)["logprobs"].sum().backward()
    assert hidden.grad is not None and weight.grad is None and b.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_low_precision(dtype):
    """Gradients come back in each input's dtype; with float32 accumulation they are the float64
    gradient of the same (compute-dtype rounded) logits, up to the output's own rounding."""
    hidden, weight, b, targets = make_inputs(n=40, h=16, v=300, dtype=dtype)
    params = (hidden, weight, b)
    got = torch.autograd.grad(run(hidden, weight, b, targets)["logprobs"].sum(), params)
    # Reference: the same rounded logits, the softmax gradient in float64, rounded to the compute
    # dtype like the kernel's tile, products summed in float64
    with torch.no_grad():
        y = hidden @ weight.T + b  # rounded to dtype, like the kernel's tile
        p = torch.softmax(y.double(), -1)
        grad_y = -p
        grad_y[torch.arange(len(targets)), targets] += 1
        grad_y = grad_y.to(dtype).double()
        want = (grad_y @ weight.double(), grad_y.T @ hidden.double(), grad_y.sum(0))
        # float32 error terms: the softmax (a few ulps per element) and the float32 sums, each
        # bounded by a few float32 ulps of sum |grad_y| |factor|
        g_abs = grad_y.abs()
        scale = (g_abs @ weight.double().abs(), g_abs.T @ hidden.double().abs(), g_abs.sum(0))
    # one rounding to the output dtype, plus float32 softmax and accumulation
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    for name, gg, ww, ss in zip(("hidden", "weight", "bias"), got, want, scale):
        assert gg.dtype == dtype, name
        bound = eps * ww.abs() + 16 * eps32 * ss
        assert ((gg.double() - ww).abs() <= bound).all(), (name, (gg.double() - ww).abs().max().item())


def test_autocast_uses_the_autocast_dtype():
    hidden, weight, b, targets = make_inputs(dtype=torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(hidden, weight, b, targets)
    want = direct(hidden, weight, b, targets, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(got["logprobs"], want["logprobs"], atol=2e-6, rtol=2e-6)
    assert got["logprobs"].dtype == torch.float32
    # and it differs from the unrounded float32 answer, so the rounding did happen
    assert not torch.allclose(got["logprobs"], direct(hidden, weight, b, targets)["logprobs"], atol=1e-4)


def test_forced_float32_work_dtype_rounds_like_the_kernel():
    hidden, weight, b, targets = make_inputs()
    with use_cpu_kernel(work_dtype=torch.float32) as k:
        out = k.function.apply(hidden, weight, b, targets, 1.0, 16, None, 1.0, ALL)
    assert out[0].dtype == torch.float32
    want = direct(hidden, weight, b, targets, work_dtype=torch.float32)
    torch.testing.assert_close(out[0], want["logprobs"], atol=2e-6, rtol=2e-6)
    grads = torch.autograd.grad(out[0].sum(), (hidden, weight, b))
    assert all(g.dtype == torch.float64 for g in grads)


def test_use_cpu_kernel_patches_and_restores():
    import trl.trainer.utils as trl_utils

    before = trl_utils._ChunkedLogProbFunction
    with use_cpu_kernel() as k:
        assert trl_utils._ChunkedLogProbFunction is k
        hidden, weight, b, targets = make_inputs(requires_grad=False)
        trl_utils._ChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, 16, None, 1.0, ALL)
        assert k.calls == 1
    assert trl_utils._ChunkedLogProbFunction is before


def test_fused_lm_head_through_trl(cpu_kernel, tiny_model):
    """TRL's own `add_fused_lm_head` forward, under the substitute, equals log_softmax of the model's logits."""
    from trl.trainer.utils import add_fused_lm_head

    tiny_model.eval()
    input_ids = torch.randint(3, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        logits = tiny_model(input_ids=input_ids).logits
    add_fused_lm_head(tiny_model, outputs=("log_probs",) + ALL)
    out = tiny_model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert cpu_kernel.calls == 1
    log_p = torch.log_softmax(logits[:, :-1].float(), -1)
    shifted = labels[:, 1:]
    mask = shifted != -100
    want = log_p.gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(out.log_probs, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.label_mask, mask)
    out.loss.backward()
    assert tiny_model.lm_head.weight.grad is not None and tiny_model.lm_head.weight.grad.abs().sum() > 0


def test_dpo_trainer_trains_one_step_on_cpu(cpu_kernel, tokenizer, tiny_model, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_dict(
        {
            "prompt": ["The capital of France is", "Two plus two equals", "The sky is", "Water boils at"],
            "chosen": [" Paris.", " four.", " blue.", " 100 degrees Celsius."],
            "rejected": [" London.", " five.", " green.", " 10 degrees."],
        }
    )
    args = DPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        max_length=64,
        max_steps=1,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        learning_rate=1e-2,
        seed=0,
    )
    trainer = DPOTrainer(
        model=tiny_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(v.abs().sum() == 0 for v in lora_b.values())
    trainer.train()

    # policy and reference (the adapter disabled), two forwards each for chosen+rejected
    assert cpu_kernel.calls >= 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs, trainer.state.log_history
    # LoRA's B starts at zero, so the policy equals the reference at the first step and the
    # sigmoid DPO loss is exactly -log sigmoid(0) = log 2
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert math.isfinite(logs[0]["logps/chosen"]) and logs[0]["logps/chosen"] < 0
    # the gradient flowed back through the substitute into the adapter
    changed = [n for n, p in trainer.model.named_parameters() if n in lora_b and not torch.equal(p, lora_b[n])]
    assert changed
