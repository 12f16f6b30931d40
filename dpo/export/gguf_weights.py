"""Is the adapter in a GGUF file? Its dequantised weights against the merged and the base model's, tensor by tensor.

The logits cannot always tell: two training steps move them less than 8-bit rounding does. The weights can.
For a weight W the adapter changes by d = M - B (merged minus base), a file holding G = M + e (e: rounding)
gives

    D = |G - B|^2 - |G - M|^2 = sum d (2 e + d)  ~  +|d|^2,   and a file of the bare base (G = B + e)  ~  -|d|^2,

with noise 2 sqrt(sum e^2 d^2) (rounding independent of d: blocks are scaled by their largest weight, which a
small d hardly moves). Summed over every tensor the adapter changes, D over its noise (z) separates the two
by many standard deviations even where |d| is far below the rounding step, since the sums run over millions
of weights. Tensors are found by llama.cpp's own name map (the `gguf` package's TensorNameMap, the table its
converter uses); one the converter re-laid out (Llama's Q/K rows are permuted for its RoPE) is far from both
and skipped, as are tensors whose names or sizes do not map.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpo.export import gguf_layout

Z_DECIDES = 5.0  # |z| above this decides; below, the weights cannot tell (and the check does not fail)
ALIGNED = 0.5  # a tensor is compared only if the file is within this relative distance of the merged or base one


@dataclass
class WeightCheck:
    tensors: int  # tensors compared (changed by the adapter, found in the file, laid out alike)
    to_merged: float  # RMS distance of the file's weights to the merged ones, over those tensors
    to_base: float  # ... to the base ones
    delta: float  # RMS of the adapter's change d
    z: float  # D over its noise

    @property
    def verdict(self) -> bool | None:
        """True: the adapter is in the file; False: the file holds the base weights; None: cannot tell."""
        if self.tensors == 0 or self.delta == 0 or abs(self.z) < Z_DECIDES:
            return None
        return self.z > 0

    def line(self) -> str:
        return (f"over the {self.tensors} tensors the adapter changes (by RMS {self.delta:.3g}) the file's weights are "
                f"RMS {self.to_merged:.3g} from the merged model's, {self.to_base:.3g} from the base's "
                f"({abs(self.z):.3g} standard deviations {'nearer' if self.z > 0 else 'farther'})")


def weight_check(triples) -> WeightCheck:
    """`triples` yields (file, merged, base) float arrays of one shape (numpy), one per tensor."""
    import numpy as np

    n = count = 0
    sq_m = sq_b = sq_d = var = 0.0
    for g, m, b in triples:
        g, m, b = (np.asarray(x, dtype=np.float64) for x in (g, m, b))
        em, eb, d = g - m, g - b, m - b
        scale = max(np.sqrt((m * m).sum()), 1e-30)
        if min(np.sqrt((em * em).sum()), np.sqrt((eb * eb).sum())) > ALIGNED * scale:
            continue  # laid out otherwise in the file (a permutation): far from both
        count += 1
        n += g.size
        sq_m += float((em * em).sum())
        sq_b += float((eb * eb).sum())
        sq_d += float((d * d).sum())
        var += 4.0 * float((np.minimum(em * em, eb * eb) * d * d).sum())
    if count == 0:
        return WeightCheck(0, 0.0, 0.0, 0.0, 0.0)
    diff = sq_b - sq_m
    z = diff / np.sqrt(var) if var > 0 else (np.inf if diff > 0 else -np.inf if diff < 0 else 0.0)
    return WeightCheck(count, (sq_m / n) ** 0.5, (sq_b / n) ** 0.5, (sq_d / n) ** 0.5, float(z))


def changed_tensors(merged, base) -> dict[str, tuple]:
    """HF name -> (merged, base) float32 numpy arrays, for the tensors the adapter changed."""
    import torch

    base_sd = base.state_dict()
    out = {}
    for name, m in merged.state_dict().items():
        b = base_sd.get(name)
        if b is not None and b.shape == m.shape and not torch.equal(m, b):
            out[name] = (m.detach().float().numpy(), b.detach().float().numpy())
    return out


def file_triples(path, changed: dict[str, tuple]):
    """(file, merged, base) arrays for each changed tensor the GGUF file holds under llama.cpp's name for it."""
    import gguf
    import numpy as np

    layout = gguf_layout.read_layout(path)
    arch = layout.fields["general.architecture"]
    arch_enum = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    blocks = layout.fields.get(f"{arch}.block_count")
    if arch_enum is None or blocks is None:
        return  # a family this gguf package does not know: nothing compared
    names = gguf.get_tensor_name_map(arch_enum, int(blocks))
    wanted = {}
    for hf_name, pair in changed.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            wanted[gguf_name] = pair
    for t in layout.tensors:
        pair = wanted.get(t.name)
        if pair is None:
            continue
        kind = gguf.GGMLQuantizationType(t.ggml_type)
        g = np.asarray(gguf.quants.dequantize(gguf_layout.tensor_data(layout, t), kind), dtype=np.float32)
        if g.size == pair[0].size:
            yield g.reshape(pair[0].shape), pair[0], pair[1]


def check_file(path, merged, base) -> WeightCheck:
    """weight_check of the GGUF file at `path` against the two torch models."""
    return weight_check(file_triples(path, changed_tensors(merged, base)))
