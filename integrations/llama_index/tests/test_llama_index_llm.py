"""KVRagLLM on the real embedded model: every call form, usage in the OpenAI shape, metadata, modes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import NUM_OUTPUT
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.llms import ChatMessage, MessageRole

from llama_index.llms.kv_rag import KVRagLLM

PROMPT = "Name one Python keyword that starts a loop."


def _check_usage(raw: dict, extra: dict) -> None:
    u = raw["usage"]
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert 0 <= u["prompt_tokens_details"]["cached_tokens"] <= u["prompt_tokens"]
    assert extra == u
    assert raw["kv_rag"]["prompt_tokens"] == u["prompt_tokens"]


def test_metadata_and_shared_model(tmp_path: Path) -> None:
    a = KVRagLLM(store=tmp_path / "a", max_new_tokens=7)
    b = KVRagLLM(store="memory", is_chat_model=False, context_window=1000)
    meta = a.metadata
    assert meta.context_window == a.engine.context_window == 8192  # SmolLM2's own window
    assert meta.num_output == 7 and meta.is_chat_model
    assert meta.model_name == "smollm2-135m-instruct"
    assert b.metadata.context_window == 1000 and not b.metadata.is_chat_model
    assert a.engine.loaded is b.engine.loaded  # one model in the process, however many LLMs
    assert a.tokenize("for x in y:") == a.engine.tokenizer("for x in y:", add_special_tokens=False)["input_ids"]


def test_mode_is_validated_by_the_core() -> None:
    with pytest.raises(ValueError, match=r"mode must be one of .*exact.*got 'nope'"):
        KVRagLLM(mode="nope")
    assert KVRagLLM(mode="exact").mode == "exact"


def test_request_options_reach_the_engine_checked_by_the_core() -> None:
    """mode, recompute, priming and selection: the same defaults and checks as LangChain's ChatKVRag."""
    from kv_rag import AttentionSelection, LeadingSelection, Mode, RequestOptions
    from kv_rag.defaults import MAX_NEW_TOKENS
    from kv_rag.errors import InputError
    from kv_rag.options import PRIMING_TEXT

    assert KVRagLLM(store="memory").max_new_tokens == MAX_NEW_TOKENS == 128
    llm = KVRagLLM(store="memory", mode="blend", recompute=0.3, priming=True, selection="leading")
    assert llm.engine.options == RequestOptions.make(
        mode="blend", recompute=0.3, priming=True, selection=LeadingSelection()
    )
    assert llm.engine.priming == PRIMING_TEXT
    opts = llm._call_kwargs({"recompute": 0.5, "selection": "attention", "formatted": True})["options"]
    assert (opts.mode, opts.fraction, opts.priming, opts.selection) == (
        Mode.BLEND,
        0.5,
        PRIMING_TEXT,
        AttentionSelection(),
    )
    with pytest.raises(InputError, match="selection must be one of attention, deviation, leading"):
        llm._call_kwargs({"selection": "best"})
    with pytest.raises(ValueError, match="applies to mode 'blend' only"):
        KVRagLLM(mode="stitch", recompute=0.2)
    with pytest.raises(ValueError, match=r"store must be a kv_rag\.Store"):
        KVRagLLM(store=3)


def test_auto_mode_and_its_budget_pass_through() -> None:
    """mode="auto" with max_loss: a field, a call option, the core's checks; the report names the choice."""
    from kv_rag import RequestOptions

    llm = KVRagLLM(store="memory", mode="auto", max_loss=0, max_new_tokens=3)
    assert llm.engine.options == RequestOptions.make(mode="auto", max_loss=0)
    assert llm._call_kwargs({"max_loss": 2, "formatted": True})["options"].budget == 2.0
    with pytest.raises(ValueError, match="applies to mode 'auto' only"):
        KVRagLLM(mode="exact", max_loss=1)
    report = llm.complete("Context:\nThe sky is green here.\n\nQuestion: What colour is the sky?").raw["kv_rag"]
    assert report["mode"] == "exact" and report["auto"]["mode_chosen"] == "exact"
    assert report["auto"]["expected_loss"] == 0.0 and report["options"]["max_loss"] == 0.0


