"""Tests run on CPU with 8 fake devices, so sharding over data, fsdp and tensor is exercised."""

import atexit
import collections
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# The tests' models are tiny: XLA's compile time, not run time, dominates the suite, so the CPU
# backend skips its expensive LLVM passes (20% less CPU time; numbers are unchanged in the
# equality tests, which compare runs compiled alike). The fusion emitters (XLA's newer CPU codegen
# through MLIR) cost 2.6x the compile CPU of the classic emitters on the tiny train step.
FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or subprocess) with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _prune_cache(folder: str, limit: int) -> None:
    """Deletes the least recently used of the folder's files until they total under `limit` / 2
    bytes, when they total more than `limit`."""
    try:
        entries = [(e, e.stat()) for e in os.scandir(folder) if e.is_file()]
    except FileNotFoundError:
        return
    total = sum(st.st_size for _, st in entries)
    if total <= limit:
        return
    for entry, st in sorted(entries, key=lambda es: max(es[1].st_atime, es[1].st_mtime)):
        if total <= limit // 2:
            break
        with contextlib.suppress(FileNotFoundError):
            os.remove(entry.path)
            total -= st.st_size


# One XLA compilation cache for both pytest-xdist workers and every subprocess they start (the
# environment is set before the workers exist): many tests compile the same tiny steps. It is
# kept between runs like pip's cache (keyed by the program, jaxlib and flags, so never stale):
# a re-run compiles only what changed. JAXLM_TEST_XLA_CACHE=fresh uses a new one for this run
# (a cold run, as on a new machine); any other value is the folder to use.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _where = os.environ.get("JAXLM_TEST_XLA_CACHE", "")
    if _where == "fresh":
        _where = tempfile.mkdtemp(prefix="jaxlm-test-xla-")
        atexit.register(shutil.rmtree, _where, ignore_errors=True)
    elif not _where:
        _home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        _where = os.path.join(_home, "jaxlm", "xla-tests")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _where
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, before any worker starts
        _prune_cache(_where, 1 << 30)
