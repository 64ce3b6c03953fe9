"""train.init_from loads a pretrained run's matching parameters; train.freeze keeps some fixed."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import finetune, sharding, train
from jaxlm.checkpoint import Checkpointer, CheckpointError
from jaxlm.config import ConfigError
from jaxlm.data import feed
from jaxlm.finetune import flat_params, freeze_mask, load_pretrained, parse_init_from
from jaxlm.state import abstract_model

# In tree order (sorted keys), the order of every report list.
CLASSIFIER = [
    "classifier/out/bias",
    "classifier/out/kernel",
    "classifier/pooler/bias",
    "classifier/pooler/kernel",
]


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory) -> str:
    """A 2-step decoder LM run with checkpoints at steps 1 and 2."""
    c = tiny_config()
    c.train.steps, c.train.checkpoint_every, c.train.eval_steps = 2, 1, 1
    workdir = tmp_path_factory.mktemp("pre_lm")
    train.train(c, workdir)
    return str(workdir)


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory) -> str:
    """An encoder MLM run directory with one checkpoint of its initial parameters (seed 1).

    Written directly rather than trained: compiling a second train step would double the
    file's runtime, and what is tested is the checkpoint's parameter tree.
    """
    c = tiny_config(objective="mlm")
    c.train.seed = 1  # other values than the fine-tuned model's own init (seed 0)
    workdir = tmp_path_factory.mktemp("pre_mlm")
    s = train.setup(c, workdir)
    config_lib.save_config(c, workdir)
    ckpt = Checkpointer(config_lib.checkpoint_dir(c, workdir))
    try:
        ckpt.save(2, train.create_state(s), {**s.state_meta(), "step": 2})
    finally:
        ckpt.close()
    return str(workdir)


def checkpoint_params(workdir: str, step: int) -> dict:
    """{path: numpy value} of a run's checkpoint, restored the way the eval program does."""
    cfg = config_lib.load_run_config(workdir)
    s = train.setup(cfg, workdir)
    ckpt = Checkpointer(config_lib.checkpoint_dir(cfg, workdir))
    try:
        params = ckpt.restore_params(step, train.abstract_state(s)["params"])
    finally:
        ckpt.close()
    return {k: np.asarray(v) for k, v in flat_params(params).items()}


def classifier_config(family: str = "decoder"):
    c = tiny_config()
    c.model.family, c.model.num_classes = family, 3
    if family == "encoder":
        c.task.objective = "mlm"  # the param tree is what matters here, not the objective
    return c


def test_parse_init_from():
    assert parse_init_from("runs/pre") == ("runs/pre", None)
    assert parse_init_from("runs/pre:300") == ("runs/pre", 300)
    assert parse_init_from("gs://bucket/runs/pre") == ("gs://bucket/runs/pre", None)
    assert parse_init_from("gs://bucket/runs/pre:0") == ("gs://bucket/runs/pre", 0)
    with pytest.raises(ConfigError, match=r"train.init_from='runs/pre:last': STEP after ':'"):
        parse_init_from("runs/pre:last")
    with pytest.raises(ConfigError, match="names no run directory"):
        parse_init_from(":300")


def test_decoder_lm_starts_a_decoder_classifier(decoder_run, tmp_path):
    c = classifier_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2  # another layout than the pretrained run
    s = train.setup(c, tmp_path)
    with sharding.use_rules(s.mesh, c.mesh.rules):
        state = train.create_state(s)
        fresh = {k: np.asarray(v) for k, v in flat_params(state["params"]).items()}
        params, report = load_pretrained(
            decoder_run, state["params"], c.mesh.rules, s.data.tokenizer_sha256
        )
    pre = checkpoint_params(decoder_run, 2)
    assert report["step"] == 2 and report["workdir"] == decoder_run
    assert report["new"] == CLASSIFIER and report["dropped"] == []
    assert sorted(report["loaded"]) == sorted(pre) and len(pre) == len(fresh) - 4
    out = flat_params(params)
    for name, value in out.items():
        want = fresh[name] if name in CLASSIFIER else pre[name]
        np.testing.assert_array_equal(np.asarray(value), want, err_msg=name)
        assert value.sharding == flat_params(state["params"])[name].sharding, name
    assert not np.array_equal(pre["embed/embedding"], fresh["embed/embedding"])
    assert finetune.summary_line(report) == (
        f"init_from {decoder_run} step 2: loaded {len(pre)} parameters; new: "
        + ", ".join(CLASSIFIER)
    )
    # An explicit step; a missing one lists what there is.
    with sharding.use_rules(s.mesh, c.mesh.rules):
        params, report = load_pretrained(f"{decoder_run}:1", state["params"], c.mesh.rules, None)
    assert report["step"] == 1
    np.testing.assert_array_equal(
        np.asarray(params["embed"]["embedding"]),
        checkpoint_params(decoder_run, 1)["embed/embedding"],
    )
    with pytest.raises(
        CheckpointError, match=r"init_from=.*:7: no checkpoint for step 7 .*\[1, 2\]"
    ):
        load_pretrained(f"{decoder_run}:7", state["params"], c.mesh.rules, None)


