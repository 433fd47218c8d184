"""Launcher overhead: tokens/s of pretrain_regmixd.py vs a minimal loop on the same megatron-core model.

Both run in fresh processes on the same synthetic data shapes with the same threads:
- launcher: the full loop (2-stage schedule through ScheduledBlendedDataset, forward_backward_func,
  DDP, megatron optimizer, LR scheduler, train_log.jsonl); evaluation only at the end, outside the
  timed window (rates come from the launcher's own per-log-interval tokens/s, first interval dropped);
- minimal: the same GPTModel (megatron_ext.model), DDP and get_megatron_optimizer, fed in-memory
  random tokens, `loss.backward(); optimizer.step()` with no schedule, pipeline machinery or logging.
Then the 1M proxy config (examples/proxy_1m.yaml) at sequence length 512.

    .venv/bin/python benchmarks/bench_launcher.py [--threads 2] [--iters 25]
"""
import argparse
import json
import os
import re
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


def child_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT, PYTHONWARNINGS="ignore",
                MASTER_PORT=str(29400 + os.getpid() % 500))


def launcher_rate(args, threads, iters, log_interval, tmp, name):
    """Mean tokens/s over the launcher's log intervals after the first."""
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_regmixd.py")] + args + [
        "--train-iters", str(iters), "--log-interval", str(log_interval), "--eval-interval", str(10 ** 9),
        "--eval-iters", "1", "--save", os.path.join(tmp, name)]
    out = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"launcher failed:\n{out.stderr[-3000:]}")
    rates = [float(x) for x in re.findall(r"tokens/s (\d+)", out.stdout)]
    return sum(rates[1:]) / len(rates[1:])


def minimal_loop(iters):
    """Child process: the same model and optimizer in a bare loop; prints tokens/s as JSON."""
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
    steady = times[len(times) // 5:]
    print(json.dumps({"tokens_per_s": len(steady) * args.global_batch_size * seq / sum(steady)}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--minimal-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.minimal_child:
        return minimal_loop(a.iters)

    from fixtures import make_domains

    with tempfile.TemporaryDirectory() as tmp:
        data = make_domains(os.path.join(tmp, "tok"), vocab_size=8192, n_docs=400, doc_len=(200, 2000))
        sched = os.path.join(tmp, "sched.json")
        with open(sched, "w") as f:
            json.dump({"version": 1, "unit": "fraction", "stages": [
                {"start": 0.0, "train": [0.7, data["web"]["train"], 0.3, data["code"]["train"]]},
                {"start": 0.5, "train": [0.2, data["web"]["train"], 0.3, data["code"]["train"],
                                         0.5, data["books"]["train"]]}]}, f)
        launch = launcher_rate(SHAPE + ["--data-schedule", sched], a.threads, a.iters, 5, tmp, "launcher")
        out = subprocess.run([sys.executable, __file__, "--minimal-child", "--iters", str(a.iters)],
                             env=child_env(a.threads), capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"minimal loop failed:\n{out.stderr[-3000:]}")
        minimal = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]
        print(f"shape: 4 layers, hidden 256, seq 256, global batch 16 (2 micro-batches of 8), vocab 8192, "
              f"fp32, {a.threads} threads")
        print(f"launcher tokens/s:     {launch:,.0f}")
        print(f"minimal loop tokens/s: {minimal:,.0f}")
        print(f"ratio launcher/minimal: {launch / minimal:.3f} (target >= 0.9)")

        proxy = launcher_rate(["--config", os.path.join(ROOT, "examples", "proxy_1m.yaml"), "--seq-length", "512",
                               "--max-position-embeddings", "512", "--global-batch-size", "16",
                               "--micro-batch-size", "8", "--lr-warmup-iters", "2", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                               "8192", "--data-schedule", sched], a.threads, 12, 3, tmp, "proxy")
        print(f"proxy_1m (2 layers, hidden 256, vocab 8192), seq 512, global batch 16, {a.threads} threads: "
              f"{proxy:,.0f} tokens/s")


if __name__ == "__main__":
    main()
