// Divergence passes over the R divergence rows only (the cached rows r0 .. Tq - 1).
//
// Per head h and divergence row i the pipeline hands over an offset off_h (glue.py) such
// that the renormalized policy on the support S(i) is p_j = sum_{h in group} pi_hj with
// pi_hj = exp(s_hj - off_h) (no division by a support mass; off = +inf on rows without a
// divergence, so they add exactly zero); the old policy's r likewise. In a tile every head's
// pi_h is formed once and summed scaled by 2^100 (p^ = p 2^100: log p stays exact where p
// underflows, kernel_utils.cuh policy_terms), the divergence's terms come from log p / log r.
//
//   div_rows_kernel<BWD = false> (div_fwd): program = 64 rows x group x key split; partial
//     row sums of the divergence, E = sum_S p g and the old policy's mass (a check of a
//     cached lse_old) into [splits, B, G, R] (flash-decoding: short responses still fill
//     the GPU; the host adds the splits in a fixed order).
//   div_rows_kernel<BWD = true> (div_bwd): forms p^ and r^ of a tile, then per head
//     dS_h = w pi_h (g - E) into dq (its rows; atomically when the keys are split), into dk
//     (atomically, unless deterministic) and the row sums A_h = sum_S pi_h g, from which the
//     host forms b_h for the attention backward's delta.
//   div_keys_kernel (div_bwd, deterministic): program = 64 keys x (batch, or KV head for
//     per-head reductions); owns dk of its keys, so no atomics.
//
// A tile visits the heads in a fixed order (Visits): the old heads, the current heads
// (forming r^, p^), then, backward, the current heads again in reverse order, the first of
// which reuses the previous visit's tiles and scores: the current scores are formed twice per
// tile (once per-head policy), the old ones once. Each visit's Q tile (rows x HD), K tile
// (when the KV head changes) and offsets stream through two cp.async stages, one barrier per
// visit (two in the atomic backward, whose dk product reads a dS tile back transposed).
// Nothing Tq x Tk is written.
#include "kernel_utils.cuh"

