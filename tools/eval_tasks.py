"""Offline lm-evaluation-harness tasks from the corpus' held-out text (`<raw>/<domain>/valid.jsonl`).

    python -m tools.eval_tasks --raw data/raw --out eval_tasks [--domains web code] [--max-docs 200]
    lm_eval --model hf --model_args pretrained=HF_DIR --include_path eval_tasks --tasks regmixd_local

Per domain, two lm-eval YAML tasks over local jsonl files (no hub download):
- `regmixd_cloze_<domain>`: last-word cloze in the manner of LAMBADA: a passage of up to `--max-chars`
  characters cut after a word of 2+ word characters; the model scores that word (with the whitespace
  before it) given the passage before it: `acc` = the word is the greedy continuation, `perplexity`.
- `regmixd_ppl_<domain>`: rolling log-likelihood of each document (first `--max-chars` characters):
  `word_perplexity`, `byte_perplexity`, `bits_per_byte` (tokenizer-independent across models).
Every task carries the tag `regmixd_local` (all of them), `regmixd_cloze` or `regmixd_ppl`.
"""
import argparse
import json
import os
import re

import yaml

from megatron_ext.atomic import atomic_write
from megatron_ext.errors import UserError
from tools.cli import run_main

LAST_WORD = re.compile(r"\s(\w{2,})")
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def read_texts(path: str, max_docs: int) -> list:
    """The first `max_docs` non-empty `text` fields of a jsonl file (the corpus' deterministic order)."""
    texts = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(text, str) and text.strip():
                texts.append(text)
                if len(texts) == max_docs:
                    break
    return texts


def cloze_item(text: str, max_chars: int):
    """{"context", "target"} from a passage's last word within `max_chars`, or None when it has none."""
    window = text[:max_chars]
    last = None
    for last in LAST_WORD.finditer(window):
        pass
    if last is None or not window[:last.start()].strip():
        return None
    return {"context": window[:last.start()], "target": window[last.start():last.end()]}


def task_yaml(name: str, tags: list, data_file: str, output_type: str, doc_to_text: str, doc_to_target: str,
              metrics: list, **extra) -> str:
    task = {"task": name, "tag": tags, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": os.path.abspath(data_file)}}, "test_split": "test",
            "output_type": output_type, "doc_to_text": doc_to_text, "doc_to_target": doc_to_target, **extra,
            "metric_list": metrics, "metadata": {"version": 1.0}}
    return yaml.safe_dump(task, sort_keys=False, allow_unicode=True)


def write_jsonl(path: str, rows: list) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_tasks(raw: str, out: str, domains=None, max_docs: int = 200, max_chars: int = 2000) -> dict:
    """Write the task folder; returns {task name: number of documents}."""
    if not os.path.isdir(raw):
        raise UserError(f"--raw {raw}: no such directory")
    available = sorted(d for d in os.listdir(raw) if os.path.isfile(os.path.join(raw, d, "valid.jsonl")))
    missing = sorted(set(domains or ()) - set(available))
    if missing:
        raise UserError(f"--domains: no {raw}/<domain>/valid.jsonl for {', '.join(missing)}")
    counts = {}
    for domain in domains or available:
        texts = read_texts(os.path.join(raw, domain, "valid.jsonl"), max_docs)
        cloze = [item for item in (cloze_item(t, max_chars) for t in texts) if item]
        if not cloze:
            raise UserError(f"{raw}/{domain}/valid.jsonl: no passage with a word to cloze")
        data = os.path.join(out, domain)
        write_jsonl(os.path.join(data, "cloze.jsonl"), cloze)
        write_jsonl(os.path.join(data, "ppl.jsonl"), [{"text": t[:max_chars]} for t in texts])
        # the target keeps its own leading whitespace, so no delimiter is inserted before it
        atomic_write(os.path.join(out, f"regmixd_cloze_{domain}.yaml"), task_yaml(
            f"regmixd_cloze_{domain}", ["regmixd_local", "regmixd_cloze"], os.path.join(data, "cloze.jsonl"),
            "loglikelihood", "{{context}}", "{{target}}",
            [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
             {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
            target_delimiter=""))
        atomic_write(os.path.join(out, f"regmixd_ppl_{domain}.yaml"), task_yaml(
            f"regmixd_ppl_{domain}", ["regmixd_local", "regmixd_ppl"], os.path.join(data, "ppl.jsonl"),
            "loglikelihood_rolling", "", "{{text}}", [{"metric": m} for m in PERPLEXITY_METRICS]))
        counts[f"regmixd_cloze_{domain}"], counts[f"regmixd_ppl_{domain}"] = len(cloze), len(texts)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.eval_tasks", description=__doc__.splitlines()[0])
    p.add_argument("--raw", required=True, help="the corpus folder: <raw>/<domain>/valid.jsonl")
    p.add_argument("--out", required=True, help="the task folder (lm_eval --include_path)")
    p.add_argument("--domains", nargs="+", help="default: every domain with a valid.jsonl")
    p.add_argument("--max-docs", type=int, default=200, help="documents per domain and task")
    p.add_argument("--max-chars", type=int, default=2000, help="characters per document")
    args = p.parse_args(argv)
    if args.max_docs < 1 or args.max_chars < 10:
        raise UserError("--max-docs must be >= 1 and --max-chars >= 10")
    counts = build_tasks(args.raw, args.out, args.domains, args.max_docs, args.max_chars)
    for name, n in counts.items():
        print(f"{name}: {n} documents")
    print(f"run: lm_eval --model hf --model_args pretrained=HF_DIR --include_path {args.out} --tasks regmixd_local")
    return 0


if __name__ == "__main__":
    run_main(main)
