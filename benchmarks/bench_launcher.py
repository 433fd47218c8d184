"""Launcher overhead: tokens/s of pretrain_regmixd.py vs a minimal loop on the same megatron-core model.

Both run in fresh processes on the same synthetic data shapes with the same threads:
- launcher: the full loop (2-stage schedule through ScheduledBlendedDataset, the DataLoader reader,
  forward_backward_func, DDP, megatron optimizer, LR scheduler, train_log.jsonl); evaluation only at the
  end, outside the timed window (step times from the launcher's own per-step tokens/s lines, which also
  give the fraction of step time spent waiting for data);
- minimal: the same GPTModel (megatron_ext.model), DDP and get_megatron_optimizer, fed in-memory
  random tokens, `loss.backward(); optimizer.step()` with no schedule, pipeline machinery or logging.
The two alternate for `--rounds` rounds (launcher with the default reader, launcher with 2 DataLoader
workers, minimal), so a load that changes during the run reaches every side alike; each side's rate is
its median step time over all rounds, the first `--warmup` steps of each process dropped.
Then the 1M proxy config (examples/proxy_1m.yaml) at sequence length 512 (`--proxy-iters 0`: skipped).

    .venv/bin/python benchmarks/bench_launcher.py [--threads 2] [--iters 12] [--rounds 3]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

SHAPE = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--ffn-hidden-size", "704",
         "--seq-length", "256", "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "1e-3",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "8192"]
TOKENS_PER_STEP = 16 * 256


def child_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT, PYTHONWARNINGS="ignore",
                MASTER_PORT=str(29400 + os.getpid() % 500))


def launcher_steps(args, threads, iters, tmp, name, tokens_per_step=TOKENS_PER_STEP):
    """(seconds per step, fraction of step time waiting for data) of each step; the launcher logs every step."""
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_regmixd.py")] + args + [
        "--train-iters", str(iters), "--log-interval", "1", "--eval-interval", str(10 ** 9),
        "--eval-iters", "1", "--save", os.path.join(tmp, name)]
    out = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"launcher failed:\n{out.stderr[-3000:]}")
    steps = re.findall(r"tokens/s (\d+) .* data wait ([0-9.]+)", out.stdout)
    return [(tokens_per_step / float(rate), float(wait)) for rate, wait in steps]


def minimal_loop(iters):
    """Child process: the same model and optimizer in a bare loop; prints its step times as JSON."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_ext import cpu_compat
    from megatron_ext.arguments import parse_args
    from megatron_ext.model import build_model, layer_spec_kind, padded_vocab_size, transformer_config

    args = parse_args(SHAPE + ["--train-iters", str(iters), "--data-path", "unused"])
    cpu_compat.enable()
    torch.distributed.init_process_group("gloo", world_size=1, rank=0,
                                         init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}")
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(1)
    cpu_compat.model_parallel_cpu_manual_seed(1)
    config = transformer_config(args)
    vocab = padded_vocab_size(args.vocab_size + 1, 128, 1)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(),
                                    build_model(args, config, vocab, layer_spec_kind()))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01,
                                                       clip_grad=1.0), [model])
    mbs, seq, n_micro = args.micro_batch_size, args.seq_length, args.global_batch_size // args.micro_batch_size
    tokens = torch.randint(0, args.vocab_size, (iters, n_micro, mbs, seq + 1))
    position_ids = torch.arange(seq).expand(mbs, seq)
    times = []
    for it in range(iters):
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        for j in range(n_micro):
            batch = tokens[it, j]
            loss = model(batch[:, :-1], position_ids, None, labels=batch[:, 1:]).mean() / n_micro
            loss.backward()
        model.finish_grad_sync()
        optimizer.step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_seconds": times}))


def minimal_steps(threads, iters):
    out = subprocess.run([sys.executable, __file__, "--minimal-child", "--iters", str(iters)],
                         env=child_env(threads), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"minimal loop failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["step_seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=12, help="steps per process")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="first steps of each process not counted")
    p.add_argument("--proxy-iters", type=int, default=12)
    p.add_argument("--minimal-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.minimal_child:
        return minimal_loop(a.iters)

    import megatron_ext.quiet_imports  # noqa: F401  (before megatron-core)
    from fixtures import make_domains

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_domains(os.path.join(tmp, "tok"), vocab_size=8192, n_docs=400, doc_len=(200, 2000))
        sched = os.path.join(tmp, "sched.json")
        with open(sched, "w") as f:
            json.dump({"version": 1, "unit": "fraction", "stages": [
                {"start": 0.0, "train": [0.7, data["web"]["train"], 0.3, data["code"]["train"]]},
                {"start": 0.5, "train": [0.2, data["web"]["train"], 0.3, data["code"]["train"],
                                         0.5, data["books"]["train"]]}]}, f)
        sides = {"launcher": [], "launcher --num-workers 2": [], "minimal loop": []}
        for r in range(a.rounds):
            for name, extra in (("launcher", []), ("launcher --num-workers 2", ["--num-workers", "2"])):
                steps = launcher_steps(SHAPE + ["--data-schedule", sched] + extra, a.threads, a.iters, tmp,
                                       f"{name.split()[-1]}{r}")
                sides[name] += steps[a.warmup:]
            sides["minimal loop"] += [(t, 0.0) for t in minimal_steps(a.threads, a.iters)[a.warmup:]]
            print(f"round {r + 1}/{a.rounds}: median step s " + ", ".join(
                f"{name} {statistics.median(t for t, _ in steps):.3f}" for name, steps in sides.items()),
                file=sys.stderr, flush=True)
        print(f"shape: 4 layers, hidden 256, seq 256, global batch 16 (2 micro-batches of 8), vocab 8192, "
              f"fp32, {a.threads} threads; {a.rounds} rounds of {a.iters} steps per side, {a.warmup} dropped")
        rate = {}
        for name, steps in sides.items():
            times = [t for t, _ in steps]
            rate[name] = TOKENS_PER_STEP / statistics.median(times)
            wait = sum(t * w for t, w in steps) / sum(times)
            print(f"{name + ' tokens/s:':34s} {rate[name]:8,.0f}  (median of {len(times)} steps; "
                  f"waiting for data {wait:.3%} of step time)")

        if a.proxy_iters:
            proxy = launcher_steps(["--config", os.path.join(ROOT, "examples", "proxy_1m.yaml"), "--seq-length",
                                    "512", "--max-position-embeddings", "512", "--global-batch-size", "16",
                                    "--micro-batch-size", "8", "--lr-warmup-iters", "2", "--tokenizer-type",
                                    "NullTokenizer", "--vocab-size", "8192", "--data-schedule", sched],
                                   a.threads, a.proxy_iters, tmp, "proxy", 16 * 512)[a.warmup:]
            print(f"proxy_1m (2 layers, hidden 256, vocab 8192), seq 512, global batch 16, {a.threads} threads: "
                  f"{16 * 512 / statistics.median([t for t, _ in proxy]):,.0f} tokens/s")
    print(f"load average (1, 5, 15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"launcher --num-workers 2 / launcher: {rate['launcher --num-workers 2'] / rate['launcher']:.3f}")
    print(f"launcher/minimal tokens/s ratio: {rate['launcher'] / rate['minimal loop']:.2f} (target >= 0.95)")


if __name__ == "__main__":
    main()
