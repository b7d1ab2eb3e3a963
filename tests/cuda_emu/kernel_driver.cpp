// Runs the CUDA kernels of csrc/ in the emulator without torch, for the schedule and mutation
// tests (test_kernel_checks.py): a mutant needs only its own .cu file recompiled, which takes
// seconds, where the torch extension takes minutes.
//
//   kernel_driver PASSES HD [DUMP]
//
// PASSES is "fwd" (attn_fwd only) or "all" (the backend's pipeline: attn_fwd on the current and
// the old policy, div_fwd, attn_bwd, div_bwd, as ral_kernels/backends/cuda/launch.py calls
// them, head-mean JSD, causal); HD is the padded head dim, 64 or 128. Inputs are fixed
// pseudo-random fp16 values, sized so that every pipelined loop runs several tiles (both
// cp.async stages are reused) and the divergence passes see two row blocks. The schedule is
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

  ral::FwdParams f{};
  f.dtype = ral::DType::kHalf;
  f.hd = hd;
  f.q = q.data();
  f.k = k.data();
  f.v = v.data();
  f.out = out.data();
  f.lse = lse.data();
  f.B = B;
  f.H = HQ;
  f.HK = HK;
  f.rows = T;
  f.Tq = T;
  f.Tk = T;
  f.r0 = R0;
  f.scale = scale;
  f.causal = true;
  run("attn_fwd", {reads("q", q), reads("k", k), reads("v", v), writes("out", out), writes("lse", lse)},
      [&] { return ral::attn_fwd(f, nullptr); });
  std::uint64_t h = output(output(0xcbf29ce484222325ull, out), lse);
  if (!all) {
    std::printf("hash=%016llx\n", static_cast<unsigned long long>(h));
    return 0;
  }

  F32 lse_old(std::size_t(B) * HQ * R), mass_old(lse_old.size());
  ral::FwdParams fo = f;
  fo.q = q_old.data();
  fo.k = k_old.data();
  fo.v = nullptr;
  fo.out = nullptr;
  fo.lse = lse_old.data();
  fo.mass = mass_old.data();
  fo.rows = R;
  fo.pos0 = R0;
  run("attn_fwd (old policy)",
      {reads("q_old", q_old), reads("k_old", k_old), writes("lse_old", lse_old), writes("mass_old", mass_old)},
      [&] { return ral::attn_fwd(fo, nullptr); });

  // Head-mean JSD without exclude_self: every row's support is all its keys (Z = 1).
  F32 z(std::size_t(B) * R, 1.0f), z_old(z.size(), 1.0f), div(std::size_t(B) * T, 0.0f), e(z.size());
  F32 a(std::size_t(B) * HQ * R, 0.0f), w(z.size());
  for (auto& x : w) x = uniform();
  ral::DivParams d{};
  d.dtype = ral::DType::kHalf;
  d.hd = hd;
  d.q = q.data();
  d.k = k.data();
  d.lse = lse.data();
  d.q_old = q_old.data();
  d.k_old = k_old.data();
  d.lse_old = lse_old.data();
  d.z = z.data();
  d.z_old = z_old.data();
  d.e = e.data();
  d.w = w.data();
  d.div = div.data();
  d.e_out = e.data();
  d.a = a.data();
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
  run("div_fwd",
      {reads("q", q), reads("k", k), reads("lse", lse), reads("q_old", q_old), reads("k_old", k_old),
       reads("lse_old", lse_old), reads("z", z), reads("z_old", z_old), writes("div", div), writes("e", e),
       writes("a", a)},
      [&] { return ral::div_fwd(d, nullptr); });

  // delta = rowsum(dO * O) (plus a small divergence-like term), as the backend's glue forms it.
  F32 delta(lse.size()), dq(q.size()), dk(k.size()), dv(k.size());
  for (std::size_t row = 0; row < delta.size(); ++row) {
    float s = 0.f;
    for (int c = 0; c < hd; ++c) s += half_value(dout[row * hd + c]) * half_value(out[row * hd + c]);
    delta[row] = s + 0.01f * uniform();
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
  run("attn_bwd",
      {reads("q", q), reads("k", k), reads("v", v), reads("dout", dout), reads("lse", lse), reads("delta", delta),
       writes("dq", dq), writes("dk", dk), writes("dv", dv)},
      [&] { return ral::attn_bwd(bw, nullptr); });
  d.dq = dq.data();
  d.dk = dk.data();
  run("div_bwd",
      {reads("q", q), reads("k", k), reads("lse", lse), reads("q_old", q_old), reads("k_old", k_old),
       reads("lse_old", lse_old), reads("z", z), reads("z_old", z_old), reads("e", e), reads("w", w), writes("dq", dq),
       writes("dk", dk)},
      [&] { return ral::div_bwd(d, nullptr); });

  for (const F32* x : {&lse_old, &mass_old, &div, &e, &a, &dq, &dk, &dv}) h = output(h, *x);
  std::printf("hash=%016llx\n", static_cast<unsigned long long>(h));
  return 0;
}
