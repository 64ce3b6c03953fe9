"""Two local processes (jax.distributed on 127.0.0.1, 4 CPU devices each) train and evaluate like
one process with 8 devices (training evals, the final eval and jaxlm-eval, for an LM on documents
and a classifier on examples); SIGTERM to one of them stops both at the same step, and a restart
continues. A hang (processes meeting different collectives) ends with where each process is."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, xla_flags

from jaxlm import config_checks, distributed, eval_loop, inference, sharding, train
from jaxlm.config import ConfigError, base_config
from jaxlm.data import feed, tokenizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def run_config():
    c = tiny_config()
    c.train.steps = STEPS
    c.train.log_every = 4
    c.train.checkpoint_every = 1000  # only the preemption save and the final one
    c.train.eval_every = 15  # evals in both runs, before and after the restart
    return c


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def experiment_file(tmp_path: Path, config=None, name: str = "tiny") -> Path:
    """An experiment file holding `config` (default run_config()): a subprocess must not import
    conftest, which sets 8 devices."""
    base = dict(_flat(base_config().to_dict()))
    config = run_config() if config is None else config
    changed = [f"{k}={v}" for k, v in _flat(config.to_dict()) if base[k] != v]
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from jaxlm.config import apply_overrides, base_config\n\n\n"
        f"def get_config():\n    c = base_config()\n    apply_overrides(c, {changed!r})\n"
        "    return c\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, *args: str) -> list[subprocess.Popen]:
    """`python -m module args` as processes 0 and 1 of one job, 4 CPU devices each."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags(4)
    port = free_port()
    procs = []
    for i in range(2):
        cmd = [
            sys.executable, "-m", module, *args, "--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", "2", "--process_id", str(i),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def launch_train(experiment: Path, workdir: Path) -> list[subprocess.Popen]:
    return launch("jaxlm.cli.train", "--config", str(experiment), "--workdir", str(workdir))


def finish(procs: list[subprocess.Popen], timeout: float, what: str) -> list[tuple[str, str]]:
    """Both processes' (stdout, stderr) once they exit 0; a hang fails the test, naming it."""
    deadline, outs = time.time() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(deadline - time.time(), 1)))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [f"process {i}: ...{''.join(p.communicate())[-1500:]}" for i, p in enumerate(procs)]
        pytest.fail(
            f"{what} hung: the 2 processes did not exit within {timeout:g} s (a collective one "
            "of them never joins); their output ends:\n" + "\n".join(tails)
        )
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"{what}: process {i} exited {p.returncode}: {err[-2000:]}"
    return outs


def records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records(workdir) if "train/loss" in r}


def evals(workdir: Path) -> dict[int, dict]:
    """{step: {metric: value}} of the training loop's evals."""
    out: dict[int, dict] = {}
    for r in records(workdir):
        metrics = {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}
        if metrics:
            out.setdefault(r["step"], {}).update(metrics)
    return out


