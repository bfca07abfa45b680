"""Reliability: a killed run resumes to exactly the uninterrupted result, checkpoints survive a kill in the middle
of a write, damaged checkpoints get a one-line error, and a NaN/inf stops the run before it spoils a checkpoint.

The kill tests run ``python -m finsight fit`` (the quickstart config on the tiny model) in subprocesses and
SIGKILL them at chosen points: between two checkpoints, right after one, and while one is being written.
Every comparison with the uninterrupted run is bitwise (CPU, one thread, same seed): adapter weights,
optimizer moments, every logged training loss and learning rate, the samples of every batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from fit_worker import PAUSE_ENV
from helpers import ROOT

from finsight.atomic import stale_temporaries
from finsight.checkpoint_files import CheckpointError, verify_checkpoint_file
from finsight.cli.lightning_cli import main
from finsight.training.checkpoint import AtomicCheckpointIO, newest_last_checkpoint
from finsight.training.reliability import ExactResume, NonFiniteError, NonFiniteGuard, StepSeededRNG

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MAX_STEPS = 10
CHECKPOINT_EVERY = 2
VALIDATE_EVERY = 3
RUN_TIMEOUT = 240  # seconds; a run takes ~15 s on an idle machine, mostly imports and start-up


# ----------------------------------------------------------------------------------------------- harness


class Run:
    """One training run folder: its config, logs, checkpoints and sample log."""

    def __init__(self, folder: Path, model_dir: Path) -> None:
        self.folder = folder
        self.model_dir = model_dir
        self.samples = folder / "samples.jsonl"
        self.log_dir = folder / "logs" / "finsight" / "run"  # fixed version: a resume finds "last" again
        self.checkpoints = self.log_dir / "checkpoints"
        self.config = folder / "reliability.yaml"
        folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(self._overrides(), sort_keys=False))

    def _overrides(self) -> dict:
        return {
            "trainer": {
                "precision": "32-true",  # the tests' float32 (conftest.FLOAT32_PRECISION)
                "max_steps": MAX_STEPS,
                "val_check_interval": VALIDATE_EVERY,
                "limit_val_batches": 2,
                "log_every_n_steps": 1,
                "enable_progress_bar": False,
                # finsight's writer, plus a pause in the save PAUSE_ENV names (the kill-during-save tests).
                "plugins": [{"class_path": "fit_worker.PausingCheckpointIO"}],
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": str(self.folder / "logs"), "name": "finsight",
                                         "version": "run"}},
                # Replaces the quickstart's list.
                "callbacks": [
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"monitor": "val/loss", "mode": "min", "save_top_k": 1, "save_last": True,
                                   "every_n_train_steps": CHECKPOINT_EVERY, "filename": "step{step}",
                                   "auto_insert_metric_name": False,
                                   # A run killed after writing a best checkpoint but before last.ckpt leaves
                                   # that file behind; the resumed run must overwrite it, not add "-v1".
                                   "enable_version_counter": False}},
                    {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                     "init_args": {"monitor": "val/loss", "mode": "min", "patience": 5, "min_delta": 0.05}},
                    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                     "init_args": {"logging_interval": "step"}},
                    {"class_path": "finsight.callbacks.SampleLog", "init_args": {"path": str(self.samples)}},
                ],
            },
            "data": {"batch_size": 2, "max_length": 512, "num_proc": 1},
        }

    def args(self, *extra: str) -> list[str]:
        """``finsight fit`` options (after the subcommand)."""
        return ["--config", str(QUICKSTART), "--config", str(self.config), f"--model.model_name={self.model_dir}",
                *extra]

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "finsight", "fit", *self.args(*extra)]

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
        # One thread: bitwise-reproducible reductions, and no OpenMP spinning on a busy machine.
        env["OMP_NUM_THREADS"] = "1"
        env.pop(PAUSE_ENV, None)
        env.update(extra)
        return env

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.folder / "output.txt", "a")
        return subprocess.Popen(self.command(*extra), cwd=self.folder, env=env or self.env(),
                                stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return (self.folder / "output.txt").read_text()

    def finish(self, process: subprocess.Popen) -> None:
        """Wait for a run to end by itself, successfully."""
        try:
            code = process.wait(timeout=RUN_TIMEOUT)
        finally:
            _kill(process)
        assert code == 0, self.output()[-4000:]

    def kill_when(self, process: subprocess.Popen, ready: Callable[[], bool]) -> None:
        """SIGKILL the run as soon as ``ready()`` holds; it must still be running then."""
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while not ready():
                assert process.poll() is None, f"the run ended before the kill point:\n{self.output()[-4000:]}"
                assert time.monotonic() < deadline, "the kill point was never reached"
                time.sleep(0.05)
        finally:
            _kill(process)
        assert process.returncode == -signal.SIGKILL

    def sample_log(self) -> list[dict]:
        return [json.loads(line) for line in self.samples.read_text().splitlines()]

    def scalars(self, tag: str) -> dict[int, float]:
        """A logged scalar by step over every event file of the run (a resumed run's values replace the lost
        ones of the run it resumed)."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        values: dict[int, float] = {}
        for events in sorted(self.log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            if tag in accumulator.Tags()["scalars"]:
                values.update({e.step: e.value for e in accumulator.Scalars(tag)})
        return values

    def last(self) -> dict:
        return torch.load(self.checkpoints / "last.ckpt", map_location="cpu", weights_only=False)


class LatestRun(Run):
    """A run whose best checkpoint is kept by ``mode: max`` on a falling val/loss (only the first validation
    is ever the best) and whose ``last.ckpt`` is ``LatestCheckpoint``'s: every validation after the first
    does not improve, and ``last.ckpt`` must follow them anyway."""

    def _overrides(self) -> dict:
        overrides = super()._overrides()
        callbacks = overrides["trainer"]["callbacks"]
        callbacks[0] = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"monitor": "val/loss", "mode": "max", "save_top_k": 1, "save_last": False,
                                      "filename": "step{step}", "auto_insert_metric_name": False}}
        callbacks.insert(1, {"class_path": "finsight.callbacks.LatestCheckpoint"})
        return overrides


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _freeze_at(step: int, marker: Path) -> str:
    """A test-only callback that stops the run at the start of the batch after ``step`` optimizer steps."""
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": "fit_worker.FreezeAt", "init_args": {"step": step, "marker": str(marker)}})