def test_every_call_form_agrees_and_reports_usage() -> None:
    llm = KVRagLLM(store="memory", max_new_tokens=NUM_OUTPUT)
    done = llm.complete(PROMPT)
    _check_usage(done.raw, done.additional_kwargs)
    assert done.raw["usage"]["completion_tokens"] <= NUM_OUTPUT
    streamed = list(llm.stream_complete(PROMPT))
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].text == done.text
    assert all(r.raw is None for r in streamed[:-1])  # usage rides on the last piece
    _check_usage(streamed[-1].raw, streamed[-1].additional_kwargs)

    messages = [ChatMessage(role=MessageRole.USER, content=PROMPT)]
    chat = llm.chat(messages)
    _check_usage(chat.raw, chat.additional_kwargs)
    assert chat.message.role == MessageRole.ASSISTANT
    # complete() wraps an unformatted prompt in the chat template with the engine's system prompt
    with_system = [ChatMessage(role=MessageRole.SYSTEM, content=llm.engine.system_prompt), *messages]
    assert llm.chat(with_system).message.content == done.text
    chat_pieces = list(llm.stream_chat(messages))
    assert "".join(r.delta or "" for r in chat_pieces) == chat.message.content

    async def run_async() -> tuple[str, str, str, str]:
        ac = await llm.acomplete(PROMPT)
        _check_usage(ac.raw, ac.additional_kwargs)
        ach = await llm.achat(messages)
        pieces = [r async for r in await llm.astream_complete(PROMPT)]
        chat_pieces = [r async for r in await llm.astream_chat(messages)]
        _check_usage(chat_pieces[-1].raw, chat_pieces[-1].additional_kwargs)
        return ac.text, ach.message.content or "", pieces[-1].text, "".join(r.delta or "" for r in chat_pieces)

    ac, ach, astream, astream_chat = asyncio.run(run_async())
    assert ac == astream == done.text
    assert ach == astream_chat == chat.message.content


def test_token_counting_handler_reads_the_usage() -> None:
    counter = TokenCountingHandler()
    llm = KVRagLLM(store="memory", max_new_tokens=4, callback_manager=CallbackManager([counter]))
    r = llm.complete("Say yes.")
    assert counter.prompt_llm_token_count == r.raw["usage"]["prompt_tokens"]
    assert counter.completion_llm_token_count == r.raw["usage"]["completion_tokens"]


def test_documents_are_data_unless_the_instance_opts_out() -> None:
    """Special-token strings inside documents stay text by default; the opt-out reaches the engine."""
    assert KVRagLLM(store="memory").engine.split_special_tokens is True
    assert KVRagLLM(store="memory", split_special_tokens=False).engine.split_special_tokens is False


def test_tenant_reaches_the_engine_and_is_never_serialized() -> None:
    from kv_rag import Tenant

    tenant = Tenant("acme", b"a-secret-of-sixteen-bytes-or-more")
    llm = KVRagLLM(store="memory", tenant=tenant)
    assert llm.engine.tenant is tenant
    assert "sixteen" not in llm.model_dump_json() and "sixteen" not in repr(llm)


def test_a_chat_engine_conversation_reuses_its_history() -> None:
    """Issue 17, part 4: a LlamaIndex chat engine (SimpleChatEngine with its memory), no kv-rag code:
    each turn loads the KV of the turns before and prefills only the new message; cached tokens grow."""
    from conftest import llm_events
    from llama_index.core.chat_engine import SimpleChatEngine

    llm = KVRagLLM(store="memory", max_new_tokens=NUM_OUTPUT)
    chat = SimpleChatEngine.from_defaults(llm=llm)
    with llm_events() as events:
        for message in ("My name is Ada and I write compilers.", "What do I write?", "And what is my name?"):
            chat.chat(message)
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in events.usages]
    prompts = [u["prompt_tokens"] for u in events.usages]
    assert len(cached) == 3 and prompts[0] < prompts[1] < prompts[2]
    assert cached[0] == 0 and 0 < cached[1] < cached[2] < prompts[2]
