"""TFDS builder for the running interpreter's standard library (imported lazily: pulls in TF).

Importing this module registers the dataset, so `data.source=tfds:python_stdlib` reads it like
any TFDS dataset (prepared locally on first use: nothing is downloaded). The `python_stdlib`
source reads the same files directly, without TensorFlow.
"""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds
from etils import epath

from jaxlm.data.builtin import corpus

# Fixed (corpus.py, not configurable) so the prepared dataset on disk always means one split.
VALIDATION_PERCENT = corpus.VALIDATION_PERCENT


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """The `*.py` files of the running interpreter's standard library, tests excluded."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # One config per interpreter: the stdlib differs between minor versions, so each version
    # gets its own prepared directory instead of silently mixing.
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name=corpus.config_name(),
            description=(
                "Source files of the running Python "
                f"{sys.version_info.major}.{sys.version_info.minor} interpreter's standard "
                "library (site-packages and test code excluded)."
            ),
        )
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default probes `importlib_resources`, which is not a dependency here; the
        # builder's own file is all it needs (to look for a checksums file next to it).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "Python source code of the running interpreter's standard library, embedded "
                "with the interpreter (nothing is downloaded). Files are split into train and "
                f"validation ({VALIDATION_PERCENT}%) by a hash of their relative path."
            ),
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            supervised_keys=None,
            # Keep generation (sorted path) order on disk so reads match corpus.read_split.
            disable_shuffling=True,
            homepage="https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):  # noqa: ARG002
        # dl_manager is unused: the data already lives on disk next to the interpreter.
        return {
            "train": self._generate_examples("train"),
            "validation": self._generate_examples("validation"),
        }

    def _generate_examples(self, split: str):
        for rel, text in corpus.iter_split(split, VALIDATION_PERCENT):
            yield rel, {"text": text, "path": rel}
