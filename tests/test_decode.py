"""Decoding: streaming, stop strings, EOS, sampling with a seed, token budget."""

from __future__ import annotations

import asyncio

from kv_rag import Engine

DOC = "The capital of the imaginary country Veltria is Orinsk. Orinsk lies on the river Sel."
Q = "What is the capital of Veltria?"


def test_stream_pieces_join_to_the_result(engine: Engine) -> None:
    st = engine.stream(Q, [DOC], max_new_tokens=20)
    pieces = list(st)
    assert st.result is not None
    assert "".join(pieces) == st.result.text
    assert len(pieces) > 1
    assert st.result.finish_reason in {"stop", "length"}


def test_stop_string_cuts_the_text(engine: Engine) -> None:
    full = engine.generate(Q, [DOC], max_new_tokens=20)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = engine.generate(Q, [DOC], max_new_tokens=20, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
    st = engine.stream(Q, [DOC], max_new_tokens=20, stop=[stop])
    assert "".join(st) == cut.text  # a partial stop string is never emitted


def test_max_new_tokens_and_eos(engine: Engine) -> None:
    gen = engine.generate(Q, [DOC], max_new_tokens=3)
    assert len(gen.token_ids) <= 3
    long = engine.generate(Q, [DOC], max_new_tokens=200)
    eos = engine.tokenizer.eos_token_id
    assert eos not in long.token_ids
    if long.finish_reason == "stop":
        assert len(long.token_ids) < 200


def test_sampling_is_repeatable_with_a_seed(engine: Engine) -> None:
    a = engine.generate(Q, [DOC], max_new_tokens=16, temperature=1.2, top_p=0.95, seed=7)
    b = engine.generate(Q, [DOC], max_new_tokens=16, temperature=1.2, top_p=0.95, seed=7)
    assert a.token_ids == b.token_ids
    outs = {tuple(engine.generate(Q, [DOC], max_new_tokens=16, temperature=1.5, seed=s).token_ids) for s in range(4)}
    assert len(outs) > 1


def test_async_forms(engine: Engine) -> None:
    async def main() -> tuple[str, str]:
        gen = await engine.agenerate(Q, [DOC], max_new_tokens=8)
        pieces = [p async for p in engine.astream(Q, [DOC], max_new_tokens=8)]
        return gen.text, "".join(pieces)

    text, streamed = asyncio.run(main())
    assert text == streamed and text
