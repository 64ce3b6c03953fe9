"""The eval program and the Python API on a real tiny run of the embedded corpus."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import evaluate, train
from jaxlm.checkpoint import CheckpointError
from jaxlm.config import ConfigError
from jaxlm.inference import LanguageModel, evaluate_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(stdlib_lm_run):
    return stdlib_lm_run


def loop_eval(run_dir: Path, step: int) -> dict:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["step"] == step and "eval/loss" in r:
            return {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}
    raise AssertionError(f"no eval record at step {step}")


@pytest.mark.parametrize("step", [2, 4])
def test_eval_program_reproduces_the_loop(run_dir, step):
    got = evaluate_run(run_dir, step=step)
    want = loop_eval(run_dir, step)
    assert got["step"] == step
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def test_a_cudnn_run_evaluates_and_generates_off_a_gpu(run_dir):
    """cuDNN attention is GPU-only and not part of the checkpoint: off a GPU, XLA's runs."""
    cudnn = ["--config.model.attention_impl=cudnn"]
    assert evaluate_run(run_dir, overrides=cudnn)["loss"] == evaluate_run(run_dir)["loss"]
    lm = LanguageModel.load(run_dir, overrides=cudnn)
    assert lm.config.model.attention_impl == "xla"
    assert lm.generate(["def "], max_new_tokens=4, temperature=0.0) == LanguageModel.load(
        run_dir
    ).generate(["def "], max_new_tokens=4, temperature=0.0)


def test_eval_on_other_data_leaves_the_run_records(run_dir, tmp_path):
    records = {n: (run_dir / n).read_bytes() for n in ("config.json", "data.json")}
    assert json.loads(records["data.json"])["sources"][0]["source"] == "python_stdlib"
    (tmp_path / "other.txt").write_text("".join(f"x_{i} = {i}\n" for i in range(400)))
    other = evaluate_run(run_dir, overrides=[f"--config.data.source=file:{tmp_path}/other.txt"])
    assert other["bits_per_byte"] != evaluate_run(run_dir)["bits_per_byte"]
    assert {n: (run_dir / n).read_bytes() for n in records} == records


def test_eval_program_reproduces_the_masked_lm_loop(stdlib_mlm_run):
    mlm_dir = stdlib_mlm_run
    for step in (2, 4):
        got, want = evaluate_run(mlm_dir, step=step), loop_eval(mlm_dir, step)
        for key in ("loss", "perplexity", "accuracy", "tokens"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
    data = train.setup(config_lib.load_run_config(mlm_dir), mlm_dir).data
    assert data.mask_id == data.text.tok.mask_id > 3 and data.special_ids == (0, 1, 2, 3)
    # An encoder loads (for fill_mask and classify) but neither scores nor generates.
    mlm = LanguageModel.load(mlm_dir)
    with pytest.raises(ValueError, match="generation needs a decoder .*use fill_mask or classify"):
        mlm.generate(["import "])
    with pytest.raises(ValueError, match="scoring needs a decoder"):
        mlm.score(["import os\n"])


def test_eval_equals_numpy_on_the_models_forward_pass(run_dir):
    """loss, perplexity and bits/byte recomputed in NumPy from the model's logits."""
    lm = LanguageModel.load(run_dir)
    batches = train.setup(_stdlib(lm.config), run_dir).data.eval_batches(2)
    nll, tokens, nbytes = 0.0, 0.0, 0.0
    model = lm.model
    for b in batches:
        logits = np.asarray(evaluate.forward(model, b, packed=True), np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
        nll += float(((logz - target) * b["loss_mask"]).sum())
        tokens += float(b["loss_mask"].sum())
        nbytes += float(b["target_bytes"].sum())
    got = evaluate_run(run_dir)
    np.testing.assert_allclose(got["loss"], nll / tokens, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], np.exp(nll / tokens), rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nll / np.log(2) / nbytes, rtol=1e-5)
    assert got["tokens"] == tokens and got["bytes"] == nbytes


def _stdlib(config):
    c = config.copy_and_resolve_references()
    c.data.source = "python_stdlib"
    return c


def test_packing_and_padding_do_not_change_the_sums(run_dir):
    """Documents packed in one row score as they do alone in padded rows."""
    model = LanguageModel.load(run_dir).model
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 512, n).astype(np.int32) for n in (7, 12, 9)]
    t = 32

    def row(parts):
        tokens, seg, pos = np.zeros(t + 1, np.int32), np.zeros(t + 1, np.int32), np.zeros(t + 1)
        i = 0
        for j, d in enumerate(parts):
            tokens[i : i + len(d)], seg[i : i + len(d)] = d, j + 1
            pos[i : i + len(d)] = np.arange(len(d))
            i += len(d)
        mask = (seg[1:] == seg[:-1]) & (seg[1:] != 0)
        return {
            "inputs": tokens[:-1],
            "targets": tokens[1:],
            "segment_ids": seg[:-1],
            "positions": pos[:-1].astype(np.int32),
            "loss_mask": mask.astype(np.float32),
            "target_bytes": mask.astype(np.int32),
        }

    def stack(rows):
        return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}

    packed = evaluate.lm_sums(model, stack([row(docs)] + [row([])] * 3))
    alone = evaluate.lm_sums(model, stack([row([d]) for d in docs] + [row([])]), packed=True)
    np.testing.assert_allclose(packed["nll"], alone["nll"], rtol=1e-5)
    assert float(packed["tokens"]) == float(alone["tokens"]) == sum(len(d) - 1 for d in docs)


