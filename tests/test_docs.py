"""The README and the documentation site stay true to the code.

Every ``finsight ...`` command they show (in fenced blocks and in inline code) names a real subcommand and
options that its ``--help`` lists, and every config file it names exists; the README stays short, its links
resolve, and each measured number in it and in the site is one that ``benchmarks/RESULTS.md`` records with its machine.
Every Python example on the site runs as written, against a tiny model in place of a Hub one.
``mkdocs build --strict`` (``.ci/run``) checks the site's own links, pages and API names.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import yaml
from docs_tables import TABLES, marked_block
from helpers import ROOT, sampled_fit

from finsight.cli.lightning_cli import main

README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SUBCOMMANDS = ("fit", "validate", "test", "predict", "export", "chat", "plan")

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# An option as written: `--trainer.max_steps 100`, `--data.sources='[...]'`, `--trainer.callbacks+=X`.
OPTION = re.compile(r"(?<![\w.-])--([A-Za-z][\w.-]*)")
CONFIG_FILE = re.compile(r"--config[ =](configs/[\w.-]+\.ya?ml)")


def documentation_files() -> list[Path]:
    """The README and every page of the site, including the snippets the site includes."""
    return [README, *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]


def shown_commands(text: str) -> list[str]:
    """Every ``finsight`` command line in a Markdown text: fenced lines and inline code spans.

    A fenced line is split at shell separators (``&&``, ``;``, ``|``) and joined with its ``\\``
    continuations, so ``pip install ... && finsight fit ...`` yields the ``finsight`` part.
    """
    pieces: list[str] = []
    for block in FENCE.findall(text):
        pieces += re.sub(r"\\\n", " ", block).splitlines()
    without_fences = FENCE.sub("", text)
    # An error message quoted as it prints (`error: ...`) is output, not a command.
    pieces += [piece for piece in INLINE_CODE.findall(without_fences) if not piece.startswith("error:")]
    commands = []
    for piece in pieces:
        piece = piece.split("  # ")[0]  # a trailing shell comment
        for part in re.split(r"&&|;|\|(?!\|)", piece.replace(r"\|", "|")):
            part = part.strip().removeprefix("$ ")
            if part.startswith("finsight ") and not part.startswith("finsight."):
                commands.append(part)
    return commands


def all_shown_commands() -> list[tuple[str, str]]:
    """(file, command) for every command in the README and the site."""
    return [(str(path.relative_to(ROOT)), command) for path in documentation_files()
            for command in shown_commands(path.read_text(encoding="utf-8"))]


@cache
def help_text(subcommand: str) -> str:
    """What ``finsight <subcommand> --help`` prints."""
    out = io.StringIO()
    # LightningCLI reads sys.argv besides `args`: give it the command's own, not pytest's.
    with mock.patch.object(sys, "argv", ["finsight"]), contextlib.redirect_stdout(out), \
            pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code == 0, f"finsight {subcommand} --help exited {exit_info.value.code}"
    return out.getvalue()


def listed_in_help(option: str, help: str) -> bool:
    """``--option`` is one of the help's option names (not merely the start of a longer one)."""
    return re.search(rf"(?<![\w.-])--{re.escape(option)}(?=[\s,=\[\]]|$)", help) is not None


def test_the_shown_commands_are_found():
    """The checks below see the commands: every subcommand is shown, and many commands in all."""
    commands = all_shown_commands()
    shown = {command.split()[1] for _, command in commands}
    assert set(SUBCOMMANDS) <= shown, f"subcommands never shown: {set(SUBCOMMANDS) - shown}"
    assert len(commands) >= 40
    readme = [command for file, command in commands if file == "README.md"]
    assert "finsight fit --config configs/quickstart.yaml" in readme


def test_every_shown_command_uses_real_subcommands_options_and_configs():
    missing = []
    for file, command in all_shown_commands():
        subcommand = command.split()[1]
        if command in ("finsight --version", "finsight -V"):
            continue  # the one option without a subcommand (tests/cli/test_version.py)
        if subcommand not in SUBCOMMANDS:
            missing.append(f"{file}: `{command}`: no subcommand {subcommand!r}")
            continue
        help = help_text(subcommand)
        for option in OPTION.findall(command):
            option = option.removesuffix("+")  # `--trainer.callbacks+=X` appends to --trainer.callbacks
            if option != "help" and not listed_in_help(option, help):
                missing.append(f"{file}: `{command}`: finsight {subcommand} --help has no --{option}")
        for config in CONFIG_FILE.findall(command):
            if not (ROOT / config).is_file():
                missing.append(f"{file}: `{command}`: no file {config}")
    assert not missing, "\n".join(missing)


