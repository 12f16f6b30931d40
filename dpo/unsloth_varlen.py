"""Unsloth's packed attention on torch 2.11: one flash-attention varlen call per layer, not one per sequence.

Unsloth 2026.10.9 sends a packed row's attention to torch's varlen flash kernel only where
`torch.nn.attention.varlen.varlen_attn` takes `enable_gqa` (torch 2.12 and later). On torch 2.11, the
CUDA build our GPU hosts carry, it falls back to one SDPA call per run of equal-length sequences, each
wrapped in pads, slices and zero-filled gradients: measured on an H200 (8B QLoRA, 8 pairs packed in one
row), about 17,500 kernel launches per optimizer step, with aten::pad, aten::zeros, slice_backward and
select_backward the most called host ops. The kernel Unsloth would call, `aten._flash_attention_forward`
with cumulative sequence offsets, is in torch 2.11 and takes fewer key/value heads than query heads
itself; only the Python wrapper with that signature is missing. `use_torch_varlen()` supplies it, routed
through Unsloth's own autograd function for that kernel, so Unsloth's choice logic runs unchanged.

Glue at the edge (it sets three names in a private Unsloth module of the pinned version); that the
packed path still equals the padded one is tests/test_gpu_packing.py, run with this in place.
"""

from __future__ import annotations


def use_torch_varlen() -> str:
    """Give Unsloth's packed attention a varlen flash call where torch lacks one; returns what was done."""
    import torch

    try:
        from unsloth.utils import attention_dispatch as dispatch
    except ImportError:
        return "unsloth has no attention_dispatch module: left as is"
    if dispatch._TORCH_VARLEN_ATTN is not None:
        return "torch's varlen_attn already in use"
    lean = getattr(dispatch, "_LeanFlashVarlen", None)
    if (lean is None or not torch.cuda.is_available() or not hasattr(torch.ops.aten, "_flash_attention_forward")
            or not torch.backends.cuda.is_flash_attention_available()):
        return "no flash-attention kernel in this torch build: per-sequence attention"

    def varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
               enable_gqa=False):
        """varlen_attn's contract for packed self-attention: [T, H, D] queries, [T, H_kv, D] keys/values."""
        if cu_seq_q is not cu_seq_k or max_q != max_k:  # Unsloth passes one set of offsets for both
            raise ValueError("packed self-attention needs the same sequence offsets for queries and keys")
        left, right = window_size
        return lean.apply(query, key, value, cu_seq_q, max_q, (left, right) == (-1, 0), scale, left, right)

    dispatch._TORCH_VARLEN_ATTN = varlen
    dispatch._LEAN_VARLEN = True
    dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False  # torch 2.11 has no cuDNN varlen route
    return "torch 2.11: flash-attention varlen kernel supplied to Unsloth (one call per layer)"
