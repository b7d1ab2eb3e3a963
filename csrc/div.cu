// Divergence passes over the R cached (divergence) rows only, one block per group of heads
// ("mean": all heads; "none": one head), so a tile's head-averaged rows abar / bbar are
// formed once for all heads of the group:
//   div_fwd      (64 rows x key tiles): divergence, E = sum_S p g, A_h += sum_S alpha_h g
//   div_bwd rows (64 rows x key tiles): dq_h += (w/n * alpha_h * G) K * scale
//   div_bwd keys (64 keys x row tiles, transposed tiles): dk += (w/n * alpha_h * G)^T Q * scale
// with G = (g - E) / Z on the support. Each block owns the rows (or keys) it adds to, so
// the read-modify-write of dq / dk needs no atomics and is deterministic.
#include "kernel_utils.cuh"

namespace ral {
namespace {

constexpr int kB = 64;  // rows per row-major block, keys per key-major block

// The other tile dimension (keys of a row-major block, rows of a key-major block).
template <int HD> __host__ __device__ constexpr int inner_tile() { return HD == 128 ? 32 : 64; }

constexpr size_t div_smem(int hd) { return size_t(2 * kB * (hd + kPad)) * 2 + 5 * kB * 4 + 2 * kB; }

// One policy (current or old): where a head's cached rows, their lse and its keys live.
struct Side {
  const void* q;
  const float* lse;
  const void* k;
  int64_t rows;  // rows per head in q / lse (Tq for the current policy, R for the old one)
  int row_off;   // index of cached row 0 in q / lse (r0, or 0)
  int H, HK;
  float scale;
};

__device__ __forceinline__ Side current_side(const DivParams& p) {
  return {p.q, p.lse, p.k, p.Tq, p.r0, p.Hq, p.Hk, p.scale};
}
__device__ __forceinline__ Side old_side(const DivParams& p) {
  return {p.q_old, p.lse_old, p.k_old, p.Tq - p.r0, 0, p.Ho, p.Hko, p.old_scale};
}

template <typename T> struct Smem {
  T* q;
  T* k;
  float* lse;
};

// alpha_h = exp(scale q.k - lse) of head h on the support bits of a tile, added to acc.
// Row-major: C rows are the warp's 16 of 64 cached rows from rq0, columns NT*8 keys from n0.
// Key-major: C rows are the warp's 16 of 64 keys from n0, columns NT*8 cached rows from rq0.
// Leaves the head's query rows in sm.q and its keys in sm.k.
template <typename T, int HD, int NT, bool RM>
__device__ __forceinline__ void head_alpha(float (&acc)[NT][4], uint32_t supp, const Smem<T>& sm, const Side& sd,
                                           int b, int h, int rq0, int R, int n0, int Tk) {
  constexpr int LD = HD + kPad, QROWS = RM ? kB : NT * 8, KROWS = RM ? NT * 8 : kB;
  const int64_t head = int64_t(b) * sd.H + h;
  const T* q = static_cast<const T*>(sd.q) + (head * sd.rows + sd.row_off) * HD;
  const T* k = static_cast<const T*>(sd.k) + (int64_t(b) * sd.HK + h / (sd.H / sd.HK)) * Tk * HD;
  __syncthreads();  // RAL_RELEASE_BARRIER(div): the previous head's tiles are no longer read
  load_tile<T, QROWS, HD>(sm.q, q, rq0, R);
  load_tile<T, KROWS, HD>(sm.k, k, n0, Tk);
  load_vec<QROWS>(sm.lse, sd.lse + head * sd.rows + sd.row_off, rq0, R, INFINITY);
  __syncthreads();
  const int warp = threadIdx.x / kWarpSize;
  float s[NT][4];
  zero(s);
  if (RM)
    gemm_nt<T, NT, HD>(s, sm.q + warp * 16 * LD, LD, sm.k, LD);
  else
    gemm_nt<T, NT, HD>(s, sm.k + warp * 16 * LD, LD, sm.q, LD);
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if ((supp >> (t * 4 + e)) & 1u) {
        const float lse = RM ? sm.lse[warp * 16 + frag_row(e)] : sm.lse[frag_col(t, e)];
        acc[t][e] += expf(s[t][e] * sd.scale - lse);
      }
}

// Mean over heads [h0, h0 + n) of their support-masked attention on the tile.
template <typename T, int HD, int NT, bool RM>
__device__ __forceinline__ void group_mean(float (&avg)[NT][4], uint32_t supp, const Smem<T>& sm, const Side& sd,
                                           int b, int h0, int n, int rq0, int R, int n0, int Tk) {
  zero(avg);
  for (int hh = 0; hh < n; ++hh) head_alpha<T, HD, NT, RM>(avg, supp, sm, sd, b, h0 + hh, rq0, R, n0, Tk);
  const float inv = 1.f / n;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) avg[t][e] *= inv;
}

// Support bits (bit t*4+e of C element (t, e)) of a row-major tile: valid rows only.
template <int NT>
__device__ __forceinline__ uint32_t support_rows(const uint8_t* sKok, const int (&rr)[2], const bool (&valid)[2],
                                                 int n0, const DivParams& p) {
  uint32_t bits = 0;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1, jj = frag_col(t, e);
      if (valid[r] && in_support(p.r0 + rr[r], n0 + jj, sKok[jj], p.Tq, p.Tk, p.causal, p.exclude_self))
        bits |= 1u << (t * 4 + e);
    }
  return bits;
}