namespace ral {
namespace {

constexpr int kBM = 64;        // rows of a row-major block (4 warps x 16 rows)
constexpr int kKeyBlock = 64;  // keys of a key-major block (4 warps x 16 keys)
template <int HD> __host__ __device__ constexpr int row_tile_keys() { return 64; }
template <int HD> __host__ __device__ constexpr int key_tile_rows() { return HD == 128 ? 32 : 64; }

// Q, K tiles (2 stages each), the dS tile (atomic backward), offsets (2 stages).
template <int HD> constexpr size_t rows_smem(bool bwd) {
  return size_t(2 * (kBM + row_tile_keys<HD>()) * (HD + kPad) + (bwd ? kBM * (row_tile_keys<HD>() + kPad) : 0)) * 2 +
         2 * kBM * 4;
}
// Q, K tiles (2 stages each), offsets (2 stages), E and w of the row tile (2 stages).
template <int HD> constexpr size_t keys_smem() {
  return size_t(2 * (key_tile_rows<HD>() + kKeyBlock) * (HD + kPad)) * 2 + 6 * key_tile_rows<HD>() * 4;
}
static_assert(rows_smem<128>(true) <= kMaxSmemAllArchs && keys_smem<128>() <= kMaxSmemAllArchs,
              "the divergence kernels must fit every arch's shared memory");

// The heads one tile visits, in order (j = 0 .. per_tile - 1): the n_old old heads, the n
// current heads (both summed into the policies), then, backward, the current heads in reverse
// order (the gradient; the first of them is the last summed head again).
struct Visits {
  int n, n_old, per_tile;
  __device__ Visits(int n_, int n_old_, bool bwd) : n(n_), n_old(n_old_), per_tile(n_old_ + n_ * (bwd ? 2 : 1)) {}
  __device__ bool old(int j) const { return j < n_old; }
  __device__ bool grad(int j) const { return j >= n_old + n; }
  __device__ bool last_sum(int j) const { return j == n_old + n - 1; }
  __device__ bool reuse(int j) const { return j == n_old + n; }  // same head, tiles and scores as j - 1
  __device__ int head(int grp, int j) const {  // head index on its side
    if (j < n_old) return grp * n_old + j;
    return grp * n + (j < n_old + n ? j - n_old : n - 1 - (j - n_old - n));
  }
};

// One policy's cached queries (row r of head h at q + ((b H + h) q_rows + q_row0 + r) HD),
// keys and offsets.
struct Side {
  const void* q;
  const void* k;
  const float* off;
  int64_t q_rows;
  int q_row0, H, HK;
  float scale2;  // sm_scale * log2(e)
};

__device__ __forceinline__ Side side_of(const DivParams& p, bool old) {
  if (old) return {p.q_old, p.k_old, p.off_old, p.Tq - p.r0, 0, p.Ho, p.Hko, p.old_scale * kLog2e};
  return {p.q, p.k, p.off, p.Tq, p.r0, p.Hq, p.Hk, p.scale * kLog2e};
}

__device__ __forceinline__ int kv_head(const DivParams& p, bool old, int h) {
  return old ? h / (p.Ho / p.Hko) : h / (p.Hq / p.Hk);
}

// Start loading one visit: rows [m0, m0 + QROWS) of head h's cached queries, keys
// [n0, n0 + KROWS) of its KV head (when load_k), and its offsets in log2 units (+inf past R);
// one cp.async group. The offsets are stored directly: the barrier that publishes the
// tiles publishes them too.
template <typename T, int QROWS, int KROWS, int HD>
__device__ __forceinline__ void issue_visit(T* sQ, T* sK, float* sOff, const DivParams& p, bool old, int b, int h,
                                            int m0, int n0, bool load_k) {
  const Side sd = side_of(p, old);
  const int R = p.Tq - p.r0;
  const int64_t head = int64_t(b) * sd.H + h;
  load_tile_async<T, QROWS, HD>(sQ, static_cast<const T*>(sd.q) + (head * sd.q_rows + sd.q_row0) * HD, m0, R);
  if (load_k) {
    const int64_t kvh = int64_t(b) * sd.HK + kv_head(p, old, h);
    load_tile_async<T, KROWS, HD>(sK, static_cast<const T*>(sd.k) + kvh * p.Tk * HD, n0, p.Tk);
  }
  cp_async_commit();
  for (int i = threadIdx.x; i < QROWS; i += kThreads) sOff[i] = m0 + i < R ? sd.off[head * R + m0 + i] * kLog2e : INFINITY;
}

// acc += exp2(s2 - off2 + 100) on the support bits (bit t*4+e of C element (t, e)).
// Row-major tiles take a row's offset per fragment row, key-major tiles per column.
template <int NT, bool ROWS>
__device__ __forceinline__ void add_scaled_policy(float (&acc)[NT][4], const float (&s)[NT][4], uint32_t supp,
                                                  float scale2, const float* tOff) {
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float off2 = ROWS ? tOff[warp * 16 + frag_row(e)] : tOff[frag_col(t, e)];
      if ((supp >> (t * 4 + e)) & 1u) acc[t][e] += exp2f(s[t][e] * scale2 - off2 + kPolicyScale2);
    }
}

// The gradient factor of one head on a tile, in place of its scores:
//   s <- scale * w pi_h (g - E) = scale * w pi^_h (coef - E 2^-100),
// and the row sums of pi_h g = pi^_h coef into a_part (row-major only). e_w holds E and w
// per fragment row (row-major) or per column (key-major, from shared memory).
template <int NT, bool ROWS>
__device__ __forceinline__ void head_grad(float (&s)[NT][4], const float (&coef)[NT][4], uint32_t supp, float scale2,
                                          const float* tOff, const float (&e_row)[2], const float (&w_row)[2],
                                          const float* sE, const float* sW, float scale, float (&a_part)[2]) {
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = frag_col(t, e);
      const float off2 = ROWS ? tOff[warp * 16 + frag_row(e)] : tOff[col];
      const float pi = ((supp >> (t * 4 + e)) & 1u) ? exp2f(s[t][e] * scale2 - off2 + kPolicyScale2) : 0.f;
      const float e_v = ROWS ? e_row[e >> 1] : sE[col], w_v = ROWS ? w_row[e >> 1] : sW[col];
      a_part[e >> 1] += pi * coef[t][e];
      s[t][e] = pi * (coef[t][e] - e_v * kPolicyUnscale) * (w_v * scale);
    }
}