def test_the_option_check_tells_a_real_option_from_a_wrong_one():
    help = help_text("fit")
    assert listed_in_help("trainer.max_steps", help)
    assert listed_in_help("model.lora_r", help)
    assert not listed_in_help("model.lora", help)  # a prefix of --model.lora_r is not an option
    assert not listed_in_help("trainer.max_stepz", help)
    assert listed_in_help("gguf_type", help_text("export"))
    assert not listed_in_help("gguf_type", help_text("chat"))
    text = "```bash\npip install x && finsight fit --config c.yaml \\\n  --trainer.callbacks+=A\n```\n" \
           "`finsight chat --adapter DIR` and `finsight.callbacks.X`"
    assert shown_commands(text) == ["finsight fit --config c.yaml    --trainer.callbacks+=A",
                                    "finsight chat --adapter DIR"]


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = target.split("#")[0]
        if path and not (ROOT / path).exists():
            broken.append(target)
    assert not broken, f"README links to missing files: {broken}"
    assert "docs/index.md" in text


# A measured quantity: a number with a unit of time, size, speed or ratio.
# A shape (4 × 256 tokens) is not a ratio, and a card's size (24 GB GPUs) is not a measurement.
MEASURED = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*(?:\s?[–-]\s?\d+(?:\.\d+)*)?)\s?"
                      r"(s|min|ms|minutes|seconds|GB|GiB|MB|MiB|×(?!\s?\d)|x(?!\s?\d)|%|tokens/s)(?![\w])(?!\s+(?:GPU|card))")
SUMMARY = ROOT / "benchmarks" / "SUMMARY.md"


def test_every_measured_number_in_the_readme_and_the_site_is_in_the_results():
    """A time, size, speed or ratio stated in prose must be one that the results record (with the machine
    they name); examples inside code (an error message, a command) are not claims and are left out."""
    results = RESULTS.read_text(encoding="utf-8")
    pages = [README, SUMMARY, *(path for path in sorted(DOCS.rglob("*.md")) if path.parent.name != "benchmarks")]
    unrecorded = []
    for page in pages:
        prose = re.sub(r"`[^`]+`", "", FENCE.sub("", page.read_text(encoding="utf-8")))
        for number, unit in MEASURED.findall(prose):
            ends = re.split(r"\s?[–-]\s?", number)  # a range: each end is a measured value
            unrecorded += [f"{page.name}: {number} {unit}" for end in ends if end not in results][:1]
    assert not unrecorded, f"numbers that benchmarks/RESULTS.md does not record: {unrecorded}"
    assert "**Machine**" in results and "AVX512-BF16" in results and "AVX2" in results


def quoted_claims() -> list[tuple[str, str, list[str]]]:
    """(page, paragraph, summary rows it links) for every paragraph of the README and the site that states a
    measured number; the computed memory plan on the GPU page is a plan, not a measurement, and is left out."""
    claims = []
    for page in [README, *(path for path in sorted(DOCS.rglob("*.md")) if path.parent.name != "benchmarks")]:
        text = re.sub(r"<!-- memory-plan -->.*?<!-- /memory-plan -->", "", page.read_text(encoding="utf-8"),
                      flags=re.S)
        for paragraph in re.split(r"\n\s*\n|\n(?=\s*[-*] )", FENCE.sub("", text)):
            if MEASURED.findall(re.sub(r"`[^`]+`", "", paragraph)):
                claims.append((page.name, paragraph, re.findall(r"SUMMARY\.md#([\w-]+)", paragraph)))
    return claims


def test_every_measured_number_on_a_page_links_to_its_summary_row():
    """A number quoted on a page links to the summary's row, which names its model, hardware and setting."""
    rows = set(re.findall(r"\{#([\w-]+)\}", SUMMARY.read_text(encoding="utf-8")))
    assert len(rows) >= 10
    claims = quoted_claims()
    assert len(claims) >= 8
    unlinked = [f"{page}: {paragraph.strip()[:100]}" for page, paragraph, linked in claims if not linked]
    assert not unlinked, "measured numbers without a link to their row in benchmarks/SUMMARY.md:\n" + \
        "\n".join(unlinked)
    unknown = sorted({row for _, _, linked in claims for row in linked} - rows)
    assert not unknown, f"links to rows benchmarks/SUMMARY.md does not have: {unknown}"


