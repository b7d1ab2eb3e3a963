// Runs the CUDA kernels of csrc/ in the emulator without torch, for the schedule and mutation
// tests (test_kernel_checks.py): a mutant needs only its own .cu file recompiled, which takes
// seconds, where the torch extension takes minutes.
//
//   kernel_driver PASSES HD [DUMP]
//
// PASSES is "fwd" (attn_fwd only) or "all" (the backend's pipeline as
// ral_kernels/backends/pipeline.py runs it through ral_kernels/backends/cuda/launch.py:
// attn_fwd on the current and the old policy, the offsets (glue.py's, here on the host),
// div_fwd over two key splits, then the backward twice: div_bwd + attn_bwd with atomics (the
// default) and with deterministic = true; head-mean JSD, causal, exclude_self); HD is the
// padded head dim, 64 or 128. Inputs are fixed pseudo-random fp16 values, sized so that every
// pipelined loop runs several tiles (both cp.async stages are reused) and the divergence
// passes see two row blocks. The schedule is
// RAL_EMU_SCHEDULE's; every launch runs the emulator's global-memory checks, as through the
// bindings. Prints "hash=<16 hex digits>" of every output byte and exits 0, or
// prints "error: <launch error>" and exits 2. DUMP, if given, receives the outputs as float32 values
// in the order they are hashed (for comparing two builds' numbers, not only their bits).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ral_cuda.h"