def _callback_state(checkpoint: dict, name: str) -> dict:
    states = [state for key, state in checkpoint["callbacks"].items() if key.startswith(name)]
    assert len(states) == 1, list(checkpoint["callbacks"])
    return states[0]


def _assert_same_tensors(a: object, b: object, where: str = "") -> None:
    """Bitwise equality of nested checkpoint content (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_resumed_like(reference: Run, resumed: Run, committed: list[int]) -> None:
    """``resumed`` (killed and resumed, possibly several times) ended exactly where ``reference`` did.

    ``committed``: the global step of the checkpoint each resume started from; the batches a killed run
    trained on after its last checkpoint were lost with it and are trained again.
    """
    ref_last, res_last = reference.last(), resumed.last()
    assert ref_last["global_step"] == res_last["global_step"] == MAX_STEPS

    # Adapter weights, AdamW moments and step counts, and the LR schedule's state: bitwise.
    _assert_same_tensors(ref_last["state_dict"], res_last["state_dict"], "state_dict")
    _assert_same_tensors(ref_last["optimizer_states"], res_last["optimizer_states"], "optimizer")
    _assert_same_tensors(ref_last["lr_schedulers"], res_last["lr_schedulers"], "lr_schedulers")
    _assert_same_tensors(ref_last["loops"], res_last["loops"], "loops")

    # Early stopping's counter and best score, and the best-checkpoint record, continued.
    ref_stop, res_stop = (_callback_state(c, "EarlyStopping") for c in (ref_last, res_last))
    assert res_stop["wait_count"] == ref_stop["wait_count"]
    assert torch.equal(res_stop["best_score"], ref_stop["best_score"])
    ref_ckpt, res_ckpt = (_callback_state(c, "ModelCheckpoint") for c in (ref_last, res_last))
    assert Path(res_ckpt["best_model_path"]).name == Path(ref_ckpt["best_model_path"]).name
    assert torch.equal(res_ckpt["best_model_score"], ref_ckpt["best_model_score"])
    assert Path(res_ckpt["best_model_path"]).parent == resumed.checkpoints
    assert sorted(p.name for p in resumed.checkpoints.iterdir()) == \
        sorted(p.name for p in reference.checkpoints.iterdir())  # no partial temporaries left behind

    # The exported (best) adapter is the same file content.
    from safetensors.torch import load_file

    ref_adapter = load_file(reference.log_dir / "adapter" / "adapter_model.safetensors")
    res_adapter = load_file(resumed.log_dir / "adapter" / "adapter_model.safetensors")
    _assert_same_tensors(ref_adapter, res_adapter, "adapter")

    # Every step's loss and learning rate, as logged, and every validation loss.
    for tag in ("train/loss", "lr-AdamW", "val/loss"):
        assert resumed.scalars(tag) == reference.scalars(tag), tag
    assert len(reference.scalars("train/loss")) == MAX_STEPS

    # The samples: each resume continues exactly after its checkpoint. A record whose step is not after the
    # one before marks a resume; the killed run's records from that step on were lost with it (their
    # updates were never checkpointed). What remains must be the uninterrupted run's sequence.
    kept: list[dict] = []
    restarts = []
    for record in resumed.sample_log():
        if kept and record["step"] <= kept[-1]["step"]:
            restarts.append(record["step"])
            kept = [k for k in kept if k["step"] < record["step"]]
        kept.append(record)
    assert restarts == committed
    assert [r["step"] for r in kept] == list(range(MAX_STEPS))
    ids = [r["ids"] for r in kept]
    assert ids == [r["ids"] for r in reference.sample_log()]
    flat = [i for batch in ids for i in batch]
    assert len(flat) == len(set(flat))  # one epoch is far longer than the run: nothing seen twice


# ----------------------------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def single_thread():
    """In-process runs on one thread: fast and steady on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


