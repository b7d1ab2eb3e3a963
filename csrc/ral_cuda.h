// ral_kernels CUDA C++ kernels: parameter structs and launchers.
//
// Plain C++ (no torch headers), so every .cu file compiles with bare nvcc and, with
// -DRAL_CPU_EMULATION, with g++ against csrc/emu/cuda_emu.h for CPU tests.
//
// Layout: every tensor is contiguous [B, H, T, HD] (statistics [B, H, T]), HD is the
// padded head dim (64 or 128; the Python side pads q, k, v, q_old, k_old with zero columns
// to a common HD). Inputs are fp16 or bf16, statistics and gradients fp32.
// The math is SPEC section 2; the passes mirror ral_kernels/_triton_kernels.py:
//   attn_fwd  (out, lse, support mass; or only lse and mass for the old policy's rows)
//   div_fwd   (divergence, E = sum_S p g, A_h = sum_S alpha_h g on the cached rows)
//   attn_bwd  (flash backward with delta_eff, dk/dv key-major, dq row-major)
//   div_bwd   (the w/n * alpha_h * G part of dS: row-major into dq, key-major into dk)
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
  int hd;                  // padded head dim of q and k (and v): 64 or 128
  const void* q;           // [B, H, rows, HD]
  const void* k;           // [B, HK, Tk, HD]
  const void* v;           // [B, HK, Tk, HD] or nullptr: statistics only (old policy)
  void* out;               // [B, H, rows, HD] or nullptr
  float* lse;              // [B, H, rows]; +inf for a row with no allowed key
  float* mass;             // [B, H, Tq - r0] support mass B_h of rows >= r0, or nullptr
  const uint8_t* kmask;    // [B, Tk] (nonzero = valid key) or nullptr
  int B, H, HK, rows, Tq, Tk;
  int pos0;                // query position of row 0 (0, or r0 for the cached old rows)
  int r0;                  // first divergence row (Tq - R)
  float scale;
  bool causal, exclude_self;
};

struct BwdParams {
  DType dtype;
  int hd;
  const void *q, *k, *v, *dout;  // q, dout: [B, H, Tq, HD]; k, v: [B, HK, Tk, HD]
  const float* lse;              // [B, H, Tq]
  const float* delta;            // [B, H, Tq]: rowsum(dO * O) + w c_h / n
  float *dq, *dk, *dv;           // fp32 [B, H, Tq, HD], [B, HK, Tk, HD] x2 (overwritten)
  const uint8_t* kmask;
  int B, H, HK, Tq, Tk;
  float scale;
  bool causal;
};

struct DivParams {
  DType dtype;
  int hd;                              // common padded head dim of q, k, q_old, k_old
  const void *q, *k;                   // [B, Hq, Tq, HD], [B, Hk, Tk, HD]
  const float* lse;                    // [B, Hq, Tq]
  const void *q_old, *k_old;           // [B, Ho, R, HD], [B, Hko, Tk, HD]
  const float* lse_old;                // [B, Ho, R]
  const float *z, *z_old;              // [B, G, R]; z == 0 marks a row without divergence
  const float* e;                      // [B, G, R] (div_bwd input)
  const float* w;                      // [B, G, R] incoming grad / n (div_bwd input)
  float* div;                          // [B, G, Tq] (div_fwd; rows >= r0 written)
  float* e_out;                        // [B, G, R] (div_fwd)
  float* a;                            // [B, Hq, R] A_h, accumulated into (div_fwd; zeroed by caller)
  float *dq, *dk;                      // fp32 [B, Hq, Tq, HD], [B, Hk, Tk, HD], added to (div_bwd)
  const uint8_t* kmask;
  int B, Hq, Hk, Ho, Hko, G, Tq, Tk, r0;
  float scale, old_scale;
  int divergence;
  bool causal, exclude_self;
};

// Each launcher returns the launch error (cudaSuccess when every kernel was queued).
cudaError_t attn_fwd(const FwdParams& p, cudaStream_t stream);
cudaError_t attn_bwd(const BwdParams& p, cudaStream_t stream);
cudaError_t div_fwd(const DivParams& p, cudaStream_t stream);
cudaError_t div_bwd(const DivParams& p, cudaStream_t stream);

}  // namespace ral
