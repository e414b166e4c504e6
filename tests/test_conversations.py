"""Conversations keep their history's KV (issue 17, part 4): the next turn loads it, token-exact.

On the embedded model (float32): each turn's greedy answer equals the answer of a from-scratch
prefill of the same prompt (``use_cache=False``), while the turns after the first read most of their
prompt from the kept KV, more with every turn.
"""

from __future__ import annotations

from kv_rag import Engine
from kv_rag.conversations import Conversations
from kv_rag.models import LoadedModel
from kv_rag.store import MemoryTier, Store
from kv_rag.tenancy import Tenant

DOC = (
    "The lighthouse on Gull Island was built in 1871. Its lamp burned whale oil until 1904, then kerosene. "
    "The keeper rowed to the mainland every Sunday for supplies. "
) * 3
QUESTIONS = ["When was the lighthouse built?", "What did the lamp burn first?", "How did the keeper get supplies?"]


def _chat(eng: Engine, turns: int) -> list[tuple[int, int, bool]]:
    """``turns`` turns of one conversation: (prompt tokens, cached tokens, answer equals a full prefill's)."""
    messages = [{"role": "system", "content": "Answer from this text:\\n\\n" + DOC}]
    out = []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        prompt = eng.prompt_from_messages(messages)
        gen = eng.generate(prompt, max_new_tokens=12)
        ref = eng.generate(prompt, max_new_tokens=12, use_cache=False)
        out.append((gen.prompt_tokens, gen.cached_tokens, gen.token_ids == ref.token_ids))
        messages.append({"role": "assistant", "content": gen.text})
    return out


def test_each_turn_loads_the_conversation_so_far_and_answers_as_a_full_prefill(embedded: LoadedModel) -> None:
    embedded.conversations.clear()
    eng = Engine(None, store=Store([MemoryTier()]), device="cpu", dtype="float32")
    turns = _chat(eng, 3)
    assert [t[2] for t in turns] == [True, True, True]
    assert turns[0][1] == 0
    cached = [c for _, c, _ in turns[1:]]
    assert cached[0] > turns[0][0] and cached[1] > cached[0]  # the whole first turn, then more
    assert all(p - c < 40 for p, c, _ in turns[1:])  # only the new message (and the answer's end) is prefilled


def test_another_tenant_does_not_continue_the_conversation(embedded: LoadedModel) -> None:
    embedded.conversations.clear()
    a = Engine(None, store=Store([MemoryTier()]), device="cpu", dtype="float32", tenant=Tenant("a", b"1" * 32))
    b = Engine(None, store=Store([MemoryTier()]), device="cpu", dtype="float32", tenant=Tenant("b", b"2" * 32))
    _chat(a, 1)
    assert _chat(b, 1)[0][1] == 0  # the same first prompt: nothing of a's is loaded


def test_the_kept_turns_are_bounded_and_a_longer_turn_replaces_its_start() -> None:
    import torch

    class Layer:
        def __init__(self, n: int) -> None:
            self.keys = torch.zeros(1, 2, n, 4)
            self.values = torch.zeros(1, 2, n, 4)

    class Cache:
        def __init__(self, n: int) -> None:
            self.layers = [Layer(n) for _ in range(3)]

    conv = Conversations(max_bytes=3 * (3 * 2 * 2 * 100 * 4 * 4))  # three 100-token turns (3 layers, K and V)
    ids = list(range(100))
    conv.keep("", ids[:40], Cache(40), prompt=30)
    conv.keep("", ids, Cache(100), prompt=80)  # extends the first: it replaces it
    assert len(conv) == 1 and conv.match("", [*ids, 7])[0] == 100 and conv.match("x", ids)[0] == 0
    assert conv.match("", ids[:80])[0] == 0  # the same prompt again is not a continuation
    for start in (1000, 2000, 3000):
        conv.keep("", list(range(start, start + 100)), Cache(100))
    assert len(conv) == 3 and conv.match("", ids)[0] == 0  # the oldest went
