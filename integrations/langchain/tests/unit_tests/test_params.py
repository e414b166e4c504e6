"""ChatKVRag / KVRagLLM / KVCacheRetriever settings and translations, without running the model."""

from __future__ import annotations

import json
import warnings

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.retrievers import BaseRetriever
from pydantic import ValidationError

import langchain_kv_rag
from kv_rag import AttentionSelection, Generation, GenerationSettings, LeadingSelection, Mode, RequestOptions
from kv_rag.errors import InputError
from langchain_kv_rag import ChatKVRag, KVCacheRetriever, KVRagLLM
from langchain_kv_rag._base import response_metadata, usage_metadata
from langchain_kv_rag.chat_models import to_chat_dicts
from langchain_kv_rag.retrievers import _with_k


def test_public_names() -> None:
    assert sorted(langchain_kv_rag.__all__) == ["ChatKVRag", "KVCacheRetriever", "KVRagLLM", "__version__"]


def test_construction_is_cheap_and_lazy() -> None:
    chat = ChatKVRag()
    assert chat.model == "smollm2-135m-instruct"
    assert chat._engines == {}  # nothing created until the first request
    assert chat.engine.model_name == "smollm2-135m-instruct"
    assert chat.engine._loaded is None  # the engine exists, the model is not loaded


def test_model_aliases_and_bad_values() -> None:
    assert ChatKVRag(model="smollm2").model == "smollm2-135m-instruct"
    assert ChatKVRag(model=None).model == "smollm2-135m-instruct"
    with pytest.raises(ValidationError, match="model must be"):
        ChatKVRag(model="  ")


@pytest.mark.parametrize("cls", [ChatKVRag, KVRagLLM])
def test_mode_is_validated_by_the_core(cls: type) -> None:
    assert cls(mode="exact").mode == "exact"
    assert cls(mode=Mode.EXACT).mode == "exact"
    with pytest.raises(ValidationError, match="mode must be one of"):
        cls(mode="bogus")


@pytest.mark.parametrize(("field", "value"), [("temperature", -1.0), ("max_tokens", 0), ("top_p", 0.0), ("top_p", 1.5)])
def test_bad_numbers_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        ChatKVRag(**{field: value})


