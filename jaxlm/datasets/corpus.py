"""TFDS builders for plain-text corpora on local disk (no download step, no TensorFlow).

`python_stdlib` is the embedded default corpus: the running interpreter's own standard-library
sources. `text_files` holds a user's files, one document per file or per paragraph. The config name
carries a fingerprint of the source files, so a changed corpus is rebuilt, never silently reused.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import os
import re
import sysconfig
from pathlib import Path

import tensorflow_datasets as tfds

from jaxlm.datasets.common import TEXT_FEATURES, fingerprint, split_by_hash

_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r\f\v]*\n")


@dataclasses.dataclass
class CorpusConfig(tfds.core.BuilderConfig):
    root: str = ""  # document keys are paths relative to this directory
    patterns: tuple[str, ...] = ()  # globs (recursive `**` allowed), relative to root
    split_paragraphs: bool = False
    validation_percent: float = 5.0


class _FileCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    EXCLUDED_DIRS: frozenset[str] = frozenset()

    @classmethod
    def files(cls, cfg: CorpusConfig) -> list[Path]:
        root = Path(cfg.root)
        found = {
            Path(p)
            for pattern in cfg.patterns
            for p in glob.glob(str(root / pattern), recursive=True)
        }
        return sorted(
            p
            for p in found
            if p.is_file() and not cls.EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
        )

    @classmethod
    def make_config(cls, root: Path, patterns: tuple[str, ...], **options) -> CorpusConfig:
        """A config named after a fingerprint of the files it covers and its options."""
        draft = CorpusConfig(name="draft", root=str(root), patterns=patterns, **options)
        tag = fingerprint(cls.files(draft), patterns, sorted(options.items()))
        return dataclasses.replace(draft, name=f"src_{tag}")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(TEXT_FEATURES))

    @classmethod
    def documents(cls, cfg: CorpusConfig) -> dict[str, bytes]:
        """Non-empty documents by key (relative path, plus #paragraph in paragraph mode)."""
        docs = {}
        for path in cls.files(cfg):
            key, data = str(path.relative_to(cfg.root)), path.read_bytes()
            if not cfg.split_paragraphs:
                docs[key] = data
                continue
            paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(data)]
            docs.update({f"{key}#{i}": p for i, p in enumerate(paragraphs)})
        return {key: text for key, text in docs.items() if text}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        docs = self.documents(self.builder_config)
        splits = split_by_hash(sorted(docs), self.builder_config.validation_percent)
        # TFDS cannot write an empty split; a missing one is reported when it is opened.
        return {name: self._generate_examples(docs, keys) for name, keys in splits.items() if keys}

    def _generate_examples(self, docs: dict[str, bytes], keys: list[str]):
        for key in keys:
            yield key, {"text": docs[key], "path": key}


class PythonStdlib(_FileCorpus):
    """The `.py` files of this interpreter's standard library.

    Tests, site-packages, codec tables (encodings/) and the pydoc topic dump are left out: they are
    data, not Python code.
    """

    EXCLUDED_DIRS = frozenset(
        {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data"}
    )

    @classmethod
    def default_root(cls) -> Path:
        return Path(sysconfig.get_paths()["stdlib"])

    @classmethod
    def files(cls, cfg: CorpusConfig) -> list[Path]:
        """The same files as the glob, found without listing what is excluded: site-packages
        under the stdlib often holds more files than the stdlib itself, and globbing `**` listed
        it all on every start (0.8 s)."""
        (pattern,) = cfg.patterns
        name_pattern = pattern.removeprefix("**/")
        found = []
        for folder, dirs, names in os.walk(cfg.root, followlinks=True):
            dirs[:] = [d for d in dirs if d not in cls.EXCLUDED_DIRS and not d.startswith(".")]
            found += [Path(folder, n) for n in names
                      if fnmatch.fnmatch(n, name_pattern) and not n.startswith(".")]
        return sorted(p for p in found if p.is_file())


class TextFiles(_FileCorpus):
    """A user's own text files."""