template <int NT> __device__ __forceinline__ void copy(float (&dst)[NT][4], const float (&src)[NT][4]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[t][e] = src[t][e];
}

template <typename T, int HD, int DIV, bool BWD>
__global__ void __launch_bounds__(kThreads, 1) div_rows_kernel(const DivParams p) {
  constexpr int BM = kBM, BN = row_tile_keys<HD>(), LD = HD + kPad, LDS = BN + kPad, NT = BN / 8, NV = HD / 8;
  static_assert(NT * 4 <= 32, "support bits of a tile must fit 32 bits");
  RAL_DYN_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // stage s at + s * BM * LD
  T* sK = sQ + 2 * BM * LD;            // stage s at + s * BN * LD
  T* sDS = sK + 2 * BN * LD;           // backward: [BM rows][LDS]
  float* sOff = reinterpret_cast<float*>(sDS + (BWD ? BM * LDS : 0));  // stage s at + s * BM

  const int m0 = blockIdx.x * BM, bg = blockIdx.y, b = bg / p.G, grp = bg % p.G, split = blockIdx.z;
  const int R = p.Tq - p.r0, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const Visits vis(p.Hq / p.G, p.Ho / p.G, BWD);
  const uint8_t* kmask = p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr;
  const float scale2 = p.scale * kLog2e, old_scale2 = p.old_scale * kLog2e;
  int rr[2], pos[2];
  bool row_ok[2];
  float e_row[2] = {0.f, 0.f}, w_row[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rr[r] = m0 + warp * 16 + lane / 4 + 8 * r;
    pos[r] = p.r0 + rr[r];
    row_ok[r] = rr[r] < R;
    if (BWD && row_ok[r]) {
      e_row[r] = p.e[int64_t(bg) * R + rr[r]];
      w_row[r] = p.w[int64_t(bg) * R + rr[r]];
    }
  }
  const int last = m0 + BM < R ? m0 + BM : R;
  const int lo = split * p.split_keys;
  int hi = key_end(p.r0 + last, p.Tq, p.Tk, p.causal);
  hi = hi < lo + p.split_keys ? hi : lo + p.split_keys;
  const int n_full = unmasked_end<BN>(p.r0 + m0, p.Tq, p.Tk, p.causal, p.exclude_self);
  const int total = hi > lo ? (hi - lo + BN - 1) / BN * vis.per_tile : 0;
  const bool atomic_rows = p.splits > 1;  // several blocks add to this block's rows of dq and A

  float d_acc[2] = {0.f, 0.f}, e_acc[2] = {0.f, 0.f}, m_acc[2] = {0.f, 0.f};
  float p_hat[NT][4], r_hat[NT][4], s_keep[NT][4];  // backward: p_hat holds coef after the sums
  uint32_t supp = 0;
  int q_slot = 0, k_slot = 0;
  if (total > 0) issue_visit<T, BM, BN, HD>(sQ, sK, sOff, p, vis.old(0), b, vis.head(grp, 0), m0, lo, true);
  for (int idx = 0; idx < total; ++idx) {
    const int j = idx % vis.per_tile, n0 = lo + idx / vis.per_tile * BN;
    const bool old = vis.old(j);
    const int h = vis.head(grp, j);
    cp_async_wait<0>();
    // This visit's tiles are visible to every warp, and every warp is done with the last
    // visit (its dS tile too), so the stage the next load takes is free.
    __syncthreads();  // RAL_RELEASE_BARRIER(div_rows)
    const T* tQ = sQ + q_slot * BM * LD;
    const T* tK = sK + k_slot * BN * LD;
    const float* tOff = sOff + q_slot * BM;
    bool load_q = false, load_k = false;
    if (idx + 1 < total) {
      const int j1 = (idx + 1) % vis.per_tile;
      const bool old1 = vis.old(j1);
      const int h1 = vis.head(grp, j1);
      load_q = !vis.reuse(j1);
      load_k = load_q && (j1 == 0 || old1 != old || kv_head(p, old1, h1) != kv_head(p, old, h));
      if (load_q)
        issue_visit<T, BM, BN, HD>(sQ + (q_slot ^ 1) * BM * LD, sK + (k_slot ^ int(load_k)) * BN * LD,
                                   sOff + (q_slot ^ 1) * BM, p, old1, b, h1, m0, lo + (idx + 1) / vis.per_tile * BN,
                                   load_k);
    }

    if (j == 0) {
      supp = 0;
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, jk = n0 + frag_col(t, e);
          const bool kok = key_ok_at(kmask, jk, p.Tk);
          const bool ok = n0 + BN > n_full ? in_support(pos[r], jk, kok, p.Tq, p.Tk, p.causal, p.exclude_self) : kok;
          if (row_ok[r] && ok) supp |= 1u << (t * 4 + e);
        }
      zero(p_hat);
      zero(r_hat);
    }
    float s[NT][4];
    if (BWD && vis.reuse(j)) {
      copy(s, s_keep);
    } else {
      zero(s);
      gemm_nt<T, NT, HD>(s, tQ + warp * 16 * LD, LD, tK, LD);
    }
    if (!vis.grad(j)) {
      if (old) {
        add_scaled_policy<NT, true>(r_hat, s, supp, old_scale2, tOff);
      } else {
        add_scaled_policy<NT, true>(p_hat, s, supp, scale2, tOff);
        if (BWD && vis.last_sum(j)) copy(s_keep, s);
      }
      if (vis.last_sum(j)) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!((supp >> (t * 4 + e)) & 1u)) continue;
            float term, pg, coef;
            policy_terms<DIV>(p_hat[t][e], r_hat[t][e], term, pg, coef);
            if (BWD) {
              p_hat[t][e] = coef;
            } else {
              d_acc[e >> 1] += term;
              e_acc[e >> 1] += pg;
              m_acc[e >> 1] += r_hat[t][e] * kPolicyUnscale;
            }
          }
      }
    } else if (BWD) {
      const int64_t hq = int64_t(b) * p.Hq + h;
      float a_part[2] = {0.f, 0.f};
      head_grad<NT, true>(s, p_hat, supp, scale2, tOff, e_row, w_row, nullptr, nullptr, p.scale, a_part);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float a = quad_sum(a_part[r]);
        if (lane % 4 != 0 || !row_ok[r]) continue;
        float* dst = p.a + hq * R + rr[r];
        if (atomic_rows)
          atomicAdd(dst, a);
        else
          *dst += a;
      }
      {  // dq rows += dS K
        float upd[NV][4];
        zero(upd);
        gemm_pn<T, NT, NV>(upd, s, tK, LD);
        add_rows_f32<NV>(p.dq + (hq * p.Tq + p.r0) * HD, HD, upd, m0 + warp * 16, R, 1.f, atomic_rows);
      }
      if (!p.deterministic) {  // dk keys += dS^T Q, read back transposed from shared memory
        constexpr int WK = BN / 16, WC = kWarps / WK, NC = NV / WC;
        static_assert(WK * WC == kWarps && NC % 2 == 0, "warps must tile the dk update");
        store_frag<T, NT>(sDS, LDS, s, warp * 16);
        __syncthreads();  // the dS tile is complete
        const int kw = warp % WK, cw = warp / WK;
        float upd[NC][4];
        zero(upd);
        gemm_tn<T, BM, NC>(upd, sDS + kw * 16, LDS, tQ + cw * NC * 8, LD);
        const int64_t kvh = int64_t(b) * p.Hk + kv_head(p, false, h);
        add_rows_f32<NC>(p.dk + kvh * p.Tk * HD + cw * NC * 8, HD, upd, n0 + kw * 16, p.Tk, 1.f, true);
      }
    }
    q_slot ^= int(load_q);  // the stages of the next visit
    k_slot ^= int(load_k);
  }
  if (!BWD) {
    const int64_t out0 = (int64_t(split) * p.B * p.G + bg) * R;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float d = quad_sum(d_acc[r]), e = quad_sum(e_acc[r]), m = quad_sum(m_acc[r]);
      if (lane % 4 != 0 || !row_ok[r]) continue;
      p.div_part[out0 + rr[r]] = d;
      p.e_part[out0 + rr[r]] = e;
      p.mass_part[out0 + rr[r]] = m;
    }
  }
}

