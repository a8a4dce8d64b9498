"""General replay rows: requests answered by the base model itself (self-distillation).

Reads requests (JSONL rows with a ``"question"``), answers each with the default base model
(SmolLM2-135M-Instruct, PyTorch fp32, greedy, up to 160 new tokens) and appends
``{"messages": [user, assistant]}`` rows to ``edgeft/assets/general/replay.jsonl``. A reply cut
by the token limit is ended at its last full sentence within 420 characters; a reply with no
full sentence, or one that repeats a sentence (a loop), is left out. Requests already in the
file are skipped, so a rerun appends nothing twice.

Usage: python benchmarks/replay_rows.py REQUESTS.jsonl [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from edgeft.demo import general_path
from edgeft.models import resolve_base
from edgeft.runtimes import get_runtime

MAX_NEW_TOKENS = 160
MAX_CHARS = 420


def finished(reply: str, cut: bool) -> str | None:
    """The reply as kept, or None when it is left out."""
    reply = reply.strip()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", reply) if s.strip()]
    if len(sentences) != len(set(sentences)):
        return None  # a loop
    if cut or len(reply) > MAX_CHARS:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", reply[:MAX_CHARS])]
        if not ends:
            return None
        reply = reply[: ends[-1]]
    return reply if re.search(r"[.!?]$", reply) else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("requests", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out = general_path("replay.jsonl")
    lines = out.read_text(encoding="utf-8").splitlines()
    have = {json.loads(line)["messages"][0]["content"] for line in lines}
    requests = [json.loads(line)["question"] for line in args.requests.read_text().splitlines()]
    requests = [r for r in dict.fromkeys(requests) if r not in have]
    session = get_runtime("torch").load(resolve_base(None).path, threads=args.threads)
    kept = 0
    try:
        prompts = [session.tokenize(r, chat=True) for r in requests]
        for start in range(0, len(prompts), 16):
            chunk = prompts[start : start + 16]
            for request, ids in zip(
                requests[start : start + 16],
                session.generate_batch(chunk, MAX_NEW_TOKENS),
                strict=True,
            ):
                reply = finished(session.detokenize(ids), cut=len(ids) >= MAX_NEW_TOKENS)
                if reply is None:
                    continue
                lines.append(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": request},
                                {"role": "assistant", "content": reply},
                            ]
                        },
                        ensure_ascii=False,
                    )
                )
                kept += 1
    finally:
        session.close()
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{kept} of {len(requests)} requests kept; {out} has {len(lines)} rows")


if __name__ == "__main__":
    main()
