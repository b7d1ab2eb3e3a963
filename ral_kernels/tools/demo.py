"""``ral-demo`` (or ``python -m ral_kernels``): the fused op beside the dense reference.

Builds one RAL-shaped problem (a long prompt, a response suffix whose old-policy queries
are cached), runs forward + backward of the advantage-weighted divergence with the fused
op and with the dense reference, and prints the divergence, the agreement and each path's
peak memory and time.
"""

from __future__ import annotations

import argparse

import torch

from .. import fused_attn_kl, make_old_policy_cache, ral_loss, resolve_backend
from .measure import in_fresh_process, peak_memory_mb, pin_cpu_allocator, time_ms
from .version import add_version_option


def _problem(args, device):
    g = torch.Generator().manual_seed(args.seed)
    b, hq, hk, t, d = args.batch, args.heads, args.kv_heads, args.seq_len, args.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = rnd(b, hq, t, d), rnd(b, hk, t, d), rnd(b, hk, t, d)
    # The old policy: the same model a few optimizer steps ago (a small perturbation).
    q_old_full, k_old = q + 0.3 * rnd(b, hq, t, d), k + 0.3 * rnd(b, hk, t, d)
    cache = make_old_policy_cache(q_old_full, k_old, args.response_len, with_lse=True)
    advantages = rnd(b)
    return q, k, v, cache, advantages


def _step(backend, q, k, v, cache, advantages, response_len):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, div = fused_attn_kl(q, k, v, **cache.as_kwargs(), backend=backend)
    mask = torch.zeros_like(div, dtype=torch.bool)
    mask[:, -response_len:] = True
    loss = ral_loss(div, advantages, mask, loss_type="grpo") + out.float().square().mean()
    loss.backward()
    return div.detach(), q.grad


def _cpu_peak_memory(args, name: str):
    """Peak extra memory of one step, read in a fresh process after a small warm-up."""
    pin_cpu_allocator()
    small = argparse.Namespace(**{**vars(args), "seq_len": 64, "response_len": 16})
    _step(name, *_problem(small, "cpu"), 16)
    q, k, v, cache, adv = _problem(args, "cpu")
    return peak_memory_mb(lambda: _step(name, q, k, v, cache, adv, args.response_len), "cpu")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ral-demo", description=__doc__.splitlines()[0])
    add_version_option(p)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (prompt + response)")
    p.add_argument("--response-len", type=int, default=None, help="divergence rows (default: a quarter)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--backend", default="auto", help="fused backend (auto, torch, triton, cuda)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-reference", action="store_true", help="do not run the dense reference")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.response_len is None:
        args.response_len = max(1, args.seq_len // 4)
    if not 0 < args.response_len <= args.seq_len:
        p.error(f"--response-len must be in [1, --seq-len={args.seq_len}], got {args.response_len}")
    device = torch.device(args.device)
    backend = resolve_backend(args.backend, device)
    q, k, v, cache, adv = _problem(args, device)
    print(f"RAL attention divergence: B={args.batch} Hq={args.heads} Hk={args.kv_heads} T={args.seq_len} "
          f"D={args.head_dim}, {args.response_len} response rows, head-mean JSD, causal, {device}")

    names = [backend] + ([] if args.skip_reference else ["reference"])
    results, timing, memory = {}, {}, {}
    for name in names:
        timing[name] = time_ms(lambda n=name: results.__setitem__(n, _step(n, q, k, v, cache, adv, args.response_len)),
                               device, warmup=1, repeats=args.repeats)[0]
    for name in names:
        memory[name] = (peak_memory_mb(lambda n=name: _step(n, q, k, v, cache, adv, args.response_len), device)
                        if device.type == "cuda" else in_fresh_process(_cpu_peak_memory, args, name))
    div = results[backend][0][:, -args.response_len:]
    print(f"per-token JSD on the response: mean {div.mean():.4e}  min {div.min():.4e}  max {div.max():.4e}")
    if "reference" in results:
        d_err = (results[backend][0] - results["reference"][0]).abs().max().item()
        g_err = (results[backend][1] - results["reference"][1]).abs().max().item()
        print(f"fused vs dense reference: max |div diff| {d_err:.2e}, max |dq diff| {g_err:.2e}")
    print(f"\n{'path':<12}{'fwd+bwd ms (median)':>22}{'peak extra MiB':>16}")
    for name in names:
        mb = memory[name]
        print(f"{name:<12}{timing[name]:>22.1f}{('n/a' if mb is None else f'{mb:.1f}'):>16}")
    if len(names) == 2 and memory[names[0]] and memory[names[1]]:
        print(f"\nthe fused op ({backend}) needed {memory['reference'] / memory[backend]:.1f}x less extra memory "
              f"and {timing['reference'] / timing[backend]:.2f}x the speed of the dense reference")


if __name__ == "__main__":
    main()
