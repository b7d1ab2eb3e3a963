// Flash-attention-2 backward over all rows, adding into the fp32 buffers the pipeline
// allocates (dq and dk already hold the divergence pass's share):
//   dS = P (dP - delta_eff),  delta_eff = rowsum(dO * O) + w b_h   (formed by the host),
// so the divergence's -alpha_h b_h term costs no matmul here.
//
// attn_bwd_kv_kernel: one block per (64 keys, KV head); warps own 16 keys each and work on
//   transposed tiles S^T = K Q^T, so dV += P^T dO and dK += dS^T Q accumulate in registers;
//   the GQA query heads of the KV head are summed in the same block. With ATOMIC_DQ (the
//   default) it also forms dQ += dS K from the dS tile read back transposed from shared
//   memory, added atomically: 5 matmuls per tile, as FlashAttention-2.
// attn_bwd_dq_kernel (deterministic = true, with ATOMIC_DQ off): one block per (64 rows,
//   query head) owns its rows of dQ: no atomics, bit-reproducible (3 more matmuls per tile).
// Streamed tiles (Q, dO, lse, delta in the key-major kernel; K, V in the dq kernel) are
// double-buffered with cp.async, one barrier per tile (two with ATOMIC_DQ). exp2 with the
// scale folded in; only tiles on the causal diagonal or across the sequence end are masked.
#include "kernel_utils.cuh"