namespace {

constexpr int B = 1, HQ = 4, HK = 2, T = 150, R = 80, R0 = T - R;

using Half = std::vector<std::uint16_t>;
using F32 = std::vector<float>;

std::uint64_t rng_state = 0x2545f4914f6cdd1dull;

float uniform() {  // xorshift64*, in [-1, 1)
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return static_cast<float>((rng_state * 0x2545f4914f6cdd1dull) >> 40) / 8388608.0f - 1.0f;
}

Half random_half(std::size_t n, float scale) {
  Half h(n);
  for (auto& x : h) x = __float2half_rn(scale * uniform()).__x;
  return h;
}

float half_value(std::uint16_t bits) { return __half2float(__half{bits}); }

std::uint64_t fnv1a(std::uint64_t h, const void* data, std::size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

std::FILE* dump = nullptr;

std::uint64_t output(std::uint64_t h, const Half& x) {
  for (std::uint16_t b : x) {
    const float f = half_value(b);
    if (dump) std::fwrite(&f, 4, 1, dump);
  }
  return fnv1a(h, x.data(), x.size() * 2);
}

std::uint64_t output(std::uint64_t h, const F32& x) {
  if (dump) std::fwrite(x.data(), 4, x.size(), dump);
  return fnv1a(h, x.data(), x.size() * 4);
}

template <class V> ral_emu::Region reads(const char* name, const V& v) {
  return {name, v.data(), v.size() * sizeof(v[0]), sizeof(v[0]), false};
}
template <class V> ral_emu::Region writes(const char* name, const V& v) {
  return {name, v.data(), v.size() * sizeof(v[0]), sizeof(v[0]), true};
}

// Runs a launcher with the per-launch global-memory checks the bindings set up (inputs stay
// unchanged, one writing block per output byte); on failure prints the error and exits 2.
template <class F> void run(const char* what, std::vector<ral_emu::Region> regions, F&& launcher) {
  const ral_emu::GlobalWatch watch(std::move(regions));
  const cudaError_t err = launcher();
  if (err == cudaSuccess) return;
  std::printf("error: %s: %s: %s\n", what, cudaGetErrorString(err), ral_emu::last_error_message());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4 || (std::strcmp(argv[1], "fwd") != 0 && std::strcmp(argv[1], "all") != 0)) {
    std::fprintf(stderr, "usage: %s fwd|all 64|128 [DUMP]\n", argv[0]);
    return 1;
  }
  if (argc == 4 && (dump = std::fopen(argv[3], "wb")) == nullptr) {
    std::perror(argv[3]);
    return 1;
  }
  const bool all = std::strcmp(argv[1], "all") == 0;
  const int hd = std::atoi(argv[2]);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  Half q = random_half(std::size_t(B) * HQ * T * hd, 1.5f), k = random_half(std::size_t(B) * HK * T * hd, 1.5f);
  Half v = random_half(k.size(), 1.0f), q_old = random_half(std::size_t(B) * HQ * R * hd, 1.5f);
  Half k_old = random_half(k.size(), 1.5f), dout = random_half(q.size(), 1.0f);
  Half out(q.size());
  F32 lse(std::size_t(B) * HQ * T);

  F32 lse_s(std::size_t(B) * HQ * R);  // the held rows' support log-sum-exp
  ral::FwdParams f{};
  f.dtype = ral::DType::kHalf;
  f.hd = hd;
  f.q = q.data();
  f.k = k.data();
  f.v = v.data();
  f.out = out.data();
  f.lse = lse.data();
  f.lse_s = lse_s.data();
  f.B = B;
  f.H = HQ;
  f.HK = HK;
  f.rows = T;
  f.Tq = T;
  f.Tk = T;
  f.r0 = R0;
  f.scale = scale;
  f.causal = true;
  run("attn_fwd", {reads("q", q), reads("k", k), reads("v", v), writes("out", out), writes("lse", lse),
                   writes("lse_s", lse_s)},
      [&] { return ral::attn_fwd(f, nullptr); });
  std::uint64_t h = output(output(output(0xcbf29ce484222325ull, out), lse), lse_s);
  if (!all) {
    std::printf("hash=%016llx\n", static_cast<unsigned long long>(h));
    return 0;
  }

  F32 lse_old(std::size_t(B) * HQ * R), lse_s_old(lse_old.size());
  ral::FwdParams fo = f;
  fo.q = q_old.data();
  fo.k = k_old.data();
  fo.v = nullptr;
  fo.out = nullptr;
  fo.lse = lse_old.data();
  fo.lse_s = lse_s_old.data();
  fo.rows = R;
  fo.pos0 = R0;
  run("attn_fwd (old policy)",
      {reads("q_old", q_old), reads("k_old", k_old), writes("lse_old", lse_old), writes("lse_s_old", lse_s_old)},
      [&] { return ral::attn_fwd(fo, nullptr); });

  // glue.offsets for one group of HQ heads: off_h = lse_h + log sum_h' exp(lse_S_h' - lse_h').
  auto offsets = [&](const F32& all_lse, int64_t rows, int64_t row0, const F32& support_lse) {
    F32 off(std::size_t(B) * HQ * R);
    for (int i = 0; i < R; ++i) {
      double m = -INFINITY, acc = 0.0;
      for (int hh = 0; hh < HQ; ++hh) m = std::fmax(m, support_lse[hh * R + i] - all_lse[hh * rows + row0 + i]);
      for (int hh = 0; hh < HQ; ++hh) acc += std::exp(support_lse[hh * R + i] - all_lse[hh * rows + row0 + i] - m);
      for (int hh = 0; hh < HQ; ++hh) off[hh * R + i] = float(all_lse[hh * rows + row0 + i] + m + std::log(acc));
    }
    return off;
  };
  const F32 off = offsets(lse, T, R0, lse_s), off_old = offsets(lse_old, R, 0, lse_s_old);

  constexpr int kSplits = 2, kSplitKeys = 128;
  F32 div(std::size_t(kSplits) * B * R), e_part(div.size()), mass(div.size()), w(std::size_t(B) * R);
  for (auto& x : w) x = uniform();
  ral::DivParams d{};
  d.dtype = ral::DType::kHalf;
  d.hd = hd;
  d.q = q.data();
  d.k = k.data();
  d.off = off.data();
  d.q_old = q_old.data();
  d.k_old = k_old.data();
  d.off_old = off_old.data();
  d.B = B;
  d.Hq = HQ;
  d.Hk = HK;
  d.Ho = HQ;
  d.Hko = HK;
  d.G = 1;
  d.Tq = T;
  d.Tk = T;
  d.r0 = R0;
  d.scale = scale;
  d.old_scale = scale;
  d.divergence = ral::kJSD;
  d.causal = true;
  d.exclude_self = true;
  d.splits = kSplits;
  d.split_keys = kSplitKeys;
  d.div_part = div.data();
  d.e_part = e_part.data();
  d.mass_part = mass.data();
  run("div_fwd",
      {reads("q", q), reads("k", k), reads("off", off), reads("q_old", q_old), reads("k_old", k_old),
       reads("off_old", off_old), writes("div_part", div), writes("e_part", e_part), writes("mass_part", mass)},
      [&] { return ral::div_fwd(d, nullptr); });
  F32 e(std::size_t(B) * R);
  for (int i = 0; i < R; ++i) e[i] = e_part[i] + e_part[R + i];
  d.e = e.data();
  d.w = w.data();
  for (const F32* x : {&lse_old, &lse_s_old, &div, &e_part, &mass}) h = output(h, *x);

  // The backward twice: atomics (the default, two key splits) and deterministic (owned rows
  // and keys); each: div_bwd, then attn_bwd with delta = rowsum(dO * O) + w b_h,
  // b_h = A_h - E exp(lse_S_h - off_h), as glue.py forms it.
  for (const bool deterministic : {false, true}) {
    F32 a(std::size_t(B) * HQ * R, 0.0f), dq(q.size(), 0.0f), dk(k.size(), 0.0f), dv(k.size(), 0.0f);
    d.a = a.data();
    d.dq = dq.data();
    d.dk = dk.data();
    d.deterministic = deterministic;
    d.splits = deterministic ? 1 : kSplits;
    d.split_keys = deterministic ? T : kSplitKeys;
    run("div_bwd",
        {reads("q", q), reads("k", k), reads("off", off), reads("q_old", q_old), reads("k_old", k_old),
         reads("off_old", off_old), reads("e", e), reads("w", w), writes("a", a), writes("dq", dq), writes("dk", dk)},
        [&] { return ral::div_bwd(d, nullptr); });
    F32 delta(lse.size());
    for (std::size_t row = 0; row < delta.size(); ++row) {
      float s = 0.f;
      for (int c = 0; c < hd; ++c) s += half_value(dout[row * hd + c]) * half_value(out[row * hd + c]);
      const int hh = int(row / T), i = int(row % T) - R0;
      if (i >= 0) s += w[i] * (a[hh * R + i] - e[i] * std::exp(lse_s[hh * R + i] - off[hh * R + i]));
      delta[row] = s;
    }
    ral::BwdParams bw{};
    bw.dtype = ral::DType::kHalf;
    bw.hd = hd;
    bw.q = q.data();
    bw.k = k.data();
    bw.v = v.data();
    bw.dout = dout.data();
    bw.lse = lse.data();
    bw.delta = delta.data();
    bw.dq = dq.data();
    bw.dk = dk.data();
    bw.dv = dv.data();
    bw.B = B;
    bw.H = HQ;
    bw.HK = HK;
    bw.Tq = T;
    bw.Tk = T;
    bw.scale = scale;
    bw.causal = true;
    bw.deterministic = deterministic;
    run("attn_bwd",
        {reads("q", q), reads("k", k), reads("v", v), reads("dout", dout), reads("lse", lse), reads("delta", delta),
         writes("dq", dq), writes("dk", dk), writes("dv", dv)},
        [&] { return ral::attn_bwd(bw, nullptr); });
    for (const F32* x : {&a, &dq, &dk, &dv}) h = output(h, *x);
  }
  std::printf("hash=%016llx\n", static_cast<unsigned long long>(h));
  return 0;
}
