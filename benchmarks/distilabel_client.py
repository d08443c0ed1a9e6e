"""distilabel's OpenAI LLM against an OpenAI-compatible server: the peer side of
``benchmarks/client_vs_distilabel.py``, run with the Python of a virtualenv that has
``distilabel`` and ``openai`` installed (it imports nothing of semilens, whose pins may clash).

Two ways a distilabel user sends a batch of prompts:

- ``--mode llm``: ``OpenAILLM.generate_outputs`` on ``concurrency`` prompts at a time (all
  of one call are sent together, as a ``TextGeneration`` step sends its input batch);
- ``--mode pipeline``: a ``Pipeline`` of ``LoadDataFromDicts >> TextGeneration`` with
  ``input_batch_size=concurrency``, run with distilabel's cache in ``--cache`` (what
  resumes a pipeline after a kill and skips it on a second run).

Prints one JSON line: the mode, concurrency, prompts, wall seconds and replies.
"""

from __future__ import annotations

import argparse
import json
import time


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what sets the etch rate of silicon nitride in hot phosphoric acid?" for i in range(n)]


def llm_mode(url: str, concurrency: int, n: int, max_tokens: int) -> int:
    from distilabel.models.llms import OpenAILLM

    llm = OpenAILLM(model="bench", base_url=url, api_key="EMPTY", max_retries=0, timeout=30)
    llm.load()
    replies = 0
    texts = prompts(n)
    for k in range(0, n, concurrency):
        batch = [[{"role": "user", "content": t}] for t in texts[k : k + concurrency]]
        out = llm.generate_outputs(inputs=batch, num_generations=1, max_new_tokens=max_tokens)
        replies += sum(1 for o in out if o["generations"] and o["generations"][0])
    return replies


def pipeline_mode(url: str, concurrency: int, n: int, max_tokens: int, cache: str) -> int:
    from distilabel.models.llms import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration

    with Pipeline(name="bench-client", cache_dir=cache) as pipeline:
        load = LoadDataFromDicts(data=[{"instruction": t} for t in prompts(n)], batch_size=concurrency)
        generate = TextGeneration(
            llm=OpenAILLM(
                model="bench",
                base_url=url,
                api_key="EMPTY",
                max_retries=0,
                timeout=30,
                generation_kwargs={"max_new_tokens": max_tokens},
            ),
            input_batch_size=concurrency,
        )
        load >> generate
    distiset = pipeline.run(use_cache=True)
    rows = distiset["default"]["train"]
    return sum(1 for g in rows["generation"] if g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=("llm", "pipeline"), default="llm")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cache", default=None, help="distilabel's cache folder (pipeline mode)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.mode == "llm":
        replies = llm_mode(args.url, args.concurrency, args.n, args.max_tokens)
    else:
        replies = pipeline_mode(args.url, args.concurrency, args.n, args.max_tokens, args.cache)
    wall = time.perf_counter() - start
    print(
        json.dumps(
            {"mode": args.mode, "concurrency": args.concurrency, "n": args.n, "wall_s": wall, "replies": replies}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
