"""Helpers shared by the tests: the tiny model and tokenizer, CLI arguments, shared runs, files, subprocesses.

The hand-written chat rendering here is written from the template's definition and tokenized one segment at a
time, so a mask bug in ``ChatEncoder`` (which renders with the tokenizer's template and maps character spans
through offsets) cannot be reproduced by the check itself.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finsight.data.chat import IGNORE_INDEX
from finsight.model.settings import QuantizationSettings
from finsight.training.checkpoint import best_checkpoint_callback, newest_last_checkpoint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CONFIG_DIR = ROOT / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
DDP_TIMEOUT_S = 480


# ------------------------------------------------------------------ the tiny model and tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SAMPLES = ROOT / "finsight" / "data" / "samples"


def build_tokenizer(template: str | None = CHATML_TEMPLATE):
    """A byte-level BPE trained on the bundled samples, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("reddit_finance.jsonl", "company_qa.jsonl"):
        for line in (SAMPLES / name).read_text().splitlines():
            row = json.loads(line)
            texts.extend(str(v) for v in row.values() if isinstance(v, str))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


def build_tiny_model_folder(folder: Path, tokenizer) -> Path:
    """A 2-layer random Llama saved as an ordinary Hugging Face folder with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Runs of the quickstart config pin float32: the config's precision follows the CPU (bf16-mixed where it is
# native), and the tests compare with float32 references on every machine. tests/model/test_precision.py covers
# the choice itself.
FLOAT32_PRECISION = "--trainer.precision=32-true"

TINY_NF4 = QuantizationSettings(kind="nf4", compute_dtype="float32", attn_implementation="sdpa")
"""The tests' 4-bit settings: NF4 with double quantization, float32 compute (bitwise comparable everywhere)."""


def sample_sources(reddit_fraction: float = 0.67, intro_rows: int = 40) -> list[dict]:
    """The bundled mixture, as the quickstart uses it."""
    return [
        {"name": "reddit_finance", "path": "bundled:reddit_finance", "format": "reddit",
         "fraction": reddit_fraction},
        {"name": "company_qa", "path": "bundled:company_qa", "format": "qa", "fraction": 1.0},
        {"name": "intro", "format": "intro", "fraction": 1.0, "rows": intro_rows},
    ]


def prepared_datamodule(model_dir: Path, max_length: int, batch_size: int):
    """The bundled mixture prepared with one process and set up for fitting."""
    from finsight import FinSightDataModule

    dm = FinSightDataModule(sources=sample_sources(), tokenizer=str(model_dir), max_length=max_length,
                            batch_size=batch_size, num_proc=1)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def qlora_module_for_gradients(model_dir: Path, monkeypatch):
    """The real 4-bit QLoRA module in float32, no dropout, with non-zero LoRA B (so every LoRA tensor gets a
    gradient) and logging switched off: for comparing one training step's gradients between two batchings."""
    import torch

    from finsight import FinSightModule

    module = FinSightModule(model_name=str(model_dir), compute_dtype="float32", lora_dropout=0.0)
    module.configure_model()
    torch.manual_seed(0)
    for name, param in module.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    return module


def free_port() -> int:
    """A local TCP port nothing listens on, for a server a test starts."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server, what: str, timeout_s: float = 120) -> None:
    """Poll ``url``/health until it answers 200; fail with the server's output when it exits or time runs out."""
    import time
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            if server.poll() is None:  # still starting after the deadline
                server.terminate()
            output = server.communicate(timeout=30)[0]
            pytest.fail(f"{what} did not start (exit status {server.returncode}; a negative one is the signal that "
                        f"stopped it):\n{(output or '')[-3000:]}")
        time.sleep(0.5)


def tensorboard_scalars(log_dir: str | Path, tag: str) -> dict[int, float]:
    """A scalar's values by step, read back from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


# ------------------------------------------------------------------ CLI arguments and shared runs

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def tiny_fit_args(model_dir: Path, root: Path, *extra: str) -> list[str]:
    """`finsight fit` arguments for a 2-step run of the quickstart config on the tiny model."""
    return [
        "fit", "--config", str(QUICKSTART),
        f"--model.model_name={model_dir}",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={root / 'lightning_logs'}",
        "--data.max_length=512", "--data.num_proc=1", FLOAT32_PRECISION, *extra,
    ]


def exported_adapter(cli) -> Path:
    """The folder the CLI's end-of-fit export wrote."""
    from finsight.export.adapter import AdapterExport

    return next(c.path for c in cli.trainer.callbacks if isinstance(c, AdapterExport))




def tiny_run_args(command: str, model_dir: Path, root: Path, *extra: str) -> list[str]:
    """Arguments of a `finsight <command>` run of the quickstart config on the tiny model."""
    return [
        command, "--config", str(QUICKSTART), f"--model.model_name={model_dir}",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={root / 'lightning_logs'}",
        "--data.max_length=512", "--data.num_proc=1", FLOAT32_PRECISION, *extra,
    ]


def sampled_fit_args(model_dir: Path, root: Path, *extra: str) -> list[str]:
    """3 optimizer steps with a validation after step 2: generation happens mid-training."""
    return tiny_run_args("fit", model_dir, root, "--trainer.max_steps=3", "--trainer.val_check_interval=2",
                         "--trainer.limit_val_batches=2", *extra)


def tiny_test_args(model_dir: Path, root: Path, *extra: str) -> list[str]:
    """`finsight test` on two batches of the held-out split, with short answers."""
    return tiny_run_args("test", model_dir, root, "--trainer.limit_test_batches=2",
                         "--eval.max_new_tokens=6", *extra)


SAMPLES_CALLBACK = ("--trainer.callbacks+=finsight.callbacks.GenerationSamples",
                    "--trainer.callbacks.max_new_tokens=6")
_RUNS: dict[str, dict] = {}


def sampled_fit(model_dir: Path, tmp_path_factory) -> dict:
    """One tiny fit with the samples callback, shared by the tests that need a trained adapter/checkpoint."""
    if "sampled" not in _RUNS:
        from finsight.cli.lightning_cli import main

        root = tmp_path_factory.mktemp("sampled-fit")
        cli = main(sampled_fit_args(model_dir, root, *SAMPLES_CALLBACK))
        _RUNS["sampled"] = {
            "log_dir": Path(cli.trainer.log_dir),
            "adapter": exported_adapter(cli),
            "best": Path(best_checkpoint_callback(cli.trainer).best_model_path),
            "last": Path(newest_last_checkpoint(cli.trainer)),
            "callback": next(c for c in cli.trainer.callbacks if type(c).__name__ == "GenerationSamples"),
        }
    return _RUNS["sampled"]


EXPORT_IDS = [[5, 17, 42, 99, 7, 3, 100, 200, 11, 60]]
"""Token ids the export tests compare logits on (a list: this module does not import torch at load)."""

