// Device building blocks shared by the kernels: 16-bit conversions, the m16n8k16
// tensor-core MMA (mma.sync on sm_80+; emulated lane by lane under RAL_CPU_EMULATION),
// warp-level GEMMs on shared-memory tiles, quad reductions, masks and the divergence terms.
//
// Fragment layout of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and c = lane % 4:
//   A (16x16, row-major): reg0 = A[g][2c..2c+1], reg1 = A[g+8][2c..], reg2 = A[g][2c+8..],
//                         reg3 = A[g+8][2c+8..]
//   B (16x8, "col"):      reg0 = B[2c..2c+1][g], reg1 = B[2c+8..2c+9][g]
//   C/D (16x8, fp32):     d0, d1 = D[g][2c], D[g][2c+1]; d2, d3 = D[g+8][2c], D[g+8][2c+1]
// A C fragment pair (n-tiles 2t, 2t+1) is exactly the A fragment of a 16x16 block, which is
// how P = softmax(S) feeds P V without going through shared memory (as in FlashAttention-2).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "ral_cuda.h"

#ifndef RAL_CPU_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define RAL_DYN_SMEM(name) extern __shared__ __align__(16) char name[]
#define RAL_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define RAL_SHARED_STORE_POINT() ((void)0)
#else
#define RAL_DYN_SMEM(name) char* name = ::ral_emu::dynamic_smem()
#define RAL_LAUNCH(kernel, grid, block, smem, stream, ...) ::ral_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
// Before a shared-memory store: where the emulator's perturbed schedules may switch threads.
#define RAL_SHARED_STORE_POINT() ::ral_emu::preemption_point()
#endif

namespace ral {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kPad = 8;  // shared rows are HD + 8 halves: 16-byte aligned, rotates banks
constexpr float kTiny = 1.1754943508222875e-38f;  // smallest normal float, as in _semantics
constexpr unsigned kFull = 0xffffffffu;

// ------------------------------------------------------------------ 16-bit types

template <typename T> struct Cvt;
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T> __device__ __forceinline__ uint16_t bits(T x) {
  uint16_t u;
  memcpy(&u, &x, 2);
  return u;
}

// Two floats rounded to T, the first in the low half (the lower-index element).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return uint32_t(bits(Cvt<T>::from_float(lo))) | (uint32_t(bits(Cvt<T>::from_float(hi))) << 16);
}


// ------------------------------------------------------------------ MMA

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

#ifndef RAL_CPU_EMULATION
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
// The same instruction in the CPU emulator, computed from the fragment layout above.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::ral_emu::mma_m16n8k16<T>(d, a, b);
}
#endif

// ------------------------------------------------------------------ ldmatrix

// ldmatrix.m8n8.x4 from shared memory: lanes 8i..8i+7 give the 16-byte row addresses of 8x8
// matrix i; each lane gets one 32-bit register per matrix: row lane/4, elements 2(lane%4)
// and 2(lane%4)+1 -- or, transposed (.trans), column lane/4 at rows 2(lane%4) and +1. These
// are exactly the A / B fragments of mma.m16n8k16 above.
#ifndef RAL_CPU_EMULATION
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
#else
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  ::ral_emu::ldmatrix_x4<TRANS>(r, row);
}
#endif

// ------------------------------------------------------------------ warp GEMMs

// acc[t] += A[16 x KD] * B[NT*8 x KD]^T with A's 16 rows at sA and B's rows at sB (shared,
// leading dims lda / ldb): the score tile S = Q K^T of one warp.
template <typename T, int NT, int KD>
__device__ __forceinline__ void gemm_nt(float (&acc)[NT][4], const T* sA, int lda, const T* sB, int ldb) {
  static_assert(NT % 2 == 0, "n-tiles are loaded in pairs");
  const int lane = threadIdx.x % kWarpSize, mi = lane / 8, ri = lane % 8;
#pragma unroll
  for (int ks = 0; ks < KD / 16; ++ks) {
    uint32_t a[4];  // matrices: rows 0-7 / 8-15 x columns 0-7 / 8-15 of the 16x16 A block
    ldmatrix_x4<false>(a, sA + (ri + 8 * (mi & 1)) * lda + ks * 16 + 8 * (mi >> 1));
#pragma unroll
    for (int t = 0; t < NT; t += 2) {
      uint32_t b[4];  // (b0, b1) of n-tile t, then of n-tile t + 1
      ldmatrix_x4<false>(b, sB + (t * 8 + ri + 8 * (mi >> 1)) * ldb + ks * 16 + 8 * (mi & 1));
      mma_16816<T>(acc[t], a, {b[0], b[1]});
      mma_16816<T>(acc[t + 1], a, {b[2], b[3]});
    }
  }
}

