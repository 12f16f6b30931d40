"""On CUDA, the plain-torch substitute (`tests/trl_cpu_kernel.py`) equals TRL 1.15's Triton kernel
`trl.kernels.ChunkedLogProbFunction`: forward outputs and the gradients w.r.t. hidden, weight and bias,
in float32 and bfloat16.

Run on a GPU host:  DPO_GPU_RESULTS=benchmarks/results/gpu_equivalence.json pytest -m gpu tests/test_gpu_kernel.py
Every comparison is recorded (name, max_abs_diff, tolerance, ...) through `tests/gpu_results.py`
before anything is asserted, so the JSON keeps the numbers of a failing case too.

How the tolerances are set (u = unit roundoff: float32 2^-24, bfloat16 2^-8). Every bound is first
order in per-element differences and is computed from this case's own inputs by `bounds()`:

* Logits. Both sides compute y = hidden @ weight.T (+ bias) with cuBLAS in the compute dtype, but with
  different GEMM shapes (the kernel tiles [4096 tokens, chunk_size vocab]), so float32 sums over H
  may be taken in different orders:
  - float32: |dy_nj| <= H u32 (|hidden| @ |weight|.T)_nj   (the classic gamma_H bound; TF32 off);
  - bfloat16: the float32 accumulations are then rounded to bfloat16. Float32 values ~1e-7 apart
    round to the same bfloat16 except next to a rounding boundary, where they land one bfloat16 ulp
    apart; the bias add (in bfloat16 too) can add one more: |dy_nj| <= 2 ulp_bf16(y_nj);
  - "exact" cases draw hidden, weight and bias on a coarse dyadic grid, so every product and partial
    sum is exact in float32: both sides hold bit-identical logits, dy = 0, and the tolerance is the
    float32 softmax noise alone, in bfloat16 as well. These are the tight checks.
  dz = dy |logit_scale| / T (tanh softcapping only shrinks differences), plus float32 evaluation
  noise e = 16 u32 (max|z| + log V) on every logit (the kernel sums an online, chunked logsumexp;
  the substitute calls torch.logsumexp).
* Forward outputs, per row, with m = sum_j p_j dz_j (how far log Z can move):
  log p_t: dz_t + m;  entropy: sum_j p_j |log p_j + H| dz_j + e (1 + H);
  log sum p^2: sum_j 2 p_j (p_j / sum p^2 + 1) dz_j;  mean logit: mean_j dz_j.
  is_top1: the count of differing rows; 0 where the logits are bit-identical, else the number of rows
  whose target is within dz of the top logit (only those can be decided either way).
* Gradients. grad_y = chain(g_lp (onehot - p) - g_ent p (log p + H)) is rounded to the compute dtype
  on both sides, multiplied into weight / hidden with float32 accumulation, and returned in the input
  dtype. With G_nj the size of grad_y's terms and dG_nj how far they move with dz (through p, H and
  the softcap's derivative), each element of grad_hidden = grad_y @ weight is within
    (G @ |weight|) (t_tile + 4 sqrt(V) u32 + 2 u_out) + dG @ |weight|
  t_tile: 2 u_bf16 (one grad_y element may round one bfloat16 ulp apart), 16 u32 in float32;
  4 sqrt(V) u32: float32 accumulation in different orders (probabilistic bound, Higham & Mary 2019);
  2 u_out: rounding the float32 result to the input dtype (both sides may land one ulp apart).
  Likewise grad_weight (sum over N tokens, factor |hidden|) and grad_bias.

Checked before any GPU run: TRL's real kernel in Triton's CPU interpreter (TRITON_INTERPRET=1) against
the substitute on small shapes of these kinds; all passed, the bfloat16 gradients differing by one
bfloat16 ulp of their largest elements (at most a third of these tolerances).
"""

from __future__ import annotations

import math

import pytest
import torch

from . import gpu_results
from .trl_cpu_kernel import OPTIONAL_OUTPUTS, CpuChunkedLogProbFunction

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (TRL's kernel is Triton-only)"),
]

U32 = 2.0**-24
U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}

# name, N tokens, H hidden, V vocab, chunk_size, bias, temperature, softcap, logit_scale, exact inputs, autocast
CASES = [
    # TRL's own chunk size (32768) with V = 32000: one partial vocabulary chunk
    dict(name="llama32k", N=300, H=64, V=32000, chunk=32768),
    # 32000 = 7 * 4096 + 3328: the last chunk is partial
    dict(name="llama32k-chunk4096", N=300, H=64, V=32000, chunk=4096),
    # a prime vocab over two TRL chunks, with bias and every transform
    dict(name="v50257-bias-transforms", N=257, H=128, V=50257, chunk=32768, bias=True, T=0.7, softcap=30.0, scale=0.5),
    # more tokens than the kernel's 4096-token tile: two token tiles, the last partial
    dict(name="n4500-tokens", N=4500, H=64, V=5003, chunk=2048),
    # bit-identical logits on both sides, so tight tolerances even in bfloat16
    dict(name="exact-grid", N=300, H=64, V=32000, chunk=4096, exact=True, scale=3.0),
    dict(name="exact-grid-bias-softcap", N=300, H=64, V=32001, chunk=4096, exact=True, bias=True, softcap=2.0, scale=4.0, T=0.9),
    # float32 master weights under bf16 autocast (TRL's bf16=True with an fp32 model): compute dtype bf16
    dict(name="autocast-bf16", N=300, H=64, V=32000, chunk=4096, autocast=True),
]


