"""TFDS builders of the code tasks in code_tasks (imported lazily: pulls in TensorFlow).

Importing this module registers `code_docstring` (code -> first docstring sentence) and
`stdlib_package` (code -> stdlib package label), so `readers.tfds_builder` reads them like any
TFDS dataset, prepared locally on first use: nothing is downloaded. Both use the file split of
`python_stdlib`, so a model pretrained on its train split never saw a validation function.
"""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds
from etils import epath

from jaxlm.data.builtin import code_tasks, corpus

_HOMEPAGE = "https://docs.python.org/3/library/"


def _interpreter_config(what: str) -> tfds.core.BuilderConfig:
    # One config per interpreter: each minor version has its own stdlib, hence its own examples.
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return tfds.core.BuilderConfig(
        name=corpus.config_name(),
        description=f"{what} of the running Python {version} interpreter's standard library.",
    )


class _StdlibTaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: local generation, the corpus file split, generation order kept."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # As in stdlib_builder: TFDS's default probes `importlib_resources`, not a dependency.
        return epath.Path(__file__)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):  # noqa: ARG002
        # dl_manager is unused: the functions come from the interpreter's own files.
        return {
            "train": self._generate_examples("train"),
            "validation": self._generate_examples("validation"),
        }

    def _examples(self, split: str):
        raise NotImplementedError

    def _generate_examples(self, split: str):
        # The key numbers examples in code_tasks order: a path alone is not unique per function.
        yield from enumerate(self._examples(split))


class CodeDocstring(_StdlibTaskBuilder):
    """Functions of the stdlib, docstring removed, paired with their docstring's first sentence."""

    BUILDER_CONFIGS = [_interpreter_config("Documented functions and their first sentences")]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        return self.dataset_info_from_configs(
            description=(
                "Functions and methods of the running interpreter's standard library with a "
                "docstring: `code` is the function without its docstring, `docstring` the "
                "docstring's first sentence. Files are split as in python_stdlib "
                f"({code_tasks.VALIDATION_PERCENT}% validation by a hash of the path)."
            ),
            features=tfds.features.FeaturesDict(
                {"code": text(), "docstring": text(), "name": text(), "path": text()}
            ),
            supervised_keys=("code", "docstring"),
            # Keep generation order on disk so reads match code_tasks.docstring_examples.
            disable_shuffling=True,
            homepage=_HOMEPAGE,
        )

    def _examples(self, split: str):
        return code_tasks.docstring_examples(split)


class StdlibPackage(_StdlibTaskBuilder):
    """Functions of the stdlib labelled with the top-level package (code_tasks.PACKAGES)."""

    BUILDER_CONFIGS = [_interpreter_config("Functions labelled with their package")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "Functions and methods (docstrings removed) of "
                f"{len(code_tasks.PACKAGES)} standard-library packages, labelled with their "
                "package. Files are split as in python_stdlib "
                f"({code_tasks.VALIDATION_PERCENT}% validation by a hash of the path)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "code": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(code_tasks.PACKAGES)),
                    "path": tfds.features.Text(),
                }
            ),
            supervised_keys=("code", "label"),
            disable_shuffling=True,
            homepage=_HOMEPAGE,
        )

    def _examples(self, split: str):
        for ex in code_tasks.package_examples(split):
            yield {"code": ex["code"], "label": ex["label"], "path": ex["path"]}
