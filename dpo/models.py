"""Model glue: load a causal LM and its tokenizer, add LoRA, run the reference, compute log-probs.

This is the only module that knows about transformers/peft model structure (and, later, Unsloth).
The math it calls lives in `dpo.logps`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from dpo import logps as logps_math
from dpo import smollm2
from dpo.config import DEFAULT_LORA_TARGETS
from dpo.paths import MODEL_FOLDER_NEEDS, model_folder_problem
from dpo.data.pairs import Batch

REF_ADAPTER = "ref"
# Fused projections some families use (Phi-3): LoRA on the fused matrix stands for LoRA on its parts.
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def resolve_model_path(name: str) -> str:
    """`smollm2-135m-instruct` (the embedded default) -> its plain local copy; anything else as given."""

    if name == smollm2.DEFAULT_MODEL:
        return str(smollm2.plain_copy())
    return name


def resolve_device(name: str) -> torch.device:
    """`auto` -> the GPU when CUDA is available, else the CPU; `cpu`, `cuda`, `cuda:N` as torch names them.

    ValueError (one line) for a name torch does not know or a GPU this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine (use auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


# What a loadable model folder holds (weights as safetensors only: this project loads no pickles).


def hub_problem(name: str, timeout_s: float = 3.0) -> str | None:
    """Why the hub model `name` (not a local folder) cannot be fetched now, as one line; None when it is in
    the local cache, the hub is switched off (HF_HUB_OFFLINE: the loader then says what is missing), or the
    hub answers. A short connection test, so an unreachable hub costs seconds, not minutes of retries."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None
    except ValueError:  # not a valid repo id: the loader's own message says so
        return None
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError as e:
        return (f"{name} is neither a local folder nor in the hub cache, and the hub ({constants.ENDPOINT}) cannot be "
                f"reached: {e.strerror or type(e).__name__}. Check the name, or the network")
    return None


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config.json as transformers reads it (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def weightless_model(config, trust_remote_code: bool = False):
    """The model `config` describes, on the meta device (no memory, no weights): its module names and
    layer types; None when the model class cannot be built that way."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - remote code or a class meta cannot build: checked after loading instead
        return None


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else EOS (as TRL pads)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # as TRL does: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and type(getattr(backend, "model", None)).__name__ == "BPE":
        # transformers skips this clean-up for BPE anyway (it would strip spaces), warning at the first decode
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def load_model(name_or_path: str, dtype: torch.dtype, device: str = "cpu", trust_remote_code: bool = False,
               load_in_4bit: bool = False):
    """A causal LM from safetensors only (no pickle); 4-bit NF4 through bitsandbytes on CUDA (QLoRA).
    A local folder loads without transformers' per-tensor loading bar (a hub model keeps its download bars)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if os.path.isdir(os.path.expanduser(name_or_path)):
        hf_logging.disable_progress_bar()

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if needs_eager_attention(AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)):
        kwargs["attn_implementation"] = "eager"
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device}
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).to(device)


def needs_eager_attention(config) -> bool:
    """Whether this model soft-caps its attention logits (Gemma 2: attn_logit_softcapping). transformers
    applies that cap in its eager (and flash/flex) attention, but SDPA, its default, silently leaves it
    out, which changes the logits of a real Gemma 2; such a model therefore runs eager attention."""
    text_config = getattr(config, "get_text_config", lambda: config)()
    return getattr(text_config, "attn_logit_softcapping", None) is not None


def attention_keeping_softcap(config, implementation: str) -> str:
    """`implementation`, or eager where it is SDPA and the model soft-caps attention (see needs_eager_attention)."""
    return "eager" if implementation == "sdpa" and needs_eager_attention(config) else implementation


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every Dropout's p to 0, as TRL's `disable_dropout=True` does (LoRA dropout included)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS


def add_lora(model, lora: LoraSettings):
    """A fresh LoRA adapter ("default"); the reference is then the same model with adapters disabled."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets_for(model, lora.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_targets_for(model, targets) -> list[str]:
    """The LoRA target names this model has: a name it lacks is replaced by the fused projection that
    holds it (q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj in Phi-3); one line when none is there."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    chosen: list[str] = []
    for name in targets:
        fused = [f for f, parts in FUSED_TARGETS.items() if name in parts and f in present]
        for found in ([name] if name in present else fused):
            if found not in chosen:
                chosen.append(found)
    if not chosen:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"--lora-targets {','.join(targets)}: no such module in this {kind} model "
                         f"(its linear layers: {', '.join(linear)})")
    return chosen


def load_starting_adapter(model, adapter_dir: str):
    """Continue training an existing adapter; a frozen copy named "ref" becomes the reference."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name="default", is_trainable=True)
    peft_model.load_adapter(adapter_dir, adapter_name=REF_ADAPTER, is_trainable=False)
    peft_model.set_adapter("default")
    for name, p in peft_model.named_parameters():
        p.requires_grad_(".default." in name and "lora_" in name)
    return peft_model


def cast_trainable_to_bf16(model) -> None:
    """QLoRA keeps its adapters in bfloat16 (Dettmers et al. 2023, and TRL does the same for quantized models)."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)


def enable_gradient_checkpointing(model) -> None:
    # Inputs must require grad so that checkpointed blocks see a graph to recompute (frozen embeddings).
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()


def _causal_lm(model):
    """The underlying *ForCausalLM module of a (possibly PEFT-wrapped) model."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


@contextlib.contextmanager
def reference_mode(model):
    """Run the reference policy: a frozen "ref" adapter where one exists, else adapters disabled."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        yield
        return
    if REF_ADAPTER in model.peft_config:
        previous = model.active_adapter
        model.base_model.set_adapter(REF_ADAPTER)
        try:
            yield
        finally:
            model.base_model.set_adapter(previous)
            for name, p in model.named_parameters():  # set_adapter may flip requires_grad; restore ours
                p.requires_grad_(".default." in name and "lora_" in name)
    else:
        with model.disable_adapter():
            yield


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout) inside the block; its train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def as_reference(model, ref_model=None):
    """Yield the module that computes the reference: `ref_model` (in eval mode) when given, else `model`
    in `reference_mode` (the frozen start adapter, or adapters off)."""
    if ref_model is not None:
        with eval_mode(ref_model):
            yield ref_model
    else:
        with reference_mode(model):
            yield model


class HostEmbedding(torch.nn.Module):
    """A frozen input-embedding table kept in CPU memory: ids[...] -> embeddings[..., H] on the ids' device.

    The lookup is a row copy, so the numbers are exactly those of the table on the GPU; only the
    [B, T, H] result crosses to the device (4 x 1024 x 4096 bf16 = 32 MiB for Llama-3-8B rows), while
    the table itself (128256 x 4096 bf16 = 0.98 GiB) stays off it. The table is a plain attribute,
    not a parameter or buffer, so `model.to(device)` leaves it on the host and `model.device` still
    names the GPU. With gradient checkpointing its output requires grad, as `enable_input_require_grads`
    makes it, so checkpointed blocks above it still get a graph to recompute. The table is not in the
    state_dict: export reloads the base model from disk (dpo.export), it never saves this one whole.
    """

    def __init__(self, weight: torch.Tensor, output_requires_grad: bool = True):
        super().__init__()
        self.table = weight.detach().to("cpu")
        self.num_embeddings, self.embedding_dim = self.table.shape
        self.output_requires_grad = output_requires_grad

    @property
    def weight(self) -> torch.Tensor:  # read by libraries that check the input embedding (frozen: no grad)
        return self.table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # ids on the GPU must come back to the host first (a device sync); completion_logps avoids it
        # by handing over the batch's own host copy through lookup().
        return self.lookup(input_ids.to("cpu"), input_ids.device)

    def lookup(self, host_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Embeddings of CPU-resident ids[...], delivered on `device` without waiting for it."""
        pin = torch.device(device).type == "cuda"  # a page-locked buffer lets the copy run asynchronously
        out = torch.empty((host_ids.numel(), self.embedding_dim), dtype=self.table.dtype, pin_memory=pin)
        torch.index_select(self.table, 0, host_ids.reshape(-1), out=out)
        out = out.view(*host_ids.shape, self.embedding_dim).to(device, non_blocking=pin)
        return out.requires_grad_() if self.output_requires_grad and torch.is_grad_enabled() else out


def embeddings_to_host(model, gradient_checkpointing: bool = True) -> int:
    """Move the input-embedding table of a (PEFT-wrapped) causal LM to CPU memory; returns bytes freed.

    Refused where the table is trained or tied to the LM head (the head needs it on the GPU), and for
    embedding modules that do more than a lookup (Gemma's scaled embeddings, say): HostEmbedding only
    looks rows up, so it would silently drop what they add.
    """
    lm = _causal_lm(model)
    emb = lm.get_input_embeddings()
    if isinstance(emb, HostEmbedding):
        return 0
    if not isinstance(emb, torch.nn.Embedding) or type(emb).forward is not torch.nn.Embedding.forward:
        raise ValueError(f"the input embedding is a {type(emb).__name__}, which does more than look rows up; "
                         "only a plain torch.nn.Embedding can move to CPU memory unchanged")
    head = lm.get_output_embeddings()
    if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():
        raise ValueError("this model ties its input embeddings to the LM head (tie_word_embeddings), so the "
                         "table must stay on the GPU for the head")
    if emb.weight.requires_grad:
        raise ValueError("the input embeddings are being trained, so they must stay on the GPU")
    freed = emb.weight.numel() * emb.weight.element_size() if emb.weight.is_cuda else 0
    lm.set_input_embeddings(HostEmbedding(emb.weight, output_requires_grad=gradient_checkpointing))
    del emb
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed


def completion_logps(model, batch: Batch, mode: str = "chunked", chunk_size: int = 256) -> torch.Tensor:
    """Summed completion log-probs of every row of the batch ([2B] float32), from one forward."""
    if mode == "full":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return logps_math.sequence_logps_from_logits(logits, batch.input_ids, batch.completion_mask)
    if mode != "chunked":
        raise ValueError(f"unknown log-prob mode {mode!r}: use 'chunked' or 'full'")
    hidden, lm_head = backbone_hidden(model, batch)
    return logps_math.sequence_logps_from_hidden(hidden, lm_head, batch.input_ids, batch.completion_mask, chunk_size)


def agrees_with_padded(model, batch: Batch, layout_logps, mode: str = "chunked", chunk_size: int = 256,
                       rtol: float = 2 * 2.0**-8) -> tuple[bool, float]:
    """(agrees, max relative difference) of another layout's summed log-probs (`layout_logps()`: [2B], in the
    padded order) against the padded path's, one no_grad forward each on a real micro-batch. A forward that
    lets the layout's sequences see each other misses by far more than rounding. rtol: 2 bfloat16 units of
    roundoff (the GPU suite's bound on summed log-probs)."""
    with torch.no_grad():
        padded = completion_logps(model, batch, mode, chunk_size)
        other = layout_logps()
    diff = ((other - padded).abs() / padded.abs().clamp_min(1.0)).max().item()
    return diff <= rtol, diff


def backbone_hidden(model, batch: Batch):
    """(hidden[R, T, H] of the last layer, the LM head): one backbone forward, no logits yet, so that
    any number of token masks can then be scored from it (`sequence_logps_from_hidden`)."""
    return backbone_forward(model, batch.input_ids, batch.host_input_ids, attention_mask=batch.attention_mask,
                            use_cache=False)


def backbone_forward(model, input_ids, host_input_ids=None, **kw):
    """(last hidden states, the LM head) of one backbone forward of any layout (padded, packed, shared: `kw`
    its mask and positions); a host-side embedding table is looked up on the ids in CPU memory, with no
    device sync."""
    lm = _causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    embedding = lm.get_input_embeddings()
    if isinstance(embedding, HostEmbedding) and host_input_ids is not None:
        inputs = {"inputs_embeds": embedding.lookup(host_input_ids, input_ids.device)}
    else:
        inputs = {"input_ids": input_ids}
    return backbone(**inputs, **kw).last_hidden_state, lm.get_output_embeddings()


class ScoredForward:
    """One forward of a batch (already on its device) whose rows can then be scored under any token mask:
    `sums(mask, rows)` = summed log-probs of input_ids[t+1] where mask[t+1] is 1 (the contract of
    dpo.logps), by the chunked (hidden states + LM head) or the full (logits) path; `wpo_weights`
    WPO's sequence weights from the same forward, without gradient."""

    def __init__(self, model, batch: Batch, mode: str = "chunked", chunk_size: int = 256):
        self.batch, self.mode, self.chunk_size = batch, mode, chunk_size
        if mode == "full":
            self.logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                use_cache=False).logits
        elif mode == "chunked":
            self.hidden, self.lm_head = backbone_hidden(model, batch)
        else:
            raise ValueError(f"unknown log-prob mode {mode!r}: use 'chunked' or 'full'")

    def sums(self, mask: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        ids = self.batch.input_ids[rows]
        if self.mode == "full":
            return logps_math.sequence_logps_from_logits(self.logits[rows], ids, mask[rows])
        return logps_math.sequence_logps_from_hidden(self.hidden[rows], self.lm_head, ids, mask[rows], self.chunk_size)

    def wpo_weights(self, completion_mask: torch.Tensor) -> torch.Tensor:
        ids = self.batch.input_ids
        if self.mode == "full":
            return logps_math.wpo_sequence_weights(*logps_math.wpo_token_terms_from_logits(self.logits, ids), completion_mask)
        return logps_math.wpo_weights_from_hidden(self.hidden, self.lm_head, ids, completion_mask, self.chunk_size)


# --- the Unsloth backend (GPU only) -------------------------------------------------------------


def unsloth_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None


def pick_backend(requested: str) -> str:
    if requested == "auto":
        return "unsloth" if unsloth_available() else "hf"
    if requested == "unsloth" and not unsloth_available():
        raise RuntimeError(
            "--backend unsloth needs a CUDA GPU and the unsloth package (pip install -e '.[gpu]')"
        )
    return requested


def load_unsloth(path: str, *, max_length: int, load_in_4bit: bool, dtype: torch.dtype | None,
                 lora: LoraSettings, seed: int, adapter: str | None = None, gradient_checkpointing: bool = True):
    """FastLanguageModel in (optionally) 4-bit, LoRA with Unsloth's gradient checkpointing, ready to train.

    `import unsloth` patches transformers/peft/trl, so it must run before they are first imported:
    `python -m dpo.train` imports them lazily, after this has run.
    """
    import unsloth  # noqa: F401  (must come first; it patches the libraries below)
    from unsloth import FastLanguageModel

    from dpo.unsloth_varlen import use_torch_varlen

    use_torch_varlen()  # packed micro-batches: one attention call per layer on torch 2.11 too
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=max_length, load_in_4bit=load_in_4bit, dtype=dtype
    )
    if adapter:
        model = load_starting_adapter(model, adapter)
    else:
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
            bias="none", use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed,
        )
    # None keeps the checkpointing get_peft_model set up ("unsloth"); False turns it off.
    FastLanguageModel.for_training(model, use_gradient_checkpointing=None if gradient_checkpointing else False)
    if load_in_4bit:
        cast_trainable_to_bf16(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
