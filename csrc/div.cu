// Divergence passes over the R divergence rows only (the cached rows r0 .. Tq - 1).
//
// Per head h and divergence row i the pipeline hands over an offset off_h (glue.py) such
// that the renormalized policy on the support S(i) is p_j = sum_{h in group} pi_hj with
// pi_hj = exp(s_hj - off_h) (no division by a support mass; off = +inf on rows without a
// divergence, so they add exactly zero); the old policy's r likewise. In a tile every head's
// x_h = log2 pi_h is formed once and summed in log space, as a running maximum m and
// sum_h 2^(x_h - m) per element (the first head costs no exp2, every other one exp2): log p
// is exact however small p is, and the divergence's terms come from log p / log r
// (kernel_utils.cuh policy_terms), with no clamp.
//
//   div_rows_kernel<BWD = false> (div_fwd): program = 64 rows x group x key split; partial
//     row sums of the divergence, E = sum_S p g and the old policy's mass (a check of a
//     cached lse_old) into [splits, B, G, R] (flash-decoding: short responses still fill
//     the GPU; the host adds the splits in a fixed order).
//   div_rows_kernel<BWD = true> (div_bwd): forms log p and log r of a tile, then per head
//     dS_h = w pi_h (g - E) = w (pi_h / p) (p g - p E), with pi_h / p = 2^(x_h - log2 p) <= 1,
//     into dq (its rows; atomically when the keys are split), into dk (atomically, unless
//     deterministic) and the row sums A_h = sum_S pi_h g, from which the host forms b_h for
//     the attention backward's delta.
//   div_keys_kernel (div_bwd, deterministic): program = 64 keys x (batch, or KV head for
//     per-head reductions); owns dk of its keys, so no atomics.
//
// A tile visits the heads in a fixed order (Visits): the old heads, the current heads (their
// sums give log r, log p), then, backward, the current heads again in reverse order (the
// gradient); the last summed head's visit also does its gradient, so the current scores are
// formed 2n - 1 times per tile for n heads in a group (once for a per-head policy), the old
// ones once. Each visit's Q tile (rows x HD), K tile (when the KV head changes) and offsets
// stream through two cp.async stages, one barrier per visit (two in the atomic backward,
// whose dk product reads a dS tile back transposed). Nothing Tq x Tk is written.
#include "kernel_utils.cuh"

namespace ral {
namespace {

constexpr int kBM = 64;        // rows of a row-major block (4 warps x 16 rows)
constexpr int kKeyBlock = 64;  // keys of a key-major block (4 warps x 16 keys)
template <int HD> __host__ __device__ constexpr int row_tile_keys() { return 64; }
template <int HD> __host__ __device__ constexpr int key_tile_rows() { return 32; }

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
// current heads (both summed into the policies), then, backward, the current heads n - 2 .. 0
// (the gradient; head n - 1's gradient rides on its summing visit).
struct Visits {
  int n, n_old, per_tile;
  __device__ Visits(int n_, int n_old_, bool bwd) : n(n_), n_old(n_old_), per_tile(n_old_ + (bwd ? 2 * n_ - 1 : n_)) {}
  __device__ bool old(int j) const { return j < n_old; }
  __device__ bool first(int j) const { return j == 0 || j == n_old; }  // the first head of its side
  __device__ bool sums(int j) const { return j < n_old + n; }
  __device__ bool last_sum(int j) const { return j == n_old + n - 1; }
  __device__ bool grad(int j) const { return j >= n_old + n - 1; }  // backward only
  __device__ int head(int grp, int j) const {  // head index on its side
    if (j < n_old) return grp * n_old + j;
    return grp * n + (j < n_old + n ? j - n_old : 2 * n + n_old - 2 - j);
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
  for (int i = threadIdx.x; i < QROWS; i += kThreads) {
    RAL_SHARED_STORE_POINT();
    sOff[i] = m0 + i < R ? sd.off[head * R + m0 + i] * kLog2e : INFINITY;
  }
}

// The offset (log2 units) of a fragment element's row: per fragment row in a row-major tile,
// per column in a key-major one.
template <bool ROWS>
__device__ __forceinline__ float row_off(const float* tOff, int t, int e) {
  return ROWS ? tOff[threadIdx.x / kWarpSize * 16 + frag_row(e)] : tOff[frag_col(t, e)];
}

// One head's x = log2 pi = s2 - off2 into a policy's log-space sum on the support bits (bit
// t*4+e of C element (t, e)): sum_h 2^x_h = 2^m * sum, m the running maximum (-inf, sum 0:
// nothing yet). The first head of a side sets (m, sum) without an exp2.
template <int NT, bool ROWS>
__device__ __forceinline__ void add_log_policy(float (&m)[NT][4], float (&sum)[NT][4], const float (&s)[NT][4],
                                               uint32_t supp, bool first, float scale2, const float* tOff) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (!((supp >> (t * 4 + e)) & 1u)) continue;
      const float x = s[t][e] * scale2 - row_off<ROWS>(tOff, t, e);
      if (first) {
        m[t][e] = x;
        sum[t][e] = x == -INFINITY ? 0.f : 1.f;
      } else if (x != -INFINITY) {  // -inf: a row without divergence
        const float d = x - m[t][e], ex = exp2f(-fabsf(d));
        sum[t][e] = d > 0.f ? fmaf(sum[t][e], ex, 1.f) : sum[t][e] + ex;
        m[t][e] = fmaxf(m[t][e], x);
      }
    }
}

// No head summed yet: (m, sum) = (-inf, 0) for both policies, off the support too.
template <int NT>
__device__ __forceinline__ void empty_policies(float (&pm)[NT][4], float (&ps)[NT][4], float (&rm)[NT][4],
                                               float (&rs)[NT][4]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      pm[t][e] = rm[t][e] = -INFINITY;
      ps[t][e] = rs[t][e] = 0.f;
    }
}

