"""Triton kernels of the fused attention + divergence op.

Quantity (SPEC section 2): per query row ``i`` the attention output and the divergence
``D_i(p || r)`` between current and old attention rows, head-averaged (one group of all
heads, ``"mean"``) or per head (``"none"``), renormalized on the support ``S(i)``.

Units: scores are formed in log2 units, ``s2 = (q . k) * sm_scale * log2(e)``, so every
exponential is an ``exp2`` with the scale folded in (the flash-attention tutorial's trick);
the statistics the kernels read and write (``lse``, ``lse_S``, offsets) are natural-log
float32, as the API exposes them, and are converted once per row.

Passes (:mod:`ral_kernels.backends.pipeline`; ``R`` divergence rows = the last ``R`` rows):

1. ``_attn_fwd_kernel`` (all rows, one program per row block and head): flash forward,
   2 matmuls per tile; only tiles on the causal diagonal or the sequence end are masked.
   With ``HOLD_SELF`` a divergence row's own key is held out of the online softmax, so the
   sweep's log-sum-exp is the support's own ``lse_S`` (exact for any support mass); the
   self term is merged at the end into ``lse`` and ``out`` (one row-wise dot, no matmul).
   Without ``V`` the same kernel is the old policy's statistics pass. With ``FUSED_KL``
   (per-head KL / reverse KL) it also forms the old scores (3 matmuls per tile) and
   accumulates the divergence online: ``KL(r || p) = E_r[s_old - s] + lse_S - off_old`` and
   ``KL(p || r) = E_p[s - s_old] - lse_S + off_old``, exact, with no logarithm.
2. ``_div_fwd_kernel`` (divergence rows only; program = row block x group x key split):
   per tile every head's ``pi_h = exp2(s2_h - off2_h)`` is formed once and summed into the
   policy; the old side likewise; the divergence terms in log space. Key splits write
   partial row sums that the host adds (flash-decoding), so short responses still fill the
   GPU. No ``Tq x Tk`` value is ever written.
3. ``_div_bwd_kernel`` (divergence rows only): forms ``p`` and ``r`` of a tile (pass over the
   heads, keeping each ``pi_h`` tile in a per-program scratch), then per head
   ``dS_h = w pi_h (g - E)`` into ``dq`` (the program's rows) and
   ``dk`` (atomically; or, ``deterministic``, a key-major second launch that owns ``dk``),
   and the row sums ``A_h = sum_S pi_h g`` from which the host forms ``b_h``.
4. ``_attn_bwd_kernel`` (key-major, one program per key block and KV head): the
   flash-attention-2 backward, 5 matmuls per tile, ``dq`` added atomically, with
   ``delta_eff = rowsum(dO * O) + w b_h``; ``deterministic`` splits it into a dk/dv kernel
   and the row-major ``_attn_bwd_dq_kernel`` (7 matmuls, no atomics). ``FUSED_KL`` adds the
   divergence's ``dS = w (p - r)`` (KL) or ``w p (log p - log r - D)`` (reverse KL).

Policies are summed over heads scaled by ``2^SCALE_LOG2`` before their logarithm, so
``log p`` is exact down to ``p ~ 2^-226`` (no clamp at the float32 underflow), and
``pi_h g`` is formed as ``(pi_h / p) (p g)``: finite where ``p`` underflows.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SCALE_LOG2 = tl.constexpr(100.0)  # policies are accumulated as p * 2^100 (p <= 1, <= 2^27 heads)
NEG_INF = tl.constexpr(float("-inf"))


# --------------------------------------------------------------------------- helpers

@triton.jit
def _allowed(offs_m, offs_n, Tq, Tk, km_ptr, b, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr):
    """allowed(i, j) for query positions ``offs_m`` and keys ``offs_n`` of batch ``b``,
    including the bounds ``i < Tq`` and ``j < Tk``."""
    ok = (offs_n < Tk)[None, :] & (offs_m < Tq)[:, None]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
    if HAS_KMASK:
        km = tl.load(km_ptr + b * Tk + offs_n, mask=offs_n < Tk, other=0)
        ok = ok & (km != 0)[None, :]
    return ok


@triton.jit
def _key_mask(offs_n, Tk, km_ptr, b, HAS_KMASK: tl.constexpr):
    """The key mask alone (tiles away from the diagonal and the sequence end)."""
    if HAS_KMASK:
        km = tl.load(km_ptr + b * Tk + offs_n)
        return (km != 0)[None, :]
    else:
        return tl.full([1, 1], 1, tl.int1)


@triton.jit
def _is_self(offs_m, offs_n, Tq, Tk):
    return offs_n[None, :] == offs_m[:, None] + (Tk - Tq)


@triton.jit
def _key_end(row_end, Tq, Tk, CAUSAL: tl.constexpr):
    """Exclusive end of the keys any row ``< row_end`` may see."""
    if CAUSAL:
        return tl.maximum(tl.minimum(Tk, row_end + Tk - Tq), 0)
    else:
        return Tk


@triton.jit
def _unmasked_end(row0, Tq, Tk, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys ``< this`` (a multiple of BLOCK_N) are allowed by the causal mask and the bounds
    for every row ``>= row0`` and are not any such row's own key."""
    if CAUSAL:
        return tl.maximum(tl.minimum(row0 + Tk - Tq, Tk), 0) // BLOCK_N * BLOCK_N
    else:
        return Tk // BLOCK_N * BLOCK_N


