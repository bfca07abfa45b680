"""Generation speed side by side, in one run: the 4-bit path, the merged path (float32 and bfloat16, with
and without prompt-lookup decoding), and plain transformers + PEFT with the adapter merged into the original
weights.

    python benchmarks/generation.py --adapter lightning_logs/quickstart/version_0/adapter \\
        --checkpoint lightning_logs/quickstart/version_0/checkpoints/last.ckpt --json gen.json

1. In-process, the same prompts, greedy, ``--max_new_tokens`` each (end-of-turn ignored, so every row
   generates the same number of tokens), one prompt at a time (as the chat does):

   * ``4-bit (training layers)``: the base loaded 4-bit NF4 as in training, the PEFT adapter unmerged;
   * ``merged float32 (from the 4-bit model)``: ``finsight.inference.generation_model.build_generation_model`` (what
     ``finsight test`` and the training samples use): the NF4 weights dequantized with bitsandbytes, the
     adapter merged with PEFT;
   * ``merged float32`` / ``bfloat16 (from the files)``: ``finsight.inference.merge.merged_from_files`` (what
     ``finsight chat`` uses on a CPU): the same tensors, built without 4-bit layers; ``+ prompt lookup 3``:
     the same model with ``prompt_lookup_num_tokens=3`` (``finsight chat --prompt_lookup_tokens 3``);
   * ``transformers + PEFT merged float32`` / ``bfloat16``: ``AutoModelForCausalLM`` in that dtype,
     ``PeftModel.from_pretrained(...).merge_and_unload()``, no finsight code.

   It reports tokens/s, the ratio to the 4-bit row, and whether the greedy tokens equal the 4-bit row's.
2. Commands, in subprocesses (wall time including imports and loading): ``finsight chat --prompt`` with
   ``--max_new_tokens`` greedy (a chat with nothing cached, which builds and caches the model, one that loads
   it from the cache, as every chat after a CPU ``fit`` does, and ``--cache false``), the same answer from a
   plain transformers + PEFT script, and (with ``--checkpoint``) ``finsight chat --ckpt_path`` with nothing
   cached and cached, and ``finsight test --eval.compare_base true`` on ``--questions`` questions. ``--old``
   adds the same commands through the 4-bit layers (``--inference 4bit``, ``--eval.inference 4bit``).

3. ``--ceilings``: where a decoded token's time goes, per dtype, on the chat's merged model: the matrix
   multiplies alone (every linear layer's weights, one row in, as a decode step reads them: the bound with no
   other cost), the model's forward pass in a loop (no ``generate``), and ``generate``; with ``--compile``,
   also ``generate`` compiled by transformers (``torch.compile``, one static cache sized for the longest
   answer), with the seconds its first call spends compiling. A row far below the matmul bound is overhead,
   not bandwidth.

The machine's load average is printed before and after: on a shared machine compare the ratios of rows
measured in the same run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = (
    "What is an index fund, and why do people recommend them for retirement savings?",
    "Explain compound interest with an example.",
    "What does a company report in its 10-K filing?",
)
ROOT = Path(__file__).resolve().parents[1]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prompt_ids(tokenizer, question: str) -> list[int]:
    from finsight.data.chat import ChatEncoder
    from finsight.data.sources import DEFAULT_SYSTEM_PROMPT

    text = ChatEncoder(tokenizer, 1 << 20).render([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                                   {"role": "user", "content": question}],
                                                  add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def time_generation(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                    lookup: int = 0) -> tuple[float, list]:
    """Tokens/s over the prompts, one at a time, and the generated tokens (a warm-up of 4 tokens first)."""
    from finsight.inference.decoding import chat_generation_config, generate

    # Greedy, as the chat's --temperature 0 --repetition_penalty 1.0 decodes.
    decoding = chat_generation_config(temperature=0, repetition_penalty=1.0, prompt_lookup_tokens=lookup)
    generate(model, tokenizer, prompts[:1], max_new_tokens=4, stop_ids=[-1], decoding=decoding)
    started = time.perf_counter()
    outputs = [generate(model, tokenizer, [p], max_new_tokens=max_new_tokens, stop_ids=[-1], decoding=decoding)[0]
               for p in prompts]
    seconds = time.perf_counter() - started
    return sum(len(o.token_ids) for o in outputs) / seconds, [o.token_ids for o in outputs]


def in_process(adapter: str, n_prompts: int, max_new_tokens: int) -> list[dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finsight.inference.merge import build_generation_model, merged_from_files, quantized_from_files
    from finsight.inference.weights import TrainedWeights
    from finsight.model.loading import load_tokenizer
    from finsight.model.settings import QuantizationSettings

    sdpa_nf4 = QuantizationSettings(attn_implementation="sdpa")

    torch.manual_seed(0)
    weights = TrainedWeights.of_adapter(adapter, sdpa_nf4)
    quantized, tokenizer = quantized_from_files(weights), load_tokenizer(weights.reference)
    base_path = quantized.get_base_model().config._name_or_path
    prompts = [prompt_ids(tokenizer, q) for q in PROMPTS[:n_prompts]]
    rows: list[dict] = []

    def measure(name: str, model, build_s: float | None = None, lookup: int = 0) -> None:
        print(f"[{load_average()}] {name} ...", file=sys.stderr, flush=True)
        speed, tokens = time_generation(model, tokenizer, prompts, max_new_tokens, lookup)
        rows.append({"path": name, "tokens_per_s": speed, "tokens": tokens, "load_average": load_average()})
        if build_s is not None:
            rows[-1]["build_s"] = build_s
        print(f"[{load_average()}] {name}: {speed:.2f} tokens/s", file=sys.stderr, flush=True)

    measure("4-bit (training layers), adapter unmerged", quantized)
    started = time.perf_counter()
    merged = build_generation_model(quantized, torch.float32)
    measure("finsight merged float32, from the 4-bit model (test, samples)", merged, time.perf_counter() - started)
    del merged, quantized
    for dtype in ("float32", "bfloat16"):
        started = time.perf_counter()
        merged = merged_from_files(weights, dtype).model
        measure(f"finsight merged {dtype}, from the files (chat)", merged, time.perf_counter() - started)
        measure(f"finsight merged {dtype}, from the files + prompt lookup 3", merged, lookup=3)
        del merged
    for dtype in (torch.float32, torch.bfloat16):
        plain = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        plain = PeftModel.from_pretrained(plain, adapter).merge_and_unload().eval()
        measure(f"transformers + PEFT merged {str(dtype)[6:]} (original weights)", plain)
        del plain
    reference = rows[0]["tokens"]
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["same_greedy_tokens"] = row["tokens"] == reference
        row["tokens"] = sum(len(t) for t in row["tokens"])
    return rows


def matmul_bound(model: torch.nn.Module) -> float:
    """Tokens/s if a decode step cost only its matrix multiplies: one input row through every linear layer."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = {m.in_features: torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in linears}

    def step() -> None:
        for layer in linears:
            torch.nn.functional.linear(rows[layer.in_features], layer.weight)

    with torch.no_grad():
        for _ in range(3):
            step()
        started = time.perf_counter()
        for _ in range(20):
            step()
    return 20 / (time.perf_counter() - started)


