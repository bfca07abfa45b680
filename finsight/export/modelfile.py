"""An Ollama ``Modelfile`` beside every ``.gguf`` export: the chat template, stop tokens, system prompt and
sampling defaults the model was trained and is chatted with, so ``ollama create finsight -f <file>.Modelfile``
gives a model that answers in its own format and stops at the end of its turn.

Ollama writes chat templates in Go's template language, not Jinja. finsight knows the layouts of the families it
supports (ChatML as in SmolLM2, Llama-2, and Mistral's ``[INST]`` without a system role, where finsight folds the
system prompt into the first user turn as in training) and fills in the tokenizer's own BOS/EOS strings. A layout
is only written after it is checked: rendered with :mod:`finsight.export.go_template` for several conversations,
it must give exactly what the tokenizer's chat template gives (finsight's ``ChatEncoder``, the rendering training
used), less the BOS token that llama.cpp adds itself. A template that matches none of them gets no Modelfile and
one warning naming why: a wrong template is the commonest reason a fine-tuned model never stops.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from finsight.atomic import atomic_path
from finsight.data.chat import ChatEncoder
from finsight.errors import FinSightError
from finsight.export import go_template
from finsight.inference.decoding import chat_generation_config, stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ModelfileTemplateError(FinSightError, ValueError):
    """The tokenizer's chat template is none of the layouts finsight can write as an Ollama template.

    Fix: export the GGUF file without the Modelfile and write its `TEMPLATE` by hand, or use a model whose chat
    template is one of the common layouts (ChatML, Llama-2, Mistral, Llama-3); a system prompt must not contain
    template markers.
    """


# Each layout with ``{bos}`` and ``{eos}`` for the tokenizer's own strings, and ``{lead}`` for the BOS that starts
# the prompt when llama.cpp does not add it itself (empty when it does). ``.Messages`` holds the system
# message first (Ollama puts the Modelfile's SYSTEM there); ``$.System`` is its content.
LAYOUTS: dict[str, str] = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"),
    "llama-2": (
        '{{- range $i, $m := .Messages }}\n'
        '{{- if eq $m.Role "user" }}{{ if gt $i 1 }}{bos}{{ else }}{lead}{{ end }}[INST] '
        '{{ if and (eq $i 1) $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ $m.Content }} [/INST]\n'
        '{{- else if eq $m.Role "assistant" }} {{ $m.Content }} {eos}\n'
        '{{- end }}\n'
        '{{- end }}'),
    "mistral": (
        '{lead}{{- range $i, $m := .Messages }}\n'
        '{{- if eq $m.Role "user" }}[INST] {{ if and (eq $i 1) $.System }}{{ $.System }}\n\n{{ end }}'
        '{{ $m.Content }} [/INST]\n'
        '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}{eos}\n'
        '{{- end }}\n'
        '{{- end }}'),
}

# Conversations the layout must render exactly as the chat template: one turn, several turns, a long answer
# with blank lines and figures.
_PROBES = (
    [{"role": "user", "content": "What is an expense ratio?"}],
    [{"role": "user", "content": "Define EBITDA."}, {"role": "assistant", "content": "Earnings before interest."},
     {"role": "user", "content": "And the margin?"}],
    [{"role": "user", "content": "Revenue in 2021?"},
     {"role": "assistant", "content": "It rose 12%\n\nto $1,200 million."},
     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome."},
     {"role": "user", "content": "One more: net income?"}],
)


def ollama_template(tokenizer: PreTrainedTokenizerBase, system_prompt: str) -> tuple[str, str]:
    """The Go template for this tokenizer's chat template and the layout's name, checked on the probe chats.

    Raises ``ModelfileTemplateError`` when no layout renders every probe exactly as the chat template does.
    """
    encoder = ChatEncoder.untruncated(tokenizer)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    # A tokenizer that adds BOS itself (Llama-2, Mistral) has it in the GGUF as add_bos_token, and llama.cpp
    # adds it too: the template leaves out the one the chat template starts with.
    adds_bos = bool(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    mismatches: list[tuple[int, str]] = []
    for name, layout in LAYOUTS.items():
        template = layout.replace("{bos}", bos).replace("{eos}", eos).replace("{lead}", "" if adds_bos else bos)
        for probe in _PROBES:
            messages = [*([{"role": "system", "content": system_prompt}] if system_prompt else []), *probe]
            expected = encoder.render(messages, add_generation_prompt=True)
            if adds_bos and expected.startswith(bos):
                expected = expected[len(bos):]  # llama.cpp adds it
            rendered = go_template.render(template, {"System": system_prompt,
                                                     "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                                  for m in messages]})
            if rendered != expected:
                same = len(os.path.commonprefix([rendered, expected]))
                mismatches.append((same, f"{name} renders {rendered[same:same + 60]!r} where the chat template has "
                                         f"{expected[same:same + 60]!r} (after {expected[max(0, same - 30):same]!r})"))
                break
        else:
            return template, name
    raise ModelfileTemplateError("the chat template is none of the layouts an Ollama Modelfile can be written for "
                                 f"({', '.join(LAYOUTS)}); the closest, {max(mismatches)[1]}")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ModelfileTemplateError('a template or system prompt holding """ cannot be written in a Modelfile')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, tokenizer: PreTrainedTokenizerBase, system_prompt: str) -> str:
    """The Modelfile for ``gguf_name`` (a file in the same folder)."""
    template, layout = ollama_template(tokenizer, system_prompt)
    stops = [tokenizer.convert_ids_to_tokens(token) for token in stop_token_ids(tokenizer)]
    decoding = chat_generation_config()  # the sampling defaults of `finsight chat`
    lines = [f"# {layout} chat template, checked against the tokenizer's; written by finsight export",
             f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(template)}",
             *([f"SYSTEM {_quoted(system_prompt)}"] if system_prompt else []),
             *(f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops)),
             f"PARAMETER temperature {decoding.temperature}", f"PARAMETER top_p {decoding.top_p}",
             f"PARAMETER repeat_penalty {decoding.repetition_penalty}"]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer: PreTrainedTokenizerBase, system_prompt: str) -> Path | None:
    """Write ``<file>.Modelfile`` beside ``gguf_path`` (atomically); None, with a warning, for an unknown template."""
    try:
        text = modelfile_text(gguf_path.name, tokenizer, system_prompt)
    except ModelfileTemplateError as error:
        log.warning("No Ollama Modelfile written: %s", error)
        return None
    path = gguf_path.with_suffix(".Modelfile")
    with atomic_path(path, "the Ollama Modelfile") as temporary:
        temporary.write_text(text)
    return path
