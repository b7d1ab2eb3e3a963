// Flash forward over all query rows: out, lse and, on held divergence rows, the support's own
// log-sum-exp lse_S. Without V (WITH_OUT = false) the same kernel is the old policy's
// statistics pass on its cached rows (lse_old, lse_S,old).
//
// Block = 4 warps = 64 query rows (16 per warp); keys in tiles of 64 through shared memory,
// double-buffered with cp.async: tile i + 1 loads while tile i is computed, one barrier per
// tile. Per tile: S = Q K^T (mma), the online softmax in registers in log2 units (exp2 with
// the scale folded in: one exp2 per element), O += P V (mma, P straight from the
// accumulators): 2 matmuls. Only tiles on the causal diagonal or across the sequence end
// are masked; the others need the key mask alone.
//
// Held rows (divergence rows with exclude_self, when lse_s is given): the row's own key is
// held out of the online softmax, so the sweep's log-sum-exp is the support's own lse_S,
// exact for any support mass (SPEC "Numerics"; issue 13 F1/F2). The own key is merged back
// at the end with one row-wise dot, no matmul:
//   lse = logaddexp(lse_S, s_self),  out = out_S exp(lse_S - lse) + v_self exp(s_self - lse).
// Written: out [B, H, rows, HD], lse [B, H, rows] (+inf: no key), lse_S [B, H, R] (-inf:
// empty support). Nothing Tq x Tk leaves a tile.
#include "kernel_utils.cuh"

namespace ral {
namespace {

constexpr int kBM = 64, kBN = 64;

// Q, then 2 stages of K (and V) tiles, then 2 stages of key flags.
template <int HD> constexpr size_t fwd_smem(bool with_out) {
  return size_t((kBM + 2 * kBN * (with_out ? 2 : 1)) * (HD + kPad)) * 2 + 2 * kBN;
}
static_assert(fwd_smem<128>(true) <= kMaxSmemAllArchs, "attn_fwd must fit every arch's shared memory");

template <typename T, int HD, bool WITH_OUT>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_kernel(const FwdParams p) {
  constexpr int LD = HD + kPad, NT = kBN / 8, NV = HD / 8;
  constexpr int STAGE = kBN * LD * (WITH_OUT ? 2 : 1);  // K (and V) tile of one stage
  RAL_DYN_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sKV = sQ + kBM * LD;                                        // stage s: K at + s * STAGE, V after it
  uint8_t* sKok = reinterpret_cast<uint8_t*>(sKV + 2 * STAGE);  // stage s: at + s * kBN

  const int m0 = blockIdx.x * kBM;
  const int64_t bh = blockIdx.y;
  const int b = int(bh / p.H), h = int(bh % p.H), kvh = h / (p.H / p.HK);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t kv_off = (int64_t(b) * p.HK + kvh) * p.Tk * HD;
  const T* q = static_cast<const T*>(p.q) + bh * p.rows * HD;
  const T* k = static_cast<const T*>(p.k) + kv_off;
  const T* v = WITH_OUT ? static_cast<const T*>(p.v) + kv_off : nullptr;
  const uint8_t* kmask = p.kmask ? p.kmask + int64_t(b) * p.Tk : nullptr;
  const float qk2 = p.scale * kLog2e;
  const bool hold = p.lse_s != nullptr;

  int row[2], pos[2], self_key[2];
  bool held[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = m0 + warp * 16 + lane / 4 + 8 * r;
    pos[r] = p.pos0 + row[r];
    self_key[r] = pos[r] + p.Tk - p.Tq;
    held[r] = hold && pos[r] >= p.r0 && row[r] < p.rows;
  }
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};  // log2 units
  float acc[NV][4];
  zero(acc);