// log2 of the summed policy, in place of its maximum (a sum of one head is exact as it is).
template <int NT> __device__ __forceinline__ void to_log(float (&m)[NT][4], const float (&sum)[NT][4], int heads) {
  if (heads == 1) return;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) m[t][e] += log2f(sum[t][e]);
}

// Backward, after the sums: per support element lp2 = log2 p stays, pg <- p g and
// pq <- p g - p E (E of the element's row: e_row per fragment row, or sE per column).
template <int DIV, int NT, bool ROWS>
__device__ __forceinline__ void grad_terms(const float (&lp2)[NT][4], float (&pg)[NT][4], float (&pq)[NT][4],
                                           const float (&lr2)[NT][4], uint32_t supp, const float (&e_row)[2],
                                           const float* sE) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float p = 0.f, r, term, g = 0.f;
      if ((supp >> (t * 4 + e)) & 1u) policy_terms<DIV>(lp2[t][e], lr2[t][e], p, r, term, g);
      pg[t][e] = g;
      pq[t][e] = g - p * (ROWS ? e_row[e >> 1] : sE[frag_col(t, e)]);
    }
}

// One head's gradient factor on a tile, in place of its scores:
//   s <- scale w pi_h (g - E) = scale w (pi_h / p) (p g - p E),  pi_h / p = 2^(x_h - log2 p),
// and the row sums of pi_h g = (pi_h / p) p g into a_part (row-major only). w is per
// fragment row (w_row) or per column (sW).
template <int NT, bool ROWS>
__device__ __forceinline__ void head_grad(float (&s)[NT][4], const float (&lp2)[NT][4], const float (&pg)[NT][4],
                                          const float (&pq)[NT][4], uint32_t supp, float scale2, const float* tOff,
                                          const float (&w_row)[2], const float* sW, float scale, float (&a_part)[2]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x = s[t][e] * scale2 - row_off<ROWS>(tOff, t, e);
      const bool on = ((supp >> (t * 4 + e)) & 1u) && x != -INFINITY;
      const float ratio = on ? exp2f(x - lp2[t][e]) : 0.f;
      a_part[e >> 1] += ratio * pg[t][e];
      s[t][e] = ratio * pq[t][e] * ((ROWS ? w_row[e >> 1] : sW[frag_col(t, e)]) * scale);
    }
}

// The visit's scores: S = Q K^T (row-major: the warp's 16 rows x the tile's keys) or
// S^T = K Q^T (key-major: the warp's 16 keys x the tile's rows).
template <typename T, int NT, int HD, bool ROWS>
__device__ __forceinline__ void visit_scores(float (&s)[NT][4], const T* tQ, const T* tK) {
  constexpr int LD = HD + kPad;
  const int warp = threadIdx.x / kWarpSize;
  zero(s);
  if (ROWS)
    gemm_nt<T, NT, HD>(s, tQ + warp * 16 * LD, LD, tK, LD);
  else
    gemm_nt<T, NT, HD>(s, tK + warp * 16 * LD, LD, tQ, LD);
}