def test_encoder_mlm_starts_classifiers(encoder_run, tmp_path):
    pre = checkpoint_params(encoder_run, 2)
    # encoder MLM -> encoder classifier: everything but the new head is loaded.
    s = train.setup(classifier_config("encoder"), tmp_path / "enc")
    abstract = train.abstract_state(s)["params"]
    ours = flat_params(abstract)
    state = train.create_state(s)
    params, report = load_pretrained(encoder_run, state["params"], s.config.mesh.rules, None)
    assert report["new"] == CLASSIFIER
    assert report["loaded"] == [n for n in ours if n in pre] and "mlm_bias" in ours
    assert report["dropped"] == [n for n in pre if n not in ours]
    fresh = np.asarray(state["params"]["blocks"][0]["mlp"]["up"]["kernel"])
    loaded = np.asarray(params["blocks"][0]["mlp"]["up"]["kernel"])
    np.testing.assert_array_equal(loaded, pre["blocks/0/mlp/up/kernel"])
    assert not np.array_equal(loaded, fresh)
    # encoder MLM -> decoder classifier in bfloat16: names match but for the MLM bias (dropped).
    c = classifier_config("decoder")
    c.model.param_dtype = "bfloat16"
    s = train.setup(c, tmp_path / "dec")
    # Abstract parameters (with shardings) work too: new ones come back as ShapeDtypeStructs.
    abstract = train.abstract_state(s)["params"]
    params, report = load_pretrained(encoder_run, abstract, c.mesh.rules, None)
    assert isinstance(params["classifier"]["out"]["kernel"], jax.ShapeDtypeStruct)
    assert report["dropped"] == ["mlm_bias"] and report["new"] == CLASSIFIER
    assert finetune.summary_line(report).endswith("classifier/pooler/kernel; dropped: mlm_bias")
    q = params["blocks"][1]["attn"]["query"]["kernel"]
    assert q.dtype == np.dtype("bfloat16")
    want = pre["blocks/1/attn/query/kernel"].astype("bfloat16")
    np.testing.assert_array_equal(np.asarray(q), want)


def test_mismatches_are_one_line_errors(decoder_run, tmp_path, monkeypatch):
    c = classifier_config()
    c.model.d_ff, c.model.num_heads = 128, 8
    s = train.setup(c, tmp_path)
    abstract = train.abstract_state(s)["params"]
    with pytest.raises(ConfigError) as e:
        load_pretrained(decoder_run, abstract, c.mesh.rules, None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"train.init_from={decoder_run}: 14 parameter(s)")
    assert "blocks/0/attn/query/kernel: pretrained (32, 4, 8) vs (32, 8, 4)" in msg
    assert "blocks/0/mlp/down/kernel: pretrained (64, 32) vs (128, 32)" in msg
    assert msg.endswith(f" and 9 more); make model.* match {decoder_run}/config.json")
    # Nothing in common (every family has embed/embedding, so a made-up tree).
    other = {"head": {"kernel": jax.ShapeDtypeStruct((32, 3), np.float32)}}
    with pytest.raises(ConfigError, match="none of the pretrained run's 20 parameters .* is in"):
        load_pretrained(decoder_run, other, c.mesh.rules, None)
    with pytest.raises(
        ConfigError,
        match=r"nothing/config.json not found; point it at the --workdir of a trained run$",
    ):
        load_pretrained(str(tmp_path / "nothing"), abstract, c.mesh.rules, None)
    # Another tokenizer: token ids would mean other things.
    real = Checkpointer.read_meta
    monkeypatch.setattr(
        Checkpointer,
        "read_meta",
        lambda self, step: {**real(self, step), "tokenizer_sha256": "ab" * 32},
    )
    with pytest.raises(ConfigError, match="sha256 abababababab, this run cdcdcdcdcdcd; leave data"):
        load_pretrained(decoder_run, abstract, c.mesh.rules, "cd" * 32)