class PackedRun(Run):
    """The same run with ``data.packing``: several conversations per row (micro-batches of 4, so rows share)."""

    def _overrides(self) -> dict:
        overrides = super()._overrides()
        overrides["data"].update(packing=True, batch_size=4)
        return overrides


class TokenBudgetRun(Run):
    """The same run with ``data.batch_tokens``: micro-batches of different sizes, handed over whole."""

    def _overrides(self) -> dict:
        overrides = super()._overrides()
        overrides["data"].update(batch_tokens=1024)
        return overrides


def _start_reference(run: Run, request) -> tuple[Run, subprocess.Popen]:
    """Start an uninterrupted run in the background (killed when the module's tests end)."""
    # Prepare the data here, once: runs started together would otherwise all build the same cache.
    main(run.args(), run=False).datamodule.prepare_data()
    process = run.start()
    request.addfinalizer(lambda: _kill(process))
    return run, process


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory, request):
    """The uninterrupted run every interrupted run must reproduce (started once, in the background)."""
    return _start_reference(Run(tmp_path_factory.mktemp("reference"), tiny_model_dir), request)


@pytest.fixture(scope="module")
def latest_reference_run(tiny_model_dir, tmp_path_factory, request):
    """The uninterrupted ``LatestRun``, started in the background."""
    return _start_reference(LatestRun(tmp_path_factory.mktemp("latest-reference"), tiny_model_dir), request)


@pytest.fixture(scope="module")
def packed_reference_run(tiny_model_dir, tmp_path_factory, request):
    """The uninterrupted ``PackedRun``, started in the background."""
    return _start_reference(PackedRun(tmp_path_factory.mktemp("packed-reference"), tiny_model_dir), request)


@pytest.fixture(scope="module")
def token_budget_reference_run(tiny_model_dir, tmp_path_factory, request):
    """The uninterrupted ``TokenBudgetRun``, started in the background."""
    return _start_reference(TokenBudgetRun(tmp_path_factory.mktemp("budget-reference"), tiny_model_dir), request)


def _reference(reference_run) -> Run:
    run, process = reference_run
    if process.returncode is None:
        run.finish(process)
    assert process.returncode == 0
    return run


# ----------------------------------------------------------------------------------------------- kill tests


def _paused_writing(run: Run, path: Path) -> Callable[[], bool]:
    """True once the test hook paused in the middle of writing ``path`` (its temporary holds some bytes)."""

    def ready() -> bool:
        partial = stale_temporaries(path)
        return (bool(partial) and f"{PAUSE_ENV}: pausing" in run.output() and str(partial[0]) in run.output()
                and partial[0].stat().st_size > 0)

    return ready


def _kill_during_save(run: Run, name: str, step: int, resume_from: int, *extra: str) -> None:
    """Resume ``run``; kill it half-way through writing checkpoint ``name`` at ``step`` (test hook); check that
    only a partial temporary is left and ``last.ckpt`` is the complete checkpoint of ``resume_from``."""
    target = run.checkpoints / name
    run.kill_when(run.start("--ckpt_path=last", *extra, env=run.env(**{PAUSE_ENV: f"{name}@{step}"})),
                  _paused_writing(run, target))
    partial = stale_temporaries(target)
    assert len(partial) == 1
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        verify_checkpoint_file(partial[0])
    verify_checkpoint_file(run.checkpoints / "last.ckpt")
    assert run.last()["global_step"] == resume_from