  const int last = m0 + kBM < p.rows ? m0 + kBM : p.rows;
  const int hi = key_end(p.pos0 + last, p.Tq, p.Tk, p.causal);
  const int n_full = unmasked_end<kBN>(p.pos0 + m0, p.Tq, p.Tk, p.causal, hold);
  load_tile_async<T, kBM, HD>(sQ, q, m0, p.rows);  // Q joins the first key tile's group
  if (hi > 0)
    issue_kv<T, kBN, HD, WITH_OUT>(sKV, sKok, k, v, kmask, 0, p.Tk);
  else
    cp_async_commit();
  for (int n0 = 0, it = 0; n0 < hi; n0 += kBN, ++it) {
    const int stage = it & 1;
    const T* sK = sKV + stage * STAGE;
    const T* sV = sK + kBN * LD;  // only with WITH_OUT
    const uint8_t* sKok_t = sKok + stage * kBN;
    cp_async_wait<0>();
    // Tile `it` is visible to every warp, and every warp is done with tile it - 1, whose stage
    // the next load reuses.
    __syncthreads();  // RAL_RELEASE_BARRIER(fwd)
    if (n0 + kBN < hi)
      issue_kv<T, kBN, HD, WITH_OUT>(sKV + (stage ^ 1) * STAGE, sKok + (stage ^ 1) * kBN, k, v, kmask, n0 + kBN, p.Tk);

    float s[NT][4];
    zero(s);
    gemm_nt<T, NT, HD>(s, sQ + warp * 16 * LD, LD, sK, LD);
    const bool masked = n0 + kBN > n_full;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, jj = frag_col(t, e), j = n0 + jj;
        const bool ok = masked ? allowed(pos[r], j, sKok_t[jj], p.Tq, p.Tk, p.causal) && !(held[r] && j == self_key[r])
                               : (kmask == nullptr || sKok_t[jj]);
        s[t][e] = ok ? s[t][e] * qk2 : -INFINITY;
        mx[r] = fmaxf(mx[r], s[t][e]);
      }
    float corr[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_i[r], quad_max(mx[r]));
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;
      corr[r] = exp2f(m_i[r] - m_use[r]);
      m_i[r] = m_new;
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[t][e] = exp2f(s[t][e] - m_use[e >> 1]);
        sum[e >> 1] += s[t][e];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_i[r] = l_i[r] * corr[r] + quad_sum(sum[r]);
    if (WITH_OUT) {
#pragma unroll
      for (int t = 0; t < NV; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] *= corr[e >> 1];
      gemm_pn<T, NT, NV>(acc, s, sV, LD);
    }
  }

  if (hold) {  // the own-key dot reads Q, which no tile may have waited for (a row with no key)
    cp_async_wait<0>();
    __syncthreads();
  }
  const int R = p.Tq - p.r0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l_safe = l_i[r] > 0.f ? l_i[r] : 1.f;
    const float lse_s2 = l_i[r] > 0.f ? m_i[r] + log2f(l_i[r]) : -INFINITY;  // over the sweep's keys
    float lse2 = lse_s2, out_w = 1.f / l_safe, self_w = 0.f;
    const int js = self_key[r];
    const bool self_ok = held[r] && js >= 0 && js < p.Tk && (kmask == nullptr || kmask[js] != 0);
    if (hold) {  // the quad of lanes that holds this row forms q . k_self, HD / 4 columns each
      float dot = 0.f;
      if (self_ok) {
        const T* qr = sQ + (warp * 16 + lane / 4 + 8 * r) * LD;
        const T* kr = k + int64_t(js) * HD;
        for (int c = (lane % 4) * (HD / 4); c < (lane % 4 + 1) * (HD / 4); ++c)
          dot += Cvt<T>::to_float(qr[c]) * Cvt<T>::to_float(kr[c]);
      }
      dot = quad_sum(dot);
      const float s_self = self_ok ? dot * qk2 : -INFINITY;
      if (held[r]) {
        lse2 = logaddexp2(lse_s2, s_self);
        const float lse_use = lse2 == -INFINITY ? 0.f : lse2;
        out_w = exp2f(lse_s2 - lse_use) / l_safe;
        self_w = exp2f(s_self - lse_use);
      }
    }
    if (row[r] >= p.rows) continue;
    if (WITH_OUT) {
      T* o = static_cast<T*>(p.out) + (bh * p.rows + row[r]) * HD + 2 * (lane % 4);
      const T* vs = v + int64_t(self_ok ? js : 0) * HD + 2 * (lane % 4);
#pragma unroll
      for (int t = 0; t < NV; ++t) {
        float o0 = acc[t][2 * r] * out_w, o1 = acc[t][2 * r + 1] * out_w;
        if (self_ok) {
          o0 += Cvt<T>::to_float(vs[t * 8]) * self_w;
          o1 += Cvt<T>::to_float(vs[t * 8 + 1]) * self_w;
        }
        *reinterpret_cast<uint32_t*>(o + t * 8) = pack2<T>(o0, o1);
      }
    }
    if (lane % 4 != 0) continue;
    p.lse[bh * p.rows + row[r]] = lse2 == -INFINITY ? INFINITY : lse2 * kLn2;
    if (held[r]) p.lse_s[bh * R + pos[r] - p.r0] = lse_s2 * kLn2;
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