@triton.jit
def _logaddexp2(a, b):
    m = tl.maximum(a, b)
    m_safe = tl.where(m == NEG_INF, 0.0, m)
    return tl.where(m == NEG_INF, NEG_INF, m_safe + tl.log2(tl.exp2(a - m_safe) + tl.exp2(b - m_safe)))


@triton.jit
def _lse_nat(lse2, EMPTY_POS_INF: tl.constexpr):
    """A log2-unit log-sum-exp as the natural-log statistic; an empty row is +inf (flash
    attention's convention for the attention lse) or -inf (a support's log-mass)."""
    if EMPTY_POS_INF:
        return tl.where(lse2 == NEG_INF, float("inf"), lse2 * LN2)
    else:
        return lse2 * LN2


@triton.jit
def _load_rows(ptr, offs_r, n_rows, offs_d, D, srow):
    return tl.load(ptr + offs_r[:, None] * srow + offs_d[None, :], mask=(offs_r < n_rows)[:, None] & (offs_d < D)[None, :],
                   other=0.0)


@triton.jit
def _load_cols(ptr, offs_n, Tk, offs_d, D, srow):
    """A key tile transposed: ``[BLOCK_D, BLOCK_N]``."""
    return tl.load(ptr + offs_n[None, :] * srow + offs_d[:, None], mask=(offs_n < Tk)[None, :] & (offs_d < D)[:, None],
                   other=0.0)


@triton.jit
def _div_terms(p_hat, r_hat, on, DIVERGENCE: tl.constexpr):
    """Pointwise divergence terms ``t`` and ``p g`` from the scaled policies ``p^ = p 2^S``,
    ``r^`` (see ``_semantics.log_policy_terms``), with natural logs taken of the scaled
    sums (exact where ``p`` underflows float32); zero where ``on`` is False.
    DIVERGENCE: 0 = jsd, 1 = kl (old || new), 2 = reverse_kl (new || old).
    Transcendentals per element: 3 logs (jsd) or 2 (kl, reverse kl), no exp."""
    unscale = tl.exp2(-SCALE_LOG2)
    p = p_hat * unscale
    r = r_hat * unscale
    # log p - log r and log p - log m without the 2^S scale (it cancels in the ratios).
    # "== 0" rather than "> 0" tests below: a NaN policy (from a NaN input) stays NaN.
    lp2 = tl.log2(tl.where(p_hat == 0, 1.0, p_hat))
    lr2 = tl.log2(tl.where(r_hat == 0, 1.0, r_hat))
    if DIVERGENCE == 0:
        lm2 = tl.log2(tl.where(on, 0.5 * (p_hat + r_hat), 1.0))
        t = 0.5 * LN2 * (tl.where(p_hat == 0, 0.0, p * (lp2 - lm2)) + tl.where(r_hat == 0, 0.0, r * (lr2 - lm2)))
        pg = tl.where(p_hat == 0, 0.0, 0.5 * LN2 * p * (lp2 - lm2))
    elif DIVERGENCE == 1:
        # r log(r / p); an underflowed p^ (p < ~2^-226) is clamped at the float32 minimum
        t = tl.where(r_hat == 0, 0.0, r * (lr2 - tl.log2(tl.maximum(p_hat, 1.1754943508222875e-38))) * LN2)
        pg = -r
    else:
        t = tl.where(p_hat == 0, 0.0, p * (lp2 - tl.log2(tl.maximum(r_hat, 1.1754943508222875e-38))) * LN2)
        pg = tl.where(p_hat == 0, 0.0, p * ((lp2 - tl.log2(tl.maximum(r_hat, 1.1754943508222875e-38))) * LN2 + 1.0))
    return tl.where(on, t, 0.0), tl.where(on, pg, 0.0)


# --------------------------------------------------------------------------- forward