// Support bits of a key-major tile (rows = keys from n0, columns = cached rows from m0).
template <int NT>
__device__ __forceinline__ uint32_t support_keys(const uint8_t* sKok, const uint8_t* sRowOk, int m0, int n0,
                                                 const DivParams& p) {
  const int warp = threadIdx.x / kWarpSize;
  uint32_t bits = 0;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kk = warp * 16 + frag_row(e), ii = frag_col(t, e);
      if (sRowOk[ii] && in_support(p.r0 + m0 + ii, n0 + kk, sKok[kk], p.Tq, p.Tk, p.causal, p.exclude_self))
        bits |= 1u << (t * 4 + e);
    }
  return bits;
}

struct Carve {
  char* p;
  template <typename X> __device__ X* take(size_t n) {
    X* out = reinterpret_cast<X*>(p);
    p += n * sizeof(X);
    return out;
  }
  template <typename T, int HD> __device__ Smem<T> tiles() {  // every kernel's Q, K tiles and lse
    Smem<T> sm;
    sm.q = take<T>(kB * (HD + kPad));
    sm.k = take<T>(kB * (HD + kPad));
    sm.lse = take<float>(kB);
    return sm;
  }
};

// Per-lane row bookkeeping of a row-major block (rows rr[0], rr[1] of the cached rows).
struct RowState {
  int rr[2];
  bool valid[2];
  float z[2], zo[2];
  __device__ RowState(const DivParams& p, int bg, int m0) {
    const int R = p.Tq - p.r0, lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      rr[r] = m0 + warp * 16 + lane / 4 + 8 * r;
      const float zr = rr[r] < R ? p.z[int64_t(bg) * R + rr[r]] : 0.f;
      const float zor = rr[r] < R ? p.z_old[int64_t(bg) * R + rr[r]] : 0.f;
      valid[r] = rr[r] < R && zr > 0.f;
      z[r] = valid[r] ? zr : 1.f;
      zo[r] = valid[r] && zor > 0.f ? zor : 1.f;
    }
  }
  // Exclusive end of the keys the block's rows see; 0 when none of them has a divergence.
  __device__ int key_hi(const DivParams& p, int m0) const {
    const int R = p.Tq - p.r0, last = m0 + kB < R ? m0 + kB : R;
    return __syncthreads_or(valid[0] || valid[1]) ? key_end(p.r0 + last, p.Tq, p.Tk, p.causal) : 0;
  }
};