// acc[t] += P[16 x NK*8] * B[NK*8 x NT*8]: P in C fragments (rounded to T, as
// FlashAttention does for P V), B row-major in shared memory (rows = the K dimension).
template <typename T, int NK, int NT>
__device__ __forceinline__ void gemm_pn(float (&acc)[NT][4], const float (&p)[NK][4], const T* sB, int ldb) {
  static_assert(NK % 2 == 0 && NT % 2 == 0, "K must be a multiple of 16, n-tiles come in pairs");
  const int lane = threadIdx.x % kWarpSize, mi = lane / 8, ri = lane % 8;
#pragma unroll
  for (int kk = 0; kk < NK / 2; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                           pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int t = 0; t < NT; t += 2) {
      uint32_t b[4];  // B is [k][n] in memory: transposed loads give the "col" fragments
      ldmatrix_x4<true>(b, sB + (kk * 16 + ri + 8 * (mi & 1)) * ldb + t * 8 + 8 * (mi >> 1));
      mma_16816<T>(acc[t], a, {b[0], b[1]});
      mma_16816<T>(acc[t + 1], a, {b[2], b[3]});
    }
  }
}

template <int NT> __device__ __forceinline__ void zero(float (&x)[NT][4]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[t][e] = 0.f;
}

// Row (r = e / 2: 0 for rows g, 1 for g + 8) and column of C-fragment element (t, e).
__device__ __forceinline__ int frag_col(int t, int e) { return t * 8 + 2 * (threadIdx.x % 4) + (e & 1); }
__device__ __forceinline__ int frag_row(int e) { return (threadIdx.x % kWarpSize) / 4 + 8 * (e >> 1); }

// Reductions over the four lanes that hold one row of a C fragment.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFull, x, 1);
  return x + __shfl_xor_sync(kFull, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFull, x, 2));
}

// ------------------------------------------------------------------ cp.async

// 16-byte asynchronous global -> shared copies (zero-filled when !valid), grouped by commit;
// wait<N> returns when at most N of this thread's groups are still in flight.
#ifndef RAL_CPU_EMULATION
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#else
// Emulated asynchrony: a copy lands when a wait retires its group (or, under the emulator's
// perturbed schedules, at once or at any moment before), so a kernel that reads a tile before
// waiting for it reads the 0xFF (NaN) fill and fails its tests.
inline void cp_async_16(void* dst, const void* src, bool valid) { ::ral_emu::cp_async_16(dst, src, valid); }
inline void cp_async_commit() { ::ral_emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { ::ral_emu::cp_async_wait(N); }
#endif

// ------------------------------------------------------------------ shared tiles

// Rows [row0, row0 + ROWS) of a contiguous [nrows, HD] matrix into shared memory (leading
// dim HD + kPad); rows past nrows are zero. All threads of the block take part.
template <typename T, int ROWS, int HD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int row0, int nrows) {
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
    const int r = i / kChunks, col = (i % kChunks) * 8;
    uint4 val = {0u, 0u, 0u, 0u};
    if (row0 + r < nrows) val = *reinterpret_cast<const uint4*>(src + int64_t(row0 + r) * HD + col);
    RAL_SHARED_STORE_POINT();
    *reinterpret_cast<uint4*>(dst + r * (HD + kPad) + col) = val;
  }
}

// load_tile with cp.async (the caller commits and waits).
template <typename T, int ROWS, int HD>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int row0, int nrows) {
  constexpr int kChunks = HD / 8;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
    const int r = i / kChunks, col = (i % kChunks) * 8;
    const bool valid = row0 + r < nrows;
    cp_async_16(dst + r * (HD + kPad) + col, valid ? src + int64_t(row0 + r) * HD + col : src, valid);
  }
}

// n floats from src[i0..] into shared memory, `fill` past `limit`.
template <int N>
__device__ __forceinline__ void load_vec(float* dst, const float* src, int i0, int limit, float fill) {
  for (int i = threadIdx.x; i < N; i += kThreads) {
    RAL_SHARED_STORE_POINT();
    dst[i] = (i0 + i < limit) ? src[i0 + i] : fill;
  }
}

// 1 for keys [n0, n0 + N) that exist and pass the key mask, else 0.
template <int N>
__device__ __forceinline__ void load_key_ok(uint8_t* dst, const uint8_t* kmask_row, int n0, int Tk) {
  for (int i = threadIdx.x; i < N; i += kThreads) {
    RAL_SHARED_STORE_POINT();
    dst[i] = (n0 + i < Tk) && (kmask_row == nullptr || kmask_row[n0 + i] != 0);
  }
}