@triton.jit
def _fwd_tile(q, m_i, l_i, acc, kl_acc, r_acc, k_base, v_base, qo, ko_base, offo2, b, offs_m, offs_n,
              offs_d, offs_dv, offs_do, D, D_V, D_O, Tq, Tk, r0, skn, svn, sokn, qk_scale, oqk_scale, KMASK,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_V: tl.constexpr,
              HOLD_SELF: tl.constexpr, FUSED_KL: tl.constexpr, INPUT_PREC: tl.constexpr):
    """One key tile of the online softmax (and of the fused per-head KL)."""
    kt = _load_cols(k_base, offs_n, Tk, offs_d, D, skn)
    s = tl.dot(q, kt, input_precision=INPUT_PREC) * qk_scale
    if MASKED:
        keep = _allowed(offs_m, offs_n, Tq, Tk, KMASK, b, CAUSAL, HAS_KMASK)
        if HOLD_SELF:
            keep = keep & ~(_is_self(offs_m, offs_n, Tq, Tk) & (offs_m >= r0)[:, None])
    else:
        keep = _key_mask(offs_n, Tk, KMASK, b, HAS_KMASK)
    s = tl.where(keep, s, NEG_INF)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
    corr = tl.exp2(m_i - m_use)
    e = tl.exp2(s - m_use[:, None])
    l_i = l_i * corr + tl.sum(e, axis=1)
    if HAS_V:
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :],
                    mask=(offs_n < Tk)[:, None] & (offs_dv < D_V)[None, :], other=0.0)
        acc = acc * corr[:, None] + tl.dot(e.to(v.dtype), v, input_precision=INPUT_PREC)
    if FUSED_KL != 0:
        kot = _load_cols(ko_base, offs_n, Tk, offs_do, D_O, sokn)
        so = tl.dot(qo, kot, input_precision=INPUT_PREC) * oqk_scale
        if FUSED_KL == 1:  # KL(r || p): sum_S r (s_old - s), r = exp2(so - offo2)
            r = tl.where(keep, tl.exp2(so - offo2[:, None]), 0.0)
            kl_acc += tl.sum(tl.where(keep, r * (so - s), 0.0), axis=1)
            r_acc += tl.sum(r, axis=1)
        else:  # KL(p || r): sum_S exp2(s - m) (s - s_old), rescaled like l
            kl_acc = kl_acc * corr + tl.sum(tl.where(keep, e * (s - so), 0.0), axis=1)
            r_acc += tl.sum(tl.where(keep, tl.exp2(so - offo2[:, None]), 0.0), axis=1)
    return m_new, l_i, acc, kl_acc, r_acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, LSES, KMASK, QO, KO, OFFO, DIVF, RMASS,
    qk_scale, oqk_scale, Tq, Tk, r0, pos0, n_rows, H, GQA, GQA_OLD,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    soqb, soqh, soqm, sokb, sokh, sokn,
    D, D_V, D_O,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, HAS_V: tl.constexpr, HOLD_SELF: tl.constexpr,
    FUSED_KL: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Rows ``offs_r`` of ``Q`` are query positions ``pos0 + offs_r`` (``pos0`` = 0 for the
    current policy, ``r0`` for the old policy's cached rows). Writes ``LSE`` ``[B, H,
    n_rows]`` and, with ``HOLD_SELF``, ``LSES`` ``[B, H, Tq - r0]``; with ``FUSED_KL`` the
    per-head divergence ``DIVF`` and the old policy's mass ``RMASS`` ``[B, H, Tq - r0]``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    g = h // GQA
    R = Tq - r0
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = pos0 + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_do = tl.arange(0, BLOCK_DO)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = _load_rows(Q + b * sqb + h * sqh, offs_r, n_rows, offs_d, D, sqm)
    k_base = K + b * skb + g * skh
    v_base = V + b * svb + g * svh
    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    kl_acc = tl.zeros([BLOCK_M], tl.float32)
    r_acc = tl.zeros([BLOCK_M], tl.float32)
    qo = q
    ko_base = K
    offo2 = tl.zeros([BLOCK_M], tl.float32)
    rows_div = offs_m - r0
    if FUSED_KL != 0:  # the old side of the divergence rows (zero rows and +inf offsets before r0)
        qo = _load_rows(QO + b * soqb + h * soqh, tl.maximum(rows_div, 0), tl.where(rows_div >= 0, R, 0),
                        offs_do, D_O, soqm)
        ko_base = KO + b * sokb + (h // GQA_OLD) * sokh
        offo2 = tl.load(OFFO + pid_bh * R + rows_div, mask=(rows_div >= 0) & (offs_r < n_rows),
                        other=float("inf")) * LOG2E
    row0 = pos0 + pid_m * BLOCK_M
    n_full = _unmasked_end(row0, Tq, Tk, BLOCK_N, CAUSAL)
    if HOLD_SELF and not CAUSAL:
        n_full = 0  # a held row's own key may lie in any tile
    hi = _key_end(row0 + BLOCK_M, Tq, Tk, CAUSAL)
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc, kl_acc, r_acc = _fwd_tile(
            q, m_i, l_i, acc, kl_acc, r_acc, k_base, v_base, qo, ko_base, offo2, b, offs_m, start_n + offs_n0,
            offs_d, offs_dv, offs_do, D, D_V, D_O, Tq, Tk, r0, skn, svn, sokn, qk_scale, oqk_scale, KMASK,
            False, CAUSAL, HAS_KMASK, HAS_V, HOLD_SELF, FUSED_KL, INPUT_PREC)
    for start_n in range(n_full, hi, BLOCK_N):
        m_i, l_i, acc, kl_acc, r_acc = _fwd_tile(
            q, m_i, l_i, acc, kl_acc, r_acc, k_base, v_base, qo, ko_base, offo2, b, offs_m, start_n + offs_n0,
            offs_d, offs_dv, offs_do, D, D_V, D_O, Tq, Tk, r0, skn, svn, sokn, qk_scale, oqk_scale, KMASK,
            True, CAUSAL, HAS_KMASK, HAS_V, HOLD_SELF, FUSED_KL, INPUT_PREC)
    l_safe = tl.where(l_i == 0, 1.0, l_i)
    lse_s2 = tl.where(l_i == 0, NEG_INF, m_i + tl.log2(l_safe))  # over the sweep's keys (the support, if held)
    lse2 = lse_s2
    out = acc / l_safe[:, None]
    if HOLD_SELF:  # merge each held row's own key back in: one row-wise dot
        pos = offs_m + (Tk - Tq)
        self_ok = (offs_m >= r0) & (offs_r < n_rows) & (pos >= 0) & (pos < Tk)
        if HAS_KMASK:
            self_ok = self_ok & (tl.load(KMASK + b * Tk + pos, mask=self_ok, other=0) != 0)
        k_self = _load_rows(k_base, tl.where(self_ok, pos, 0), tl.where(self_ok, Tk, 0), offs_d, D, skn)
        s_self = tl.where(self_ok, tl.sum(q.to(tl.float32) * k_self.to(tl.float32), axis=1) * qk_scale, NEG_INF)
        lse2 = _logaddexp2(lse_s2, s_self)
        if HAS_V:
            lse_use = tl.where(lse2 == NEG_INF, 0.0, lse2)
            v_self = _load_rows(v_base, tl.where(self_ok, pos, 0), tl.where(self_ok, Tk, 0), offs_dv, D_V, svn)
            out = out * tl.exp2(lse_s2 - lse_use)[:, None] + v_self.to(tl.float32) * tl.exp2(s_self - lse_use)[:, None]
    row_ok = offs_r < n_rows
    if HAS_V:
        tl.store(O + b * sob + h * soh + offs_r[:, None] * som + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv < D_V)[None, :])
    tl.store(LSE + pid_bh * n_rows + offs_r, _lse_nat(lse2, True), mask=row_ok)
    div_row = row_ok & (rows_div >= 0)
    if HOLD_SELF:
        tl.store(LSES + pid_bh * R + rows_div, _lse_nat(lse_s2, False), mask=div_row)
    if FUSED_KL != 0:
        lse_s_nat = lse_s2 * LN2
        offo_nat = offo2 * LN2
        if FUSED_KL == 1:
            dval = kl_acc * LN2 + (lse_s_nat - offo_nat) * r_acc
        else:
            dval = kl_acc / l_safe * LN2 - lse_s_nat + offo_nat
        ok = div_row & (l_i != 0) & (offo2 != float("inf"))  # NaN stays NaN
        tl.store(DIVF + pid_bh * R + rows_div, tl.where(ok, dval, 0.0), mask=div_row)
        tl.store(RMASS + pid_bh * R + rows_div, r_acc, mask=div_row)


# --------------------------------------------------------------------------- divergence passes

@triton.jit
def _policy_sum(Q, K, OFF, b, grp, n_heads, GQA, sqb, sqh, sqm, skb, skh, skn, soffb, soffh,
                offs_r, R, offs_n, offs_d, D, Tk, qk_scale, supp, SCR, INPUT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE: tl.constexpr):
    """``sum_h exp2(s2_h - off2_h + SCALE_LOG2)`` over the group's heads on a tile (``Q``
    rows = cached rows ``offs_r``). ``STORE``: also keep each head's ``pi^_h`` tile in the
    program's scratch ``SCR`` ``[n_heads, BLOCK_M, BLOCK_N]`` for a second pass over the
    heads (so each head's scores and exponentials are formed once per tile)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    for hh in range(0, n_heads):
        h = grp * n_heads + hh
        q = _load_rows(Q + b * sqb + h * sqh, offs_r, R, offs_d, D, sqm)
        kt = _load_cols(K + b * skb + (h // GQA) * skh, offs_n, Tk, offs_d, D, skn)
        off2 = tl.load(OFF + b * soffb + h * soffh + offs_r, mask=offs_r < R, other=float("inf")) * LOG2E
        s = tl.dot(q, kt, input_precision=INPUT_PREC) * qk_scale
        pi_hat = tl.where(supp, tl.exp2(s - off2[:, None] + SCALE_LOG2), 0.0)
        acc += pi_hat
        if STORE:
            tl.store(SCR + hh * BLOCK_M * BLOCK_N + tile, pi_hat)
    return acc


@triton.jit
def _tile_policies(Q, K, OFF, QO, KO, OFFO, KMASK, b, grp, n_heads, n_old, GQA, GQA_OLD,
                   sqb, sqh, sqm, skb, skh, skn, soffb, soffh,
                   soqb, soqh, soqm, sokb, sokh, sokn, soffob, soffoh,
                   offs_r, r0, offs_n, offs_d, offs_do, D, D_O, Tq, Tk, qk_scale, oqk_scale, SCR,
                   CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                   INPUT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE: tl.constexpr):
    """Support and scaled policies ``p^ = p 2^SCALE_LOG2``, ``r^`` on a tile of cached rows
    ``offs_r`` (positions ``r0 + offs_r``); ``STORE`` keeps the current heads' ``pi^_h``."""
    R = Tq - r0
    offs_m = r0 + offs_r
    supp = _allowed(offs_m, offs_n, Tq, Tk, KMASK, b, CAUSAL, HAS_KMASK)
    if EXCLUDE_SELF:
        supp = supp & ~_is_self(offs_m, offs_n, Tq, Tk)
    # The current side's Q holds all Tq rows: its cached row r is row r0 + r.
    p_hat = _policy_sum(Q + r0 * sqm, K, OFF, b, grp, n_heads, GQA, sqb, sqh, sqm, skb, skh, skn, soffb, soffh,
                        offs_r, R, offs_n, offs_d, D, Tk, qk_scale, supp, SCR, INPUT_PREC, BLOCK_M, BLOCK_N, STORE)
    r_hat = _policy_sum(QO, KO, OFFO, b, grp, n_old, GQA_OLD, soqb, soqh, soqm, sokb, sokh, sokn, soffob, soffoh,
                        offs_r, R, offs_n, offs_do, D_O, Tk, oqk_scale, supp, SCR, INPUT_PREC, BLOCK_M, BLOCK_N,
                        False)
    return supp, p_hat, r_hat


@triton.jit
def _div_fwd_kernel(
    Q, K, OFF, QO, KO, OFFO, KMASK, DIV, E, RMASS,
    qk_scale, oqk_scale, Tq, Tk, r0, GROUPS, n_heads, n_old, GQA, GQA_OLD, split_keys, s_split,
    sqb, sqh, sqm, skb, skh, skn, soffb, soffh,
    soqb, soqh, soqm, sokb, sokh, sokn, soffob, soffoh,
    D, D_O,
    DIVERGENCE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    INPUT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Partial row sums (divergence, ``E = sum p g``, old mass) of one row block, group and
    key split (``split_keys`` keys from ``pid_s * split_keys``), into ``[splits, B, G, R]``."""
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bg // GROUPS
    grp = pid_bg % GROUPS
    R = Tq - r0
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = tl.arange(0, BLOCK_DO)
    d_acc = tl.zeros([BLOCK_M], tl.float32)
    e_acc = tl.zeros([BLOCK_M], tl.float32)
    r_acc = tl.zeros([BLOCK_M], tl.float32)
    lo = pid_s * split_keys
    hi = tl.minimum(lo + split_keys, _key_end(r0 + (pid_m + 1) * BLOCK_M, Tq, Tk, CAUSAL))
    for start_n in range(lo, hi, BLOCK_N):
        supp, p_hat, r_hat = _tile_policies(
            Q, K, OFF, QO, KO, OFFO, KMASK, b, grp, n_heads, n_old, GQA, GQA_OLD,
            sqb, sqh, sqm, skb, skh, skn, soffb, soffh, soqb, soqh, soqm, sokb, sokh, sokn, soffob, soffoh,
            offs_r, r0, start_n + offs_n0, offs_d, offs_do, D, D_O, Tq, Tk, qk_scale, oqk_scale, DIV,
            CAUSAL, HAS_KMASK, EXCLUDE_SELF, INPUT_PREC, BLOCK_M, BLOCK_N, False)
        on = supp & ~((p_hat == 0) & (r_hat == 0))
        t, pg = _div_terms(p_hat, r_hat, on, DIVERGENCE)
        d_acc += tl.sum(t, axis=1)
        e_acc += tl.sum(pg, axis=1)
        r_acc += tl.sum(r_hat, axis=1) * tl.exp2(-SCALE_LOG2)
    out = pid_s * s_split + pid_bg * R + offs_r
    row_ok = offs_r < R
    tl.store(DIV + out, d_acc, mask=row_ok)
    tl.store(E + out, e_acc, mask=row_ok)
    tl.store(RMASS + out, r_acc, mask=row_ok)


@triton.jit
def _div_bwd_kernel(
    Q, K, OFF, QO, KO, OFFO, KMASK, E, W, A, DQ, DK, SCR,
    sm_scale, qk_scale, oqk_scale, Tq, Tk, r0, GROUPS, n_heads, n_old, GQA, GQA_OLD, HK, split_keys,
    sqb, sqh, sqm, skb, skh, skn, soffb, soffh,
    soqb, soqh, soqm, sokb, sokh, sokn, soffob, soffoh,
    D, D_O,
    KEY_MAJOR: tl.constexpr, ATOMIC: tl.constexpr, PER_HEAD: tl.constexpr, DIVERGENCE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """``dS_h = w pi_h (g - E)`` on the support of the divergence rows, with ``pi_h g``
    formed as ``pi^_h (p g) / p^``.

    Row-major (``KEY_MAJOR`` False): program = (row block, batch x group, key split); adds to
    ``dq`` (its rows; atomically across key splits), to ``dk`` atomically when ``ATOMIC``,
    and the row sums ``A_h = sum_S pi_h g``. Key-major (the deterministic second launch):
    program = (key block, batch x owner), the owner being the whole batch ("mean") or one KV
    head ("none"); it owns ``dk`` of its key block. ``DQ``/``DK`` are float32 buffers
    ``[.., BLOCK_D]``-padded. ``SCR``: per program, ``[n_heads, BLOCK_M, BLOCK_N]`` float32
    scratch that carries each head's ``pi^_h`` from the pass that sums the policy to the
    pass that forms the gradient (O(tile) per program, never ``Tq x Tk``)."""
    prog = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    scr = SCR + prog.to(tl.int64) * n_heads * BLOCK_M * BLOCK_N
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    R = Tq - r0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = tl.arange(0, BLOCK_DO)
    if KEY_MAJOR:
        pid_n = tl.program_id(0)
        pid_bo = tl.program_id(1).to(tl.int64)
        if not PER_HEAD:
            b = pid_bo
            grp_lo = 0
            grp_hi = 1
        else:  # one KV head: its GQA query heads are groups g * GQA .. g * GQA + GQA - 1
            b = pid_bo // HK
            grp_lo = (pid_bo % HK) * GQA
            grp_hi = grp_lo + GQA
        n_lo = pid_n * BLOCK_N
        n_hi = n_lo + BLOCK_N
        m_lo = 0
        if CAUSAL:
            m_lo = tl.maximum(n_lo - (Tk - Tq) - r0, 0) // BLOCK_M * BLOCK_M
        m_hi = R
    else:
        pid_m = tl.program_id(0)
        pid_bg = tl.program_id(1).to(tl.int64)
        pid_s = tl.program_id(2)
        b = pid_bg // GROUPS
        grp_lo = pid_bg % GROUPS
        grp_hi = grp_lo + 1
        m_lo = pid_m * BLOCK_M
        m_hi = m_lo + BLOCK_M
        n_lo = pid_s * split_keys
        n_hi = n_lo + split_keys
    for grp in range(grp_lo, grp_hi):
        bg = b * GROUPS + grp
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_r = start_m + offs_m0
            row_ok = offs_r < R
            e = tl.load(E + bg * R + offs_r, mask=row_ok, other=0.0)
            w = tl.load(W + bg * R + offs_r, mask=row_ok, other=0.0)
            n_end = tl.minimum(n_hi, _key_end(r0 + start_m + BLOCK_M, Tq, Tk, CAUSAL))
            for start_n in range(n_lo, n_end, BLOCK_N):
                offs_n = start_n + offs_n0
                supp, p_hat, r_hat = _tile_policies(
                    Q, K, OFF, QO, KO, OFFO, KMASK, b, grp, n_heads, n_old, GQA, GQA_OLD,
                    sqb, sqh, sqm, skb, skh, skn, soffb, soffh, soqb, soqh, soqm, sokb, sokh, sokn, soffob, soffoh,
                    offs_r, r0, offs_n, offs_d, offs_do, D, D_O, Tq, Tk, qk_scale, oqk_scale, scr,
                    CAUSAL, HAS_KMASK, EXCLUDE_SELF, INPUT_PREC, BLOCK_M, BLOCK_N, True)
                tl.debug_barrier()  # the pi^_h tiles in scratch are read back by other threads
                on = supp & ~((p_hat == 0) & (r_hat == 0))
                _, pg = _div_terms(p_hat, r_hat, on, DIVERGENCE)
                # pi_h g = pi^_h * (p g / p^); with E: dS_h = w pi^_h (p g / p^ - E 2^-SCALE)
                coef = tl.where(p_hat == 0, 0.0, pg / tl.where(p_hat == 0, 1.0, p_hat))
                gam = coef - e[:, None] * tl.exp2(-SCALE_LOG2)
                for hh in range(0, n_heads):
                    h = grp * n_heads + hh
                    kv = h // GQA
                    q_ptr = Q + b * sqb + h * sqh + r0 * sqm
                    k_ptr = K + b * skb + kv * skh
                    q = _load_rows(q_ptr, offs_r, R, offs_d, D, sqm)
                    kt = _load_cols(k_ptr, offs_n, Tk, offs_d, D, skn)
                    pi_hat = tl.load(scr + hh * BLOCK_M * BLOCK_N + tile)
                    ds = pi_hat * gam * w[:, None] * sm_scale
                    if KEY_MAJOR:
                        dk_ptr = DK + ((b * HK + kv) * Tk + offs_n[:, None]) * BLOCK_D + offs_d[None, :]
                        upd = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=INPUT_PREC)
                        tl.store(dk_ptr, tl.load(dk_ptr, mask=(offs_n < Tk)[:, None], other=0.0) + upd,
                                 mask=(offs_n < Tk)[:, None])
                    else:
                        dq_ptr = DQ + ((b * GROUPS * n_heads + h) * Tq + r0 + offs_r[:, None]) * BLOCK_D + offs_d[None, :]
                        upd = tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PREC)
                        if ATOMIC:
                            tl.atomic_add(dq_ptr, upd, mask=row_ok[:, None])
                            dk_ptr = DK + ((b * HK + kv) * Tk + offs_n[:, None]) * BLOCK_D + offs_d[None, :]
                            tl.atomic_add(dk_ptr, tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=INPUT_PREC),
                                          mask=(offs_n < Tk)[:, None])
                        else:
                            tl.store(dq_ptr, tl.load(dq_ptr, mask=row_ok[:, None], other=0.0) + upd,
                                     mask=row_ok[:, None])
                        a_ptr = A + (b * GROUPS * n_heads + h) * R + offs_r
                        tl.atomic_add(a_ptr, tl.sum(pi_hat * coef, axis=1), mask=row_ok)
                tl.debug_barrier()  # the next tile's pass may overwrite the scratch only after these reads


# --------------------------------------------------------------------------- attention backward

@triton.jit
def _fused_kl_ds(s, so, off2, offo2, w, dval, supp, FUSED_KL: tl.constexpr):
    """The per-head divergence's dS (natural units, before sm_scale) on the support:
    ``w (p - r)`` for KL(r || p), ``w p (log p - log r - D)`` for KL(p || r)."""
    supp = supp & (off2 != float("inf"))  # rows without a divergence carry +inf offsets
    p = tl.where(supp, tl.exp2(s - off2), 0.0)
    r = tl.where(supp, tl.exp2(so - offo2), 0.0)
    if FUSED_KL == 1:
        return w * (p - r)
    else:
        lp_lr = tl.where(supp, ((s - off2) - (so - offo2)) * LN2, 0.0)
        return w * p * (lp_lr - dval)


@triton.jit
def _bwd_tile(dk, dv, k, v, b, h, g, HK, GQA, start_m, offs_m0, offs_n, offs_d, offs_dv, offs_do,
              Q, DO, LSE, DELTA, DQ, KMASK, QO, KO, OFF, OFFO, W, DIVR,
              sm_scale, qk_scale, oqk_scale, Tq, Tk, r0, GQA_OLD,
              sqb, sqh, sqm, sdob, sdoh, sdom, soqb, soqh, soqm, sokb, sokh, sokn, D, D_V, D_O,
              MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, FUSED_KL: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, INPUT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row block of the key-major backward (transposed tiles ``S^T = K Q^T``)."""
    R = Tq - r0
    offs_m = start_m + offs_m0
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, Tq, offs_d, D, sqm)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, Tq, offs_dv, D_V, sdom)
    row_base = (b * HK * GQA + h) * Tq
    lse2 = tl.load(LSE + row_base + offs_m, mask=offs_m < Tq, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Tq, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    if MASKED:
        ok_t = tl.trans(_allowed(offs_m, offs_n, Tq, Tk, KMASK, b, CAUSAL, HAS_KMASK))
    else:
        ok_t = tl.trans(_key_mask(offs_n, Tk, KMASK, b, HAS_KMASK))
    p_t = tl.where(ok_t, tl.exp2(s_t - lse2[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    if FUSED_KL != 0:
        if start_m + BLOCK_M > r0:  # the block holds divergence rows: add their dS
            rows = offs_m - r0
            rv = (rows >= 0) & (offs_m < Tq)
            qo = _load_rows(QO + b * soqb + h * soqh, tl.maximum(rows, 0), tl.where(rows >= 0, R, 0), offs_do,
                            D_O, soqm)
            ko = _load_rows(KO + b * sokb + (h // GQA_OLD) * sokh, offs_n, Tk, offs_do, D_O, sokn)
            so_t = tl.dot(ko, tl.trans(qo), input_precision=INPUT_PREC) * oqk_scale
            bh = b * HK * GQA + h
            off2 = tl.load(OFF + bh * R + rows, mask=rv, other=float("inf")) * LOG2E
            offo2 = tl.load(OFFO + bh * R + rows, mask=rv, other=float("inf")) * LOG2E
            w = tl.load(W + bh * R + rows, mask=rv, other=0.0)
            dval = tl.load(DIVR + bh * R + rows, mask=rv, other=0.0)
            supp_t = tl.trans(_allowed(offs_m, offs_n, Tq, Tk, KMASK, b, CAUSAL, HAS_KMASK))
            if EXCLUDE_SELF:
                supp_t = supp_t & ~tl.trans(_is_self(offs_m, offs_n, Tq, Tk))
            ds_t += _fused_kl_ds(s_t, so_t, off2[None, :], offo2[None, :], w[None, :], dval[None, :], supp_t,
                                 FUSED_KL)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PREC)
    if ATOMIC_DQ:
        dq_ptr = DQ + (row_base + offs_m[:, None]) * BLOCK_D + offs_d[None, :]
        tl.atomic_add(dq_ptr, tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=INPUT_PREC) * sm_scale,
                      mask=(offs_m < Tq)[:, None])
    return dk, dv


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, KMASK, QO, KO, OFF, OFFO, W, DIVR,
    sm_scale, qk_scale, oqk_scale, Tq, Tk, r0, HK, GQA, GQA_OLD,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    soqb, soqh, soqm, sokb, sokh, sokn,
    D, D_V, D_O,
    ATOMIC_DQ: tl.constexpr, FUSED_KL: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """dk, dv of one key block of one KV head (summed over its query heads, added to what the
    divergence pass left in ``DK``), and, with ``ATOMIC_DQ``, dq added atomically (the
    flash-attention-2 backward: 5 matmuls per tile). Only the row blocks on the causal
    diagonal and at the sequence end are masked."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HK
    g = pid_bh % HK
    n_first = pid_n * BLOCK_N
    offs_n = n_first + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_do = tl.arange(0, BLOCK_DO)
    k = _load_rows(K + b * skb + g * skh, offs_n, Tk, offs_d, D, skn)
    v = _load_rows(V + b * svb + g * svh, offs_n, Tk, offs_dv, D_V, svn)
    dk_ptr = DK + (b * HK + g) * Tk * BLOCK_D + offs_n[:, None] * BLOCK_D + offs_d[None, :]
    dv_ptr = DV + (b * HK + g) * Tk * BLOCK_DV + offs_n[:, None] * BLOCK_DV + offs_dv[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL:  # rows that see this block: i >= j - (Tk - Tq)
        lo = tl.maximum(n_first - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
    # Row blocks in [m_full, m_even) see every key of this block, none as their own key.
    m_even = Tq // BLOCK_M * BLOCK_M
    m_full = lo
    if CAUSAL:
        m_full = tl.minimum(tl.cdiv(tl.maximum(n_first + BLOCK_N - (Tk - Tq), 0), BLOCK_M) * BLOCK_M, m_even)
    elif EXCLUDE_SELF and FUSED_KL != 0:
        m_full = m_even
    if n_first + BLOCK_N > Tk:
        m_full = m_even  # the key block crosses the sequence end: mask every tile
    m_full = tl.maximum(m_full, lo)
    for hh in range(0, GQA):
        h = g * GQA + hh
        for start_m in range(lo, m_full, BLOCK_M):
            dk, dv = _bwd_tile(dk, dv, k, v, b, h, g, HK, GQA, start_m, offs_m0, offs_n, offs_d, offs_dv, offs_do,
                               Q, DO, LSE, DELTA, DQ, KMASK, QO, KO, OFF, OFFO, W, DIVR,
                               sm_scale, qk_scale, oqk_scale, Tq, Tk, r0, GQA_OLD,
                               sqb, sqh, sqm, sdob, sdoh, sdom, soqb, soqh, soqm, sokb, sokh, sokn, D, D_V, D_O,
                               True, ATOMIC_DQ, FUSED_KL, EXCLUDE_SELF, CAUSAL, HAS_KMASK, INPUT_PREC, BLOCK_M, BLOCK_D)
        for start_m in range(m_full, m_even, BLOCK_M):
            dk, dv = _bwd_tile(dk, dv, k, v, b, h, g, HK, GQA, start_m, offs_m0, offs_n, offs_d, offs_dv, offs_do,
                               Q, DO, LSE, DELTA, DQ, KMASK, QO, KO, OFF, OFFO, W, DIVR,
                               sm_scale, qk_scale, oqk_scale, Tq, Tk, r0, GQA_OLD,
                               sqb, sqh, sqm, sdob, sdoh, sdom, soqb, soqh, soqm, sokb, sokh, sokn, D, D_V, D_O,
                               False, ATOMIC_DQ, FUSED_KL, EXCLUDE_SELF, CAUSAL, HAS_KMASK, INPUT_PREC, BLOCK_M,
                               BLOCK_D)
        for start_m in range(tl.maximum(m_even, lo), Tq, BLOCK_M):
            dk, dv = _bwd_tile(dk, dv, k, v, b, h, g, HK, GQA, start_m, offs_m0, offs_n, offs_d, offs_dv, offs_do,
                               Q, DO, LSE, DELTA, DQ, KMASK, QO, KO, OFF, OFFO, W, DIVR,
                               sm_scale, qk_scale, oqk_scale, Tq, Tk, r0, GQA_OLD,
                               sqb, sqh, sqm, sdob, sdoh, sdom, soqb, soqh, soqm, sokb, sokh, sokn, D, D_V, D_O,
                               True, ATOMIC_DQ, FUSED_KL, EXCLUDE_SELF, CAUSAL, HAS_KMASK, INPUT_PREC, BLOCK_M, BLOCK_D)
    key_ok = (offs_n < Tk)[:, None]
    tl.store(dk_ptr, tl.load(dk_ptr, mask=key_ok, other=0.0) + dk * sm_scale, mask=key_ok)
    tl.store(dv_ptr, dv, mask=key_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KMASK, QO, KO, OFF, OFFO, W, DIVR,
    sm_scale, qk_scale, oqk_scale, Tq, Tk, r0, HQ, GQA, GQA_OLD,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    soqb, soqh, soqm, sokb, sokh, sokn,
    D, D_V, D_O,
    FUSED_KL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
    INPUT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """dq of one query block of one head, added to ``DQ`` (the deterministic backward)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    g = h // GQA
    R = Tq - r0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_do = tl.arange(0, BLOCK_DO)
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, Tq, offs_d, D, sqm)
    do = _load_rows(DO + b * sdob + h * sdoh, offs_m, Tq, offs_dv, D_V, sdom)
    lse2 = tl.load(LSE + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + b * skb + g * skh
    v_base = V + b * svb + g * svh
    rows = offs_m - r0
    rv = (rows >= 0) & (offs_m < Tq)
    if FUSED_KL != 0:
        qo = _load_rows(QO + b * soqb + h * soqh, tl.maximum(rows, 0), tl.where(rows >= 0, R, 0), offs_do, D_O, soqm)
        ko_base = KO + b * sokb + (h // GQA_OLD) * sokh
        off2 = tl.load(OFF + pid_bh * R + rows, mask=rv, other=float("inf")) * LOG2E
        offo2 = tl.load(OFFO + pid_bh * R + rows, mask=rv, other=float("inf")) * LOG2E
        w = tl.load(W + pid_bh * R + rows, mask=rv, other=0.0)
        dval = tl.load(DIVR + pid_bh * R + rows, mask=rv, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = _key_end((pid_m + 1) * BLOCK_M, Tq, Tk, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = _load_cols(k_base, offs_n, Tk, offs_d, D, skn)
        s = tl.dot(q, kt, input_precision=INPUT_PREC) * qk_scale
        ok = _allowed(offs_m, offs_n, Tq, Tk, KMASK, b, CAUSAL, HAS_KMASK)
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        vt = _load_cols(v_base, offs_n, Tk, offs_dv, D_V, svn)
        dp = tl.dot(do, vt, input_precision=INPUT_PREC)
        ds = p * (dp - delta[:, None])
        if FUSED_KL != 0:
            if (pid_m + 1) * BLOCK_M > r0:
                kot = _load_cols(ko_base, offs_n, Tk, offs_do, D_O, sokn)
                so = tl.dot(qo, kot, input_precision=INPUT_PREC) * oqk_scale
                supp = ok
                if EXCLUDE_SELF:
                    supp = supp & ~_is_self(offs_m, offs_n, Tq, Tk)
                ds += _fused_kl_ds(s, so, off2[:, None], offo2[:, None], w[:, None], dval[:, None], supp, FUSED_KL)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PREC)
    dq_ptr = DQ + pid_bh * Tq * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(dq_ptr, tl.load(dq_ptr, mask=(offs_m < Tq)[:, None], other=0.0) + dq * sm_scale,
             mask=(offs_m < Tq)[:, None])
