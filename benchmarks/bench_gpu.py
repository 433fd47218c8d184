"""GPU figures of the launcher: proxy tokens/s and proxies per GPU-hour, and the 1B target's tokens/s and MFU.

    python benchmarks/bench_gpu.py [--layers 22] [--proxy-iters 10] [--target-iters 10] [--concurrent 1,4]

Needs one CUDA GPU (refuses to run without). Every figure comes from the launcher's own log lines
(`tokens/s` over training steps only, the first log interval dropped as warm-up), on synthetic token
data written in Megatron's .bin/.idx format (tests/fixtures.make_domains), so nothing but the GPU's
software stack is needed:
- proxy: examples/proxy_1m.yaml at RegMix's recipe (sequence 2048, global batch 512, micro-batch 16);
  one proxy alone, then N proxies side by side on the same GPU (aggregate tokens/s). Proxies per
  GPU-hour = aggregate tokens/s × 3600 / tokens of one RegMix proxy (1000 iterations × 512 × 2048).
- target: examples/target_1b.yaml (bf16) at TP=1 with --layers layers, global batch 64 of micro-batch 4;
  MFU = tokens/s × FLOPs per token / the GPU's dense bf16 peak (--peak-tflops, H100/H200 SXM: 989),
  FLOPs per token = 6 × parameters + 6 × layers × sequence × hidden (attention scores and values,
  forward and backward; Megatron-LM's formula without recomputation).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

VOCAB = 50304  # GPT-NeoX's padded vocabulary, as RegMix's tokenizer
PROXY_TOKENS = 1000 * 512 * 2048


def launcher(args: list, tmp: str, name: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), PYTHONWARNINGS="ignore", MASTER_PORT=str(port))
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_regmixd.py"), *args, "--save", os.path.join(tmp, name),
           "--eval-interval", str(10 ** 9), "--eval-iters", "1", "--tokenizer-type", "NullTokenizer",
           "--vocab-size", str(VOCAB)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rate(proc: subprocess.Popen, what: str) -> float:
    """Mean of the launcher's tokens/s log lines after the first (warm-up)."""
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"{what} failed:\n{err[-4000:]}")
    rates = [float(x) for x in re.findall(r"tokens/s (\d+)", out)]
    if len(rates) < 2:
        sys.exit(f"{what}: fewer than 2 log intervals:\n{out[-2000:]}")
    return sum(rates[1:]) / len(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22, help="target layers (22 = the whole 1B model)")
    p.add_argument("--proxy-iters", type=int, default=10)
    p.add_argument("--target-iters", type=int, default=10)
    p.add_argument("--concurrent", default="1,4", help="proxies side by side on one GPU")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    a = p.parse_args()

    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA GPU")
    from fixtures import make_domains

    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_domains(os.path.join(tmp, "tok"), vocab_size=VOCAB, n_docs=3000, doc_len=(500, 4000),
                            valid_docs=50)
        blend = ["--data-path", "0.5", data["web"]["train"], "0.3", data["code"]["train"], "0.2",
                 data["books"]["train"]]
        proxy = ["--config", os.path.join(ROOT, "examples", "proxy_1m.yaml"), *blend,
                 "--train-iters", str(a.proxy_iters), "--log-interval", "2", "--lr-warmup-iters", "2"]
        for n in [int(x) for x in a.concurrent.split(",")]:
            start = time.time()
            procs = [launcher(proxy, tmp, f"proxy{n}_{i}", 29500 + 10 * n + i) for i in range(n)]
            rates = [rate(q, f"proxy {i} of {n}") for i, q in enumerate(procs)]
            total = sum(rates)
            print(f"proxy_1m seq 2048 x 512, {n} side by side: {total:,.0f} tokens/s in all "
                  f"({min(rates):,.0f}-{max(rates):,.0f} each); {total * 3600 / PROXY_TOKENS:.1f} RegMix proxies "
                  f"(1B tokens each) per GPU-hour; wall {time.time() - start:.0f} s", flush=True)

        target = ["--config", os.path.join(ROOT, "examples", "target_1b.yaml"), *blend,
                  "--num-layers", str(a.layers), "--global-batch-size", "64", "--micro-batch-size", "4",
                  "--train-iters", str(a.target_iters), "--log-interval", "2", "--lr-warmup-iters", "1"]
        tokens_per_s = rate(launcher(target, tmp, "target", 29700), "target")
        h, f, s, L = 2048, 5632, 2048, a.layers
        params = L * (4 * h * h + 3 * h * f + 2 * h) + 2 * VOCAB * h + h
        flops_per_token = 6 * params + 6 * L * s * h
        mfu = tokens_per_s * flops_per_token / (a.peak_tflops * 1e12)
        print(f"target_1b bf16 TP=1, {L} layers ({params / 1e9:.2f}B parameters), seq 2048, global batch 64: "
              f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.3f} (peak {a.peak_tflops:.0f} TFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
