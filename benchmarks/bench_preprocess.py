"""Tokenization throughput of tools.preprocess, MB/s of raw text, with 1 and 2 workers side by side.

    python benchmarks/bench_preprocess.py [--input data/raw] [--workers 1 2] [--vocab-size 8192] [--repeat 3]

Uses the corpus at --input when it holds a manifest.json (tools.corpus output), else a stand-in
corpus of real text: this Python's standard-library sources, as three domains of at most --max-mb
in all. A SentencePiece model is trained once beforehand (not timed); each timed run is the whole
`preprocess` call (read jsonl, tokenize, write .bin/.idx, tokens.json) with that model. The machine
may be shared: the load average is printed, and CPU seconds (this process and the workers) per MB
show the cost of the work itself, independent of how much CPU the run got.
"""
import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.preprocess import (SPLITS, PreprocessConfig, find_domains, preprocess, split_path,  # noqa: E402
                              train_sentencepiece_on_splits)


def stdlib_corpus(root: str, max_bytes: int) -> str:
    """Standard-library .py files as jsonl in three domains (by file hash), 1 in 20 files to valid."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(stdlib) for f in fs if f.endswith(".py"))
    handles, total = {}, 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        digest = hashlib.sha256(path[len(stdlib):].encode()).digest()
        domain, split = f"stdlib{digest[0] % 3}", "valid" if digest[1] % 20 == 0 else "train"
        if (domain, split) not in handles:
            os.makedirs(os.path.join(root, domain), exist_ok=True)
            handles[domain, split] = open(split_path(root, domain, split), "w", encoding="utf-8")
        handles[domain, split].write(json.dumps({"text": text, "source": "stdlib"}) + "\n")
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    for handle in handles.values():
        handle.close()
    return root


def snapshot(source: str, root: str) -> str:
    """Copy the corpus's jsonl files, so every timed run reads the same bytes even if it is rebuilt meanwhile."""
    for domain in find_domains(source, None):
        os.makedirs(os.path.join(root, domain))
        for split in SPLITS:
            shutil.copyfile(split_path(source, domain, split), split_path(root, domain, split))
    return root


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default="data/raw")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-mb", type=float, default=8.0, help="size of the stand-in corpus")
    p.add_argument("--repeat", type=int, default=1, help="runs per setting; the fastest is reported")
    args = p.parse_args()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isfile(os.path.join(args.input, "manifest.json")):
            corpus, label = snapshot(args.input, os.path.join(tmp, "raw")), f"{args.input} (a copy)"
        else:
            corpus = stdlib_corpus(os.path.join(tmp, "raw"), int(args.max_mb * 1e6))
            label = f"stand-in: Python stdlib sources, {args.max_mb:g} MB"
        domains = find_domains(corpus, None)
        model = os.path.join(tmp, "tokenizer.model")
        start = time.time()
        with open(model, "wb") as f:
            f.write(train_sentencepiece_on_splits([split_path(corpus, d, "train") for d in domains],
                                                  args.vocab_size, PreprocessConfig.tokenizer_sample_mb))
        print(f"corpus {label}: {len(domains)} domains; SentencePiece BPE {args.vocab_size} trained in "
              f"{time.time() - start:.1f} s (not timed below); cpus {os.cpu_count()}")
        best = {}
        for _ in range(args.repeat):  # interleaved, so load from other processes hits every setting
            for workers in args.workers:
                cfg = PreprocessConfig(input=corpus, output=os.path.join(tmp, f"tok{workers}"),
                                       tokenizer_model=model, workers=workers, progress=False)
                start, cpu_start = time.time(), cpu_seconds()
                result = preprocess(cfg)
                seconds, cpu = time.time() - start, cpu_seconds() - cpu_start
                if workers not in best or seconds < best[workers][3]:
                    text_mb = sum(s.text_bytes for sp in result.stats.values() for s in sp.values()) / 1e6
                    tokens = sum(s.tokens for sp in result.stats.values() for s in sp.values())
                    best[workers] = (workers, text_mb, tokens, seconds, cpu)
    rows = [best[w] for w in args.workers]
    base = rows[0][1] / rows[0][3]
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"best of {args.repeat} run(s) each; load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(f"{'workers':>7}  {'text MB':>8}  {'tokens':>10}  {'seconds':>7}  {'MB/s':>6}  {'vs first':>8}"
          f"  {'CPU s':>6}  {'MB/CPU-s':>8}")
    for workers, text_mb, tokens, seconds, cpu in rows:
        rate = text_mb / seconds
        print(f"{workers:>7}  {text_mb:>8.2f}  {tokens:>10}  {seconds:>7.2f}  {rate:>6.2f}  {rate / base:>7.2f}x"
              f"  {cpu:>6.1f}  {text_mb / cpu:>8.2f}")


if __name__ == "__main__":
    main()
