"""Saves that never lose the program, loads that never mix two saves (SPEC section 10).

Saves run in forked children that are killed (SIGKILL, or ``os._exit`` at each step
of the replacement); after each kill the path loads as the old or the new program,
and the next save leaves no debris. Loads run while another process re-saves.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import tracevene as iv
from tracevene.ir import nodes as ir_nodes
from tracevene.ir import serialize

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks children (POSIX)")

#: Which tensor value goes with which save name: a mixed load would pair them wrongly.
VALUES = {"old": 1.0, "new": 2.0}


def program(kind: str, n: int = 256) -> iv.Program:
    """``const -> save(kind)``, the constant filled with ``VALUES[kind]``."""
    nodes = [
        ir_nodes.Node(0, "const", "c0"),
        ir_nodes.Node(1, "save", kind, args=(ir_nodes.Ref(0),)),
    ]
    return iv.Program(nodes, 0, {}, {"c0": torch.full((n,), VALUES[kind])})


def kind_of(directory: Path) -> str:
    """``"old"`` or ``"new"``: the program at ``directory``, checked to be one save's."""
    loaded = iv.Program.load(directory)
    (name,) = loaded.saves
    assert torch.equal(loaded.tensors["c0"], torch.full_like(loaded.tensors["c0"], VALUES[name]))
    return name


def assert_clean(directory: Path) -> None:
    """Only the program's three files, and nothing of the save beside the directory."""
    names = sorted(os.listdir(directory))
    assert names[:2] == ["README.md", "program.json"] and len(names) == 3, names
    assert names[2].startswith("tensors.") and names[2].endswith(".safetensors"), names
    assert os.listdir(directory.parent) == [directory.name]


def fork(body: Callable[[], None]) -> int:
    """Run ``body`` in a child process; its exit status is 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            body()
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            print(f"child failed: {type(e).__name__}: {e}", flush=True)
            code = 1
        os._exit(code)
    return pid


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def save_forever(target: Path) -> Callable[[], None]:
    def body() -> None:
        while True:
            for kind in ("new", "old"):
                program(kind).save(target)

    return body


@pytest.fixture()
def target(tmp_path) -> Path:
    path = tmp_path / "parent" / "prog"
    program("old").save(path)
    return path


# -- kills -----------------------------------------------------------------------------------
def test_saves_killed_at_random_moments_leave_the_old_or_the_new_program(target):
    rng = random.Random(0)
    seen = set()
    for _ in range(120):
        pid = fork(save_forever(target))
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL
        seen.add(kind_of(target))
    assert seen == {"old", "new"}
    program("new").save(target)
    assert kind_of(target) == "new"
    assert_clean(target)


def _exit_at(step: int, target: Path) -> Callable[[], None]:
    """A save of the new program that ``os._exit``s at hook call number ``step``."""

    def body() -> None:
        calls = []

        def hook(real):
            def wrapped(*args, **kwargs):
                calls.append(real)
                if len(calls) == step:
                    os._exit(3)
                return real(*args, **kwargs)

            return wrapped

        for name in ("replace", "fsync", "unlink", "write"):
            setattr(os, name, hook(getattr(os, name)))
        Path.unlink = hook(Path.unlink)
        program("new").save(target)
        os._exit(4)  # the save finished before step ``step``

    return body


@pytest.mark.parametrize("first", [False, True], ids=["re-save", "first save"])
def test_a_save_killed_at_each_step_leaves_the_old_or_the_new_program(tmp_path, first):
    target = tmp_path / "parent" / "prog"
    seen = []
    for step in range(1, 200):
        shutil.rmtree(tmp_path / "parent", ignore_errors=True)
        if not first:
            program("old").save(target)
        code = wait(fork(_exit_at(step, target)))
        if code == 4:
            break
        assert code == 3
        if first and not (target / "program.json").exists():
            with pytest.raises(iv.ProgramFormatError):
                iv.Program.load(target)
            seen.append("none")
        else:
            seen.append(kind_of(target))
        program("new").save(target)
        assert_clean(target)
    assert code == 4 and len(seen) >= 5, seen  # each write, fsync and rename was a step
    assert seen[-1] == "new" and ("none" if first else "old") in seen


# -- concurrency ------------------------------------------------------------------------------
def test_loads_during_re_saves_return_one_whole_program(target):
    pid = fork(save_forever(target))
    try:
        kinds = [kind_of(target) for _ in range(1000)]
    finally:
        os.kill(pid, signal.SIGKILL)
        wait(pid)
    assert set(kinds) == {"old", "new"}


def test_two_processes_saving_to_one_path_both_succeed(target):
    def saves(kind: str) -> Callable[[], None]:
        return lambda: [program(kind).save(target) for _ in range(40)]

    pids = [fork(saves("old")), fork(saves("new"))]
    assert [wait(pid) for pid in pids] == [0, 0]
    assert kind_of(target) in VALUES
    assert_clean(target)


def test_a_load_retries_once_when_a_re_save_replaces_the_tensor_file(target, monkeypatch):
    real = serialize._read_graph
    calls = []

    def racing(directory):
        graph = real(directory)
        if not calls:  # another process re-saves between reading program.json and the tensors
            program("new").save(target)
        calls.append(directory)
        return graph

    monkeypatch.setattr(serialize, "_read_graph", racing)
    assert kind_of(target) == "new" and len(calls) == 2


# -- disk full, permissions, notes ------------------------------------------------------------
def _full_disk(monkeypatch) -> None:
    real = serialize._write_all

    def half(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(serialize, "_write_all", half)


def test_a_full_disk_keeps_the_old_program(target, monkeypatch):
    _full_disk(monkeypatch)
    with pytest.raises(iv.DiskFullError, match=r"No space left on device.*intact") as info:
        program("new").save(target)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert kind_of(target) == "old"
    assert_clean(target)


def test_a_full_disk_on_a_first_save_leaves_nothing(tmp_path, monkeypatch):
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match=r"No space left on device.*nothing was written"):
        program("new").save(tmp_path / "prog")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_files_get_the_permissions_the_umask_allows(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        target = tmp_path / "prog"
        program("old").save(target)
        program("new").save(target)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == dir_mode
    for path in target.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path.name


def test_a_re_save_keeps_the_directory_mode(target):
    target.chmod(0o750)
    program("new").save(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_notes_below_the_marker_survive_a_re_save(target):
    card = target / "README.md"
    text = card.read_text()
    assert text.count(serialize.NOTES_MARK) == 1
    card.write_text(text + "## My notes\n\nTrained on the IOI split, seed 3.\n")
    program("new").save(target)
    again = card.read_text()
    assert again.endswith(
        f"{serialize.NOTES_MARK}\n## My notes\n\nTrained on the IOI split, seed 3.\n"
    )
    assert "`new`" in again and "`old`" not in again  # the card describes the new program
    assert kind_of(target) == "new"


def test_a_directory_in_the_first_layout_loads_and_re_saves(target):
    name = serialize._tensor_entry(serialize._read_graph(target))[0]
    (target / name).rename(target / "tensors.safetensors")
    graph = serialize._read_graph(target)
    del graph["tensor_file"]
    (target / "program.json").write_text(serialize.json.dumps(graph))
    assert kind_of(target) == "old"
    program("new").save(target)
    assert kind_of(target) == "new"
    assert_clean(target)