def test_unknown_constructor_argument_warns_but_provider_generic_ones_do_not() -> None:
    with pytest.warns(UserWarning, match="max_new_tokens"):
        ChatKVRag(max_new_tokens=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChatKVRag(api_key="x", timeout=5, max_retries=1)


def test_call_arguments_override_fields_and_unknown_ones_fail() -> None:
    chat = ChatKVRag(max_tokens=5, temperature=0.0, stop=["A"], store="memory")
    req = chat.request(["B"], {"max_tokens": 7, "temperature": 0.5, "seed": 3, "documents": ["some text"]})
    assert req.options.generation == GenerationSettings(
        max_new_tokens=7, temperature=0.5, top_p=1.0, seed=3, stop=("A", "B")
    )
    assert req.options.use_cache and req.options.mode is Mode.EXACT and req.documents == ["some text"]
    assert chat.request(None, {}).options.generation.max_new_tokens == 5
    assert ChatKVRag().request(None, {}).options.generation.max_new_tokens == 128
    with pytest.raises(InputError, match="unexpected argument"):
        chat.request(None, {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="mode must be one of"):
        chat.request(None, {"mode": "nope"})
    docs = chat.request(None, {"documents": [Document(page_content="x y")]}).documents
    assert docs == ["x y"]


@pytest.mark.parametrize("cls", [ChatKVRag, KVRagLLM])
def test_request_options_reach_the_engine_checked_by_the_core(cls: type) -> None:
    """mode, recompute, priming and selection: instance defaults, per-call overrides, the core's checks."""
    from kv_rag.options import PRIMING_TEXT

    model = cls(store="memory", mode="blend", recompute=0.3, priming=True, selection="leading")
    assert model.engine.options == RequestOptions.make(
        mode="blend", recompute=0.3, priming=True, selection=LeadingSelection()
    )
    assert model.engine.priming == PRIMING_TEXT  # publishing stores the primed artifacts too
    opts = model.request(None, {"recompute": 0.5, "selection": "attention"}).options
    assert (opts.mode, opts.fraction, opts.priming) == (Mode.BLEND, 0.5, PRIMING_TEXT)
    assert opts.selection == AttentionSelection()
    assert model.request(None, {"mode": "stitch"}).options.fraction == 0.0  # blend's fraction is not inherited
    with pytest.raises(InputError, match="recompute must be a fraction"):
        model.request(None, {"recompute": 2})
    with pytest.raises(InputError, match="selection must be one of attention, deviation, leading"):
        model.request(None, {"selection": "best"})
    with pytest.raises(ValidationError, match="applies to mode 'blend' only"):
        cls(mode="stitch", recompute=0.2)
    with pytest.raises(ValidationError, match="priming must be"):
        cls(priming="  ")
    with pytest.raises(ValidationError, match=r"store must be a kv_rag\.Store"):
        cls(store=3)


@pytest.mark.parametrize("cls", [ChatKVRag, KVRagLLM])
def test_auto_mode_and_its_budget_reach_the_engine(cls: type) -> None:
    """mode="auto" with max_loss: an instance default, a per-call override, the core's checks."""
    model = cls(store="memory", mode="auto", max_loss=2)
    assert model.engine.options == RequestOptions.make(mode="auto", max_loss=2)
    assert model.request(None, {"max_loss": 0}).options.budget == 0.0
    assert model.request(None, {"mode": "exact"}).options.max_loss is None  # the budget belongs to auto
    with pytest.raises(InputError, match="max_loss must be a number of accuracy points"):
        model.request(None, {"max_loss": -1})
    with pytest.raises(ValidationError, match="applies to mode 'auto' only"):
        cls(mode="exact", max_loss=1)


@pytest.mark.parametrize("cls", [ChatKVRag, KVRagLLM])
def test_from_engine_runs_on_the_given_engine(cls: type) -> None:
    from kv_rag import Engine

    engine = Engine(None, store="memory")
    model = cls.from_engine(engine, max_tokens=3)
    assert model.engine is engine and model.max_tokens == 3
    assert model.request(None, {}).engine is engine


def test_model_override_uses_another_engine_on_the_same_store() -> None:
    chat = ChatKVRag(store="memory")
    other = chat.engine_for("/some/model/folder")
    assert other is not chat.engine and other.store is chat.engine.store
    assert chat.engine_for("smollm2") is chat.engine
    assert chat.request(None, {"model": "/some/model/folder"}).model_name == "/some/model/folder"


def test_ls_params() -> None:
    chat = ChatKVRag(max_tokens=9, stop=["x"])
    params = chat._get_ls_params()
    assert params["ls_provider"] == "kv_rag" and params["ls_model_type"] == "chat"
    assert params["ls_model_name"] == "smollm2-135m-instruct" and params["ls_max_tokens"] == 9
    assert params["ls_stop"] == ["x"]
    assert KVRagLLM()._get_ls_params(model="m")["ls_model_name"] == "m"


def test_messages_become_chat_template_dicts() -> None:
    msgs = [
        SystemMessage("sys"),
        HumanMessage([{"type": "text", "text": "a"}, "b"]),
        AIMessage("c", tool_calls=[{"name": "f", "args": {}, "id": "1"}]),
        ToolMessage("d", tool_call_id="1"),
        ChatMessage(role="critic", content="e"),
    ]
    assert to_chat_dicts(msgs) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {
            "role": "assistant",
            "content": "c",
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}],
        },
        {"role": "tool", "content": "d", "tool_call_id": "1"},
        {"role": "critic", "content": "e"},
    ]


