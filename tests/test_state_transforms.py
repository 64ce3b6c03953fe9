"""Model state without data (jaxlm/state.py) and the parameter transform step (jaxlm/transforms.py):
a run's model.transforms reach LanguageModel (so generation), the eval program and init_from."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as config_lib
from jaxlm import eval_loop, finetune, sharding, train
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import ConfigError
from jaxlm.inference import LanguageModel, evaluate_run
from jaxlm.state import ModelState

QUERY = ("blocks", 0, "attn", "query", "kernel")
EMBED = ("embed", "embedding")
SCALE = "test_state_transforms:double_embedding"


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def double_embedding(params, model_cfg):
    """The transform under test: the (tied) token embedding times 2, a jax function."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * 2 if sharding.path_name(p) == "embed/embedding" else x, params
    ), model_cfg


def drop_last_block(params, model_cfg):
    """A transform that makes the model smaller: its config changes with its parameters."""
    last = model_cfg.num_layers - 1
    blocks = {k: v for k, v in params["blocks"].items() if int(k) != last}
    cfg = model_cfg.__class__(**{**model_cfg.__dict__, "num_layers": last})
    return {**params, "blocks": blocks}, cfg


@pytest.fixture(scope="module")
def run_dir(stdlib_lm_run):
    return stdlib_lm_run


def with_transforms(run_dir: Path, dest: Path, names: str, **data) -> Path:
    """A copy of the run whose config.json names `names` (and other data.* values)."""
    shutil.copytree(run_dir, dest)
    saved = json.loads((dest / "config.json").read_text())
    saved["model"]["transforms"] = names
    saved["data"].update(data)
    (dest / "config.json").write_text(json.dumps(saved))
    return dest


def test_language_model_loads_with_no_data_and_no_optimizer(run_dir, tmp_path, monkeypatch):
    # The data is gone and the data and optimizer builders fail if called.
    gone = with_transforms(
        run_dir,
        tmp_path / "gone",
        "",
        source=f"file:{tmp_path}/deleted.txt",
        cache_dir=str(tmp_path / "deleted_cache"),
    )

    def refuse(*args, **kwargs):
        raise AssertionError("LanguageModel.load must not build data or an optimizer")

    monkeypatch.setattr(train, "build_source", refuse)
    monkeypatch.setattr(train, "make_optimizer", refuse)
    lm = LanguageModel.load(gone)
    monkeypatch.undo()
    want = LanguageModel.load(run_dir)
    assert lm.generate(["def "], max_new_tokens=6, temperature=0.0) == want.generate(
        ["def "], max_new_tokens=6, temperature=0.0
    )
    assert not (tmp_path / "deleted_cache").exists()
    # Parameters sit in the rules' shardings, as training laid them out.
    q = _get(lm.params, QUERY)
    assert q.sharding == _get(lm.state.shardings, QUERY)


def test_a_transform_reaches_generation_eval_and_init_from(run_dir, tmp_path):
    scaled = with_transforms(run_dir, tmp_path / "scaled", SCALE)
    base, lm = LanguageModel.load(run_dir), LanguageModel.load(scaled)
    np.testing.assert_array_equal(_get(lm.params, EMBED), 2 * np.asarray(_get(base.params, EMBED)))
    # Generation and scoring run the transformed parameters.
    text = ["def f(x):\n    return x + 1\n"]
    manual = LanguageModel(base.config, base.state, double_embedding(base.params, None)[0],
                           base.tokenizer, base.step)  # fmt: skip
    np.testing.assert_array_equal(lm.score(text)[0], manual.score(text)[0])
    assert not np.allclose(lm.score(text)[0], base.score(text)[0])
    prompt = dict(max_new_tokens=8, temperature=0.0)
    assert lm.generate(["import "], **prompt) == manual.generate(["import "], **prompt)

    # The eval program: the same metrics as evaluating the transformed parameters by hand.
    got = evaluate_run(scaled, step=4)
    s = train.setup(config_lib.load_run_config(run_dir), run_dir, optimizer=False)
    assert s.tx is None and s.state_shardings is None  # the eval program builds no optimizer
    ckpt = Checkpointer(config_lib.checkpoint_dir(s.config, run_dir))
    try:
        params = s.model.restore(ckpt, 4, s.data.tokenizer_sha256)
    finally:
        ckpt.close()
    with s.model.rules_context():
        want = eval_loop.run_eval(s, eval_loop.make_eval_step(s), double_embedding(params, None)[0])
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    assert abs(got["loss"] - evaluate_run(run_dir, step=4)["loss"]) > 1e-4

    # init_from takes the pretrained run's parameters after its transforms.
    c = config_lib.load_run_config(run_dir)
    fresh = train.create_state(train.setup(c, tmp_path / "ft"))["params"]
    loaded, report = finetune.load_pretrained(f"{scaled}:4", fresh, c.mesh.rules, None)
    plain, _ = finetune.load_pretrained(f"{run_dir}:4", fresh, c.mesh.rules, None)
    assert report["step"] == 4 and report["new"] == []
    np.testing.assert_array_equal(_get(loaded, EMBED), 2 * np.asarray(_get(plain, EMBED)))
    assert _get(loaded, EMBED).sharding == _get(fresh, EMBED).sharding


def test_a_transform_may_change_the_model(run_dir, tmp_path, monkeypatch):
    from jaxlm import transforms

    monkeypatch.setitem(transforms.REGISTRY, "drop_last_block", drop_last_block)
    lm = LanguageModel.load(run_dir, overrides=["--config.model.transforms=drop_last_block"])
    assert lm.state.model_cfg.num_layers == 1 and list(lm.params["blocks"]) == [0]
    assert _get(lm.params, QUERY).sharding == _get(lm.state.shardings, QUERY)
    out = lm.generate_ids([[5, 6, 7]], lm.sampling_settings(max_new_tokens=4, temperature=0.0))
    assert len(out[0]) == 4


def test_unknown_or_broken_transforms_are_one_line_errors(run_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown transform 'nope'; use one of \['identity'\]"):
        LanguageModel.load(run_dir, overrides=["--config.model.transforms=nope"])
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_module:f' \(No module"):
        evaluate_run(run_dir, overrides=["--config.model.transforms=no_such_module:f"])
    bad = with_transforms(run_dir, tmp_path / "bad", "test_state_transforms:missing")
    c = config_lib.load_run_config(run_dir)
    with pytest.raises(ConfigError, match=r"^train.init_from=.*cannot import .*missing"):
        finetune.load_pretrained(str(bad), {}, c.mesh.rules, None)


def test_model_state_alone_inits_sharded_and_equals_the_trainers_init():
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh = sharding.mesh_from_config(c.mesh)
    ms = ModelState.build(config_lib.model_config(c, 64), mesh, c.mesh.rules)
    params = ms.init(c.train.seed)
    q = _get(params, QUERY)
    assert q.sharding.spec == _get(ms.shardings, QUERY).spec and len(q.addressable_shards) == 8
    assert _get(ms.abstract, QUERY).shape == q.shape
    s = train.setup(c, "/nonexistent-unused")  # synthetic data: nothing is written
    want = train.create_state(s)["params"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
