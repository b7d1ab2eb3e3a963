// Flash backward with the divergence's row term folded into delta:
//   dS = alpha * (dP - delta),  delta = rowsum(dO * O) + w c_h / n   (computed by the caller)
// dk/dv: one block per (64-key block, KV head), warps own 16 keys each and work on
//   transposed tiles S^T = K Q^T, so dV += P^T dO and dK += dS^T Q need no atomics;
//   the GQA query heads of the KV head are summed in the same block.
// dq: one block per (64-row block, query head): dQ += dS K.
// All gradients are written once, in fp32 (deterministic). The streamed tiles (Q, dO for
// dk/dv; K, V for dq) are double-buffered with cp.async.
#include "kernel_utils.cuh"

namespace ral {
namespace {

constexpr int kBN = 64;  // keys per dk/dv block; rows per dq block

// Query tile of the dk/dv kernel and key tile of the dq kernel: 32 at HD = 128 keeps the
// fp32 accumulators in registers.
template <int HD> __host__ __device__ constexpr int inner_tile() { return HD == 128 ? 32 : 64; }

// dk/dv: K, V of the block, then 2 stages of (Q, dO) tiles and their lse / delta.
template <int HD> constexpr size_t dkdv_smem() {
  return size_t(2 * (kBN + 2 * inner_tile<HD>()) * (HD + kPad)) * 2 + 4 * inner_tile<HD>() * 4 + kBN;
}
// dq: Q, dO of the block, then 2 stages of (K, V) tiles and their key flags.
template <int HD> constexpr size_t dq_smem() {
  return size_t(2 * (kBN + 2 * inner_tile<HD>()) * (HD + kPad)) * 2 + 2 * inner_tile<HD>();
}

// Start loading row tile m0 of query head bh (Q, dO, lse, delta) into one pipeline stage.
template <typename T, int BM, int HD>
__device__ __forceinline__ void issue_rows(T* stage, float* stats, const BwdParams& p, int64_t bh, int m0) {
  load_tile_async<T, BM, HD>(stage, static_cast<const T*>(p.q) + bh * p.Tq * HD, m0, p.Tq);
  load_tile_async<T, BM, HD>(stage + BM * (HD + kPad), static_cast<const T*>(p.dout) + bh * p.Tq * HD, m0, p.Tq);
  load_vec<BM>(stats, p.lse + bh * p.Tq, m0, p.Tq, INFINITY);
  load_vec<BM>(stats + BM, p.delta + bh * p.Tq, m0, p.Tq, 0.f);
  cp_async_commit();
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dkdv_kernel(const BwdParams p) {
  constexpr int BM = inner_tile<HD>(), LD = HD + kPad, NM = BM / 8, NV = HD / 8;
  RAL_DYN_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBN * LD;
  T* sQdO = sV + kBN * LD;  // stage s: Q at sQdO + s * 2 * BM * LD, dO right after it
  float* sStats = reinterpret_cast<float*>(sQdO + 4 * BM * LD);  // stage s: lse, delta at + s * 2 * BM
  uint8_t* sKok = reinterpret_cast<uint8_t*>(sStats + 4 * BM);

  const int n0 = blockIdx.x * kBN;
  const int b = blockIdx.y / p.HK, kvh = blockIdx.y % p.HK, gqa = p.H / p.HK;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t kv_off = int64_t(blockIdx.y) * p.Tk * HD;
  load_tile<T, kBN, HD>(sK, static_cast<const T*>(p.k) + kv_off, n0, p.Tk);
  load_tile<T, kBN, HD>(sV, static_cast<const T*>(p.v) + kv_off, n0, p.Tk);
  load_key_ok<kBN>(sKok, p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr, n0, p.Tk);

  int key[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) key[r] = n0 + warp * 16 + lane / 4 + 8 * r;
  float dk[NV][4], dv[NV][4];
  zero(dk);
  zero(dv);
  int lo = 0;
  if (p.causal) {  // rows that see this block: i >= j - (Tk - Tq)
    lo = n0 - (p.Tk - p.Tq);
    lo = lo < 0 ? 0 : lo / BM * BM;
  }
  // One flat loop over (query head of this KV head, row tile), so the next tile's load
  // overlaps this one's math across head boundaries too.
  const int n_m = lo < p.Tq ? (p.Tq - lo + BM - 1) / BM : 0, total = gqa * n_m;
  if (total > 0) issue_rows<T, BM, HD>(sQdO, sStats, p, b * p.H + kvh * gqa, lo);
  for (int idx = 0; idx < total; ++idx) {
    const int stage = idx & 1, m0 = lo + (idx % n_m) * BM;
    const T* sQ = sQdO + stage * 2 * BM * LD;
    const T* sdO = sQ + BM * LD;
    const float* sLse = sStats + stage * 2 * BM;
    const float* sDelta = sLse + BM;
    if (idx + 1 < total) {  // the other stage was released by the barrier ending the last tile
      issue_rows<T, BM, HD>(sQdO + (stage ^ 1) * 2 * BM * LD, sStats + (stage ^ 1) * 2 * BM, p,
                            b * p.H + kvh * gqa + (idx + 1) / n_m, lo + ((idx + 1) % n_m) * BM);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile (and K, V, the key flags) visible to every warp

    float st[NM][4];  // S^T: rows = this warp's keys, columns = query rows
    zero(st);
    gemm_nt<T, NM, HD>(st, sK + warp * 16 * LD, LD, sQ, LD);
#pragma unroll
    for (int t = 0; t < NM; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ii = frag_col(t, e), jj = key[e >> 1] - n0;
        const bool ok = allowed(m0 + ii, n0 + jj, sKok[jj], p.Tq, p.Tk, p.causal);
        st[t][e] = ok ? expf(st[t][e] * p.scale - sLse[ii]) : 0.f;
      }
    gemm_pn<T, NM, NV>(dv, st, sdO, LD);
    float dpt[NM][4];
    zero(dpt);
    gemm_nt<T, NM, HD>(dpt, sV + warp * 16 * LD, LD, sdO, LD);
#pragma unroll
    for (int t = 0; t < NM; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[t][e] = st[t][e] * (dpt[t][e] - sDelta[frag_col(t, e)]);
    gemm_pn<T, NM, NV>(dk, dpt, sQ, LD);
    __syncthreads();  // RAL_RELEASE_BARRIER(dkdv): this stage is free for the next iteration's load
  }
  store_rows_f32<NV, HD, false>(p.dk + kv_off, dk, n0 + warp * 16, p.Tk, p.scale);
  store_rows_f32<NV, HD, false>(p.dv + kv_off, dv, n0 + warp * 16, p.Tk, 1.f);
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dq_kernel(const BwdParams p) {
  constexpr int BN = inner_tile<HD>(), LD = HD + kPad, NT = BN / 8, NV = HD / 8;
  RAL_DYN_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBN * LD;
  T* sKV = sdO + kBN * LD;  // stage s: K at sKV + s * 2 * BN * LD, V right after it
  uint8_t* sKok = reinterpret_cast<uint8_t*>(sKV + 4 * BN * LD);  // stage s at + s * BN

  const int m0 = blockIdx.x * kBN;
  const int bh = blockIdx.y, b = bh / p.H, kvh = (bh % p.H) / (p.H / p.HK);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t q_off = int64_t(bh) * p.Tq * HD, kv_off = int64_t(b * p.HK + kvh) * p.Tk * HD;
  const uint8_t* kmask = p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr;
  load_tile<T, kBN, HD>(sQ, static_cast<const T*>(p.q) + q_off, m0, p.Tq);
  load_tile<T, kBN, HD>(sdO, static_cast<const T*>(p.dout) + q_off, m0, p.Tq);
  int row[2];
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = m0 + warp * 16 + lane / 4 + 8 * r;
    lse[r] = row[r] < p.Tq ? p.lse[int64_t(bh) * p.Tq + row[r]] : INFINITY;
    delta[r] = row[r] < p.Tq ? p.delta[int64_t(bh) * p.Tq + row[r]] : 0.f;
  }
  float dq[NV][4];
  zero(dq);
  const int last = m0 + kBN < p.Tq ? m0 + kBN : p.Tq;
  const int hi = key_end(last, p.Tq, p.Tk, p.causal);
  const T* k = static_cast<const T*>(p.k) + kv_off;
  const T* v = static_cast<const T*>(p.v) + kv_off;
  if (hi > 0) issue_kv<T, BN, HD, true>(sKV, sKok, k, v, kmask, 0, p.Tk);
  for (int n0 = 0, it = 0; n0 < hi; n0 += BN, ++it) {
    const int stage = it & 1;
    const T* sK = sKV + stage * 2 * BN * LD;
    const T* sV = sK + BN * LD;
    const uint8_t* sKok_t = sKok + stage * BN;
    if (n0 + BN < hi) {
      issue_kv<T, BN, HD, true>(sKV + (stage ^ 1) * 2 * BN * LD, sKok + (stage ^ 1) * BN, k, v, kmask, n0 + BN, p.Tk);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    float s[NT][4], dp[NT][4];
    zero(s);
    zero(dp);
    gemm_nt<T, NT, HD>(s, sQ + warp * 16 * LD, LD, sK, LD);
    gemm_nt<T, NT, HD>(dp, sdO + warp * 16 * LD, LD, sV, LD);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, jj = frag_col(t, e);
        const bool ok = allowed(row[r], n0 + jj, sKok_t[jj], p.Tq, p.Tk, p.causal);
        s[t][e] = ok ? expf(s[t][e] * p.scale - lse[r]) * (dp[t][e] - delta[r]) : 0.f;
      }
    gemm_pn<T, NT, NV>(dq, s, sK, LD);
    __syncthreads();  // RAL_RELEASE_BARRIER(dq): this stage is free for the next iteration's load
  }
  store_rows_f32<NV, HD, false>(p.dq + q_off, dq, m0 + warp * 16, p.Tq, p.scale);
}

}  // namespace

cudaError_t attn_bwd(const BwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0) return cudaSuccess;
  return dispatch(p.dtype, p.hd, [&](auto t_tag, auto hd_tag) -> cudaError_t {
    using T = decltype(t_tag);
    constexpr int HD = decltype(hd_tag)::value;
    auto dkdv = attn_bwd_dkdv_kernel<T, HD>;
    auto dq = attn_bwd_dq_kernel<T, HD>;
    cudaError_t err = set_smem(dkdv, dkdv_smem<HD>());
    if (err == cudaSuccess) err = set_smem(dq, dq_smem<HD>());
    if (err != cudaSuccess) return err;
    if (p.Tk > 0) {
      RAL_LAUNCH(dkdv, dim3((p.Tk + kBN - 1) / kBN, p.B * p.HK), dim3(kThreads), dkdv_smem<HD>(), stream, p);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (p.Tq > 0) {
      RAL_LAUNCH(dq, dim3((p.Tq + kBN - 1) / kBN, p.B * p.H), dim3(kThreads), dq_smem<HD>(), stream, p);
      err = cudaGetLastError();
    }
    return err;
  });
}

}  // namespace ral