# No size limit for JAX itself: with one, JAX lists the whole folder and reads every entry's
# access time on each compile (0.67 s of CPU at 9k entries), and the suite's programs are many and
# small. The controller prunes it above (_prune_cache) instead, once a run.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import filelock  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402
from compile_report import (  # noqa: E402, F401 (JAXLM_TEST_COMPILE_REPORT=1's hooks)
    pytest_runtest_protocol,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import sharding, train  # noqa: E402
from jaxlm.checkpoint import Checkpointer  # noqa: E402
from jaxlm.config import OBJECTIVE_FAMILY, base_config  # noqa: E402
from jaxlm.data import feed  # noqa: E402


def tiny_config(source: str = "synthetic", objective: str = "lm"):
    """A small model derived from the base config; every dim divides a 2x2x2 mesh.

    objective picks the model family it trains (lm: decoder, mlm: encoder, classify: encoder,
    seq2seq and span_corruption: encoder_decoder).
    """
    c = base_config()
    c.task.objective = objective
    c.model.family = OBJECTIVE_FAMILY[objective][0]
    c.model.vocab_size = 64
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.d_ff = 64
    c.model.max_len = 16
    c.model.dtype = "float32"  # exact comparisons (sharded vs one device, resume)
    c.data.source = source
    c.data.batch_size = 8
    c.data.seq_len = 16
    c.data.target_len = 8
    if objective == "classify":
        c.model.num_classes = 3
    c.data.prefetch = 1
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    c.train.steps = 6
    c.train.log_every = 2
    c.train.eval_every = 0
    c.train.eval_steps = 2
    c.train.checkpoint_every = 3
    c.mesh.data = -1  # all 8 fake devices unless a test picks a layout
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


def losses_after(config, devices, tmp_path, steps: int = 3) -> list[float]:
    """Training losses of the first `steps` steps, driving the jitted step directly."""
    s = train.setup(config, tmp_path, devices)
    state = train.create_state(s)
    step_fn = train.make_train_step(s)
    out = []
    with sharding.use_rules(s.mesh, config.mesh.rules):
        for i in range(steps):
            state, metrics = step_fn(state, feed.to_device(s.data.train_batch(i), s.batch_sharding))
            out.append(float(metrics["loss"]))
    return out


def init_run(config, workdir: Path, devices=None, tokenizer_sha256: str | None = None) -> Path:
    """A run directory holding `config`'s freshly initialized model at step 0, without training
    (what compression and distillation read). `tokenizer_sha256` stands for another tokenizer."""
    s = train.setup(config, workdir, devices)
    state = train.create_state(s)
    config_lib.save_config(config, workdir)
    meta = {**s.state_meta(), "step": 0}
    if tokenizer_sha256 is not None:
        meta["tokenizer_sha256"] = tokenizer_sha256
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(0, state, meta)
    ckpt.close()
    return workdir


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def one_device():
    return jax.devices()[:1]


def train_stdlib(tmp: Path, objective: str = "lm") -> Path:
    """4 steps on the embedded corpus; checkpoints at 2 and 4, the loop evaluates at both."""
    c = tiny_config(source="python_stdlib", objective=objective)
    c.data.tokenizer_mask = objective == "mlm"
    c.data.cache_dir = str(tmp / "cache")
    c.data.tokenizer_vocab_size = 512
    c.model.vocab_size = 0
    c.model.max_len = 32
    c.data.seq_len = 32
    c.train.steps = 4
    c.train.eval_every = 2
    c.train.eval_steps = 2
    c.train.checkpoint_every = 2
    train.train(c, tmp / "run")
    return tmp / "run"


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)`'s folder, built once per test session: the pytest-xdist workers share
    one (the first to ask builds it under a file lock; the others wait, then read it)."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # this session's folder, above the workers' own
    folder, done = root / name, root / f"{name}.built"
    with filelock.FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def stdlib_lm_run(tmp_path_factory):
    """One 4-step LM run on the embedded corpus, shared by the tests that only read it."""
    return built_once(tmp_path_factory, "stdlib_lm", train_stdlib) / "run"


@pytest.fixture(scope="session")
def stdlib_mlm_run(tmp_path_factory):
    """One 4-step masked-LM (encoder) run on the embedded corpus, shared like stdlib_lm_run."""
    return built_once(tmp_path_factory, "stdlib_mlm", lambda d: train_stdlib(d, "mlm")) / "run"


# With `--dist loadfile` xdist hands out files by test count, so a slow file drawn last
# leaves the other workers idle at the end. These go first, slowest first (each file's summed
# test time in a `make test` of 2026-12-03 on the 2-core VM, 15-158 s); the rest follow.
SLOWEST_FILES = (
    "test_multiprocess.py",
    "test_multiprocess_eval.py",
    "test_train.py",
    "test_faults_cli.py",
    "test_inference.py",
    "test_families_train.py",
    "test_lora.py",
    "test_quantize.py",
    "test_interop_decoders.py",
    "test_chunked_loss.py",
    "test_model.py",
    "test_prefix_lm.py",
    "test_interop_encoders.py",
    "test_distill.py",
    "test_finetune.py",
    "test_cpu_speed.py",
    "test_interop_t5.py",
    "test_seq2seq_eval.py",
    "test_prune.py",
    "test_hf_tokenizer.py",
    "test_hf_api.py",
    "test_faults.py",
)


def slowest_first(nodeids: list[str]) -> list[str]:
    """`nodeids` reordered file by file as SLOWEST_FILES says; order within a file is kept."""

    def rank(i_nodeid: tuple[int, str]) -> tuple[int, int]:
        i, nodeid = i_nodeid
        name = Path(nodeid.split("::", 1)[0]).name
        slow = SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
        return slow, i

    return [nodeid for _, nodeid in sorted(enumerate(nodeids), key=rank)]


@pytest.hookimpl(optionalhook=True)  # without xdist (`-p no:xdist`) the hook does not exist
def pytest_xdist_make_scheduler(config, log):
    """With `--dist loadfile`, a scheduler that hands out the slowest files first."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SlowestFirst(LoadFileScheduling):
        # The work queue (file -> its tests) is reordered, never the workers' collections: the
        # scheduler sends each worker indexes into its own collection.
        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "_sorted", False):  # the queue is complete at the first call
                self._sorted = True
                files = slowest_first(list(self.workqueue))
                self.workqueue = collections.OrderedDict((f, self.workqueue[f]) for f in files)
            super()._assign_work_unit(node)

    return SlowestFirst(config, log)