def assert_same_metrics(got: dict, want: dict) -> None:
    """Losses to 1e-5 (float sums in another order); counts, accuracy and F1 exactly."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if key in ("loss", "perplexity", "bits_per_byte"):
            np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
        else:
            assert got[key] == value, (key, got[key], value)


def test_two_processes_match_one_and_resume_after_sigterm(tmp_path):
    reference = tmp_path / "one"
    train.train(run_config(), reference)
    want = losses(reference)

    experiment, workdir = experiment_file(tmp_path), tmp_path / "two"
    procs = launch_train(experiment, workdir)
    deadline = time.time() + 240
    while not losses(workdir) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # one host is preempted; both must save and exit 0
    outs = finish(procs, 240, "training until SIGTERM")
    assert "saved checkpoint at step" in outs[0][0], outs[0][0][-2000:]
    saved = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert len(saved) == 1 and 0 < saved[0] < STEPS

    finish(launch_train(experiment, workdir), 300, "the resumed training")
    got = losses(workdir)
    assert max(got) == STEPS
    common = sorted(set(got) & set(want))
    assert len(common) >= STEPS // 4 - 1
    np.testing.assert_allclose([got[s] for s in common], [want[s] for s in common], rtol=1e-5)
    want_evals, got_evals = evals(reference), evals(workdir)
    assert sorted(want_evals) == sorted(got_evals) == [15, 30, STEPS]
    for step, metrics in want_evals.items():
        assert_same_metrics(got_evals[step], metrics)


WORDS = (
    "the cat sat on a mat while dogs ran far away and birds sang in trees near old houses".split()
)
VALID_EXAMPLES = 795  # classify: 100 eval batches of 8, the last with 3 real examples


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """JSONL documents (lm) and labelled sentences (classify) with a tokenizer trained on them:
    a multi-process run trains none, and its caches come from the one-process run."""
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    # Validation: ~100 eval batches each (a dozen were too few to meet the hang this guards
    # against), the last one mostly fill rows.
    for split, docs, examples in (("train", 80, 80), ("validation", 200, VALID_EXAMPLES)):
        lines = [{"text": " ".join(_sentence(rng) for _ in range(3))} for _ in range(docs)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        lines = [{"text": _sentence(rng)} for _ in range(examples)]
        for r in lines:
            r["label"] = WORDS.index(r["text"].split()[0]) % 3
        (root / f"{split}-cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    tokenizer.train_tokenizer(
        [json.loads(line)["text"] for line in (root / "train.jsonl").read_text().splitlines()],
        root / "tok.model",
        vocab_size=300,
    )
    return root


def eval_config(texts: Path, objective: str):
    """4 steps, an eval of the whole validation split (fill rows in its last batch) at 2 and 4."""
    c = tiny_config(objective=objective)
    if objective == "classify":
        c.data.source = f"jsonl:{texts}/{{split}}-cls.jsonl"
        c.data.input_key, c.data.label_key = "text", "label"
    else:
        c.data.source = f"jsonl:{texts}/{{split}}.jsonl"
    c.data.tokenizer = str(texts / "tok.model")
    c.data.cache_dir = str(texts / "cache")
    c.model.vocab_size = 0
    c.train.steps = 4
    c.train.eval_every = 2
    c.train.eval_steps = 0
    c.train.checkpoint_every = 1000
    c.train.hang_timeout = 120  # a hang ends with where each process is, within the test's limit
    return c


@pytest.mark.parametrize("objective", ["lm", "classify"])
def test_two_processes_evaluate_like_one(tmp_path, texts, objective):
    config = eval_config(texts, objective)
    reference = tmp_path / "one"
    train.train(config, reference)  # also builds the caches the two processes read
    want = evals(reference)
    assert sorted(want) == [2, 4]

    workdir = tmp_path / "two"
    experiment = experiment_file(tmp_path, config, objective)
    finish(launch_train(experiment, workdir), 180, f"{objective} training with evals")
    got = evals(workdir)
    assert sorted(got) == [2, 4]
    for step in (2, 4):
        assert_same_metrics(got[step], want[step])
    # The last eval batch is filled up with rows that count nothing.
    if objective == "lm":
        described = json.loads((reference / "data.json").read_text())["sources"]
        split = described[0]["validation"]
        assert split["rows"] % config.data.batch_size != 0
        assert want[4]["tokens"] == split["tokens"] - split["documents"]  # not each doc's first
    else:  # an accuracy of k/795, not k/800
        correct = want[4]["accuracy"] * VALID_EXAMPLES
        assert 0 < correct < VALID_EXAMPLES and abs(correct - round(correct)) < 1e-6, want[4]

    # jaxlm-eval in two processes, on N batches (the loop evaluated the whole split).
    out = tmp_path / "eval.json"
    args = ["--workdir", str(workdir), "--max_batches", "1", "--output", str(out)]
    finish(launch("jaxlm.cli.eval", *args), 180, f"{objective} jaxlm-eval")
    got = json.loads(out.read_text())
    want = inference.evaluate_run(reference, max_batches=1)
    assert got["step"] == want.pop("step") == 4
    assert_same_metrics({k: got[k] for k in want}, want)


@pytest.mark.parametrize("objective", ["lm", "span_corruption", "classify"])
def test_processes_share_the_same_eval_batches(tmp_path, texts, objective):
    """run_eval's contract with the data: for the whole split and for N batches, every process
    gets as many eval batches as one process does, and their rows make up its batches."""
    c = eval_config(texts, "lm" if objective == "span_corruption" else objective)
    if objective == "span_corruption":  # a tokenizer with sentinels, trained for the run
        c.task.objective, c.model.family = objective, "encoder_decoder"
        c.data.tokenizer, c.data.tokenizer_sentinels = "", 16
        c.data.tokenizer_vocab_size = 300
    data = train.setup(c, tmp_path).data
    for n in (0, 3):
        whole = data.eval_batches(n, 0, 1)
        shares = [data.eval_batches(n, i, 2) for i in range(2)]
        assert len(whole) == len(shares[0]) == len(shares[1]) == (n or len(whole)) >= 3
        for b, batch in enumerate(whole):
            for key, value in batch.items():
                got = np.concatenate([share[b][key] for share in shares])
                np.testing.assert_array_equal(got, value, err_msg=f"batch {b} {key}")


def test_eval_steps_are_chained_through_their_sums(tmp_path):
    """Each eval step adds to the sums it is given, so consecutive steps depend on each other
    and every device runs them in one order: independent steps may run in any order on CPU, and
    two processes meeting different steps' collectives wait for each other forever."""
    c = tiny_config(objective="classify")
    s = train.setup(c, tmp_path)
    params = train.create_state(s)["params"]
    step = eval_loop.make_eval_step(s)
    with sharding.use_rules(s.mesh, c.mesh.rules):
        batch = feed.to_device(s.data.eval_batches(1)[0], s.batch_sharding)
        index = jnp.int32(0)
        zeros = step.zeros(params, batch, index)
        once = step.step(params, batch, index, zeros)
        twice = step.step(params, batch, index, once)
    assert set(once) >= {"nll", "correct", "examples"}
    for key, value in jax.device_get(once).items():
        assert not np.any(jax.device_get(zeros[key]))
        np.testing.assert_allclose(jax.device_get(twice[key]), 2 * value, rtol=1e-6, err_msg=key)


