"""``kv-rag calibrate``: measure stitch and blend against a full prefill and store the profile auto mode reads.

Its arguments are in :mod:`kv_rag.cli_parser`; the measuring is :func:`kv_rag.calibration.calibrate`.
Heavy imports happen inside :func:`cmd_calibrate`, so that ``kv-rag --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["cmd_calibrate", "read_questions"]


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """Questions from a JSON file (a list of objects) or a JSON-lines file (one object a line).

    Raises :class:`~kv_rag.errors.InputError` for a missing file or text that is neither.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--questions-file: no such file: {path}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise InputError(
                f"--questions-file {path}: neither a JSON list nor JSON lines of "
                f'{{"question": ..., "answer": ...}} ({exc})'
            ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise InputError(f"--questions-file {path}: expected a non-empty list of questions")
    return data


def _numbers(text: str, name: str, kind: type) -> list[Any]:
    try:
        return [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{name} wants comma-separated numbers; got {text!r}") from None


def cmd_calibrate(args: argparse.Namespace, engine: Any) -> int:
    """``kv-rag calibrate``: the profile of ``engine``'s model on the given documents and questions, stored
    beside the store's artifacts (and in ``--out``); prints what each assembly lost, per bucket."""
    from .calibration import calibrate
    from .profile import profile_path
    from .retrieve import read_documents

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    documents = [d.text for d in read_documents(args.paths)] if args.paths else []
    questions = read_questions(args.questions_file) if args.questions_file else []
    profile = calibrate(
        engine,
        documents,
        questions,
        n_questions=args.questions,
        docs_per_prompt=_numbers(args.docs_per_prompt, "--docs-per-prompt", int),
        blend=_numbers(args.blend, "--blend", float),
        passage_tokens=args.passage_tokens,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        progress=True,
        out=args.out,
    )
    loaded = engine.loaded
    where = profile_path(engine.store, loaded.fingerprint.digest, loaded.tokenizer_digest)
    if args.json:
        print(json.dumps({"profile": str(where), **profile.to_dict()}, indent=2))
        return 0
    print(
        f"{engine.model_name} ({profile.dtype}): {len(profile.rows)} prompts ({profile.settings['questions']}) "
        f"in {profile.extra['seconds']:.1f} s"
    )
    for b in profile.buckets:
        print(
            f"\n{b.moved} moved document{'s' * (b.moved != 1)}, up to {b.max_document_tokens} document tokens: "
            f"{b.prompts} prompts, full prefill right on {b.full_accuracy:.0f}%"
        )
        print("  assembly        accuracy drop  loss bound  greedy agreement  KL first answer tokens  log-prob drop")
        for s in b.recipes:
            print(
                f"  {s.label:<15} {s.accuracy_drop:10.1f} pt {s.loss_upper:8.1f} pt {100 * s.greedy_agreement:15.0f}% "
                f"{s.kl_first_answer_tokens:23.3f} {s.logprob_drop:14.3f}"
            )
    print(
        f"\nloss bound: one-sided {100 * profile.confidence:.0f}% upper bound of the share of prompts the full "
        "prefill got right and the assembly wrong; auto mode (--mode auto --max-loss X) uses an assembly only "
        f"where it is at most X.\nprofile: {where}" + (f" (and {args.out})" if args.out else ""),
        file=sys.stderr,
    )
    return 0
