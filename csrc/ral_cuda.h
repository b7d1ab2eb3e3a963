// ral_kernels CUDA C++ kernels: parameter structs and launchers.
//
// Plain C++ (no torch headers), so every .cu file compiles with bare nvcc and, with
// -DRAL_CPU_EMULATION, with g++ against csrc/emu/cuda_emu.h for CPU tests.
//
// Layout: every tensor is contiguous [B, H, T, HD] (statistics [B, H, T]), HD is the
// padded head dim (64 or 128; the Python side pads q, k, v, q_old, k_old with zero columns
// to a common HD). Inputs are fp16 or bf16; statistics and gradients are fp32. Statistics
// are natural-log (as the API exposes them); the kernels work in log2 units inside.
//
// The math is SPEC section 2 and ral_kernels/backends/glue.py (offsets instead of support
// masses); the passes are those of ral_kernels/backends/pipeline.py, as the Triton kernels
// (ral_kernels/backends/triton/kernels.py) run them:
//   attn_fwd  out, lse and, on held divergence rows, the support's own lse_S (all rows);
//             without v: the old policy's lse / lse_S on its cached rows
//   div_fwd   partial row sums (divergence, E = sum_S p g, old mass) per key split
//   div_bwd   dS_h = w pi_h (g - E) into dq (rows) and dk, and A_h = sum_S pi_h g
//   attn_bwd  flash backward with delta_eff = rowsum(dO * O) + w b_h, adding to dq/dk/dv
#pragma once

#include <cstdint>

#ifdef RAL_CPU_EMULATION
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif

namespace ral {

enum class DType : int { kHalf = 0, kBF16 = 1 };

// Divergence codes, in ral_kernels._semantics.DIVERGENCES order.
enum Divergence : int { kJSD = 0, kKL = 1, kReverseKL = 2 };

struct FwdParams {
  DType dtype;
  int hd;                  // padded head dim of q, k (and v): 64 or 128
  const void* q;           // [B, H, rows, HD]: query positions pos0 .. pos0 + rows - 1
  const void* k;           // [B, HK, Tk, HD]
  const void* v;           // [B, HK, Tk, HD], or nullptr: statistics only (the old policy)
  void* out;               // [B, H, rows, HD], or nullptr (with v)
  float* lse;              // [B, H, rows] over the allowed keys; +inf for a row with no key
  float* lse_s;            // [B, H, Tq - r0] over the support of the held rows (-inf: empty),
                           // or nullptr (then no row is held)
  const uint8_t* kmask;    // [B, Tk] (nonzero = valid key) or nullptr
  int B, H, HK, rows, Tq, Tk;
  int pos0;                // query position of row 0 (0, or r0 for the cached old rows)
  int r0;                  // first divergence row (Tq - R); rows >= r0 are held when lse_s is set
  float scale;             // sm_scale (natural units)
  bool causal;
};

struct DivParams {
  DType dtype;
  int hd;                  // common padded head dim of q, k, q_old, k_old
  const void *q, *k;       // [B, Hq, Tq, HD] (divergence rows r0..), [B, Hk, Tk, HD]
  const float* off;        // [B, Hq, R] offsets: pi_h = exp(s_h - off_h); +inf = no divergence
  const void *q_old, *k_old;  // [B, Ho, R, HD], [B, Hko, Tk, HD]
  const float* off_old;    // [B, Ho, R]
  const uint8_t* kmask;    // [B, Tk] or nullptr
  int B, Hq, Hk, Ho, Hko, G, Tq, Tk, r0;
  float scale, old_scale;
  int divergence;
  bool causal, exclude_self;
  int splits, split_keys;  // key splits: split s covers keys [s * split_keys, (s + 1) * split_keys)
  // div_fwd: partial row sums [splits, B, G, R], every element written
  float *div_part, *e_part, *mass_part;
  // div_bwd
  const float *e, *w;      // [B, G, R]: E and the incoming gradient of div (0 off the rows)
  float* a;                // [B, Hq, R] A_h, added to (zeroed by the caller)
  float *dq, *dk;          // fp32 [B, Hq, Tq, HD], [B, Hk, Tk, HD], added to
  bool deterministic;      // dk from a key-major launch that owns it, no atomics (needs splits == 1)
};

struct BwdParams {
  DType dtype;
  int hd;
  const void *q, *k, *v, *dout;  // q, dout: [B, H, Tq, HD]; k, v: [B, HK, Tk, HD]
  const float* lse;              // [B, H, Tq] (natural log; +inf: no key)
  const float* delta;            // [B, H, Tq]: rowsum(dO * O) + w b_h
  float *dq, *dk, *dv;           // fp32 [B, H, Tq, HD], [B, HK, Tk, HD] x2, added to
  const uint8_t* kmask;
  int B, H, HK, Tq, Tk;
  float scale;
  bool causal;
  bool deterministic;            // dq from a row-major kernel instead of atomics
};

// Each launcher returns the launch error (cudaSuccess when every kernel was queued).
cudaError_t attn_fwd(const FwdParams& p, cudaStream_t stream);
cudaError_t div_fwd(const DivParams& p, cudaStream_t stream);
cudaError_t div_bwd(const DivParams& p, cudaStream_t stream);
cudaError_t attn_bwd(const BwdParams& p, cudaStream_t stream);

// Dynamic shared memory of every kernel, for the largest head dim (checked against each
// arch's limit at compile time in the .cu files and reported by the bindings).
constexpr int kMaxSmemAllArchs = 99 * 1024;  // sm_86 / sm_89 opt-in limit per block

}  // namespace ral