// E and w of rows [m0, m0 + BM) of group row bg (0 past R), stored directly (published by the
// next visit's barrier).
template <int BM>
__device__ __forceinline__ void load_e_w(float* dst, const DivParams& p, int64_t bg, int m0) {
  const int R = p.Tq - p.r0;
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    const bool ok = m0 + i < R;
    dst[i] = ok ? p.e[bg * R + m0 + i] : 0.f;
    dst[BM + i] = ok ? p.w[bg * R + m0 + i] : 0.f;
  }
}

// dk[kv head][keys of this warp] += acc (the block owns these keys), then acc = 0.
template <int NV, int HD>
__device__ __forceinline__ void flush_dk(float (&acc)[NV][4], const DivParams& p, int b, int kvh, int n0) {
  const int warp = threadIdx.x / kWarpSize;
  add_rows_f32<NV>(p.dk + (int64_t(b) * p.Hk + kvh) * p.Tk * HD, HD, acc, n0 + warp * 16, p.Tk, 1.f, false);
  zero(acc);
}

// dk of one block of 64 keys for its owner (the batch, or one KV head for per-head
// reductions), added once per KV head: the deterministic backward. Tiles are transposed:
// rows = the block's keys (16 per warp), columns = cached query rows.
template <typename T, int HD, int DIV>
__global__ void __launch_bounds__(kThreads, 1) div_keys_kernel(const DivParams p) {
  constexpr int BN = kKeyBlock, BM = key_tile_rows<HD>(), LD = HD + kPad, NM = BM / 8, NV = HD / 8;
  static_assert(NM * 4 <= 32, "support bits of a tile must fit 32 bits");
  RAL_DYN_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);                         // stage s at + s * BM * LD
  T* sK = sQ + 2 * BM * LD;                                   // stage s at + s * BN * LD
  float* sOff = reinterpret_cast<float*>(sK + 2 * BN * LD);  // stage s at + s * BM
  float* sEW = sOff + 2 * BM;                                 // row tile c: E, w at + (c & 1) * 2 * BM

  const bool per_head = p.G > 1;  // "none": groups are single heads; the block owns one KV head
  const int n0 = blockIdx.x * BN, gqa = p.Hq / p.Hk;
  const int b = per_head ? blockIdx.y / p.Hk : blockIdx.y;
  const int grp_lo = per_head ? (blockIdx.y % p.Hk) * gqa : 0, n_grp = per_head ? gqa : 1;
  const int R = p.Tq - p.r0, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const Visits vis(p.Hq / p.G, p.Ho / p.G, true);
  const uint8_t* kmask = p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr;
  const float scale2 = p.scale * kLog2e, old_scale2 = p.old_scale * kLog2e;
  int key[2];
  bool kok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    key[r] = n0 + warp * 16 + lane / 4 + 8 * r;
    kok[r] = key_ok_at(kmask, key[r], p.Tk);
  }
  int m_lo = 0;
  if (p.causal) {  // cached rows that see this key block: r0 + m >= n0 - (Tk - Tq)
    m_lo = n0 - (p.Tk - p.Tq) - p.r0;
    m_lo = m_lo < 0 ? 0 : m_lo / BM * BM;
  }
  const int n_rt = R > m_lo ? (R - m_lo + BM - 1) / BM : 0;
  const int total = n_grp * n_rt * vis.per_tile;

  float p_hat[NM][4], r_hat[NM][4], s_keep[NM][4], dk[NV][4];  // p_hat holds coef after the sums
  zero(dk);
  int dk_head = -1;  // the KV head dk accumulates for
  uint32_t supp = 0;
  int q_slot = 0, k_slot = 0;
  if (total > 0) {
    issue_visit<T, BM, BN, HD>(sQ, sK, sOff, p, vis.old(0), b, vis.head(grp_lo, 0), m_lo, n0, true);
    load_e_w<BM>(sEW, p, int64_t(b) * p.G + grp_lo, m_lo);
  }
  for (int idx = 0; idx < total; ++idx) {
    const int c = idx / vis.per_tile, j = idx % vis.per_tile;  // row tile counter, visit
    const int grp = grp_lo + c / n_rt, m0 = m_lo + c % n_rt * BM;
    const bool old = vis.old(j);
    const int h = vis.head(grp, j);
    cp_async_wait<0>();
    // This visit's tiles are visible to every warp, and every warp is done with the last
    // visit, so the stage the next load takes is free.
    __syncthreads();  // RAL_RELEASE_BARRIER(div_keys)
    const T* tQ = sQ + q_slot * BM * LD;
    const T* tK = sK + k_slot * BN * LD;
    const float* tOff = sOff + q_slot * BM;
    const float* sE = sEW + (c & 1) * 2 * BM;
    bool load_q = false, load_k = false;
    if (idx + 1 < total) {
      const int c1 = (idx + 1) / vis.per_tile, j1 = (idx + 1) % vis.per_tile;
      const int grp1 = grp_lo + c1 / n_rt, m1 = m_lo + c1 % n_rt * BM;
      const bool old1 = vis.old(j1);
      const int h1 = vis.head(grp1, j1);
      load_q = !vis.reuse(j1);
      load_k = load_q && (old1 != old || kv_head(p, old1, h1) != kv_head(p, old, h));  // the block's keys stay
      if (load_q)
        issue_visit<T, BM, BN, HD>(sQ + (q_slot ^ 1) * BM * LD, sK + (k_slot ^ int(load_k)) * BN * LD,
                                   sOff + (q_slot ^ 1) * BM, p, old1, b, h1, m1, n0, load_k);
      if (j1 == 0) load_e_w<BM>(sEW + (c1 & 1) * 2 * BM, p, int64_t(b) * p.G + grp1, m1);
    }

    if (j == 0) {
      const bool masked = n0 + BN > p.Tk || p.exclude_self || (p.causal && p.r0 + m0 + p.Tk - p.Tq < n0 + BN - 1);
      supp = 0;
#pragma unroll
      for (int t = 0; t < NM; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, row = m0 + frag_col(t, e);
          const bool ok = masked ? in_support(p.r0 + row, key[r], kok[r], p.Tq, p.Tk, p.causal, p.exclude_self) : kok[r];
          if (row < R && ok) supp |= 1u << (t * 4 + e);
        }
      zero(p_hat);
      zero(r_hat);
    }
    float s[NM][4];  // S^T: this warp's 16 keys x BM rows
    if (vis.reuse(j)) {
      copy(s, s_keep);
    } else {
      zero(s);
      gemm_nt<T, NM, HD>(s, tK + warp * 16 * LD, LD, tQ, LD);
    }
    if (!vis.grad(j)) {
      if (old) {
        add_scaled_policy<NM, false>(r_hat, s, supp, old_scale2, tOff);
      } else {
        add_scaled_policy<NM, false>(p_hat, s, supp, scale2, tOff);
        if (vis.last_sum(j)) copy(s_keep, s);
      }
      if (vis.last_sum(j)) {
#pragma unroll
        for (int t = 0; t < NM; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float term, pg, coef = 0.f;
            if ((supp >> (t * 4 + e)) & 1u) policy_terms<DIV>(p_hat[t][e], r_hat[t][e], term, pg, coef);
            p_hat[t][e] = coef;
          }
      }
    } else {
      const float none[2] = {0.f, 0.f};
      float a_unused[2] = {0.f, 0.f};
      head_grad<NM, false>(s, p_hat, supp, scale2, tOff, none, none, sE, sE + BM, p.scale, a_unused);
      const int kvh = kv_head(p, false, h);
      if (kvh != dk_head) {
        if (dk_head >= 0) flush_dk<NV, HD>(dk, p, b, dk_head, n0);
        dk_head = kvh;
      }
      gemm_pn<T, NM, NV>(dk, s, tQ, LD);  // dk (16 keys x HD) += dS^T Q
    }
    q_slot ^= int(load_q);  // the stages of the next visit
    k_slot ^= int(load_k);
  }
  if (dk_head >= 0) flush_dk<NV, HD>(dk, p, b, dk_head, n0);
}