def test_freeze_mask_patterns():
    _, params, _ = abstract_model(config_lib.model_config(tiny_config(), 64))
    mask = flat_params(freeze_mask(params, "embed, blocks/0/"))
    assert mask["embed/embedding"] and mask["blocks/0/attn/query/kernel"]
    assert mask["blocks/0/mlp_norm/scale"] and not mask["blocks/1/attn/query/kernel"]
    assert not mask["final_norm/scale"]
    assert sum(mask.values()) == 1 + len([n for n in mask if n.startswith("blocks/0/")])
    assert freeze_mask(params, " ") is None
    with pytest.raises(ConfigError, match=r"pattern 'blocks/7' matches no parameter; paths look "):
        freeze_mask(params, "embed,blocks/7")
    with pytest.raises(ConfigError, match=r"pattern '\(' is not a regex"):
        freeze_mask(params, "(")
    with pytest.raises(ConfigError, match="freezes every parameter"):
        freeze_mask(params, ".")


def test_frozen_parameters_do_not_move(tmp_path):
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.optim.weight_decay, c.optim.decay_embeddings = 0.5, True  # decay must not move them either
    c.train.freeze = "embed,blocks/0"
    s = train.setup(c, tmp_path)
    step_fn = train.make_train_step(s)
    with sharding.use_rules(s.mesh, c.mesh.rules):
        state = train.create_state(s)
        before = {k: np.asarray(v) for k, v in flat_params(state["params"]).items()}
        # tiny_config has no dropout, so the step's gradients are those of this loss.
        batch0 = feed.to_device(s.data.train_batch(0), s.batch_sharding)

        def mean_loss(params):
            sums = s.objective.loss_sums(nnx.merge(s.graphdef, params), batch0, None)
            return sums["nll"] / sums["tokens"]

        grads = flat_params(jax.grad(mean_loss)(state["params"]))
        for i in range(3):
            state, metrics = step_fn(state, feed.to_device(s.data.train_batch(i), s.batch_sharding))
            if i == 0:
                first_norm = float(metrics["grad_norm"])
    frozen = [n for n in before if n.startswith(("embed", "blocks/0/"))]
    assert len(frozen) == 1 + 9
    # grad_norm is the norm clipping sees: trained parameters only.
    trained_norm = np.sqrt(
        sum(float(np.sum(np.square(g))) for n, g in grads.items() if n not in frozen)
    )
    full_norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
    np.testing.assert_allclose(first_norm, trained_norm, rtol=1e-5)
    assert full_norm > trained_norm * 1.01
    for name, value in flat_params(state["params"]).items():
        same = np.array_equal(np.asarray(value), before[name])
        assert same == (name in frozen), name
    # Adam moments exist only for trained parameters, each laid out like its parameter.
    param_sh = {
        sharding.path_name(p): sh
        for p, sh in jax.tree_util.tree_flatten_with_path(s.state_shardings["params"])[0]
    }
    moments = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        name = sharding.path_name(path)
        owner = [p for p in param_sh if name.endswith("/" + p)]
        if owner:
            moments += 1
            assert not owner[0].startswith(("embed", "blocks/0/")), name
            assert leaf.sharding == param_sh[owner[0]], name
        else:
            assert leaf.sharding == NamedSharding(s.mesh, PartitionSpec()), name
    assert moments == 2 * (len(before) - len(frozen))
    # The state (MaskedNodes included) survives a checkpoint round trip.
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    try:
        ckpt.save(3, state, {})
        back = ckpt.restore(3, train.abstract_state(s))
    finally:
        ckpt.close()
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_another_freeze_names_the_key(tmp_path):
    c = tiny_config()
    c.train.steps, c.train.stop_at, c.train.freeze = 4, 2, "embed"
    train.train(c, tmp_path)
    c.train.freeze = "blocks/0"
    with pytest.raises(CheckpointError, match=r"train.freeze='embed' \(config has 'blocks/0'\)"):
        train.train(c, tmp_path)
    c.train.freeze, c.train.stop_at = " embed ", 0  # the same patterns, written differently
    assert train.train(c, tmp_path)["step"] == 4
