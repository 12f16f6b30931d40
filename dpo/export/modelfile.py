"""An Ollama Modelfile for an exported GGUF file, so that `ollama create NAME -f FILE.Modelfile` needs no edits.

The chat template is a Jinja template in the tokenizer; Ollama's is a Go template over `.Messages`. The
common families are recognised by their turn markers and written as Ollama's own templates for them render
them; another template is left out, with a comment saying so (Ollama then sends the bare prompt).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    markers: tuple[str, ...]  # all present in the Jinja template
    template: str  # Ollama's Go template
    stops: tuple[str, ...]


FORMATS = (
    ChatFormat("ChatML", ("<|im_start|>", "<|im_end|>"),
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>")),
    ChatFormat("Llama 3", ("<|start_header_id|>", "<|eot_id|>"),
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ChatFormat("Gemma", ("<start_of_turn>", "<end_of_turn>"),
               "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
               "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
               ("<start_of_turn>", "<end_of_turn>")),
    ChatFormat("Phi-3", ("<|user|>", "<|assistant|>", "<|end|>"),
               "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
               ("<|end|>", "<|user|>", "<|assistant|>")),
    ChatFormat("Mistral", ("[INST]", "[/INST]"),
               "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
               "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}",
               ("[INST]", "[/INST]")),
)


def chat_format(chat_template: str | None) -> ChatFormat | None:
    """The family whose turn markers the Jinja template uses, or None."""
    if not chat_template:
        return None
    for fmt in FORMATS:
        if all(m in chat_template for m in fmt.markers):
            return fmt
    return None


def modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None, adapter_name: str | None = None) -> str:
    """The Modelfile text: FROM the GGUF beside it (and ADAPTER for a LoRA file), TEMPLATE, stop tokens."""
    fmt = chat_format(chat_template)
    lines = ["# Written by dpo.export: ollama create NAME -f THIS_FILE", f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    if fmt is None:
        why = "the model has no chat template" if not chat_template else "its chat template is not one of " + \
            ", ".join(f.name for f in FORMATS)
        lines.append(f"# TEMPLATE omitted: {why}; write one in Ollama's Go template syntax to chat with it")
    else:
        lines.append(f"# {fmt.name} chat format, translated from the tokenizer's chat template")
        lines.append(f'TEMPLATE """{fmt.template}"""')
    stops = list(fmt.stops if fmt else ())
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