def test_the_number_check_finds_an_unrecorded_number():
    assert MEASURED.findall("it took 12.3 s and 0.54 GB") == [("12.3", "s"), ("0.54", "GB")]
    assert MEASURED.findall("4 × 256 tokens on 2 × 24 GB GPUs, 1.42× faster, 3.1 GB") == [("1.42", "×"), ("3.1", "GB")]
    assert "987.65" not in RESULTS.read_text(encoding="utf-8")


def map_paths(text: str) -> set[str]:
    """The paths a Markdown table names in its first column."""
    rows = re.findall(r"^\| (.+?) \|", text, re.M)
    return {path.rstrip("/") for row in rows for path in re.findall(r"`([^`]+)`", row) if "/" in path
            or path.endswith((".py", ".yml"))}


def test_the_architecture_map_names_every_module_and_only_paths_that_exist():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    readme_map = README.read_text(encoding="utf-8").split("## Architecture")[1].split("\n## ")[0]
    named = map_paths(text) | map_paths(readme_map)
    assert "finsight/compat" in map_paths(readme_map)
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"the architecture map names paths that do not exist: {missing}"
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "finsight").rglob("*.py")
               if path.name != "__init__.py" or path.parent.name == "compat"}
    unmapped = sorted(module for module in modules if f"`{module}`" not in text)
    assert not unmapped, f"modules missing from docs/architecture.md: {unmapped}"


PYTHON_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# A Hub model id in an example: the test gives a tiny local model instead (the Hub is offline in tests).
HUB_ID = re.compile(r'"(?:HuggingFaceTB|meta-llama|mistralai)/[\w.-]+"')


def python_examples() -> list[tuple[str, str]]:
    """(page, code) for every ``python`` block on the site."""
    return [(str(path.relative_to(ROOT)), code) for path in sorted(DOCS.rglob("*.md"))
            for code in PYTHON_FENCE.findall(path.read_text(encoding="utf-8"))]


def test_every_python_example_runs(tmp_path, monkeypatch, tiny_model_dir, tmp_path_factory):
    """Each example runs in a folder holding what the page says is there: the quickstart's adapter (a tiny
    trained run's, written by ``finsight fit``) and a ``my_chats.jsonl`` in the ``messages`` shape."""
    examples = python_examples()
    assert {page for page, _ in examples} >= {"docs/getting-started.md", "docs/data.md"}
    monkeypatch.setattr(sys, "argv", ["finsight"])  # the fit below reads its own arguments, not pytest's
    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    shutil.copytree(run["adapter"], tmp_path / "lightning_logs/quickstart/version_0/adapter")
    chats = [{"messages": [{"role": "user", "content": f"What is the yield of bond number {i}?"},
                           {"role": "assistant", "content": f"Bond {i} yields {i % 7 + 1}% a year."}]}
             for i in range(60)]
    (tmp_path / "my_chats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chats))
    write_own_data(tmp_path / "data")  # the files of the own-data tutorial
    monkeypatch.chdir(tmp_path)
    for page, code in examples:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(HUB_ID.sub(repr(str(tiny_model_dir)), code), f"<{page}>", "exec"), {})
        assert out.getvalue().strip(), f"the example on {page} printed nothing"


@pytest.mark.parametrize("page", sorted(TABLES))
def test_the_computed_tables_are_what_finsight_computes_now(page, monkeypatch, capsys):
    """docs/gpu.md's memory plan of every shipped config and docs/troubleshooting.md's errors are computed
    (``python tests/docs_tables.py`` rewrites them): a change to the planner, a config or an error shows here."""
    monkeypatch.chdir(ROOT)
    name, compute = TABLES[page]
    committed = marked_block((ROOT / page).read_text(encoding="utf-8"), name)
    assert committed is not None, f"{page} has no <!-- {name} --> block"
    assert committed == compute(), f"{page}: the {name} table is out of date: run python tests/docs_tables.py"