def test_media_blocks_are_refused_with_a_clear_message() -> None:
    msg = HumanMessage([{"type": "text", "text": "what is this?"}, {"type": "image", "base64": "AAAA"}])
    with pytest.raises(InputError, match=r"messages\[0\] has a 'image' content block.*text only"):
        to_chat_dicts([msg])


def _generation() -> Generation:
    return Generation(
        text="hi",
        token_ids=[1, 2, 3],
        finish_reason="stop",
        mode=Mode.EXACT,
        prompt_tokens=100,
        cached_tokens=60,
        prefilled_tokens=40,
        stored_tokens=30,
        ttft_s=0.1,
        total_s=0.2,
        prefill_s=0.05,
    )


def test_usage_metadata_counts_the_whole_prompt_and_the_cache() -> None:
    usage = usage_metadata(_generation())
    assert usage == {
        "input_tokens": 100,
        "output_tokens": 3,
        "total_tokens": 103,
        "input_token_details": {"cache_read": 60, "cache_creation": 30},
    }
    meta = response_metadata(_generation(), "smollm2-135m-instruct")
    assert meta["model_name"] == "smollm2-135m-instruct" and meta["finish_reason"] == "stop"
    assert meta["kv_rag"]["cached_tokens"] == 60 and "answer" not in meta["kv_rag"]


class _Fixed(BaseRetriever):
    k: int = 4

    def _get_relevant_documents(self, query: str, *, run_manager: object) -> list[Document]:
        return [Document(page_content=f"{query} {i}") for i in range(self.k)]


def test_k_is_passed_to_the_wrapped_retriever() -> None:
    inner = _Fixed()
    assert _with_k(inner, None) is inner
    assert _with_k(inner, 2).k == 2 and inner.k == 4  # a copy: the wrapped retriever is unchanged


def test_retriever_requires_a_kv_rag_model() -> None:
    with pytest.raises(ValidationError):
        KVCacheRetriever(retriever=_Fixed(), llm="not a model")
    with pytest.raises(ValidationError):
        KVCacheRetriever(retriever=_Fixed(), llm=ChatKVRag(), k=0)


@pytest.mark.parametrize("cls", [ChatKVRag, KVRagLLM])
def test_round_trip(cls: type) -> None:
    from langchain_core.load import dumpd, load

    model = cls(store="memory", max_tokens=5, temperature=0.3, stop=["\n"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load() is marked beta
        back = load(dumpd(model), valid_namespaces=["langchain_kv_rag"], allowed_objects=[cls])
    assert isinstance(back, cls)
    assert back.model_dump() == model.model_dump()


def test_activity_counts_running_requests() -> None:
    import threading

    from langchain_kv_rag._base import Activity

    act = Activity()
    assert act.wait_idle(timeout=0)
    started, release = threading.Event(), threading.Event()

    def work() -> None:
        with act.running():
            started.set()
            release.wait()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    assert not act.wait_idle(timeout=0.05)
    release.set()
    assert act.wait_idle(timeout=5)
    t.join()


@pytest.mark.parametrize("cls", [ChatKVRag, KVRagLLM])
def test_documents_are_data_unless_the_instance_opts_out(cls: type) -> None:
    """Special-token strings inside documents stay text by default; the opt-out reaches the engine."""
    assert cls(store="memory").engine.split_special_tokens is True
    assert cls(store="memory", split_special_tokens=False).engine.split_special_tokens is False


@pytest.mark.parametrize("cls", [ChatKVRag, KVRagLLM])
def test_tenant_reaches_the_engine_and_is_never_serialized(cls: type) -> None:
    from langchain_core.load import dumpd

    from kv_rag import Tenant

    tenant = Tenant("acme", b"a-secret-of-sixteen-bytes-or-more")
    model = cls(store="memory", tenant=tenant)
    assert model.engine.tenant is tenant
    assert "sixteen" not in json.dumps(dumpd(model), default=str) and "sixteen" not in repr(model)
