"""Prefix-shared rows on the Unsloth backend: Unsloth's own FlexAttention shared-prefix kernel.

Unsloth 2026.10.9 dedups GRPO prompts with a shared-prefix attention ("PrefixGrouper"): its patched
attention forwards (llama, mistral, qwen3, gemma2, cohere, granite) take a `prefix_seg_info` segment table
through the model's keyword arguments and then run a FlexAttention block mask in which each suffix sees
its group's whole prefix and itself, causally, and nothing of any other group or suffix. A DPO pair laid
out as [prompt | chosen | rejected] is such a group with two suffixes, so dpo/sharing.py's one-row layout
goes through that kernel unchanged: the blocks the mask removes are never computed, where a dense mask
computes them and throws them away, and no 4D mask reaches Unsloth's attention (which takes none).

Glue at the edge (a module of the pinned Unsloth, imported only when a forward asks for it); that the
route equals the padded path is tests/test_gpu_sharing.py, and each run checks it again on its first
micro-batch before using it (Trainer.choose_layout).
"""

from __future__ import annotations

# Unsloth's attention forwards that pass the segment table to the kernel; any other decoder would ignore it
# and let the two completions of a pair see each other.
ARCHITECTURES = ("llama", "mistral", "qwen3", "gemma2", "cohere", "granite")


def unsupported(config) -> str | None:
    """Why this model's Unsloth forward cannot take the shared-prefix kernel (None: it can)."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"Unsloth's shared-prefix attention covers {', '.join(ARCHITECTURES)}, not {kind}"
    if getattr(config, "attn_logit_softcapping", None):
        return "the shared-prefix kernel does not apply attention logit softcapping"
    if getattr(config, "attention_dropout", 0):
        return "the shared-prefix kernel applies no attention dropout"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return f"the shared-prefix kernel applies no sliding window (this model attends {window} tokens back)"
    return None


def segment_table(segments: list[tuple[int, int, int]], device):
    """Unsloth's PrefixSegInfo for pairs laid out one after another in one row: each pair (prompt, chosen,
    rejected) tokens is one group, its prompt the prefix, its two completions the suffixes."""
    from unsloth.utils.prefix_grouper_kernel import build_seg_info_multigroup

    table, _ = build_seg_info_multigroup([(p, [c, r]) for p, c, r in segments], device)
    return table
