"""Document cleaning before tokenization, with counts of what was changed and dropped."""

from __future__ import annotations

import collections
import hashlib
import re
import unicodedata

from jaxlm.data.specs import CleanConfig

# C0 and C1 control characters except tab and newline, plus the byte-order mark.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
# More than two blank lines in a row; two are kept (PEP 8 separates definitions with two).
_BLANK_RUNS = re.compile(r"\n{4,}")


_ASCII_CONTROL = bytes(range(0, 9)) + bytes(range(11, 32)) + b"\x7f"


def _has_control(text: str) -> bool:
    if text.isascii():  # bytes.translate is far faster than a regex scan
        data = text.encode("ascii")
        return len(data.translate(None, _ASCII_CONTROL)) != len(data)
    return _CONTROL.search(text) is not None


class Cleaner:
    """Call on each document: the cleaned text, or None if it is dropped (see `counts`)."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.counts: collections.Counter[str] = collections.Counter()
        self._seen: set[bytes] = set()

    def __call__(self, text: str) -> str | None:
        cfg, counts = self.cfg, self.counts
        counts["documents"] += 1
        original = text
        if cfg.normalize != "none":
            text = unicodedata.normalize(cfg.normalize, text)
        # Cheap substring tests guard the regexes: they are slow and seldom have work to do.
        if cfg.strip_control:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if _has_control(text):
                text = _CONTROL.sub("", text)
        if cfg.strip_whitespace:
            if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
                text = _TRAILING_SPACE.sub("", text)
            if "\n\n\n\n" in text:
                text = _BLANK_RUNS.sub("\n\n\n", text)
            text = text.lstrip("\n")
            if text.endswith("\n\n"):  # trailing blank lines go; a final newline stays
                text = text.rstrip("\n") + "\n"
        if text != original:
            counts["changed"] += 1
        if not text:
            return self._drop("empty")
        if len(text) < cfg.min_chars:
            return self._drop("too_short")
        if cfg.max_chars and len(text) > cfg.max_chars:
            return self._drop("too_long")
        if cfg.dedup:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in self._seen:
                return self._drop("duplicate")
            self._seen.add(key)
        counts["kept"] += 1
        return text

    def _drop(self, why: str) -> None:
        self.counts[f"dropped_{why}"] += 1
        return None

    def summary(self) -> str:
        """One line, e.g. `1000 documents: 990 kept, dropped 7 duplicate, 3 empty`."""
        c = self.counts
        drops = [(k.removeprefix("dropped_"), v) for k, v in sorted(c.items()) if "dropped" in k]
        line = f"{c['documents']} documents: {c['kept']} kept"
        if drops:
            line += ", dropped " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in drops)
        return line + f", {c['changed']} changed"