# Checkpoints of these runs (every 2 steps, validation every 3): at step 3 (the step-2 save waits for the first
# val/loss), 4, 6, 8 and 10 — at 6 and 8 before that step's validation, which a resume must then run.


def test_kill_between_checkpoints_and_during_a_save_resumes_exactly(reference_run, tiny_model_dir, tmp_path):
    """Killed between two checkpoints, resumed, killed while writing last.ckpt, resumed to the end."""
    run = Run(tmp_path / "interrupted", tiny_model_dir)
    marker = tmp_path / "frozen"

    # 1. Between checkpoints: 5 optimizer steps done, the last checkpoint holds 4.
    run.kill_when(run.start(_freeze_at(5, marker)), marker.exists)
    assert run.last()["global_step"] == 4

    # 2. Resume from 4; killed while last.ckpt of step 8 is half written: last.ckpt still holds step 6.
    _kill_during_save(run, "last.ckpt", 8, resume_from=6)

    # 3. Resume from 6 to the end; the partial file is cleared by the next save.
    run.finish(run.start("--ckpt_path=last"))
    assert not stale_temporaries(run.checkpoints / "last.ckpt")
    assert_resumed_like(_reference(reference_run), run, committed=[4, 6])


def _killed_at_5_resumes_like(run: Run, reference_run, tmp_path: Path) -> None:
    """Kill ``run`` between its checkpoints (at step 5, after the one at 4), resume it, compare with the reference."""
    marker = tmp_path / "frozen"
    run.kill_when(run.start(_freeze_at(5, marker)), marker.exists)
    assert run.last()["global_step"] == 4
    run.finish(run.start("--ckpt_path=last"))
    assert_resumed_like(_reference(reference_run), run, committed=[4])


def test_a_packed_run_killed_between_checkpoints_resumes_exactly(packed_reference_run, tiny_model_dir, tmp_path):
    """data.packing keeps the sampler's order and the loader's position: a kill and a resume end bitwise where
    the uninterrupted packed run ends."""
    _killed_at_5_resumes_like(PackedRun(tmp_path / "interrupted", tiny_model_dir), packed_reference_run, tmp_path)


def test_a_token_budget_run_killed_between_checkpoints_resumes_exactly(token_budget_reference_run, tiny_model_dir,
                                                                      tmp_path):
    """data.batch_tokens: the loader's position counts whole micro-batches; a kill and a resume end bitwise
    where the uninterrupted run ends, every micro-batch the same."""
    _killed_at_5_resumes_like(TokenBudgetRun(tmp_path / "interrupted", tiny_model_dir), token_budget_reference_run,
                              tmp_path)


def test_kill_after_a_validation_that_did_not_improve_resumes_from_that_validation(
        latest_reference_run, tiny_model_dir, tmp_path):
    """Validations at 3, 6 and 9; only step 3 is the best. Killed at step 7, the run resumes from step 6
    (Lightning's own last.ckpt would still hold step 3) and ends exactly like the uninterrupted run, whose
    last.ckpt is its final step."""
    reference = _reference(latest_reference_run)
    assert Path(_callback_state(reference.last(), "ModelCheckpoint")["best_model_path"]).name == "step3.ckpt"

    run = LatestRun(tmp_path / "interrupted", tiny_model_dir)
    marker = tmp_path / "frozen"
    run.kill_when(run.start(_freeze_at(7, marker)), marker.exists)
    assert run.last()["global_step"] == 6
    run.finish(run.start("--ckpt_path=last"))
    assert_resumed_like(reference, run, committed=[6])


@pytest.mark.slow
def test_kill_right_after_a_checkpoint_and_during_a_best_save_resumes_exactly(
        reference_run, tiny_model_dir, tmp_path):
    """Killed just after the step-3 checkpoint, resumed, killed while writing the best checkpoint of step 10."""
    reference = _reference(reference_run)
    best = Path(_callback_state(reference.last(), "ModelCheckpoint")["best_model_path"]).name
    assert best == f"step{MAX_STEPS}.ckpt"  # the case this test kills in; it depends on the tiny run's losses

    run = Run(tmp_path / "interrupted", tiny_model_dir)
    marker = tmp_path / "frozen"
    run.kill_when(run.start(_freeze_at(3, marker)), marker.exists)
    assert run.last()["global_step"] == 3

    _kill_during_save(run, best, MAX_STEPS, resume_from=8)
    run.finish(run.start("--ckpt_path=last"))
    assert not stale_temporaries(run.checkpoints / best)
    assert_resumed_like(reference, run, committed=[3, 8])


