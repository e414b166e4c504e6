"""One exception family for kv-rag.

Every error kv-rag raises on purpose derives from :class:`KVRagError`. Each subclass says whether a
caller may treat it as a cache miss (``is_miss``): those are about stored artifacts and are handled
inside the store by recomputing; the others are mistakes in the caller's input and carry a message
that says what to do.
"""

from __future__ import annotations


class KVRagError(Exception):
    """Base class of every error raised by kv-rag."""

    #: True when the caller may treat the error as a cache miss and recompute.
    is_miss: bool = False


class ArtifactError(KVRagError):
    """A stored artifact is corrupt, truncated, of another format version, model or tokenizer.

    Always safe to treat as a miss: the store drops the artifact and the engine recomputes it.
    """

    is_miss = True


class InputError(KVRagError, ValueError):
    """The caller's input cannot be used (empty text, bad option, unreadable file).

    Not a miss: the message names the argument, what was received and what to do.
    """


class ContextLengthError(InputError):
    """The prompt does not fit in the model's context window."""


class ModelLoadError(KVRagError):
    """The model or tokenizer could not be found or loaded. Not a miss."""


class UnsupportedModelError(KVRagError):
    """The model's position scheme cannot be handled exactly for the requested operation.

    The engine catches it and falls back to prefill; it is a miss for the affected documents.
    """

    is_miss = True