def make_inputs(case, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    N, H, V = case["N"], case["H"], case["V"]
    if case.get("exact"):
        # multiples of 1/4 and 1/16 with |k| <= 4: products are multiples of 1/64 below 1/4, so sums of
        # H <= 2^10 of them are exact in float32 and the GEMM order cannot matter
        hidden = torch.randint(-4, 5, (N, H), generator=g, device=device).float() / 4
        weight = torch.randint(-4, 5, (V, H), generator=g, device=device).float() / 16
        bias = torch.randint(-4, 5, (V,), generator=g, device=device).float() / 8 if case.get("bias") else None
    else:
        # logits with a standard deviation of about 3 and a maximum near 17, like a trained LM head's
        hidden = torch.randn(N, H, generator=g, device=device)
        weight = torch.randn(V, H, generator=g, device=device) * (3.0 / math.sqrt(H))
        bias = torch.randn(V, generator=g, device=device) * 0.5 if case.get("bias") else None
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    g_lp = torch.randn(N, generator=g, device=device)
    g_ent = torch.randn(N, generator=g, device=device) * 0.1
    in_dtype = torch.float32 if case.get("autocast") else dtype
    tensors = [t.to(in_dtype).requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    return (*tensors, targets, g_lp, g_ent)


def run(fn, case, dtype, hidden, weight, bias, targets, g_lp, g_ent):
    args = (hidden, weight, bias, targets, case.get("T", 1.0), case["chunk"], case.get("softcap"),
            case.get("scale", 1.0), OPTIONAL_OUTPUTS)
    if case.get("autocast"):
        with torch.autocast("cuda", dtype=dtype):
            out = fn.apply(*args)
    else:
        out = fn.apply(*args)
    params = [t for t in (hidden, weight, bias) if t is not None]
    loss = (out[0] * g_lp).sum() + (out[1] * g_ent).sum()
    grads = torch.autograd.grad(loss, params)
    return [o.detach() for o in out], grads


@torch.no_grad()
def bounds(case, dtype, hidden, weight, bias, targets, g_lp, g_ent):
    """The tolerances described in the module docstring, from the inputs of this case.

    First order and per element: each logit z_nj may differ by dz_nj between the two sides, and each
    output is bounded by the sum of its sensitivities times those differences.
    """
    V, H, N = case["V"], case["H"], case["N"]
    compute = dtype  # the bfloat16 autocast case computes in bfloat16 too
    T, softcap, scale = case.get("T", 1.0), case.get("softcap"), case.get("scale", 1.0)
    c = abs(scale) / T
    h_abs, w_abs = hidden.detach().float().abs(), weight.detach().float().abs()
    y = hidden.detach().to(compute) @ weight.detach().to(compute).T
    if bias is not None:
        y = y + bias.detach().to(compute)
    y = y.float()
    if case.get("exact"):
        dy = torch.zeros_like(y)
    elif compute == torch.float32:
        dy = H * U32 * (h_abs @ w_abs.T)  # gamma_H, element by element
    else:
        # two bfloat16 ulps of each logit: |y| = m 2^k with m in [0.5, 1) has ulp 2^(k-8)
        _, k = torch.frexp(y)
        dy = 2 * torch.ldexp(torch.ones_like(y), k - 8)
    dz = dy * c

    z = y * scale
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    z = z / T
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    ent = -(p * log_p).sum(-1)
    e = 16 * U32 * (z.abs().amax().item() + math.log(V))
    dze = dz + e
    rows = torch.arange(N, device=z.device)
    m = (p * dze).sum(-1)  # how far log Z can move
    d_ent = (p * (log_p + ent[:, None]).abs() * dze).sum(-1) + e * (1 + ent)
    sq = (p * p).sum(-1, keepdim=True)
    fwd = {
        "logprobs": (dze[rows, targets] + m).amax().item(),
        "entropy": d_ent.amax().item(),
        "log_sum_sq_probs": (2 * p * (p / sq + 1) * dze).sum(-1).amax().item() + e,
        "mean_logits": dze.mean(-1).amax().item(),
    }
    if case.get("exact"):
        top1 = 0  # bit-identical logits: the same argmax on both sides
    else:
        # rows whose target is within the possible differences of the top logit could be decided either way
        zt, zmax = z[rows, targets], z.amax(-1)
        top1 = int(((zmax - zt) <= dz[rows, targets] + dz.amax(-1) + 2 * e).sum().item())

    # |grad_y| per element, and how much it can move with the logits (the chain factor c applied after)
    gl, ge = g_lp.abs()[:, None], g_ent.abs()[:, None]
    gz = gl * p + ge * p * (log_p.abs() + ent[:, None])
    gz[rows, targets] += g_lp.abs()
    dp = p * (dze + m[:, None])  # |dp_j| <= p_j (dz_j + sum_k p_k dz_k)
    dgz = gl * dp + ge * (dp * (log_p.abs() + ent[:, None] + 1) + p * d_ent[:, None])
    if t is not None:
        # the softcap's derivative 1 - tanh^2 moves by at most 2 |tanh| dy * scale / cap
        dgz = dgz + gz * 2 * t.abs() * dy * abs(scale) / softcap
    gz, dgz = gz * c, dgz * c
    t_tile = 2 * U[torch.bfloat16] if compute == torch.bfloat16 else 16 * U32

    def grad_bound(terms_abs, moved, n_sum, out_dtype):
        rel = t_tile + 4 * math.sqrt(n_sum) * U32 + 2 * U[out_dtype]
        return (terms_abs * rel + moved).amax().item()

    grad = {
        "hidden": grad_bound(gz @ w_abs, dgz @ w_abs, V, hidden.dtype),
        "weight": grad_bound(gz.T @ h_abs, dgz.T @ h_abs, N, weight.dtype),
    }
    if bias is not None:
        grad["bias"] = grad_bound(gz.sum(0), dgz.sum(0), N, bias.dtype)
    return fwd, grad, top1, dz.amax().item()


def compare(case, dtype, kernel, substitute=CpuChunkedLogProbFunction, device="cuda"):
    """Run both functions on the same inputs, record every comparison, return the failures."""
    inputs = make_inputs(case, dtype, device=device)
    hidden, weight, bias, targets, g_lp, g_ent = inputs
    ref_out, ref_grads = run(kernel, case, dtype, *inputs)
    sub_out, sub_grads = run(substitute, case, dtype, *inputs)
    fwd_tol, grad_tol, top1_tol, max_dz = bounds(case, dtype, *inputs)
    dtype_name = str(dtype).removeprefix("torch.")
    extra = dict(N=case["N"], H=case["H"], V=case["V"], chunk_size=case["chunk"], dtype=dtype_name,
                 bias=bool(case.get("bias")), temperature=case.get("T", 1.0), softcap=case.get("softcap"),
                 logit_scale=case.get("scale", 1.0), exact_inputs=bool(case.get("exact")),
                 autocast=bool(case.get("autocast")), max_logit_diff_bound=max_dz)
    failures = []

    def check(metric, diff, tol, **more):
        entry = gpu_results.record(f"chunked_logprob/{case['name']}/{dtype_name}/{metric}", diff, tol, **extra, **more)
        if not entry["passed"]:
            failures.append(entry)

    for i, name in enumerate(("logprobs",) + OPTIONAL_OUTPUTS):
        a, b = ref_out[i], sub_out[i]
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        if name == "is_top1":
            check(name, (a != b).sum().item(), top1_tol, unit="rows that differ", rows_top1=a.sum().item())
        else:
            diff = (a.double() - b.double()).abs().max().item()
            check(name, diff, fwd_tol[name], max_abs_value=a.abs().max().item())
    names = ["hidden", "weight"] + (["bias"] if bias is not None else [])
    for name, a, b in zip(names, ref_grads, sub_grads):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
        diff = (a.double() - b.double()).abs().max().item()
        check(f"grad_{name}", diff, grad_tol[name], max_abs_value=a.abs().max().item(), grad_dtype=str(a.dtype))
    return failures


@pytest.fixture(scope="module", autouse=True)
def float32_matmul_without_tf32():
    """The float32 bounds assume IEEE float32 GEMMs (PyTorch's default); TF32 would round inputs to 10 bits."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def triton_kernel():
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"TRL's Triton kernel is not importable: {e}")
    return ChunkedLogProbFunction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_substitute_equals_triton_kernel(case, dtype, triton_kernel):
    if case.get("autocast") and dtype == torch.float32:
        pytest.skip("autocast is a bfloat16 case")
    failures = compare(case, dtype, triton_kernel)
    assert not failures, failures


def test_kernel_is_the_one_trl_uses(triton_kernel):
    import trl.trainer.utils as trl_utils

    assert trl_utils._ChunkedLogProbFunction is triton_kernel
    gpu_results.record("trl_uses_triton_kernel", 0.0, 0.0, kernel=f"{triton_kernel.__module__}.{triton_kernel.__qualname__}")