// A summing visit: the head's log-space term into the old or the current policy's sum.
template <int NT, bool ROWS>
__device__ __forceinline__ void sum_visit(float (&pm)[NT][4], float (&ps)[NT][4], float (&rm)[NT][4],
                                          float (&rs)[NT][4], const float (&s)[NT][4], bool old, bool first,
                                          uint32_t supp, float scale2, float old_scale2, const float* tOff) {
  if (old)
    add_log_policy<NT, ROWS>(rm, rs, s, supp, first, old_scale2, tOff);
  else
    add_log_policy<NT, ROWS>(pm, ps, s, supp, first, scale2, tOff);
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
  // Log-space sums while the heads are summed: (pm, ps) current, (rm, rs) old; after the
  // sums pm = log2 p, rm = log2 r and, backward, ps = p g, rs = p g - p E (the same
  // registers serve both phases).
  float pm[NT][4], ps[NT][4], rm[NT][4], rs[NT][4];
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
    __syncthreads();  // RAL_RELEASE_BARRIER(div)
    const T* tQ = sQ + q_slot * BM * LD;
    const T* tK = sK + k_slot * BN * LD;
    const float* tOff = sOff + q_slot * BM;
    bool load_k = false;
    if (idx + 1 < total) {
      const int j1 = (idx + 1) % vis.per_tile;
      const bool old1 = vis.old(j1);
      const int h1 = vis.head(grp, j1);
      load_k = j1 == 0 || old1 != old || kv_head(p, old1, h1) != kv_head(p, old, h);
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
      empty_policies(pm, ps, rm, rs);
    }
    float s[NT][4];
    visit_scores<T, NT, HD, true>(s, tQ, tK);
    if (vis.sums(j)) sum_visit<NT, true>(pm, ps, rm, rs, s, old, vis.first(j), supp, scale2, old_scale2, tOff);
    if (vis.last_sum(j)) {
      to_log(pm, ps, vis.n);
      to_log(rm, rs, vis.n_old);
      if (BWD) {
        grad_terms<DIV, NT, true>(pm, ps, rs, rm, supp, e_row, nullptr);
      } else {
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!((supp >> (t * 4 + e)) & 1u)) continue;
            float pv, rv, term, pg;
            policy_terms<DIV>(pm[t][e], rm[t][e], pv, rv, term, pg);
            d_acc[e >> 1] += term;
            e_acc[e >> 1] += pg;
            m_acc[e >> 1] += rv;
          }
      }
    }
    if (BWD && vis.grad(j)) {
      const int64_t hq = int64_t(b) * p.Hq + h;
      float a_part[2] = {0.f, 0.f};
      head_grad<NT, true>(s, pm, ps, rs, supp, scale2, tOff, w_row, nullptr, p.scale, a_part);
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
      // The updates go out in chunks of CH * 8 columns, which keeps their registers few.
      constexpr int CH = 4;
#pragma unroll
      for (int c0 = 0; c0 < NV; c0 += CH) {  // dq rows += dS K
        float upd[CH][4];
        zero(upd);
        gemm_pn<T, NT, CH>(upd, s, tK + c0 * 8, LD);
        add_rows_f32<CH>(p.dq + (hq * p.Tq + p.r0) * HD + c0 * 8, HD, upd, m0 + warp * 16, R, 1.f, atomic_rows);
      }
      if (!p.deterministic) {  // dk keys += dS^T Q, read back transposed from shared memory
        constexpr int WK = BN / 16, WC = kWarps / WK, NC = NV / WC;
        static_assert(WK * WC == kWarps && NC % CH == 0, "warps must tile the dk update");
        store_frag<T, NT>(sDS, LDS, s, warp * 16);
        __syncthreads();  // the dS tile is complete
        const int kw = warp % WK, cw = warp / WK;
        const int64_t kvh = int64_t(b) * p.Hk + kv_head(p, false, h);
#pragma unroll
        for (int c0 = 0; c0 < NC; c0 += CH) {
          const int col = (cw * NC + c0) * 8;
          float upd[CH][4];
          zero(upd);
          gemm_tn<T, BM, CH>(upd, sDS + kw * 16, LDS, tQ + col, LD);
          add_rows_f32<CH>(p.dk + kvh * p.Tk * HD + col, HD, upd, n0 + kw * 16, p.Tk, 1.f, true);
        }
      }
    }
    q_slot ^= 1;  // the stages of the next visit
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
    RAL_SHARED_STORE_POINT();
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

  // The log-space sums and, after them, log2 p, p g, p g - p E: as in div_rows_kernel.
  float pm[NM][4], ps[NM][4], rm[NM][4], rs[NM][4], dk[NV][4];
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
    bool load_k = false;
    if (idx + 1 < total) {
      const int c1 = (idx + 1) / vis.per_tile, j1 = (idx + 1) % vis.per_tile;
      const int grp1 = grp_lo + c1 / n_rt, m1 = m_lo + c1 % n_rt * BM;
      const bool old1 = vis.old(j1);
      const int h1 = vis.head(grp1, j1);
      load_k = old1 != old || kv_head(p, old1, h1) != kv_head(p, old, h);  // the block's keys stay
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
      empty_policies(pm, ps, rm, rs);
    }
    float s[NM][4];  // S^T: this warp's 16 keys x BM rows
    visit_scores<T, NM, HD, false>(s, tQ, tK);
    if (vis.sums(j)) sum_visit<NM, false>(pm, ps, rm, rs, s, old, vis.first(j), supp, scale2, old_scale2, tOff);
    if (vis.last_sum(j)) {
      to_log(pm, ps, vis.n);
      to_log(rm, rs, vis.n_old);
      const float none[2] = {0.f, 0.f};
      grad_terms<DIV, NM, false>(pm, ps, rs, rm, supp, none, sE);
    }
    if (vis.grad(j)) {
      const float none[2] = {0.f, 0.f};
      float a_unused[2] = {0.f, 0.f};
      head_grad<NM, false>(s, pm, ps, rs, supp, scale2, tOff, none, sE + BM, p.scale, a_unused);
      const int kvh = kv_head(p, false, h);
      if (kvh != dk_head) {
        if (dk_head >= 0) flush_dk<NV, HD>(dk, p, b, dk_head, n0);
        dk_head = kvh;
      }
      gemm_pn<T, NM, NV>(dk, s, tQ, LD);  // dk (16 keys x HD) += dS^T Q
    }
    q_slot ^= 1;  // the stages of the next visit
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
