"""Grammar-constrained decoding: a request's answer kept to a JSON schema or a grammar, token by token.

A request whose :class:`~kv_rag.decode.GenerationSettings` carry ``json_schema`` (a dict or its JSON
text) or ``grammar`` (a Lark grammar in llguidance's syntax) gets a :class:`Guide`: before each token
is chosen, every token the grammar does not allow next has its logit set to ``-inf``; the chosen token
then advances the grammar. End-of-sequence is allowed only once the grammar is complete, and the
request ends as soon as the grammar admits nothing more. The mask is per request, so constrained and
unconstrained requests share the scheduler's steps as before.

The matcher is `llguidance <https://github.com/guidance-ai/llguidance>`_ (an optional dependency:
``pip install 'kv-rag[structured]'``), imported on the first constrained request. It needs a fast
(Rust) Hugging Face tokenizer; its view of the tokenizer is built once per loaded model (about 1 s).
An answer cut by ``max_new_tokens`` before the grammar is complete ends with ``finish_reason
"length"`` and is not valid: give constrained requests room.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from .errors import InputError

#: What to install for constrained decoding.
EXTRA = "pip install 'kv-rag[structured]'"
#: JSON compiled without free whitespace: a small model cannot pad an answer with endless blank lines.
JSON_OPTIONS = {"whitespace_flexible": False}


def schema_text(schema: Any) -> str:
    """``schema`` (a JSON-schema mapping or its JSON text) as JSON text, key order kept; checked."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InputError(f"json_schema must be a JSON schema (a dict or its JSON text); got {exc}") from None
    if isinstance(schema, bool) or not isinstance(schema, Mapping):
        raise InputError(f"json_schema must be a JSON schema object (a dict); got {type(schema).__name__}")
    try:
        return json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"json_schema must be JSON-serializable: {exc}") from None


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise InputError(
            f"json_schema and grammar (constrained decoding) need the llguidance package: {EXTRA}"
        ) from None
    return llguidance


def grammar_of(json_schema: str | None, grammar: str | None) -> str:
    """The llguidance grammar of a request's ``json_schema`` or Lark ``grammar``."""
    llg = _llguidance()
    if json_schema is not None:
        return str(llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS))
    if grammar is not None:
        return str(llg.LLMatcher.grammar_from_lark(grammar))
    raise InputError("a constraint needs json_schema or grammar")


class Guide:
    """One request's grammar state. Not thread-safe: one request's steps run one at a time.

    :meth:`mask` returns the logits with every token the grammar does not allow next at ``-inf``;
    :meth:`advance` feeds the chosen token; :attr:`finished` turns true once nothing but the end may follow.
    """

    def __init__(self, matcher: Any, vocab: int, eos_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self.vocab = vocab
        self.eos_ids = tuple(i for i in eos_ids if i < vocab)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``[vocab]`` logits with the disallowed tokens at ``-inf`` (a new tensor)."""
        n = logits.shape[-1]
        allowed = torch.zeros(n, dtype=torch.bool)
        m = self.matcher
        if not m.is_error():
            bias = torch.frombuffer(bytearray(m.compute_logit_bias()), dtype=torch.uint8)[:n] > 0
            allowed[: bias.shape[0]] = bias
        eos = list(self.eos_ids)
        if eos:  # the end only where the grammar is complete (or broken: then nothing else)
            allowed[eos] = bool(m.is_accepting() or m.is_error())
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, token_id: int) -> None:
        """Feed the chosen token (a token outside the mask puts the matcher in its error state)."""
        self.matcher.consume_token(token_id)

    @property
    def finished(self) -> bool:
        """Whether the grammar admits nothing more (the answer is complete), or the matcher failed."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        """The matcher's error, or ``""``."""
        return str(self.matcher.get_error())


def guide(loaded: Any, settings: Any) -> Guide | None:
    """A :class:`Guide` for one request on ``loaded`` (a :class:`~kv_rag.models.LoadedModel`) under
    ``settings`` (:class:`~kv_rag.decode.GenerationSettings`), or ``None`` without a constraint. Raises
    :class:`~kv_rag.errors.InputError` for a grammar that does not compile, a missing llguidance or a
    tokenizer it cannot read."""
    json_schema, grammar = settings.json_schema, settings.grammar
    if json_schema is None and grammar is None:
        return None
    llg = _llguidance()
    text = grammar_of(json_schema, grammar)
    lltok = loaded.constraint_tokenizer
    if lltok is None:
        try:
            lltok = llg.hf.from_tokenizer(loaded.tokenizer, eos_token=min(loaded.eos_ids) if loaded.eos_ids else None)
        except ValueError as exc:
            raise InputError(f"constrained decoding needs a fast (Rust) Hugging Face tokenizer: {exc}") from None
        loaded.constraint_tokenizer = lltok
    matcher = llg.LLMatcher(lltok, text, log_level=0)
    if matcher.is_error():
        what = "json_schema" if json_schema is not None else "grammar"
        raise InputError(f"{what} does not compile for constrained decoding: {matcher.get_error()}")
    return Guide(matcher, int(lltok.vocab_size), loaded.eos_ids)