PROMPTS = ("What is an expense ratio?", "Hi", "Explain compound interest with an example, please.",
           "What does a company report in its 10-K filing?", "Is a Roth IRA taxed?", "Who are you?")


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    from finsight.data.chat import ChatEncoder

    text = ChatEncoder(tokenizer, 512).render([{"role": "system", "content": "You are FinSight."},
                                               {"role": "user", "content": question}], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ subprocesses

def run_finsight(args: list[str], cache: Path, timeout: float = DDP_TIMEOUT_S, expect_failure: bool = False) -> str:
    """Run ``python -m finsight`` in its own process group; fail (and kill every rank) on a hang, and on an error
    unless ``expect_failure`` (then on success)."""
    return run_ranks(["-m", "finsight", *args], cache, timeout, expect_failure)


def run_ranks(command: list[str], cache: Path, timeout: float = DDP_TIMEOUT_S, expect_failure: bool = False) -> str:
    """Run ``python COMMAND`` (which starts the other ranks itself) in its own process group; fail and kill every
    rank on a hang, and on an error unless ``expect_failure`` (then on success)."""
    env = dict(os.environ, FINSIGHT_CACHE=str(cache), COLUMNS="200",
               PYTHONPATH=os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is a child of rank 0, in the same process group
        output, _ = proc.communicate()
        pytest.fail(f"the run did not finish in {timeout}s; a collective call made on one rank only "
                    f"(e.g. trainer.log_dir inside `if trainer.is_global_zero`) hangs the others:\n{output[-4000:]}")
    if (proc.returncode != 0) != expect_failure:
        pytest.fail(f"{' '.join(command[:2])} exited with {proc.returncode}:\n{output[-6000:]}")
    return output


# ------------------------------------------------------------------ data files and chat rendering

Segment = tuple[str, bool]  # text, trained


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    """A CSV file with a header row."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def chatml_segments(messages: list[dict]) -> list[Segment]:
    """ChatML as the test tokenizer's template writes it; trained: each answer and its ``<|im_end|>``."""
    segments: list[Segment] = []
    for message in messages:
        header = f"<|im_start|>{message['role']}\n"
        if message["role"] == "assistant":
            segments += [(header, False), (message["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((header + message["content"] + "<|im_end|>\n", False))
    return segments


# Mistral-like: no system role (raise_exception), answers end with the EOS token.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def no_system_segments(messages: list[dict], bos: str, eos: str) -> list[Segment]:
    """The Mistral-like template by hand, with the system prompt folded into the first user turn."""
    if messages[0]["role"] == "system":
        messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                    *messages[2:]]
    segments: list[Segment] = [(bos, False)]
    for message in messages:
        if message["role"] == "user":
            segments.append(("[INST] " + message["content"] + " [/INST]", False))
        else:
            segments.append((message["content"] + eos, True))
    return segments


# Llama-2's template: system in <<SYS>> inside the first [INST]; answers are " answer </s>".
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def llama2_segments(messages: list[dict], bos: str, eos: str) -> list[Segment]:
    """Llama-2's layout by hand; trained: `` answer </s>`` (the space before the EOS token included)."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    segments: list[Segment] = []
    for index, message in enumerate(messages):
        if message["role"] == "user":
            content = message["content"]
            if index == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            segments.append((f"{bos}[INST] {content.strip()} [/INST]", False))
        else:
            segments.append((f" {message['content'].strip()} {eos}", True))
    return segments


def encode_segments(tokenizer: Any, segments: list[Segment]) -> tuple[list[int], list[int]]:
    """Token ids of the segments tokenized one by one, and labels: the id where trained, else -100."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def rows_of(dataset: Any) -> list[dict]:
    """A prepared split as plain rows."""
    return dataset.with_format(None).to_list()


# ------------------------------------------------------------------------------ the bundled sample files

REDDIT_KEYS = {"id", "title", "selftext", "body", "subreddit", "z_score", "normalized_score",
               "comment_normalized_score", "combined_score"}
COMPANY_KEYS = {"question", "answer", "context", "ticker", "filing"}


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def reddit_kind(row: dict, seen: set) -> str | None:
    """What is wrong with a Reddit-shaped row, judged from the row alone (None: a good row)."""
    body = row["body"]
    key = (row["title"], row["selftext"], body)
    duplicate = key in seen
    seen.add(key)
    if body is None:
        return "body_none"
    if body in ("[deleted]", "[removed]"):
        return body.strip("[]")
    if body == "":
        return "empty_body"
    if not body.strip():
        return "whitespace_body"
    if len(body.split()) < 5:
        return "short_body"
    if not row["title"].strip():
        return "empty_title"
    if row["comment_normalized_score"] < 0.05 and row["combined_score"] < 0:
        return "low_score"
    return "duplicate" if duplicate else None


def company_kind(row: dict, seen: set) -> str | None:
    """What is wrong with a 10-K QA row, judged from the row alone (None: a good row)."""
    key = (row["question"], row["answer"], row["context"])
    duplicate = key in seen
    seen.add(key)
    if not isinstance(row["question"], str):
        return "question_not_str"
    if not row["question"].strip():
        return "whitespace_question"
    if row["answer"] is None:
        return "answer_none"
    if row["answer"] == "":
        return "empty_answer"
    if row["answer"] == "[removed]":
        return "answer_removed"
    return "duplicate" if duplicate else None


def bad_rows(rows: list[dict], classify) -> dict[int, str]:
    """Row index → what is wrong with it, for every bad row of a file."""
    seen: set = set()
    kinds = {index: classify(row, seen) for index, row in enumerate(rows)}
    return {index: kind for index, kind in kinds.items() if kind is not None}


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """A Modelfile's instructions (name → values), as Ollama reads them: triple-quoted values may span lines."""
    found: dict[str, list[str]] = {}
    rest = text
    while rest:
        line, _, rest = rest.partition("\n")
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if value.startswith('"""'):
            value, _, rest = (value[3:] + "\n" + rest).partition('"""')
            rest = rest.lstrip("\n")
        found.setdefault(name, []).append(value)
    return found


# ------------------------------------------------------------------ poisoned checkpoints

class ShellPayload:
    """Unpickling runs ``touch <marker>`` through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class SubprocessPayload(ShellPayload):
    """Unpickling runs ``touch <marker>`` through ``subprocess.call``."""

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


def expected_refusal(path: Path, what: str) -> str:
    """The one line every reader prints for a checkpoint that holds ``what`` (as torch names it)."""
    return (f"error: checkpoint {path} holds {what}, not tensors or plain data: refused, nothing in it was run "
            "(finsight loads checkpoints as data only, see Security in the docs); use a checkpoint from a source "
            "you trust")


def run_entry(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """``finsight ARGS`` in this process, as the console script runs it: its exit status and standard error."""
    from finsight.__main__ import entry

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["finsight", *args])
    status = entry()
    return status, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines of a command's standard error, which must hold no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def files_under(folder: Path) -> list[str]:
    """Every path under ``folder``, relative: what a refused command must not have changed."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []
