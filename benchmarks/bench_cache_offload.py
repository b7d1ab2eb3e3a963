"""Old-policy cache: resident on the model's device vs ``offload="cpu"``.

Builds the cache of Qwen2.5-VL-7B's last layer (Ho = 28, Hko = 4, Do = 128, bf16) for a
rollout batch the way ``RALPatch.capture`` does (one ``LayerCapture`` per chunk, then
``OldPolicy.cat``), then walks the update pass's minibatches (``old.select(idx)``), and
reports per mode: the cache's bytes, the bytes left on the device between passes, the
peak device memory of the walk (CUDA only; on the CPU device and host are one memory),
and the time of capture and of one minibatch's ``select``.

    python benchmarks/bench_cache_offload.py                       # CPU: 32 sequences, T=2048, R=512
    python benchmarks/bench_cache_offload.py --device cuda --seqs 128 --tokens 8192 --responses 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ral_kernels
from ral_trainer.policy import LayerCapture, OldPolicy


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(mode, args, device):
    dt = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    offload = "cpu" if mode == "offload" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    parts = []
    for s in range(0, args.seqs, args.chunk):  # the no-grad pass, chunk by chunk
        b = min(args.chunk, args.seqs - s)
        q = torch.randn(b, args.heads, args.responses, args.head_dim, generator=g).to(device, dt)
        k = torch.randn(b, args.kv_heads, args.tokens, args.head_dim, generator=g).to(device, dt)
        cache = ral_kernels.OldPolicyCache(q, k, None)
        parts.append(OldPolicy({0: LayerCapture(cache, args.head_dim ** -0.5, None, args.tokens).offload(offload)}))
        del q, k, cache
    old = OldPolicy.cat(parts)
    del parts
    _sync(device)
    t_capture = time.perf_counter() - t0
    on_device = sum(t.numel() * t.element_size() for t in old.layers[0]._tensors()
                    if t is not None and t.device == device)
    times = []
    for s in range(0, args.seqs, args.minibatch):  # the update pass's minibatches
        t1 = time.perf_counter()
        mb = old.select(torch.arange(s, min(s + args.minibatch, args.seqs)))
        _sync(device)
        times.append(time.perf_counter() - t1)
        del mb
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"mode": mode, "cache_mib": old.nbytes() / 2 ** 20, "on_device_mib": on_device / 2 ** 20,
            "peak_device_mib": None if peak is None else peak / 2 ** 20, "capture_ms": 1e3 * t_capture,
            "select_ms": 1e3 * statistics.median(times), "pinned": old.layers[0].cache.q_old.is_pinned()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", type=int, default=32, help="sequences in the rollout batch")
    ap.add_argument("--tokens", type=int, default=2048, help="T, tokens per sequence")
    ap.add_argument("--responses", type=int, default=512, help="R, response rows per sequence")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=8, help="sequences per chunk of the capture pass")
    ap.add_argument("--minibatch", type=int, default=4, help="sequences per update minibatch")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}: {args.seqs} sequences, T={args.tokens}, R={args.responses}, "
          f"Ho={args.heads}, Hko={args.kv_heads}, Do={args.head_dim}, {args.dtype}; capture chunk {args.chunk}, "
          f"minibatch {args.minibatch}")
    print("| mode | cache MiB | on device between passes MiB | peak device MiB | capture ms | select ms / minibatch "
          "| pinned |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for mode in ("resident", "offload"):
        r = run(mode, args, device)
        peak = "n/a (CPU)" if r["peak_device_mib"] is None else f"{r['peak_device_mib']:.0f}"
        print(f"| {r['mode']} | {r['cache_mib']:.0f} | {r['on_device_mib']:.0f} | {peak} | {r['capture_ms']:.0f} | "
              f"{r['select_ms']:.1f} | {r['pinned']} |")


if __name__ == "__main__":
    main()
