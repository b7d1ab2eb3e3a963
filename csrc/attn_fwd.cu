// Flash forward: attention output, log-sum-exp and support mass, one pass over the keys.
// Also the old policy's statistics (lse_old, its support mass) on the cached rows, with
// WITH_OUT = false (no V, no output).
//
// Block = 4 warps = 64 query rows (16 per warp); keys in tiles of 64 through shared memory,
// double-buffered with cp.async (the next tile loads while this one is computed).
// Per tile: S = Q K^T (mma), mask, online softmax in registers, O += P V (mma, P from
// registers). Nothing Tq x Tk leaves the tile.
#include "kernel_utils.cuh"

namespace ral {
namespace {

constexpr int kBM = 64, kBN = 64;

template <int HD> constexpr size_t fwd_smem(bool with_out) {  // Q, then 2 stages of K (and V)
  return size_t((kBM + 2 * kBN * (with_out ? 2 : 1)) * (HD + kPad)) * 2 + 2 * kBN;
}

template <typename T, int HD, bool WITH_OUT>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_kernel(const FwdParams p) {
  constexpr int LD = HD + kPad, NT = kBN / 8, NV = HD / 8;
  constexpr int STAGE = kBN * LD * (WITH_OUT ? 2 : 1);  // K (and V) tile of one stage
  RAL_DYN_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = sQ + kBM * LD;  // stage s: K at sKV + s * STAGE, V right after it
  uint8_t* sKok = reinterpret_cast<uint8_t*>(sKV + 2 * STAGE);  // stage s at + s * kBN

  const int m0 = blockIdx.x * kBM;
  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H, kvh = h / (p.H / p.HK);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const T* q = static_cast<const T*>(p.q) + int64_t(bh) * p.rows * HD;
  const T* k = static_cast<const T*>(p.k) + int64_t(b * p.HK + kvh) * p.Tk * HD;
  const T* v = WITH_OUT ? static_cast<const T*>(p.v) + int64_t(b * p.HK + kvh) * p.Tk * HD : nullptr;
  const uint8_t* kmask = p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr;

  load_tile<T, kBM, HD>(sQ, q, m0, p.rows);
  int row[2], pos[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = m0 + warp * 16 + lane / 4 + 8 * r;
    pos[r] = p.pos0 + row[r];
  }
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f}, ls_i[2] = {0.f, 0.f};
  float acc[NV][4];
  zero(acc);

  const int last = m0 + kBM < p.rows ? m0 + kBM : p.rows;
  const int hi = key_end(p.pos0 + last, p.Tq, p.Tk, p.causal);
  if (hi > 0) issue_kv<T, kBN, HD, WITH_OUT>(sKV, sKok, k, v, kmask, 0, p.Tk);
  for (int n0 = 0, it = 0; n0 < hi; n0 += kBN, ++it) {
    const int stage = it & 1;
    const T* sK = sKV + stage * STAGE;
    const T* sV = sK + kBN * LD;  // only with WITH_OUT
    const uint8_t* sKok_t = sKok + stage * kBN;
    if (n0 + kBN < hi) {  // the other stage was released by the barrier ending the last tile
      issue_kv<T, kBN, HD, WITH_OUT>(sKV + (stage ^ 1) * STAGE, sKok + (stage ^ 1) * kBN, k, v, kmask, n0 + kBN, p.Tk);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile (and Q) visible to every warp

    float s[NT][4];
    zero(s);
    gemm_nt<T, NT, HD>(s, sQ + warp * 16 * LD, LD, sK, LD);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, jj = frag_col(t, e);
        const bool ok = allowed(pos[r], n0 + jj, sKok_t[jj], p.Tq, p.Tk, p.causal);
        s[t][e] = ok ? s[t][e] * p.scale : -INFINITY;
        mx[r] = fmaxf(mx[r], s[t][e]);
      }
    float corr[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_i[r], quad_max(mx[r]));
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;
      corr[r] = expf(m_i[r] - m_use[r]);
      m_i[r] = m_new;
    }
    float sum[2] = {0.f, 0.f}, sum_s[2] = {0.f, 0.f};
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, j = n0 + frag_col(t, e);
        s[t][e] = expf(s[t][e] - m_use[r]);
        sum[r] += s[t][e];
        if (j != pos[r] + p.Tk - p.Tq) sum_s[r] += s[t][e];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_i[r] = l_i[r] * corr[r] + quad_sum(sum[r]);
      ls_i[r] = ls_i[r] * corr[r] + quad_sum(sum_s[r]);
    }
    if (WITH_OUT) {
#pragma unroll
      for (int t = 0; t < NV; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] *= corr[e >> 1];
      gemm_pn<T, NT, NV>(acc, s, sV, LD);
    }
    __syncthreads();  // RAL_RELEASE_BARRIER(fwd): this stage is free for the next iteration's load
  }

  const int R = p.Tq - p.r0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= p.rows) continue;
    const float l_safe = l_i[r] > 0.f ? l_i[r] : 1.f;
    if (WITH_OUT) {
      T* o = static_cast<T*>(p.out) + (int64_t(bh) * p.rows + row[r]) * HD + 2 * (lane % 4);
#pragma unroll
      for (int t = 0; t < NV; ++t)
        *reinterpret_cast<uint32_t*>(o + t * 8) = pack2<T>(acc[t][2 * r] / l_safe, acc[t][2 * r + 1] / l_safe);
    }
    if (lane % 4 != 0) continue;
    p.lse[int64_t(bh) * p.rows + row[r]] = l_i[r] > 0.f ? m_i[r] + logf(l_safe) : INFINITY;
    if (p.mass != nullptr && pos[r] >= p.r0)
      p.mass[int64_t(bh) * R + pos[r] - p.r0] = p.exclude_self ? ls_i[r] / l_safe : (l_i[r] > 0.f ? 1.f : 0.f);
  }
}

}  // namespace

cudaError_t attn_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.B == 0 || p.H == 0) return cudaSuccess;
  return dispatch(p.dtype, p.hd, [&](auto t_tag, auto hd_tag) -> cudaError_t {
    using T = decltype(t_tag);
    constexpr int HD = decltype(hd_tag)::value;
    const dim3 grid((p.rows + kBM - 1) / kBM, p.B * p.H);
    const bool with_out = p.v != nullptr;
    const size_t smem = fwd_smem<HD>(with_out);
    auto kernel = with_out ? attn_fwd_kernel<T, HD, true> : attn_fwd_kernel<T, HD, false>;
    cudaError_t err = set_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    RAL_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p);
    return cudaGetLastError();
  });
}

}  // namespace ral
