"""The Ollama Modelfile: its template renders conversations exactly as the chat template the model was trained
with (rendered by the Go-template subset, since Ollama is not available here), its stops end the turn."""

from __future__ import annotations

import logging

import pytest
from helpers import CHATML_TEMPLATE, LLAMA2_TEMPLATE, NO_SYSTEM_TEMPLATE, build_tokenizer, parse_modelfile

from finsight.data.chat import ChatEncoder
from finsight.export import go_template
from finsight.export.modelfile import modelfile_text, write_modelfile

SYSTEM = "You are FinSight, a finance assistant."
# Not one of the conversations the export checks the layout on: a different length, unicode and markdown.
CONVERSATION = [{"role": "user", "content": "Compare a Roth IRA and a 401(k) — briefly."},
                {"role": "assistant", "content": "**Roth IRA**: taxed now.\n- 401(k): taxed later, 2024 limit $23,000."},
                {"role": "user", "content": "Which one first?"},
                {"role": "assistant", "content": "Usually the 401(k) up to the match."},
                {"role": "user", "content": "Why?"}]


@pytest.mark.parametrize("chat_template, layout", [(CHATML_TEMPLATE, "chatml"), (LLAMA2_TEMPLATE, "llama-2"),
                                                   (NO_SYSTEM_TEMPLATE, "mistral")])
def test_the_template_renders_a_conversation_as_the_chat_template_does(chat_template, layout):
    tokenizer = build_tokenizer(chat_template)
    text = modelfile_text("model-q8_0.gguf", tokenizer, SYSTEM)
    modelfile = parse_modelfile(text)
    assert modelfile["FROM"] == ["./model-q8_0.gguf"] and modelfile["SYSTEM"] == [SYSTEM]
    messages = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    # What training fed the model (a system role folded into the first user turn where the template has none).
    expected = ChatEncoder.untruncated(tokenizer).render(messages, add_generation_prompt=True)
    rendered = go_template.render(modelfile["TEMPLATE"][0], {
        "System": SYSTEM, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    assert rendered == expected  # this tokenizer adds no BOS itself: the template writes it
    assert text.startswith(f"# {layout} chat template, checked against the tokenizer's")
    # The answer ends at the end-of-turn token: the one the template closes an assistant turn with.
    assert modelfile["PARAMETER"][0] == 'stop "<|im_end|>"'
    ending = ChatEncoder.untruncated(tokenizer).render([*messages, {"role": "assistant", "content": "END"}])
    assert ending.rpartition("END")[2].lstrip().startswith("<|im_end|>")
    assert modelfile["PARAMETER"][1:] == ["temperature 0.7", "top_p 0.9", "repeat_penalty 1.1"]


def test_a_bos_the_tokenizer_adds_itself_is_left_to_llama_cpp():
    from tokenizers import processors

    tokenizer = build_tokenizer(LLAMA2_TEMPLATE)
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    template = parse_modelfile(modelfile_text("m.gguf", tokenizer, SYSTEM))["TEMPLATE"][0]
    messages = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    expected = ChatEncoder.untruncated(tokenizer).render(messages, add_generation_prompt=True)
    rendered = go_template.render(template, {"System": SYSTEM, "Messages": [
        {"Role": m["role"], "Content": m["content"]} for m in messages]})
    assert expected.startswith(bos) and rendered == expected[len(bos):]
    assert rendered.count(bos) == 2  # the later user turns keep theirs


def test_an_unknown_template_gets_no_modelfile_and_one_warning(tmp_path, caplog):
    tokenizer = build_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with caplog.at_level(logging.WARNING, logger="finsight"):
        assert write_modelfile(tmp_path / "m.gguf", tokenizer, SYSTEM) is None
    assert list(tmp_path.iterdir()) == []
    assert "No Ollama Modelfile written: the chat template is none of the layouts" in caplog.text