// Row-major key tile n0 of group grp: its key flags, support bits and group means.
template <typename T, int HD, int NT>
__device__ __forceinline__ uint32_t row_tile(float (&abar)[NT][4], float (&bbar)[NT][4], const Smem<T>& sm,
                                             uint8_t* sKok, const RowState& rs, const DivParams& p, int b, int grp,
                                             int m0, int n0) {
  const int R = p.Tq - p.r0, n = p.Hq / p.G, n_o = p.Ho / p.G;
  __syncthreads();  // the previous tile's key flags are no longer read
  load_key_ok<NT * 8>(sKok, p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr, n0, p.Tk);
  __syncthreads();
  const uint32_t supp = support_rows<NT>(sKok, rs.rr, rs.valid, n0, p);
  group_mean<T, HD, NT, true>(abar, supp, sm, current_side(p), b, grp * n, n, m0, R, n0, p.Tk);
  group_mean<T, HD, NT, true>(bbar, supp, sm, old_side(p), b, grp * n_o, n_o, m0, R, n0, p.Tk);
  return supp;
}

template <typename T, int HD, int DIV>
__global__ void __launch_bounds__(kThreads, 1) div_fwd_kernel(const DivParams p) {
  constexpr int BN = inner_tile<HD>(), NT = BN / 8;
  RAL_DYN_SMEM(smem);
  Carve c{smem};
  const Smem<T> sm = c.tiles<T, HD>();
  uint8_t* sKok = c.take<uint8_t>(kB);

  const int m0 = blockIdx.x * kB, bg = blockIdx.y, b = bg / p.G, grp = bg % p.G;
  const int n = p.Hq / p.G, R = p.Tq - p.r0, lane = threadIdx.x % kWarpSize;
  const RowState rs(p, bg, m0);
  const int hi = rs.key_hi(p, m0);

  float d_acc[2] = {0.f, 0.f}, e_acc[2] = {0.f, 0.f};
  for (int n0 = 0; n0 < hi; n0 += BN) {
    float gv[NT][4], bbar[NT][4];
    const uint32_t supp = row_tile<T, HD, NT>(gv, bbar, sm, sKok, rs, p, b, grp, m0, n0);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pp = gv[t][e] / rs.z[r], rp = bbar[t][e] / rs.zo[r];
        float term, g;
        div_terms<DIV>(pp, rp, term, g);
        d_acc[r] += term;
        e_acc[r] += pp * g;
        gv[t][e] = g;
      }
    for (int hh = 0; hh < n; ++hh) {
      const int h = grp * n + hh;
      float alpha[NT][4];
      zero(alpha);
      head_alpha<T, HD, NT, true>(alpha, supp, sm, current_side(p), b, h, m0, R, n0, p.Tk);
      float sa[2] = {0.f, 0.f};
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) sa[e >> 1] += alpha[t][e] * gv[t][e];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sa[r] = quad_sum(sa[r]);
        if (lane % 4 == 0 && rs.rr[r] < R) p.a[(int64_t(b) * p.Hq + h) * R + rs.rr[r]] += sa[r];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float d = quad_sum(d_acc[r]), e = quad_sum(e_acc[r]);
    if (lane % 4 != 0 || rs.rr[r] >= R) continue;
    p.div[int64_t(bg) * p.Tq + p.r0 + rs.rr[r]] = rs.valid[r] ? d : 0.f;
    p.e_out[int64_t(bg) * R + rs.rr[r]] = rs.valid[r] ? e : 0.f;
  }
}

// G = w (g - E) / Z on the support of a tile, from the group means (in place in `abar`).
template <int DIV, int NT>
__device__ __forceinline__ void big_g(float (&abar)[NT][4], const float (&bbar)[NT][4], uint32_t supp, int t, int e,
                                      float z, float zo, float e_row, float w) {
  float term, g;
  div_terms<DIV>(abar[t][e] / z, bbar[t][e] / zo, term, g);
  abar[t][e] = ((supp >> (t * 4 + e)) & 1u) ? (g - e_row) / z * w : 0.f;
}

// acc += alpha * G * scale, then dst[row] += (that) B for the warp's 16 rows (fp32 RMW).
template <typename T, int HD, int NT>
__device__ __forceinline__ void add_ds_times(float* dst, int row0, int nrows, float (&alpha)[NT][4],
                                             const float (&gg)[NT][4], float scale, const T* sB) {
  constexpr int NV = HD / 8;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) alpha[t][e] *= gg[t][e] * scale;
  float upd[NV][4];
  zero(upd);
  gemm_pn<T, NT, NV>(upd, alpha, sB, HD + kPad);
  store_rows_f32<NV, HD, true>(dst, upd, row0, nrows, 1.f);
}