namespace ral {
namespace {

constexpr int kBN = 64;  // keys of a key-major block; rows of a dq block

// Query tile of the key-major kernel and key tile of the dq kernel: 32 at HD = 128 keeps the
// fp32 accumulators in registers.
template <int HD> __host__ __device__ constexpr int inner_tile() { return HD == 128 ? 32 : 64; }

// K, V of the block, 2 stages of (Q, dO) tiles and of their lse / delta, the dS tile.
template <int HD> constexpr size_t kv_smem(bool atomic_dq) {
  return size_t(2 * (kBN + 2 * inner_tile<HD>()) * (HD + kPad) + (atomic_dq ? kBN * (inner_tile<HD>() + kPad) : 0)) *
             2 +
         4 * inner_tile<HD>() * 4;
}
// Q, dO of the block, 2 stages of (K, V) tiles and of their key flags.
template <int HD> constexpr size_t dq_smem() {
  return size_t(2 * (kBN + 2 * inner_tile<HD>()) * (HD + kPad)) * 2 + 2 * inner_tile<HD>();
}
static_assert(kv_smem<128>(true) <= kMaxSmemAllArchs && dq_smem<128>() <= kMaxSmemAllArchs,
              "the attention backward must fit every arch's shared memory");

// Start loading row tile m0 of query head bh (Q, dO; lse in log2 units, delta) into one
// stage: one cp.async group; the statistics are stored directly (published by the barrier
// that publishes the tiles).
template <typename T, int BM, int HD>
__device__ __forceinline__ void issue_rows(T* stage, float* stats, const BwdParams& p, int64_t bh, int m0) {
  load_tile_async<T, BM, HD>(stage, static_cast<const T*>(p.q) + bh * p.Tq * HD, m0, p.Tq);
  load_tile_async<T, BM, HD>(stage + BM * (HD + kPad), static_cast<const T*>(p.dout) + bh * p.Tq * HD, m0, p.Tq);
  cp_async_commit();
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    const bool ok = m0 + i < p.Tq;
    RAL_SHARED_STORE_POINT();
    stats[i] = ok ? p.lse[bh * p.Tq + m0 + i] * kLog2e : INFINITY;
    stats[BM + i] = ok ? p.delta[bh * p.Tq + m0 + i] : 0.f;
  }
}

template <typename T, int HD, bool ATOMIC_DQ>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_kv_kernel(const BwdParams p) {
  constexpr int BM = inner_tile<HD>(), LD = HD + kPad, LDS = BM + kPad, NM = BM / 8, NV = HD / 8;
  RAL_DYN_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBN * LD;
  T* sQdO = sV + kBN * LD;       // stage s: Q at + s * 2 * BM * LD, dO right after it
  T* sDS = sQdO + 4 * BM * LD;  // ATOMIC_DQ: dS^T [keys][LDS]
  float* sStats = reinterpret_cast<float*>(sDS + (ATOMIC_DQ ? kBN * LDS : 0));  // stage s: lse2, delta at + s * 2 * BM

  const int n0 = blockIdx.x * kBN;
  const int b = blockIdx.y / p.HK, kvh = blockIdx.y % p.HK, gqa = p.H / p.HK;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t kv_off = int64_t(blockIdx.y) * p.Tk * HD;
  const float qk2 = p.scale * kLog2e;
  const uint8_t* kmask = p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr;
  int key[2];
  bool kok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    key[r] = n0 + warp * 16 + lane / 4 + 8 * r;
    kok[r] = key_ok_at(kmask, key[r], p.Tk);
  }
  float dk[NV][4], dv[NV][4];
  zero(dk);
  zero(dv);
  int lo = 0;
  if (p.causal) {  // rows that see this block: i >= j - (Tk - Tq)
    lo = n0 - (p.Tk - p.Tq);
    lo = lo < 0 ? 0 : lo / BM * BM;
  }
  // Row tiles from m_full on see every key of the block (the causal mask allows them all).
  const int m_full = n0 + kBN > p.Tk ? INT32_MAX : (p.causal ? n0 + kBN - 1 - (p.Tk - p.Tq) : 0);
  // One flat loop over (query head of this KV head, row tile), so the next tile's load
  // overlaps this one's math across head boundaries too.
  const int n_m = lo < p.Tq ? (p.Tq - lo + BM - 1) / BM : 0, total = gqa * n_m;
  load_tile_async<T, kBN, HD>(sK, static_cast<const T*>(p.k) + kv_off, n0, p.Tk);  // K, V join the first group
  load_tile_async<T, kBN, HD>(sV, static_cast<const T*>(p.v) + kv_off, n0, p.Tk);
  if (total > 0)
    issue_rows<T, BM, HD>(sQdO, sStats, p, int64_t(b) * p.H + kvh * gqa, lo);
  else
    cp_async_commit();
  for (int idx = 0; idx < total; ++idx) {
    const int stage = idx & 1, m0 = lo + (idx % n_m) * BM;
    const int64_t bh = int64_t(b) * p.H + kvh * gqa + idx / n_m;
    const T* sQ = sQdO + stage * 2 * BM * LD;
    const T* sdO = sQ + BM * LD;
    const float* sLse2 = sStats + stage * 2 * BM;
    const float* sDelta = sLse2 + BM;
    cp_async_wait<0>();
    // This tile is visible to every warp, and every warp is done with the last one (its
    // stage and the dS tile), so the next load may take the other stage.
    __syncthreads();  // RAL_RELEASE_BARRIER(dkdv)
    if (idx + 1 < total)
      issue_rows<T, BM, HD>(sQdO + (stage ^ 1) * 2 * BM * LD, sStats + (stage ^ 1) * 2 * BM, p,
                            int64_t(b) * p.H + kvh * gqa + (idx + 1) / n_m, lo + ((idx + 1) % n_m) * BM);

    float st[NM][4];  // S^T, then P^T: rows = this warp's keys, columns = query rows
    zero(st);
    gemm_nt<T, NM, HD>(st, sK + warp * 16 * LD, LD, sQ, LD);
    const bool masked = m0 < m_full;
#pragma unroll
    for (int t = 0; t < NM; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ii = frag_col(t, e), r = e >> 1;
        const bool ok = masked ? allowed(m0 + ii, key[r], kok[r], p.Tq, p.Tk, p.causal) : kok[r];
        st[t][e] = ok ? exp2f(st[t][e] * qk2 - sLse2[ii]) : 0.f;
      }
    gemm_pn<T, NM, NV>(dv, st, sdO, LD);
    float dpt[NM][4];  // dP^T, then dS^T
    zero(dpt);
    gemm_nt<T, NM, HD>(dpt, sV + warp * 16 * LD, LD, sdO, LD);
#pragma unroll
    for (int t = 0; t < NM; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[t][e] = st[t][e] * (dpt[t][e] - sDelta[frag_col(t, e)]);
    gemm_pn<T, NM, NV>(dk, dpt, sQ, LD);
    if (ATOMIC_DQ) {  // dQ rows += dS K: warps tile (BM / 16) row blocks x WC column blocks
      constexpr int WR = BM / 16, WC = kWarps / WR, NC = NV / WC, CH = NC < 4 ? NC : 4;
      static_assert(WR * WC == kWarps && NC % CH == 0 && CH % 2 == 0, "warps must tile the dq update");
      store_frag<T, NM>(sDS, LDS, dpt, warp * 16);
      __syncthreads();  // the dS tile is complete
      const int rw = warp % WR, cw = warp / WR;
#pragma unroll
      for (int c0 = 0; c0 < NC; c0 += CH) {  // column chunks keep the update's registers few
        const int col = (cw * NC + c0) * 8;
        float upd[CH][4];
        zero(upd);
        gemm_tn<T, kBN, CH>(upd, sDS + rw * 16, LDS, sK + col, LD);
        add_rows_f32<CH>(p.dq + bh * p.Tq * HD + col, HD, upd, m0 + rw * 16, p.Tq, p.scale, true);
      }
    }
  }
  add_rows_f32<NV>(p.dk + kv_off, HD, dk, n0 + warp * 16, p.Tk, p.scale, false);
  add_rows_f32<NV>(p.dv + kv_off, HD, dv, n0 + warp * 16, p.Tk, 1.f, false);
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dq_kernel(const BwdParams p) {
  constexpr int BN = inner_tile<HD>(), LD = HD + kPad, NT = BN / 8, NV = HD / 8;
  RAL_DYN_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBN * LD;
  T* sKV = sdO + kBN * LD;                                        // stage s: K at + s * 2 * BN * LD, V after it
  uint8_t* sKok = reinterpret_cast<uint8_t*>(sKV + 4 * BN * LD);  // stage s at + s * BN

  const int m0 = blockIdx.x * kBN;
  const int64_t bh = blockIdx.y;
  const int b = int(bh / p.H), kvh = int(bh % p.H) / (p.H / p.HK);
  const int warp = threadIdx.x / kWarpSize;
  const int64_t q_off = bh * p.Tq * HD, kv_off = (int64_t(b) * p.HK + kvh) * p.Tk * HD;
  const uint8_t* kmask = p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr;
  const float qk2 = p.scale * kLog2e;
  int row[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = m0 + warp * 16 + (threadIdx.x % kWarpSize) / 4 + 8 * r;
    lse2[r] = row[r] < p.Tq ? p.lse[bh * p.Tq + row[r]] * kLog2e : INFINITY;
    delta[r] = row[r] < p.Tq ? p.delta[bh * p.Tq + row[r]] : 0.f;
  }
  float dq[NV][4];
  zero(dq);
  const int last = m0 + kBN < p.Tq ? m0 + kBN : p.Tq;
  const int hi = key_end(last, p.Tq, p.Tk, p.causal);
  const int n_full = unmasked_end<BN>(m0, p.Tq, p.Tk, p.causal, false);
  const T* k = static_cast<const T*>(p.k) + kv_off;
  const T* v = static_cast<const T*>(p.v) + kv_off;
  load_tile_async<T, kBN, HD>(sQ, static_cast<const T*>(p.q) + q_off, m0, p.Tq);  // Q, dO join the first group
  load_tile_async<T, kBN, HD>(sdO, static_cast<const T*>(p.dout) + q_off, m0, p.Tq);
  if (hi > 0)
    issue_kv<T, BN, HD, true>(sKV, sKok, k, v, kmask, 0, p.Tk);
  else
    cp_async_commit();
  for (int n0 = 0, it = 0; n0 < hi; n0 += BN, ++it) {
    const int stage = it & 1;
    const T* sK = sKV + stage * 2 * BN * LD;
    const T* sV = sK + BN * LD;
    const uint8_t* sKok_t = sKok + stage * BN;
    cp_async_wait<0>();
    // Tile `it` is visible to every warp, and every warp is done with tile it - 1, whose
    // stage the next load reuses.
    __syncthreads();  // RAL_RELEASE_BARRIER(dq)
    if (n0 + BN < hi)
      issue_kv<T, BN, HD, true>(sKV + (stage ^ 1) * 2 * BN * LD, sKok + (stage ^ 1) * BN, k, v, kmask, n0 + BN, p.Tk);
    float s[NT][4], dp[NT][4];
    zero(s);
    zero(dp);
    gemm_nt<T, NT, HD>(s, sQ + warp * 16 * LD, LD, sK, LD);
    gemm_nt<T, NT, HD>(dp, sdO + warp * 16 * LD, LD, sV, LD);
    const bool masked = n0 + BN > n_full;
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, jj = frag_col(t, e);
        const bool ok = masked ? allowed(row[r], n0 + jj, sKok_t[jj], p.Tq, p.Tk, p.causal)
                               : (kmask == nullptr || sKok_t[jj]);
        s[t][e] = ok ? exp2f(s[t][e] * qk2 - lse2[r]) * (dp[t][e] - delta[r]) : 0.f;
      }
    gemm_pn<T, NT, NV>(dq, s, sK, LD);
  }
  add_rows_f32<NV>(p.dq + q_off, HD, dq, m0 + warp * 16, p.Tq, p.scale, false);
}

}  // namespace