// Start loading key tile n0 (K, and V after it when WITH_V) and its key flags into one
// pipeline stage; one cp.async group.
template <typename T, int ROWS, int HD, bool WITH_V>
__device__ __forceinline__ void issue_kv(T* stage, uint8_t* key_ok, const T* k, const T* v, const uint8_t* kmask_row,
                                         int n0, int Tk) {
  load_tile_async<T, ROWS, HD>(stage, k, n0, Tk);
  if (WITH_V) load_tile_async<T, ROWS, HD>(stage + ROWS * (HD + kPad), v, n0, Tk);
  load_key_ok<ROWS>(key_ok, kmask_row, n0, Tk);
  cp_async_commit();
}

// dst[row] (=, or += with ADD) mul * acc for the warp's 16 rows from row0 (fp32, rows past
// nrows skipped); acc holds C fragments over NT * 8 columns.
template <int NT, int HD, bool ADD>
__device__ __forceinline__ void store_rows_f32(float* dst, const float (&acc)[NT][4], int row0, int nrows, float mul) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + lane / 4 + 8 * r;
    if (row >= nrows) continue;
    float* o = dst + int64_t(row) * HD + 2 * (lane % 4);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      o[t * 8] = (ADD ? o[t * 8] : 0.f) + acc[t][2 * r] * mul;
      o[t * 8 + 1] = (ADD ? o[t * 8 + 1] : 0.f) + acc[t][2 * r + 1] * mul;
    }
  }
}

// ------------------------------------------------------------------ masks and terms

// allowed(i, j) (SPEC: key mask and bottom-right causal) for query position i, given that
// key j exists and passes the key mask (key_ok).
__device__ __forceinline__ bool allowed(int i, int j, bool key_ok, int Tq, int Tk, bool causal) {
  return key_ok && (!causal || j <= i + Tk - Tq);
}

__device__ __forceinline__ bool in_support(int i, int j, bool key_ok, int Tq, int Tk, bool causal, bool exclude_self) {
  return allowed(i, j, key_ok, Tq, Tk, causal) && !(exclude_self && j == i + Tk - Tq);
}

// Exclusive end of the keys that query positions < pos_end may see.
__device__ __forceinline__ int key_end(int pos_end, int Tq, int Tk, bool causal) {
  if (!causal) return Tk;
  const int hi = pos_end + Tk - Tq;
  return hi < 0 ? 0 : (hi > Tk ? Tk : hi);
}

// Pointwise divergence term t and g = dD/dp; zero where p = r = 0 (off the support).
template <int DIV>
__device__ __forceinline__ void div_terms(float p, float r, float& t, float& g) {
  if (!(p > 0.f || r > 0.f)) {
    t = 0.f;
    g = 0.f;
    return;
  }
  const float log_p = logf(fmaxf(p, kTiny)), log_r = logf(fmaxf(r, kTiny));
  if (DIV == kJSD) {
    const float log_m = logf(fmaxf((p + r) * 0.5f, kTiny));
    t = 0.5f * (p * (log_p - log_m) + r * (log_r - log_m));
    g = 0.5f * (log_p - log_m);
  } else if (DIV == kKL) {
    t = r * (log_r - log_p);
    g = -__fdividef(r, fmaxf(p, kTiny));  // p <= 1: the fast division is exact to 2 ulp here
  } else {
    t = p * (log_p - log_r);
    g = log_p - log_r + 1.f;
  }
}

// ------------------------------------------------------------------ host-side dispatch

template <int V> struct IntTag { static constexpr int value = V; };

// f(T{}, IntTag<HD>{}) for the supported (dtype, head dim) pairs.
template <typename F> cudaError_t dispatch(DType dtype, int hd, F&& f) {
  if (hd != 64 && hd != 128) return cudaErrorInvalidValue;
  if (dtype == DType::kHalf) return hd == 64 ? f(__half{}, IntTag<64>{}) : f(__half{}, IntTag<128>{});
  return hd == 64 ? f(__nv_bfloat16{}, IntTag<64>{}) : f(__nv_bfloat16{}, IntTag<128>{});
}

template <typename F> cudaError_t dispatch_div(int divergence, F&& f) {
  switch (divergence) {
    case kJSD: return f(IntTag<kJSD>{});
    case kKL: return f(IntTag<kKL>{});
    case kReverseKL: return f(IntTag<kReverseKL>{});
    default: return cudaErrorInvalidValue;
  }
}

// Opt in to more than 48 KiB of dynamic shared memory, then launch.
template <typename K> cudaError_t set_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

}  // namespace ral