template <typename T, int HD, int DIV>
__global__ void __launch_bounds__(kThreads, 1) div_bwd_rows_kernel(const DivParams p) {
  constexpr int BN = inner_tile<HD>(), NT = BN / 8;
  RAL_DYN_SMEM(smem);
  Carve c{smem};
  const Smem<T> sm = c.tiles<T, HD>();
  uint8_t* sKok = c.take<uint8_t>(kB);

  const int m0 = blockIdx.x * kB, bg = blockIdx.y, b = bg / p.G, grp = bg % p.G;
  const int n = p.Hq / p.G, R = p.Tq - p.r0, warp = threadIdx.x / kWarpSize;
  const RowState rs(p, bg, m0);
  float e_row[2], w[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    e_row[r] = rs.valid[r] ? p.e[int64_t(bg) * R + rs.rr[r]] : 0.f;
    w[r] = rs.valid[r] ? p.w[int64_t(bg) * R + rs.rr[r]] : 0.f;
  }
  const int hi = rs.key_hi(p, m0);

  for (int n0 = 0; n0 < hi; n0 += BN) {
    float gg[NT][4], bbar[NT][4];
    const uint32_t supp = row_tile<T, HD, NT>(gg, bbar, sm, sKok, rs, p, b, grp, m0, n0);
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        big_g<DIV, NT>(gg, bbar, supp, t, e, rs.z[r], rs.zo[r], e_row[r], w[r]);
      }
    for (int hh = 0; hh < n; ++hh) {
      const int h = grp * n + hh;
      float alpha[NT][4];
      zero(alpha);
      head_alpha<T, HD, NT, true>(alpha, supp, sm, current_side(p), b, h, m0, R, n0, p.Tk);  // sm.k = K tile of h
      float* dq = p.dq + ((int64_t(b) * p.Hq + h) * p.Tq + p.r0) * HD;
      add_ds_times<T, HD, NT>(dq, m0 + warp * 16, R, alpha, gg, p.scale, sm.k);
    }
  }
}