def forward_loop(model: torch.nn.Module, prompt: list[int], steps: int) -> float:
    """Tokens/s of greedy decoding by calling the model directly: ``generate`` without its bookkeeping."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        started = time.perf_counter()
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return steps / (time.perf_counter() - started)


def compiled_generation(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, float]:
    """transformers' compiled decoding (static cache, ``torch.compile``): seconds of the first (compiling)
    call of 4 tokens, and tokens/s after it."""
    from transformers import CompileConfig, GenerationConfig

    from finsight.inference.decoding import generate

    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    # One cache size for every call (the longest prompt's answer), so the compiled step is compiled once.
    decoding = GenerationConfig(do_sample=False, cache_implementation="static", compile_config=compile_config,
                                max_cache_len=max(len(p) for p in prompts) + max_new_tokens)
    started = time.perf_counter()
    generate(model, tokenizer, prompts[:1], max_new_tokens=4, stop_ids=[-1], decoding=decoding)
    first = time.perf_counter() - started
    started = time.perf_counter()
    outputs = [generate(model, tokenizer, [p], max_new_tokens=max_new_tokens, stop_ids=[-1], decoding=decoding)[0]
               for p in prompts]
    return first, sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - started)


def ceilings(adapter: str, n_prompts: int, max_new_tokens: int, compile_: bool) -> list[dict]:
    """The 4-bit path's tokens/s, then per dtype the merged model's bound, forward loop, generate (compiled)."""
    from finsight.inference.merge import merged_from_files, quantized_from_files
    from finsight.inference.weights import TrainedWeights
    from finsight.model.loading import load_tokenizer
    from finsight.model.settings import QuantizationSettings

    sdpa_nf4 = QuantizationSettings(attn_implementation="sdpa")

    weights = TrainedWeights.of_adapter(adapter, sdpa_nf4)
    quantized, tokenizer = quantized_from_files(weights), load_tokenizer(weights.reference)
    prompts = [prompt_ids(tokenizer, q) for q in PROMPTS[:n_prompts]]
    rows = [{"path": "4-bit (training layers), generate", "tokens_per_s":
             time_generation(quantized, tokenizer, prompts, max_new_tokens)[0]}]
    del quantized
    for dtype in ("float32", "bfloat16"):
        model = merged_from_files(weights, dtype).model
        print(f"[{load_average()}] {dtype} ceilings ...", file=sys.stderr, flush=True)
        rows.append({"path": f"merged {dtype}: matrix multiplies alone (bound)", "tokens_per_s": matmul_bound(model)})
        rows.append({"path": f"merged {dtype}: forward pass in a loop",
                     "tokens_per_s": forward_loop(model, prompts[0], max_new_tokens)})
        rows.append({"path": f"merged {dtype}: generate",
                     "tokens_per_s": time_generation(model, tokenizer, prompts, max_new_tokens)[0]})
        if compile_:
            first, speed = compiled_generation(model, tokenizer, prompts, max_new_tokens)
            rows.append({"path": f"merged {dtype}: generate compiled (first call {first:.0f} s)",
                         "tokens_per_s": speed, "first_call_s": first})
        del model
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["load_average"] = load_average()
    return rows


PLAIN_CHAT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter, base, question, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(adapter)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
model = model.merge_and_unload().eval()
from finsight.data.sources import DEFAULT_SYSTEM_PROMPT
ids = tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                     {"role": "user", "content": question}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=n, do_sample=False)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""


def timed(command: list[str], label: str, env: dict[str, str] | None = None) -> dict:
    print(f"[{load_average()}] {label}: {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{label} failed:\n{result.stderr[-3000:]}")
    print(f"[{load_average()}] {label}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"command": label, "wall_s": seconds, "stdout": result.stdout, "stderr": result.stderr,
            "load_average": load_average()}


def commands(adapter: str, checkpoint: str | None, max_new_tokens: int, questions: int, old: bool) -> list[dict]:
    from transformers import AutoTokenizer

    finsight = [sys.executable, "-m", "finsight"]
    question = PROMPTS[0]
    base = json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    from finsight.model.loading import resolve_model

    base_path = resolve_model(base)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    greedy = ["--prompt", question, "--max_new_tokens", str(max_new_tokens), "--temperature", "0",
              "--repetition_penalty", "1.0"]
    chat = [*finsight, "chat", "--adapter", adapter, *greedy]
    # The chat's generation cache starts empty in a folder of its own (the base model is a local folder, read
    # where it is), so the first chat builds and caches its model and the later ones load it.
    env = {**os.environ, "FINSIGHT_CACHE": tempfile.mkdtemp(prefix="finsight-bench-cache-")}
    runs = [timed(chat, "finsight chat --prompt, nothing cached: builds the float32 model from the files, caches it", env),
            timed(chat, "finsight chat --prompt, cached (by that chat, or by fit on a CPU): the float32 model (the default)", env),
            timed([*chat, "--cache", "false"], "finsight chat --prompt --cache false: builds it every time", env),
            timed([*chat, "--prompt_lookup_tokens", "3"], "finsight chat --prompt --prompt_lookup_tokens 3 (cached)",
                  env)]
    timed([*chat, "--dtype", "bfloat16", "--max_new_tokens", "1"], "caching the bfloat16 model (not a result)", env)
    runs += [timed([*chat, "--dtype", "bfloat16"], "finsight chat --prompt --dtype bfloat16 (cached)", env),
             timed([sys.executable, "-c", PLAIN_CHAT, adapter, base_path, question, str(max_new_tokens)],
                   "transformers + PEFT merged float32 script")]
    if checkpoint:
        # The local base folder, as the adapter rows read it (a pypi: reference would be converted first).
        from_checkpoint = [*finsight, "chat", "--ckpt_path", checkpoint, "--model_name", base_path, *greedy]
        runs += [timed(from_checkpoint, "finsight chat --ckpt_path --prompt, nothing cached: builds through the "
                                        "training model, caches it", env),
                 timed(from_checkpoint, "finsight chat --ckpt_path --prompt, cached", env)]
    if old:
        runs.append(timed([*chat, "--inference", "4bit"], "finsight chat --prompt --inference 4bit"))
    for run in runs:
        run["answer_tokens"] = len(tokenizer(run["stdout"].strip(), add_special_tokens=False)["input_ids"])
    if checkpoint:
        rows = [json.loads(line) for line in (ROOT / "finsight/data/samples/company_qa.jsonl").read_text().splitlines()]
        folder = Path(tempfile.mkdtemp(prefix="finsight-bench-"))
        eval_file = folder / "questions.jsonl"
        eval_file.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                     for r in rows[-questions:]))
        test = [*finsight, "test", "--config", "configs/quickstart.yaml", "--ckpt_path", checkpoint,
                "--eval.compare_base", "true", f"--eval.file={eval_file}",
                f"--eval.max_samples={questions}", f"--eval.max_new_tokens={max_new_tokens}",
                f"--trainer.logger.init_args.save_dir={folder}", "--trainer.enable_progress_bar=false"]
        runs.append(timed(test, f"finsight test, {questions} questions + 3 identity, base + tuned"))
        if old:
            runs.append(timed([*test, "--eval.inference=4bit"], "finsight test --eval.inference 4bit"))
        for run in runs[-2 if old else -1:]:
            results = sorted(folder.rglob("eval_results.json"), key=lambda p: p.stat().st_mtime)[-1]
            run["generation_s"] = json.loads(results.read_text())["settings"]["generation_seconds"]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder written by finsight fit")
    parser.add_argument("--checkpoint", help="checkpoint of the same run, for the finsight test timing")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per in-process row (at most 3)")
    parser.add_argument("--questions", type=int, default=20, help="finsight test: held-out-style questions")
    parser.add_argument("--old", action="store_true", help="also time the commands through the 4-bit layers")
    parser.add_argument("--skip_commands", action="store_true")
    parser.add_argument("--skip_in_process", action="store_true", help="only the command timings")
    parser.add_argument("--ceilings", action="store_true",
                        help="only where a token's time goes: matmul bound, forward loop, generate, per dtype")
    parser.add_argument("--compile", action="store_true", help="--ceilings: also transformers' compiled decoding")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    started_load = load_average()
    if args.ceilings:
        rows = ceilings(args.adapter, args.prompts, args.max_new_tokens, args.compile)
        print(f"\nload average at start: {started_load}, at end: {load_average()}; threads: {torch.get_num_threads()}"
              "\n\n| path | tokens/s | × 4-bit |\n|---|---:|---:|")
        for row in rows:
            print(f"| {row['path']} | {row['tokens_per_s']:.2f} | {row['ratio']:.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"load_average_start": started_load, "rows": rows}, indent=2))
        return
    rows = [] if args.skip_in_process else in_process(args.adapter, args.prompts, args.max_new_tokens)
    runs = [] if args.skip_commands else commands(args.adapter, args.checkpoint, args.max_new_tokens,
                                                  args.questions, args.old)
    print(f"\nload average (1, 5, 15 min) at start: {started_load}, at end: {load_average()}; "
          f"threads: {torch.get_num_threads()}")
    if rows:
        print("\n| path | tokens/s | × 4-bit | same greedy tokens as 4-bit | build s | load average |\n"
              "|---|---:|---:|---|---:|---|")
    for row in rows:
        build = f"{row['build_s']:.1f}" if "build_s" in row else ""
        print(f"| {row['path']} | {row['tokens_per_s']:.2f} | {row['ratio']:.2f} | "
              f"{'yes' if row['same_greedy_tokens'] else 'no'} | {build} | {row['load_average']} |")
    if runs:
        print("\n| command | wall s | answer tokens | generation s | load average |\n|---|---:|---:|---:|---|")
        for run in runs:
            print(f"| {run['command']} | {run['wall_s']:.1f} | {run.get('answer_tokens', '')} | "
                  f"{run.get('generation_s', '')} | {run['load_average']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average_start": started_load, "load_average_end": load_average(),
                                               "rows": rows, "commands": [{k: v for k, v in r.items()
                                                                           if k not in ("stdout", "stderr")}
                                                                          for r in runs]}, indent=2))


if __name__ == "__main__":
    main()
