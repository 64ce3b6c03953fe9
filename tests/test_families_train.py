"""Every family trains through the one trainer: sharded equals one device, batches are sound."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import losses_after, tiny_config

from jaxlm import objectives, tasks, train
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import data_spec
from jaxlm.data.builtin import synthetic
from jaxlm.data.documents import span_corruption as spans
from jaxlm.data.types import EOS_ID
from jaxlm.inference import evaluate_run

# (objective, family): each family with the objectives that train it.
FAMILIES = [
    ("span_corruption", "encoder_decoder"),
    ("seq2seq", "encoder_decoder"),
    ("seq2seq", "decoder"),  # a prefix LM
    ("classify", "encoder"),
    ("classify", "decoder"),
]


def family_config(objective: str, family: str):
    c = tiny_config(objective=objective)
    c.model.family = family
    c.model.positions = "relative" if family == "encoder_decoder" else "rope"
    c.model.dropout = 0.1  # dropout keys must not depend on the mesh either
    c.model.num_layers = 1  # per stack: compilation dominates these tests
    return c


@pytest.mark.parametrize("objective,family", FAMILIES)
def test_sharded_equals_one_device(objective, family, tmp_path):
    one = losses_after(family_config(objective, family), jax.devices()[:1], tmp_path / "one")
    c = family_config(objective, family)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    np.testing.assert_allclose(losses_after(c, None, tmp_path / "mesh"), one, rtol=1e-5)
    assert np.isfinite(one).all()


def test_raw_length_is_the_longest_row_that_fits():
    for seq_len, target_len in [(16, 8), (512, 114), (64, 64)]:
        raw = spans.raw_length(seq_len, target_len, 0.15, 3.0)
        i, t = spans.corrupted_lengths(raw, 0.15, 3.0)
        assert i + 1 <= seq_len and t + 1 <= target_len
        i2, t2 = spans.corrupted_lengths(raw + 1, 0.15, 3.0)
        assert i2 + 1 > seq_len or t2 + 1 > target_len
    assert spans.raw_length(512, 114, 0.15, 3.0) == 568  # T5's 568 -> (512, 114)


def test_span_corruption_batches_reassemble_the_rows(tmp_path):
    c = tiny_config(objective="span_corruption")
    data = synthetic.build(data_spec(c))
    batch = data.train_batch(0)
    raw = spans.raw_length(16, 8, 0.15, 3.0)
    rows = synthetic.synthetic_batch(0, 8, raw, 64 - synthetic.NUM_SENTINELS, 0)
    sentinels = set(data.sentinel_ids)
    for b in range(8):
        enc = batch["inputs"][b][batch["input_segment_ids"][b] == 1]
        dec = batch["targets"][b][batch["target_segment_ids"][b] == 1]
        assert enc[-1] == dec[-1] == EOS_ID
        # Replace each sentinel in the inputs by the span that follows it in the targets.
        spans_of, current = {}, None
        for tok in dec[:-1]:
            if tok in sentinels:
                current = int(tok)
                spans_of[current] = []
            else:
                spans_of[current].append(int(tok))
        rebuilt = []
        for tok in enc[:-1]:
            rebuilt += spans_of[int(tok)] if tok in sentinels else [int(tok)]
        assert rebuilt == rows["inputs"][b].tolist()
    np.testing.assert_array_equal(batch["loss_mask"], batch["target_segment_ids"])
    # A pure function of the step: same step, same batch; another step, another corruption.
    np.testing.assert_array_equal(data.train_batch(0)["inputs"], batch["inputs"])
    assert not np.array_equal(data.train_batch(1)["inputs"], batch["inputs"])


def test_seq2seq_loss_ignores_padding_and_starts_from_the_start_id(tmp_path):
    c = tiny_config(objective="seq2seq")
    s = train.setup(c, tmp_path)
    params = train.create_state(s)["params"]
    batch = s.data.train_batch(0)
    sums = jax.jit(lambda p, b: s.objective.eval_sums(train.nnx.merge(s.graphdef, p), b, None))
    base = sums(params, batch)
    assert float(base["tokens"]) == batch["loss_mask"].sum()
    # Changing padded encoder and target positions leaves the sums unchanged.
    noisy = {k: v.copy() for k, v in batch.items()}
    noisy["inputs"] = np.where(batch["input_segment_ids"] == 0, 7, batch["inputs"])
    noisy["targets"] = np.where(batch["target_segment_ids"] == 0, 9, batch["targets"])
    for key in ("nll", "tokens", "correct"):
        np.testing.assert_allclose(sums(params, noisy)[key], base[key], rtol=1e-6)
    model = train.nnx.merge(s.graphdef, params)
    decoder_in = objectives.shift_right(batch["targets"], tasks.DECODER_START_ID)
    assert (np.asarray(decoder_in)[:, 0] == 0).all()
    logits = model(batch["inputs"], decoder_in, encoder_segment_ids_BS=batch["input_segment_ids"])
    want = objectives.token_sums(logits, batch["targets"], batch["loss_mask"])
    np.testing.assert_allclose(base["nll"], want["nll"], rtol=1e-5)


def test_classify_loss_weights_classes(tmp_path):
    c = tiny_config(objective="classify")
    c.task.class_weights = (1.0, 0.0, 0.0)
    s = train.setup(c, tmp_path)
    params = train.create_state(s)["params"]
    batch = s.data.train_batch(0)
    out = s.objective.eval_sums(train.nnx.merge(s.graphdef, params), batch, None)
    assert float(out["tokens"]) == float((batch["labels"] == 0).sum())
    assert float(out["examples"]) == 8.0


def _eval_record(workdir, step: int) -> dict:
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["step"] == step and "eval/loss" in r:
            return {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}
    raise AssertionError(f"no eval record at step {step}")


def test_fine_tuned_classifier_starts_from_the_run_freezes_and_evaluates(tmp_path, capsys):
    pre = tiny_config()
    pre.train.steps = 2
    train.train(pre, tmp_path / "pre")
    c = tiny_config(objective="classify")
    c.model.family = "decoder"
    c.train.init_from = f"{tmp_path / 'pre'}:2"
    c.train.freeze = "blocks/0"
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 4, 2, 2
    train.train(c, tmp_path / "ft")
    out = capsys.readouterr().out
    assert "step 2: loaded" in out and "new: classifier/" in out
    # The frozen block is still the pretrained one after fine-tuning; the head moved.
    s = train.setup(c, tmp_path / "ft")
    ckpt = Checkpointer(tmp_path / "ft" / "checkpoints")
    tuned = ckpt.restore(4, train.abstract_state(s))["params"]
    pre_s = train.setup(pre, tmp_path / "pre")
    pre_ckpt = Checkpointer(tmp_path / "pre" / "checkpoints")
    pretrained = pre_ckpt.restore(2, train.abstract_state(pre_s))["params"]
    frozen = zip(
        jax.tree.leaves(tuned["blocks"][0]), jax.tree.leaves(pretrained["blocks"][0]), strict=True
    )
    for a, b in frozen:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = jax.tree.leaves(tuned["blocks"][1])[0] - jax.tree.leaves(pretrained["blocks"][1])[0]
    assert float(np.abs(moved).max()) > 0
    ckpt.close(), pre_ckpt.close()
    # The eval program reproduces the loop's accuracy and macro F1.
    for step in (2, 4):
        got, want = evaluate_run(tmp_path / "ft", step=step), _eval_record(tmp_path / "ft", step)
        for key in ("loss", "accuracy", "macro_f1", "examples"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