cudaError_t attn_bwd(const BwdParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0) return cudaSuccess;
  return dispatch(p.dtype, p.hd, [&](auto t_tag, auto hd_tag) -> cudaError_t {
    using T = decltype(t_tag);
    constexpr int HD = decltype(hd_tag)::value;
    auto kv = p.deterministic ? attn_bwd_kv_kernel<T, HD, false> : attn_bwd_kv_kernel<T, HD, true>;
    auto dq = attn_bwd_dq_kernel<T, HD>;
    const size_t kv_bytes = kv_smem<HD>(!p.deterministic);
    cudaError_t err = set_smem(kv, kv_bytes);
    if (err == cudaSuccess) err = set_smem(dq, dq_smem<HD>());
    if (err != cudaSuccess) return err;
    if (p.Tk > 0) {
      RAL_LAUNCH(kv, dim3((p.Tk + kBN - 1) / kBN, p.B * p.HK), dim3(kThreads), kv_bytes, stream, p);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (p.deterministic && p.Tq > 0) {
      RAL_LAUNCH(dq, dim3((p.Tq + kBN - 1) / kBN, p.B * p.H), dim3(kThreads), dq_smem<HD>(), stream, p);
      err = cudaGetLastError();
    }
    return err;
  });
}

}  // namespace ral
