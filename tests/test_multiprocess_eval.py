"""Two local processes evaluate like one process with 8 devices: the training loop's evals, the
final eval and jaxlm-eval, for an LM on documents and a classifier on examples, over a validation
split whose last batch is mostly fill rows (where a process that runs out of batches first would
wait forever in a collective); and every process gets its share of the same eval batches."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from multiprocess_helpers import (
    assert_same_metrics,
    evals,
    experiment_file,
    finish,
    launch,
    launch_train,
)

from jaxlm import eval_loop, inference, sharding, train
from jaxlm.data import feed, tokenizer

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
    """4 steps, then an eval of the whole validation split (fill rows in its last batch); the
    evals between training steps, across a restart, are test_multiprocess.py's."""
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
    c.train.eval_every = 4
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
    assert sorted(want) == [4]

    workdir = tmp_path / "two"
    experiment = experiment_file(tmp_path, config, objective)
    finish(launch_train(experiment, workdir), 180, f"{objective} training with evals")
    got = evals(workdir)
    assert sorted(got) == [4]
    assert_same_metrics(got[4], want[4])
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