def test_a_hang_names_where_each_process_is(tmp_path):
    """Process 0 enters a collective that process 1 never joins: it stops after the deadline,
    naming its own place and the other's."""
    script = tmp_path / "hang.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            import jax, jax.numpy as jnp, numpy as np
            from jax.sharding import NamedSharding, PartitionSpec as P
            from jaxlm import distributed

            me = int(sys.argv[1])
            distributed.initialize(sys.argv[2], 2, me)
            if me == 1:
                with distributed.deadline("saving", 60):
                    pass
                time.sleep(120)  # elsewhere: never joins the sum
            mesh = jax.make_mesh((2,), ("data",))
            x = jax.make_array_from_process_local_data(
                NamedSharding(mesh, P("data")), np.ones(1, np.float32), (2,)
            )
            with distributed.deadline("eval batch 2 of 3", 5):
                np.asarray(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
            print("the sum returned")
            """
        )
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), address],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == distributed.HANG_EXIT_CODE, err[-2000:]
    assert "the sum returned" not in out
    line = next(x for x in err.splitlines() if x.startswith("jaxlm: "))
    assert "process 0 of 2 waited 5 s in eval batch 2 of 3" in line, line
    assert re.search(r"process 0: in eval batch 2 of 3 \(\d+ s ago\)", line), line
    assert "process 1: after saving (" in line, line
    assert "raise --config.train.hang_timeout" in line, line


def test_hang_timeout_is_checked_and_one_process_is_unwatched():
    c = tiny_config()
    c.train.hang_timeout = -1.0
    with pytest.raises(ConfigError, match="'train.hang_timeout' must be >= 0, got -1"):
        config_checks.validate(c)
    fired = []
    with distributed.deadline("eval batch 1 of 1", 0.01, on_timeout=lambda *a: fired.append(a)):
        time.sleep(0.2)  # one process: nothing else can keep it waiting
    assert fired == []


def test_distributed_arguments_are_checked():
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        distributed.initialize("127.0.0.1:1234", environ={})
    with pytest.raises(ValueError, match="need --coordinator_address"):
        distributed.initialize(num_processes=2, environ={})
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2, environ={})
    assert distributed.initialize(environ={}) is False  # one process: nothing to start
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
    assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert distributed.cluster_detected({"SLURM_NTASKS": "4"})


def test_a_workdir_in_use_stops_every_process(tmp_path):
    experiment, workdir = experiment_file(tmp_path), tmp_path / "run"
    holder = subprocess.Popen(["sleep", "60"])  # a live trainer holding the workdir
    workdir.mkdir()
    lock = {"pid": holder.pid, "host": socket.gethostname(), "token": "x"}
    lock.update({"started": time.time(), "heartbeat": time.time()})
    (workdir / "jaxlm.lock").write_text(json.dumps(lock))
    procs = launch_train(experiment, workdir)
    try:
        outs = [p.communicate(timeout=60) for p in procs]  # not waiting in a collective
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a process refused the workdir hung instead of exiting")
    finally:
        holder.kill()
        holder.wait()
    held = f"workdir {workdir} is in use by pid {holder.pid} on host {socket.gethostname()}"
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        lines = err.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, f"process {i}: {err[-2000:]}"
        prefix = "jaxlm-train: error: " + ("process 0: " if i else "")
        assert lines[0].startswith(prefix + held), lines[0]
    assert not (workdir / "checkpoints").exists()