def test_score_matches_the_forward_pass(run_dir):
    lm = LanguageModel.load(run_dir)
    texts = ["import os\n", "def add(a, b):\n    return a + b\n"]
    scores = lm.score(texts)
    for text, got in zip(texts, scores, strict=True):
        ids = lm.encode(text)
        logits = np.asarray(lm.model(jnp.asarray([ids], jnp.int32)))[0, :-1]
        want = np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(len(ids) - 1), ids[1:]]
        assert got.shape == (len(ids) - 1,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_generate_is_deterministic_when_greedy(run_dir):
    lm = LanguageModel.load(run_dir)
    prompts = ["import ", "def main():\n    "]
    a = lm.generate(prompts, max_new_tokens=8, temperature=0.0)
    b = lm.generate(prompts, max_new_tokens=8, temperature=0.0, seed=7)
    assert a == b and all(isinstance(x, str) for x in a)
    # Greedy ids agree with argmax over the full forward pass.
    settings = lm.sampling_settings(max_new_tokens=4, temperature=0.0)
    prompt = lm.encode("import ")
    ids = lm.generate_ids([prompt], settings)[0]
    logits = lm.model(jnp.asarray([prompt + ids], jnp.int32))[0]
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1 : -1], -1), ids)


def test_bad_input_is_a_clear_error(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="not a jaxlm run directory"):
        evaluate_run(tmp_path)
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no checkpoint in .*train first"):
        evaluate_run(tmp_path)
    with pytest.raises(CheckpointError, match=r"available steps: \[2, 4\]"):
        evaluate_run(run_dir, step=3)
    lm = LanguageModel.load(run_dir)
    with pytest.raises(ValueError, match="empty prompt"):
        lm.generate([""])
    with pytest.raises(ValueError, match="exceeds the model's context of 32 tokens"):
        lm.generate(["x = 1\n" * 40], max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        lm.generate(["import "], temperature=-1.0)


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_cli_eval_and_generate(run_dir, tmp_path):
    out_file = tmp_path / "eval.json"
    r = cli("jaxlm.cli.eval", "--workdir", str(run_dir), "--step", "4", "--output", str(out_file))
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert record == json.loads(out_file.read_text())
    np.testing.assert_allclose(record["loss"], loop_eval(run_dir, 4)["loss"], rtol=1e-6)
    assert {"perplexity", "bits_per_byte", "tokens", "bytes", "step"} <= set(record)
    assert (run_dir / "eval_metrics.jsonl").is_file()
    assert any((run_dir / "tensorboard" / "jaxlm-eval").iterdir())
    # An eval with overrides records them, so its line differs from the validation eval's.
    more = ["--config.train.eval_steps=1"]
    r = cli("jaxlm.cli.eval", "--workdir", str(run_dir), "--step", "4", *more)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["overrides"] == more
    last = json.loads((run_dir / "eval_metrics.jsonl").read_text().splitlines()[-1])
    assert last["overrides"] == more and last["step"] == 4 and "validation/loss" in last

    r = cli("jaxlm.cli.generate", "--workdir", str(run_dir), "--prompt", "import ",
            "--max_new_tokens", "6", "--temperature", "0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lm = LanguageModel.load(run_dir)
    expected = "import " + lm.generate(["import "], max_new_tokens=6, temperature=0.0)[0]
    assert r.stdout.rstrip("\n") == expected  # streamed text equals the batch result

    r = cli("jaxlm.cli.generate", "--workdir", str(run_dir), "--prompt", "import ",
            "--temperature=-0.5")  # fmt: skip
    assert r.returncode == 2  # a usage error
    assert r.stderr.strip().splitlines() == [
        "jaxlm-generate: error: temperature must be >= 0 (0 is greedy), got -0.5; "
        "pass --temperature 0 or a positive value"
    ]
