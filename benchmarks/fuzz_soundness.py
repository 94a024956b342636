"""The soundness fuzzer at scale: ``certprune verify``'s cascade on N random foreign ONNX networks (three properties
each), every answer judged against onnxruntime, PGD and, on tiny networks, an exact brute force (issue 21's goal:
0 wrong verdicts over at least 10,000 cases). The cases and the judge are the test suite's
(``tests/fuzz_networks.py``, ``tests/fuzz_judge.py``); case ``seed`` is the same network and boxes everywhere.

    python benchmarks/fuzz_soundness.py --cases 10000 --seed 0 --out fuzz.json

Prints a progress line every ``--every`` cases and a summary: cases, verdicts per kind and stage (the cascade's, and
on tiny networks branch and bound's), wrong verdicts (must be 0) and other problems (crashes, a bound above the
truth), each with a reproducing seed. The JSON summary holds the same, every wrong verdict and problem in full.
Exit status 1 when any verdict was wrong.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the fuzzer's cases and judge

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fuzz_judge import CASCADE, judge_case  # noqa: E402
    from fuzz_networks import FAMILIES, make_case  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="networks to fuzz (three properties each)")
    parser.add_argument("--seed", type=int, default=0, help="the first case's seed; case k has seed + k")
    parser.add_argument("--family", default="any", choices=FAMILIES, help="which networks (default: a mix)")
    parser.add_argument("--stages", nargs="+", default=list(CASCADE), help="the cascade's bound stages")
    parser.add_argument("--public-every", type=int, default=4,
                        help="every k-th case runs through verify_instances on its files (else the Cascade)")
    parser.add_argument("--every", type=int, default=100, help="cases per progress line")
    parser.add_argument("--out", help="the JSON summary's path")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.every < 1 or args.public_every < 1:
        parser.error("--cases, --every and --public-every must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.disable(logging.WARNING)  # the cascade logs each property it leaves unknown
    warnings.simplefilter("ignore")
    verdicts, stages, problems = collections.Counter(), collections.Counter(), collections.Counter()
    wrong, examples, started, properties = [], {}, time.perf_counter(), 0
    for k in range(args.cases):
        seed = args.seed + k
        case = make_case(seed, args.family)
        for judged in judge_case(case, public=seed % args.public_every == 0, stages=args.stages):
            properties += judged.path != "BaB"
            verdicts[judged.verdict] += 1
            by = f" by {judged.by}" if judged.by else ""
            stages[f"{'BaB' if judged.path == 'BaB' else 'cascade'}: {judged.verdict}{by}"] += 1
            where = {"seed": seed, "family": args.family, "property": judged.index, "box": judged.kind,
                     "relus": judged.relus, "features": case.network.features, "path": judged.path,
                     "verdict": judged.verdict, "by": judged.by, "exact_min_margin": judged.exact}
            wrong += [{**where, "why": text} for text in judged.wrong]
            for text in dict.fromkeys(judged.problems):
                kind = re.sub(r"[-+]?\d[\w.+-]*", "#", text)[:100]  # the sentence without its numbers
                problems[kind] += 1
                examples.setdefault(kind, {**where, "problem": text})
        if (k + 1) % args.every == 0 or k + 1 == args.cases:
            print(f"{k + 1}/{args.cases} cases, {properties} properties in {time.perf_counter() - started:.0f} s, "
                  "verdicts (cascade and BaB): "
                  + ", ".join(f"{verdict} {count}" for verdict, count in sorted(verdicts.items()))
                  + f"; wrong {len(wrong)}; other problems {sum(problems.values())}", flush=True)
    seconds = time.perf_counter() - started
    print(f"\n{args.cases} cases (seeds {args.seed}..{args.seed + args.cases - 1}, family {args.family}), "
          f"{properties} properties in {seconds:.0f} s")
    for verdict, count in sorted(stages.items()):
        print(f"  {verdict}: {count}")  # BaB: tiny networks only, each property alone
    print(f"wrong verdicts: {len(wrong)}")
    for item in wrong[:20]:
        print(f"  seed {item['seed']} property {item['property']} ({item['box']} box, {item['path']}): {item['why']}")
    print(f"other problems: {sum(problems.values())}")
    for kind, count in problems.most_common():
        print(f"  {count} x {kind} (e.g. seed {examples[kind]['seed']}: {examples[kind]['problem'][:160]})")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"cases": args.cases, "first_seed": args.seed, "family": args.family, "stages": args.stages,
             "properties": properties, "seconds": seconds, "verdicts": dict(verdicts), "by_stage": dict(stages),
             "wrong_verdicts": len(wrong), "wrong": wrong, "problems": dict(problems), "problem_examples": examples},
            indent=1, default=str) + "\n")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
