"""README's "Pretrained models (Hugging Face)" walkthrough, run as written on random-init
folders, then checked against transformers: greedy GPT-2 generation equals transformers'
generate(max_length=...), the fine-tuned BERT's fill_mask equals its exported copy's
probabilities, and classify equals DistilBERT's softmax."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from reference_libs import torch, transformers

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Pretrained models (Hugging Face)"


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text().split(SECTION)[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def hf_encode(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """transformers' inputs of the texts: [CLS] ... [SEP], right-padded, attention mask."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = tok(texts, padding=True, return_tensors="pt")
    return {k: inputs[k] for k in ("input_ids", "attention_mask")}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> dict:
    """The README's Python blocks run in order in a fresh folder (caches there too)."""
    where = tmp_path_factory.mktemp("walkthrough")
    (where / "corpus").mkdir()
    sentences = ["the cat sat on the mat.", "a gripping film, never dull!", "the plot was dull."]
    for i in range(40):  # the corpus the README's fine-tuning reads
        text = " ".join(sentences[(i + j) % 3] for j in range(i % 5 + 2))
        (where / "corpus" / f"{i}.txt").write_text(text)
    cwd, home = Path.cwd(), os.environ.get("HOME")
    os.chdir(where)
    os.environ["HOME"] = str(where)  # data.cache_dir's default ~/.cache/jaxlm
    namespace: dict = {}
    try:
        blocks = python_blocks()
        assert len(blocks) == 4
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
        if home is not None:
            os.environ["HOME"] = home
    return {**namespace, "where": where}


def test_gpt2_generate_equals_transformers(walked):
    gpt2, samples, greedy = walked["gpt2"], walked["samples"], walked["greedy"]
    assert len(samples) == 5 and len(set(samples)) > 1
    ids = gpt2.encode("the cat")
    hf = transformers.GPT2LMHeadModel.from_pretrained(walked["where"] / "hf/gpt2").eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_length=20, do_sample=False,
        )[0, len(ids):].tolist()  # fmt: skip
    assert len(ids) + len(out) <= 20
    new = [t for t in out if t != gpt2.tokenizer.eos_id]  # transformers pads with EOS after it
    assert greedy == [gpt2.continuation(ids, new)]


def test_fine_tuned_bert_fills_masks_as_its_export_does(walked):
    mlm, top, where = walked["mlm"], walked["top"], walked["where"]
    assert mlm.step == 4 and len(top) == 1 and len(top[0]) == 5
    inputs = hf_encode(where / "hf/bert", ["the cat [MASK] on the mat."])
    ids = inputs["input_ids"][0].tolist()
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        where / "hf/bert_ft", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        logits = model.eval()(**inputs).logits[0, ids.index(mlm.tokenizer.mask_id)].numpy()
    probs = softmax(logits.astype(np.float64))
    best = np.argsort(-probs)[:5]
    assert [c["token"] for c in top[0]] == best.tolist()
    np.testing.assert_allclose([c["score"] for c in top[0]], probs[best], atol=1e-5)


def test_distilbert_classify_equals_transformers_softmax(walked):
    clf, probs, where = walked["clf"], walked["probs"], walked["where"]
    assert clf.class_names == ("NEGATIVE", "POSITIVE")
    assert walked["named"] == dict(zip(clf.class_names, probs[0], strict=True))
    texts = ["a gripping film", "the plot was dull, the cat sat on the mat."]  # the README's
    inputs = hf_encode(where / "hf/distilbert-sst2", texts)
    assert inputs["attention_mask"].sum(1).tolist() != [inputs["input_ids"].shape[1]] * 2
    hf = transformers.DistilBertForSequenceClassification.from_pretrained(
        where / "hf/distilbert-sst2"
    )
    with torch.no_grad():
        want = torch.softmax(hf.eval()(**inputs).logits, -1).numpy()
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs, want, atol=1e-5)