# ----------------------------------------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def a_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """A real checkpoint of a 2-step run, written by the CLI's default checkpoint IO."""
    from helpers import tiny_fit_args

    root = tmp_path_factory.mktemp("checkpoint")
    with single_thread():
        cli = main(tiny_fit_args(tiny_model_dir, root))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, NonFiniteGuard) for c in cli.trainer.callbacks)
    assert any(isinstance(c, StepSeededRNG) for c in cli.trainer.callbacks)
    assert any(isinstance(c, ExactResume) for c in cli.trainer.callbacks)
    return Path(newest_last_checkpoint(cli.trainer))


@pytest.mark.parametrize("damage", ["empty", "cut_to_half", "cut_last_bytes", "flipped_byte", "not_a_checkpoint"])
def test_damaged_checkpoint_gets_a_one_line_error(a_checkpoint, tmp_path, damage):
    data = a_checkpoint.read_bytes()
    damaged = {
        "empty": b"",
        "cut_to_half": data[: len(data) // 2],
        "cut_last_bytes": data[:-10],
        "flipped_byte": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:],
        "not_a_checkpoint": b"step,loss\n1,2.5\n" * 100,
    }[damage]
    path = tmp_path / "last.ckpt"
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError) as error:
        AtomicCheckpointIO().load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message and "earlier checkpoint" in message


@pytest.mark.parametrize("given", ["path", "last"])
def test_fit_from_a_truncated_checkpoint_prints_one_line_and_exits_1(
        given, a_checkpoint, tiny_model_dir, tmp_path, monkeypatch, capsys, one_thread):
    """``finsight fit --ckpt_path <file>`` (read by LightningCLI first) and ``--ckpt_path last`` (found and
    read by the Trainer) both end with the one-line error and exit status 1."""
    from helpers import tiny_fit_args

    from finsight.__main__ import entry

    truncated = tmp_path / "lightning_logs" / "quickstart" / "run" / "checkpoints" / "last.ckpt"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(a_checkpoint.read_bytes()[:1000])
    args = tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.logger.init_args.version=run",
                         f"--ckpt_path={truncated if given == 'path' else 'last'}")
    monkeypatch.setattr(sys, "argv", ["finsight", *args])
    assert entry() == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {truncated} is truncated or corrupt (not a complete torch.save archive, 1000 bytes); "
        "use an earlier checkpoint")


def test_checkpoint_write_is_atomic_and_leaves_no_temporary(a_checkpoint, tmp_path):
    io = AtomicCheckpointIO()
    checkpoint = io.load_checkpoint(a_checkpoint)
    target = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint(checkpoint, target)
    first = target.stat().st_ino
    checkpoint["global_step"] = 99
    io.save_checkpoint(checkpoint, target)
    assert target.stat().st_ino != first  # replaced by rename, never rewritten in place
    assert io.load_checkpoint(target)["global_step"] == 99
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_value_stops_the_run_naming_the_step_and_the_last_checkpoint_resumes(
        where, tiny_model_dir, tmp_path, one_thread):
    from helpers import tiny_fit_args

    def args(*extra: str) -> list[str]:
        # The quickstart's ModelCheckpoint writes last.ckpt after every validation: at steps 2 and 4.
        return tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=5", "--trainer.val_check_interval=2",
                             "--trainer.logger.init_args.version=run", *extra)

    inject = {"class_path": "fit_worker.InjectNonFinite", "init_args": {"step": 3, "where": where}}
    with pytest.raises(NonFiniteError) as error:
        main(args("--trainer.callbacks+=" + json.dumps(inject)))
    message = str(error.value)
    assert "global step 3" in message and "\n" not in message
    assert ("training loss is nan" if where == "loss" else "gradient of model.") in message
    checkpoints = tmp_path / "lightning_logs" / "quickstart" / "run" / "checkpoints"
    assert str(checkpoints / "last.ckpt") in message

    # The last good checkpoint is the step-2 one (no checkpoint was written after the NaN) and is finite.
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    assert last["state_dict"] and all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []

    if where == "grad":
        return
    # Resuming from it trains on to the end.
    cli = main(args("--ckpt_path=last"))
    assert cli.trainer.global_step == 5
    assert all(torch.isfinite(p).all() for p in cli.model.trainable_parameters())