template <typename T, int HD, int DIV>
__global__ void __launch_bounds__(kThreads, 1) div_bwd_keys_kernel(const DivParams p) {
  constexpr int BM = inner_tile<HD>(), NT = BM / 8;
  RAL_DYN_SMEM(smem);
  Carve c{smem};
  const Smem<T> sm = c.tiles<T, HD>();
  float* sZ = c.take<float>(kB);
  float* sZo = c.take<float>(kB);
  float* sE = c.take<float>(kB);
  float* sW = c.take<float>(kB);
  uint8_t* sKok = c.take<uint8_t>(kB);
  uint8_t* sRowOk = c.take<uint8_t>(kB);

  const bool per_head = p.G > 1;  // "none": one group per head, the block owns one KV head
  const int n0 = blockIdx.x * kB, gqa = p.Hq / p.Hk;
  const int b = per_head ? blockIdx.y / p.Hk : blockIdx.y;
  const int grp_lo = per_head ? (blockIdx.y % p.Hk) * gqa : 0, grp_hi = per_head ? grp_lo + gqa : 1;
  const int n = p.Hq / p.G, n_o = p.Ho / p.G, R = p.Tq - p.r0, warp = threadIdx.x / kWarpSize;
  const Side cur = current_side(p), old = old_side(p);
  load_key_ok<kB>(sKok, p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr, n0, p.Tk);
  int m_lo = 0;
  if (p.causal) {  // cached rows that see this key block: r0 + m >= n0 - (Tk - Tq)
    m_lo = n0 - (p.Tk - p.Tq) - p.r0;
    m_lo = m_lo < 0 ? 0 : m_lo / BM * BM;
  }
  for (int grp = grp_lo; grp < grp_hi; ++grp) {
    const int64_t bg = int64_t(b) * p.G + grp;
    for (int m0 = m_lo; m0 < R; m0 += BM) {
      __syncthreads();  // the previous tile's row statistics are no longer read
      int ok = 0;
      if (threadIdx.x < BM) {
        const int rr = m0 + threadIdx.x;
        const float z = rr < R ? p.z[bg * R + rr] : 0.f, zo = rr < R ? p.z_old[bg * R + rr] : 0.f;
        ok = rr < R && z > 0.f;
        sRowOk[threadIdx.x] = ok;
        sZ[threadIdx.x] = ok ? z : 1.f;
        sZo[threadIdx.x] = ok && zo > 0.f ? zo : 1.f;
        sE[threadIdx.x] = ok ? p.e[bg * R + rr] : 0.f;
        sW[threadIdx.x] = ok ? p.w[bg * R + rr] : 0.f;
      }
      if (!__syncthreads_or(ok)) continue;
      const uint32_t supp = support_keys<NT>(sKok, sRowOk, m0, n0, p);
      float gg[NT][4], bbar[NT][4];
      group_mean<T, HD, NT, false>(gg, supp, sm, cur, b, grp * n, n, m0, R, n0, p.Tk);
      group_mean<T, HD, NT, false>(bbar, supp, sm, old, b, grp * n_o, n_o, m0, R, n0, p.Tk);
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ii = frag_col(t, e);
          big_g<DIV, NT>(gg, bbar, supp, t, e, sZ[ii], sZo[ii], sE[ii], sW[ii]);
        }
      for (int hh = 0; hh < n; ++hh) {
        const int h = grp * n + hh;
        float alpha[NT][4];
        zero(alpha);
        head_alpha<T, HD, NT, false>(alpha, supp, sm, cur, b, h, m0, R, n0, p.Tk);  // sm.q = Q rows of h
        float* dk = p.dk + (int64_t(b) * p.Hk + h / gqa) * p.Tk * HD;
        add_ds_times<T, HD, NT>(dk, n0 + warp * 16, p.Tk, alpha, gg, p.scale, sm.q);
      }
    }
  }
}

template <typename F> cudaError_t with_kernels(const DivParams& p, F&& f) {
  return dispatch(p.dtype, p.hd, [&](auto t_tag, auto hd_tag) -> cudaError_t {
    return dispatch_div(p.divergence, [&](auto div_tag) -> cudaError_t {
      using T = decltype(t_tag);
      constexpr int HD = decltype(hd_tag)::value, DIV = decltype(div_tag)::value;
      return f(div_fwd_kernel<T, HD, DIV>, div_bwd_rows_kernel<T, HD, DIV>, div_bwd_keys_kernel<T, HD, DIV>,
               div_smem(HD));
    });
  });
}

}  // namespace

cudaError_t div_fwd(const DivParams& p, cudaStream_t stream) {
  const int R = p.Tq - p.r0;
  if (R <= 0 || p.B == 0) return cudaSuccess;
  return with_kernels(p, [&](auto fwd, auto, auto, size_t smem) -> cudaError_t {
    cudaError_t err = set_smem(fwd, smem);
    if (err != cudaSuccess) return err;
    RAL_LAUNCH(fwd, dim3((R + kB - 1) / kB, p.B * p.G), dim3(kThreads), smem, stream, p);
    return cudaGetLastError();
  });
}

cudaError_t div_bwd(const DivParams& p, cudaStream_t stream) {
  const int R = p.Tq - p.r0;
  if (R <= 0 || p.B == 0) return cudaSuccess;
  return with_kernels(p, [&](auto, auto rows, auto keys, size_t smem) -> cudaError_t {
    cudaError_t err = set_smem(rows, smem);
    if (err == cudaSuccess) err = set_smem(keys, smem);
    if (err != cudaSuccess) return err;
    RAL_LAUNCH(rows, dim3((R + kB - 1) / kB, p.B * p.G), dim3(kThreads), smem, stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess || p.Tk == 0) return err;
    const int owners = p.G > 1 ? p.B * p.Hk : p.B;
    RAL_LAUNCH(keys, dim3((p.Tk + kB - 1) / kB, owners), dim3(kThreads), smem, stream, p);
    return cudaGetLastError();
  });
}

}  // namespace ral