def test_every_error_has_an_entry_with_its_cause_fix_and_messages():
    from finsight.errors import error_catalogue_markdown, error_classes, raised_messages

    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    classes = error_classes()
    assert len(classes) >= 25
    without_fix = [cls.__name__ for cls in classes if "\nFix: " not in (cls.__doc__ or "").replace("\n    ", "\n")]
    assert not without_fix, f"error classes whose docstring has no 'Fix: ' paragraph: {without_fix}"
    missing = [cls.__name__ for cls in classes if f"### {cls.__name__}\n" not in page]
    assert not missing, f"errors without an entry in docs/troubleshooting.md: {missing}"
    messages = raised_messages()
    silent = [cls.__name__ for cls in classes if not messages.get(cls.__name__)]
    assert not silent, f"error classes with no message found where they are built: {silent}"
    assert "checkpoint {path} does not exist" in messages["CheckpointError"]
    assert any(text.startswith("source {") for text in messages["DataSourceError"])
    # A new error class is found as soon as it exists, and its entry is then missing from the committed page.
    new = type("BrandNewError", (classes[0],), {"__doc__": "Cause.\n\nFix: do this.", "__module__": "finsight.x"})
    assert new in error_classes()
    assert "### BrandNewError\n" in error_catalogue_markdown() and "### BrandNewError" not in page


def write_own_data(folder: Path) -> None:
    """The own-data tutorial's files, in the shapes its page shows: chats, a CSV with its own headers, and a
    held-out CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    chats = [{"messages": [{"role": "user", "content": f"How do I order card number {i}?"},
                           {"role": "assistant", "content": f"In the app: Cards, then Replace card {i}."}]}
             for i in range(40)]
    (folder / "my_chats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chats))
    faq = "Question,Answer\n" + "".join(f"What is limit {i}?,\"{i},000 dollars a day, unless you change it.\"\n"
                                         for i in range(40))
    (folder / "faq.csv").write_text(faq)
    (folder / "held_out.csv").write_text("Question,Answer\nWhat is the weekend limit?,500 dollars.\n")


TUTORIAL_RUN = {  # what makes each step of the tutorial quick on the tiny model
    "fit": ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.max_length=256",
            "--trainer.precision=32-true", "--data.num_proc=1", "--trainer.accelerator=cpu"],
    "test": ["--trainer.limit_test_batches=1", "--eval.max_samples=4", "--eval.max_new_tokens=4",
             "--data.max_length=256", "--trainer.precision=32-true", "--data.num_proc=1",
             "--trainer.accelerator=cpu"],
    "chat": ["--max_new_tokens=4"],
    "export": [],
}


def test_the_own_data_tutorial_runs(tmp_path, monkeypatch, tiny_model_dir):
    """Every command of docs/own-data.md, in order, in a folder with the page's files: training on the tiny
    model, the evaluation of both files' sources, the chat with the run's system prompt, the GGUF export."""
    page = (DOCS / "own-data.md").read_text(encoding="utf-8")
    commands = [command for block in re.findall(r"^```bash\n(.*?)^```", page, re.S | re.M)
                for command in [re.sub(r"\\\n\s*", "", block).strip()]]
    assert [c.split()[1] for c in commands] == ["fit", "test", "test", "chat", "export"]
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    write_own_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["finsight"])
    for command in commands:
        words = shlex.split(command)[1:]
        model = [f"--model.model_name={tiny_model_dir}"] if words[0] in ("fit", "test") else []
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main([*words, *model, *TUTORIAL_RUN[words[0]]])
        if words[0] == "chat":
            assert out.getvalue().strip()  # an answer, however short
    run = tmp_path / "lightning_logs" / "own_data"
    results = sorted(run.glob("version_*/eval_results.json"))
    assert len(results) == 2
    held_out, from_file = (json.loads(path.read_text()) for path in results)
    assert set(held_out["sources"]) == {"my_chats", "faq"} and set(held_out["rows"]) == {"fine_tuned", "base"}
    assert "identity" not in held_out["rows"]["fine_tuned"]  # no identity source: no identity check
    assert set(from_file["sources"]) == {"held_out"}
    prompt = yaml.safe_load((ROOT / "configs" / "own_data.yaml").read_text())["data"]["system_prompt"]
    recorded = json.loads((run / "version_0" / "adapter" / "finsight_run.json").read_text())
    assert recorded == {"data.system_prompt": prompt}  # what the chat above answered with
    modelfile = next((tmp_path / "exported").glob("*.Modelfile")).read_text()
    assert f'SYSTEM """{prompt}"""' in modelfile