template <typename F> cudaError_t with_kernels(const DivParams& p, F&& f) {
  return dispatch(p.dtype, p.hd, [&](auto t_tag, auto hd_tag) -> cudaError_t {
    return dispatch_div(p.divergence, [&](auto div_tag) -> cudaError_t {
      using T = decltype(t_tag);
      constexpr int HD = decltype(hd_tag)::value, DIV = decltype(div_tag)::value;
      return f(div_rows_kernel<T, HD, DIV, false>, div_rows_kernel<T, HD, DIV, true>, div_keys_kernel<T, HD, DIV>,
               rows_smem<HD>(false), rows_smem<HD>(true), keys_smem<HD>());
    });
  });
}

bool bad_splits(const DivParams& p) {
  return p.splits < 1 || p.split_keys < 1 || int64_t(p.splits) * p.split_keys < p.Tk || p.splits > 65535;
}

}  // namespace

cudaError_t div_fwd(const DivParams& p, cudaStream_t stream) {
  const int R = p.Tq - p.r0;
  if (R <= 0 || p.B == 0 || p.G == 0) return cudaSuccess;
  if (bad_splits(p)) return cudaErrorInvalidValue;
  return with_kernels(p, [&](auto fwd, auto, auto, size_t smem, size_t, size_t) -> cudaError_t {
    cudaError_t err = set_smem(fwd, smem);
    if (err != cudaSuccess) return err;
    RAL_LAUNCH(fwd, dim3((R + kBM - 1) / kBM, p.B * p.G, p.splits), dim3(kThreads), smem, stream, p);
    return cudaGetLastError();
  });
}

cudaError_t div_bwd(const DivParams& p, cudaStream_t stream) {
  const int R = p.Tq - p.r0;
  if (R <= 0 || p.B == 0 || p.G == 0) return cudaSuccess;
  if (bad_splits(p) || (p.deterministic && p.splits != 1)) return cudaErrorInvalidValue;
  return with_kernels(p, [&](auto, auto rows, auto keys, size_t, size_t rows_bytes, size_t keys_bytes) -> cudaError_t {
    cudaError_t err = set_smem(rows, rows_bytes);
    if (err == cudaSuccess) err = set_smem(keys, keys_bytes);
    if (err != cudaSuccess) return err;
    RAL_LAUNCH(rows, dim3((R + kBM - 1) / kBM, p.B * p.G, p.splits), dim3(kThreads), rows_bytes, stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess || !p.deterministic || p.Tk == 0) return err;
    const int owners = p.G > 1 ? p.B * p.Hk : p.B;
    RAL_LAUNCH(keys, dim3((p.Tk + kKeyBlock - 1) / kKeyBlock, owners), dim3(kThreads), keys_bytes, stream, p);
    return cudaGetLastError();
  });
}

}  // namespace ral
