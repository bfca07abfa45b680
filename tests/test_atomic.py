"""Atomic files and folders: complete or absent under the final name; a full disk is one clear error."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from fit_worker import NoSpaceAfter

from finsight.atomic import DiskFullError, atomic_path, stale_temporaries
from finsight.training.checkpoint import AtomicCheckpointIO


class Crash(Exception):
    pass


def test_a_failed_file_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(Crash), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise Crash
    assert target.read_bytes() == b"old" and not stale_temporaries(target)
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # readable until the new one is complete
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_a_folder_is_replaced_whole_and_a_failed_one_leaves_the_old(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_config.json").write_text("old")
    (target / "stale.bin").write_text("from an older export")
    with pytest.raises(Crash), atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "adapter_config.json").write_text("half")
        raise Crash
    assert (target / "adapter_config.json").read_text() == "old" and not stale_temporaries(target)
    with atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "adapter_config.json").write_text("new")
    assert [p.name for p in target.iterdir()] == ["adapter_config.json"]
    assert (target / "adapter_config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary, nothing moved aside


def test_a_full_disk_names_the_folder_and_the_space_needed(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(DiskFullError) as caught, atomic_path(target, "the GGUF file", expected_bytes=3_500_000):
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(caught.value)
    assert f"no space left in {tmp_path} to write the GGUF file: it needs about 3.5 MB" in message
    assert "free; the previous files are intact" in message and "\n" not in message
    assert target.read_bytes() == b"old" and not stale_temporaries(target)


def test_a_checkpoint_save_that_fills_the_disk_inside_torch_save_keeps_the_previous_checkpoint(tmp_path):
    """The OSError arrives through torch.save's stream writer (a RuntimeError there): still DiskFullError."""

    class FillingDisk(AtomicCheckpointIO):
        def write(self, checkpoint, file, path):
            super().write(checkpoint, NoSpaceAfter(file, limit=1000), path)

    target = tmp_path / "checkpoints" / "last.ckpt"
    previous = {"global_step": 4, "state_dict": {"w": torch.ones(8)}}
    AtomicCheckpointIO().save_checkpoint(previous, target)
    with pytest.raises(DiskFullError, match=r"no space left in .*checkpoints to write checkpoint last.ckpt: "
                                            r"it needs about 400.0 KB"):
        FillingDisk().save_checkpoint({"global_step": 6, "state_dict": {"w": torch.ones(100_000)}}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 4
    assert not stale_temporaries(target)
    assert Path(target).parent.iterdir().__next__().name == "last.ckpt"


def test_a_folder_replaces_an_older_one_in_one_step_where_the_kernel_can_swap_them(tmp_path, monkeypatch):
    import sys

    from finsight import atomic

    target, temporary = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.tmp-step2"
    for folder, content in ((target, "step 1"), (temporary, "step 2")):
        folder.mkdir()
        (folder / "model_states.pt").write_text(content)
    renames: list[tuple[str, str]] = []
    real_rename = atomic.os.rename
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    atomic.replace_with(temporary, target)
    assert (target / "model_states.pt").read_text() == "step 2" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    if sys.platform.startswith("linux"):
        assert renames == []  # swapped by renameat2(RENAME_EXCHANGE): no instant without last.ckpt
    # Where the swap is refused (another kernel, a file system without it): moved aside, then renamed.
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    temporary.mkdir()
    (temporary / "model_states.pt").write_text("step 3")
    atomic.replace_with(temporary, target)
    assert (target / "model_states.pt").read_text() == "step 3" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert len(renames) == 2
