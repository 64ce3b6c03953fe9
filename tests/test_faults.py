"""Faults: damaged checkpoints, a changed model, the workdir lock, full disks, metrics on resume.

(Signals, kill -9 and bad command lines, which need a jaxlm-train process: test_faults_cli.py.)
"""

import errno
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from jaxlm import config as config_lib
from jaxlm import monitor, train
from jaxlm.checkpoint import CheckpointError
from jaxlm.workdir_lock import LOCK_NAME, WorkdirError, WorkdirLock


def records(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def train_steps(workdir):
    return [r["step"] for r in records(workdir) if "train/loss" in r]


def final_loss(workdir):
    return [r["train/loss"] for r in records(workdir) if "train/loss" in r][-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6; tests work on copies."""
    workdir = tmp_path_factory.mktemp("trained")
    train.train(tiny_config(), workdir)
    return workdir


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def biggest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_damaged_newest_step_resumes_from_the_previous_one(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    victim = biggest_file(run / "checkpoints" / "6")
    size = victim.stat().st_size
    with victim.open("r+b") as f:
        f.truncate(size // 2)
    name = str(victim.relative_to(run / "checkpoints" / "6"))
    out = train.train(tiny_config(), run)
    said = capsys.readouterr().out
    assert (
        f"checkpoint step 6 in {run / 'checkpoints'} is damaged ({name} has {size // 2} bytes of "
        f"{size}): moved to 6.damaged; resuming from step 3, the newest complete checkpoint"
    ) in said
    assert out["step"] == 6 and (run / "checkpoints" / "6.damaged").is_dir()
    np.testing.assert_allclose(final_loss(run), final_loss(trained), rtol=1e-5)
    # Steps 4-6 were logged by the first run and again by the resumed one: kept once.
    assert train_steps(run) == train_steps(trained) == [2, 4, 6]
    assert "dropped 3 lines past step 3" in said  # the train lines of steps 4 and 6, eval at 6
    assert not (run / LOCK_NAME).exists()  # released at the end of the run


def test_no_complete_step_is_refused_and_nothing_moved(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    for step in (3, 6):
        (run / "checkpoints" / str(step) / "params" / "manifest.ocdbt").unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(
        CheckpointError,
        match=r"no complete checkpoint in .*checkpoints \(step 6: params/manifest.ocdbt is "
        r"missing, step 3: params/manifest.ocdbt is missing\): put the files back from a copy, "
        r"or move .* aside to start again from step 0",
    ):
        train.train(tiny_config(), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("vocab_size", 128, "model.vocab_size=64 (config has 128)"),
        ("num_layers", 3, "model.num_layers=2 (config has 3)"),
    ],
)
def test_resume_with_another_model_names_the_difference(trained, tmp_path, key, value, message):
    run = copy_of(trained, tmp_path)
    c = tiny_config()
    c.model[key] = value
    c.train.steps = 9
    with pytest.raises(CheckpointError) as e:
        train.train(c, run)
    assert message in str(e.value) and "use a new --workdir" in str(e.value)


def test_a_remote_workdir_is_refused_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config_lib.ConfigError) as e:
        train.train(tiny_config(), "gs://bucket/run/")
    assert str(e.value) == (
        "--workdir gs://bucket/run/ is remote, but the workdir (lock, config, metrics, "
        "TensorBoard) must be local: use a local --workdir and "
        "--config.train.checkpoint_dir=gs://bucket/run/checkpoints"
    )
    assert list(tmp_path.iterdir()) == []  # no ./gs:/bucket/run


def held_lock(workdir, **fields):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "token": "x"}
    record.update({"started": time.time(), "heartbeat": time.time(), **fields})
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / LOCK_NAME).write_text(json.dumps(record))


def test_a_workdir_in_use_is_refused_at_once(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        held_lock(tmp_path, pid=sleeper.pid)
        t0 = time.perf_counter()
        with pytest.raises(WorkdirError) as e:
            train.train(tiny_config(), tmp_path)
        assert time.perf_counter() - t0 < 2.0  # before any setup or compile
    finally:
        sleeper.kill()
        sleeper.wait()
    assert f"is in use by pid {sleeper.pid} on host {socket.gethostname()}" in str(e.value)
    assert not (tmp_path / "checkpoints").exists()
    # The same lock from another host, with a fresh heartbeat: refused too.
    held_lock(tmp_path, host="other-host", pid=1)
    with pytest.raises(WorkdirError, match="in use by pid 1 on host other-host"):
        WorkdirLock(tmp_path).__enter__()


@pytest.mark.parametrize(
    "held", ["dead pid", "expired heartbeat", "half written", "our pid", "live pid, expired"]
)
def test_a_stale_lock_does_not_block(tmp_path, capsys, held):
    sleeper = subprocess.Popen(["sleep", "60"])
    if held == "dead pid":
        gone = subprocess.Popen(["true"])
        gone.wait()
        held_lock(tmp_path, pid=gone.pid)
    elif held == "expired heartbeat":
        held_lock(tmp_path, host="other-host", heartbeat=time.time() - 3600)
    elif held == "our pid":  # a container restarted with the same hostname and pid (e.g. 1)
        held_lock(tmp_path)
    elif held == "live pid, expired":  # the pid was reused by another process on this host
        held_lock(tmp_path, pid=sleeper.pid, heartbeat=time.time() - 3600)
    else:
        (tmp_path / LOCK_NAME).write_text('{"pid": 12')
        with pytest.raises(WorkdirError, match="is in use"):  # maybe being written right now
            WorkdirLock(tmp_path).__enter__()
        os.utime(tmp_path / LOCK_NAME, (time.time() - 60, time.time() - 60))
    try:
        with WorkdirLock(tmp_path) as lock:
            assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.mine["token"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "taking over" in capsys.readouterr().out
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("before", ["no lock", "a stale lock"])
def test_launches_at_the_same_moment_take_the_lock_once(tmp_path, before):
    if before == "a stale lock":  # each launch judges it stale; only one may take it over
        held_lock(tmp_path, host="other-host", heartbeat=time.time() - 3600)
    barrier, won, refused = threading.Barrier(8), [], []

    def launch():
        barrier.wait()
        try:
            won.append(WorkdirLock(tmp_path).__enter__())
        except WorkdirError:
            refused.append(1)

    threads = [threading.Thread(target=launch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(refused)) == (1, 7)
    won[0].__exit__(None, None, None)
    assert not (tmp_path / LOCK_NAME).exists()


def test_metrics_write_on_a_full_disk_keeps_whole_lines(tmp_path, monkeypatch):
    writer = monitor.MetricsWriter(tmp_path)
    writer.write(1, {"train/loss": 1.0})
    real_write = os.write

    def half_then_full(fd, data):
        """The disk fills in the middle of the line: part of it is written, then ENOSPC."""
        if b'"step": 2' not in data:
            return real_write(fd, data)
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(monitor.WriteError) as e:
        writer.write(2, {"train/loss": 2.0})
    assert str(e.value).startswith(
        f"could not write {writer.path}: No space left on device (errno 28); the run stopped"
    )
    monkeypatch.undo()
    assert [r["step"] for r in records(tmp_path)] == [1]
    assert (tmp_path / "metrics.jsonl").read_bytes().endswith(b"}\n")  # no half line
    writer.write(3, {"train/loss": 3.0})  # the next write appends a whole line after it
    assert [r["step"] for r in records(tmp_path)] == [1, 3]
    writer.close()


def test_config_json_stays_whole_when_its_rewrite_fails(tmp_path, monkeypatch):
    old, new = tiny_config(), tiny_config()
    new.train.steps = 7
    config_lib.save_config(old, tmp_path)
    old_text = (tmp_path / "config.json").read_text()
    real_open = io.open

    class FullDisk:
        """A file on a disk that fills in the middle of the new config."""

        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            if (data.encode() if isinstance(data, str) else data) == new_bytes:
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

    new_bytes = config_lib.to_json(new).encode()
    monkeypatch.setattr(io, "open", lambda *a, **k: FullDisk(real_open(*a, **k)))
    with pytest.raises(OSError, match="No space left on device"):
        config_lib.save_config(new, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "config.json").read_text() == old_text  # whole, and still the old one
    config_lib.save_config(new, tmp_path)
    assert (tmp_path / "config.json").read_bytes() == new_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.1.json", "config.json"]
    assert (tmp_path / "config.1.json").read_text() == old_text


def test_checkpoint_save_on_a_full_disk_stops_and_keeps_the_last_one(
    trained, tmp_path, monkeypatch, capsys
):
    run = copy_of(trained, tmp_path)
    shutil.rmtree(run / "checkpoints" / "6")
    real = ocp.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if x.get("step") == 6:  # the save in the background thread, as a real full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await real(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
    with pytest.raises(CheckpointError) as e:
        train.train(tiny_config(), run)
    message = str(e.value)
    assert message.startswith(f"saving checkpoint step 6 in {run / 'checkpoints'} failed: ")
    assert "No space left on device" in message and "(step 3) is kept" in message
    monkeypatch.undo()
    capsys.readouterr()
    out = train.train(tiny_config(), run)  # the last good checkpoint resumes
    assert out["step"] == 6
    assert "an unfinished save of step 6 (the run was stopped while saving)" in (
        capsys.readouterr().out
    )
    np.testing.assert_allclose(final_loss(run), final_loss(trained), rtol=1e-5)


def tensorboard_purges(directory):
    """The purge steps (SessionLog START events) written into TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(directory.glob("events.*")):
        data = path.read_bytes()
        while data:
            (n,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event.FromString(data[12 : 12 + n])
            data = data[16 + n :]
            if event.HasField("session_log") and event.session_log.status == 1:
                steps.append(event.step)
    return steps


def test_tensorboard_writes_without_importing_torch(tmp_path):
    """tensorboardX imports torch when it can (seconds per training start); the writer keeps it
    out, and `import torch` still works afterwards in the same process."""
    code = textwrap.dedent(
        f"""
        import sys
        from jaxlm import monitor
        writer = monitor.MetricsWriter({str(tmp_path)!r})
        writer.write(1, {{"train/loss": 2.5}})
        writer.close()
        print("torch" in sys.modules)
        import torch
        print(torch.ones(2).sum().item())
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "2.0"]
    assert len(list((tmp_path / "tensorboard").glob("events.*"))) == 1


def test_resume_drops_metrics_past_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": float(s)}) for s in (1, 2, 3, 4, 5)]
    lines.insert(3, json.dumps({"step": 3, "eval/loss": 0.5}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "tra')
    writer = monitor.MetricsWriter(tmp_path)
    assert writer.resume(3) == 3  # steps 4 and 5, and the half line a kill left
    writer.write(4, {"train/loss": 4.5})
    writer.close()
    assert [(r["step"], r.get("train/loss")) for r in records(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (3, None), (4, 4.5),
    ]  # fmt: skip
    assert tensorboard_purges(tmp_path / "tensorboard") == [4]  # TensorBoard drops steps >= 4
    # A finished run re-run evaluates its last step again: that eval line goes, not the step's.
    again = monitor.MetricsWriter(tmp_path)
    assert again.resume(4) == 0
    assert again.resume(3, eval_again=True) == 2  # the eval at 3, the train line at 4
    again.close()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]


def test_every_row_of_the_readme_fault_table_names_a_test():
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text().split("## What happens when...")[1].split("\n## ")[0]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "::" in line]
    assert len(rows) >= 30
    for row in rows:
        path, name = row.rsplit("| `", 1)[1].split("`")[0].split("::")
        name = name.split("[")[0]
        assert f"def {name}(" in (root / path).read_text(), row
        assert "traceback" not in row.lower(), row
