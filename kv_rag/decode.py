"""Token selection, stop conditions and incremental detokenization for the decode loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .constrain import schema_text
from .defaults import MAX_NEW_TOKENS
from .errors import InputError


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. ``temperature == 0`` is greedy; ``seed`` makes sampling repeatable.

    ``json_schema`` (a dict, kept as its JSON text) or ``grammar`` (a Lark grammar, llguidance's syntax)
    constrains the answer token by token (see :mod:`kv_rag.constrain`; needs ``kv-rag[structured]``).
    """

    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    json_schema: Mapping[str, Any] | str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", schema_text(self.json_schema))
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise InputError(f"grammar must be a non-empty Lark grammar text; got {self.grammar!r}")
        if self.json_schema is not None and self.grammar is not None:
            raise InputError("pass json_schema or grammar, not both")

    @property
    def constrained(self) -> bool:
        """Whether the answer is kept to a JSON schema or a grammar."""
        return self.json_schema is not None or self.grammar is not None


class Sampler:
    """Picks the next token from float32 logits: argmax, or temperature + nucleus sampling."""

    def __init__(self, settings: GenerationSettings, device: torch.device) -> None:
        self.settings = settings
        self.generator: torch.Generator | None = None
        if settings.temperature > 0:
            self.generator = torch.Generator(device="cpu")
            if settings.seed is not None:
                self.generator.manual_seed(settings.seed)
            else:
                self.generator.seed()

    @property
    def greedy(self) -> bool:
        """Whether it takes the argmax (temperature 0)."""
        return self.generator is None

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token id from ``[vocab]`` logits."""
        if self.generator is None:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float().cpu() / self.settings.temperature, dim=-1)
        if self.settings.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            keep = cum - sorted_p < self.settings.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


class TextStream:
    """Turns generated ids into text pieces, holding back what could still become a stop string.

    ``push(id)`` returns the newly safe text; ``stopped`` turns true once a stop string appears
    (the text is cut before it); ``finish()`` returns what was held back.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decoded(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add one id; return text that is now final."""
        self.ids.append(token_id)
        text = self._decoded()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        for s in self.stop:
            pos = text.find(s)
            if pos != -1:
                text = text[:pos]
                self.stopped = True
        self.text = text
        hold = 0 if self.stopped else self._held_back(text)
        piece = text[self.emitted : len(text) - hold]
        self.emitted += len(piece)
        return piece

    def _held_back(self, text: str) -> int:
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def finish(self) -> str:
        """Text not yet returned (held back for a stop string that never came)."""
        if not self.stopped:
            text = self._decoded()
            self.text = text.rstrip("\ufffd")
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece
