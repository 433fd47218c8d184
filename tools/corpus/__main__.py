"""`python -m tools.corpus`: build data/raw/<domain>/{train,valid}.jsonl, the eval-only sets' valid.jsonl and manifest.json."""
import argparse
import time

from tools.cli import run_main
from tools.corpus.build import CorpusConfig, build_corpus, format_table
from tools.corpus.sources import DOMAINS, EVAL_ONLY


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.corpus", description=__doc__)
    parser.add_argument("--out", default="data/raw", help="output directory (default: data/raw)")
    parser.add_argument("--cache", default="cache", help="download cache; a second run does no network work")
    parser.add_argument("--domains", default=",".join([*DOMAINS, *EVAL_ONLY]),
                        help=f"comma-separated subset of the training domains {','.join(DOMAINS)} and the "
                             f"evaluation-only sets {','.join(EVAL_ONLY)} (default: all)")
    parser.add_argument("--max-mb-per-domain", type=float, default=4.0,
                        help="cap on text per domain in MB (1e6 bytes), train+valid; 0 = no cap (default: 4)")
    parser.add_argument("--valid-fraction", type=float, default=0.04,
                        help="fraction of chunks held out for validation, by stable hash (default: 0.04)")
    parser.add_argument("--jobs", type=int, default=2, help="domains built in parallel processes (default: 2)")
    args = parser.parse_args(argv)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    start = time.time()
    manifest = build_corpus(CorpusConfig(out=args.out, cache=args.cache, domains=domains,
                                         max_mb_per_domain=args.max_mb_per_domain,
                                         valid_fraction=args.valid_fraction, jobs=args.jobs))
    print(format_table(manifest))
    print(f"wrote {args.out}/manifest.json in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
