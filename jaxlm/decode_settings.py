"""Decoding settings: sampling (`SamplingSettings`) and beam search (`BeamSettings`).

Plain dataclasses without JAX, so a program checks its decoding flags before JAX loads;
jaxlm/generate.py decodes with them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set with this much probability; 1: all
    eos_id: int = -1  # stop a row when it samples this id; -1: never
    pad_id: int = 0  # written after a row has stopped

    def check(self) -> None:
        """One-line errors naming the flag to fix."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(
                f"temperature must be >= 0 (0 is greedy), got {self.temperature}; "
                "pass --temperature 0 or a positive value"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps all tokens), got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class BeamSettings:
    beam_size: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 0.6  # alpha in ((5 + length) / 6) ** alpha; 0: raw log-probability
    eos_id: int = -1  # a hypothesis ends when it emits this id; -1: never
    pad_id: int = 0  # written after a hypothesis's EOS

    def check(self) -> None:
        """One-line errors naming the flag to fix (jaxlm-eval decodes with these settings)."""
        if self.beam_size < 1:
            raise ValueError(f"--beam_size must be >= 1 (1 is greedy), got {self.beam_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.length_penalty < 0:
            raise ValueError(
                f"--length_penalty must be >= 0 (0 ranks beams by log-probability), got "
                f"{self.length_penalty}"
            )
