"""Triton kernels of the fused attention + divergence op.

Quantity (SPEC section 2): per query row ``i`` the attention output and the divergence
``D_i(p || r)`` between current and old attention rows, head-averaged (one group of all
heads, ``"mean"``) or per head (one group per head, ``"none"``), renormalized on the
support ``S(i)``. Every statistic is float32 in natural-log units; probabilities are
``exp(s - lse)`` with the difference taken before the exponential (not ``exp2`` of a
rescaled score) so that sharp, large-logit rows keep the accuracy of a plain softmax.

Passes and what they read / write (``R`` = cached old rows, the last ``R`` query rows):

1. ``_attn_fwd_kernel`` (all rows, per head): reads q, k, v; writes out, ``lse`` and, with
   ``exclude_self``, the support mass ``B_h`` of the divergence rows.
2. ``_old_stats_kernel`` (divergence rows, per old head): writes ``lse_old`` and the old
   support mass (skipped when the caller hands over ``lse_old``).
3. ``_div_fwd_kernel`` (divergence rows, per group): per key tile it forms the group's
   ``abar`` and ``bbar`` once, then ``p``, ``r``, the divergence terms and ``g``; it writes
   the divergence, ``E = sum_S p g`` and ``A_h = sum_S alpha_h g`` (the host turns these into
   ``c_h = (A_h - E B_h) / Z``).
4. ``_attn_bwd_dkdv_kernel`` / ``_attn_bwd_dq_kernel`` (all rows, per head): flash
   backward with ``delta_eff = rowsum(dO * O) + w c_h / n``, which carries the
   ``- alpha_h c_h`` part of the divergence's ``dS``.
5. ``_div_bwd_kernel`` (divergence rows, per group): the ``alpha_h G_j`` part, with
   ``G_j = (g_j - E) / Z``; ``abar``/``bbar`` of a tile are formed once for all heads of the
   group. Row-major programs add to ``dq`` (each owns its rows), key-major programs add to
   ``dk`` (each owns its key block), so no atomics and the result is deterministic.

Nothing of size ``Tq x Tk`` is ever written: only ``[BLOCK_M, BLOCK_N]`` tiles live in
registers / shared memory; the outputs are ``O(T)`` per head.
"""

import triton
import triton.language as tl

TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32, as in _semantics


@triton.jit
def _allowed(offs_m, offs_n, Tq, Tk, km_ptr, b, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr):
    """allowed(i, j) for query rows ``offs_m`` and keys ``offs_n`` of batch ``b``."""
    ok = (offs_n < Tk)[None, :] & (offs_m < Tq)[:, None]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
    if HAS_KMASK:
        km = tl.load(km_ptr + b * Tk + offs_n, mask=offs_n < Tk, other=0)
        ok = ok & (km != 0)[None, :]
    return ok


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
def _div_terms(p, r, DIVERGENCE: tl.constexpr):
    """Pointwise divergence terms and g = dD/dp; zero where p = r = 0 (off the support).
    DIVERGENCE: 0 = jsd, 1 = kl (old || new), 2 = reverse_kl (new || old)."""
    on = (p > 0) | (r > 0)
    log_p = tl.log(tl.maximum(p, TINY))
    log_r = tl.log(tl.maximum(r, TINY))
    if DIVERGENCE == 0:
        log_m = tl.log(tl.maximum((p + r) * 0.5, TINY))
        t = 0.5 * (p * (log_p - log_m) + r * (log_r - log_m))
        g = 0.5 * (log_p - log_m)
    elif DIVERGENCE == 1:
        t = r * (log_r - log_p)
        g = -r / tl.maximum(p, TINY)
    else:
        t = p * (log_p - log_r)
        g = log_p - log_r + 1.0
    return tl.where(on, t, 0.0), tl.where(on, g, 0.0)


@triton.jit
def _masked_scores(q, k_base, offs_m, offs_n, offs_d, D, Tq, Tk, skn, scale_s, KMASK, b,
                   CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, INPUT_PREC: tl.constexpr):
    """Scores of a query tile against keys ``offs_n`` (-inf where not allowed) and the
    transposed key tile ``[BLOCK_D, BLOCK_N]`` they came from."""
    kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None],
                 mask=(offs_n < Tk)[None, :] & (offs_d < D)[:, None], other=0.0)
    s = tl.dot(q, kt, input_precision=INPUT_PREC) * scale_s
    s = tl.where(_allowed(offs_m, offs_n, Tq, Tk, KMASK, b, CAUSAL, HAS_KMASK), s, float("-inf"))
    return s, kt


@triton.jit
def _online_softmax(m_i, l_i, ls_i, s, offs_m, offs_n, Tq, Tk, EXCLUDE_SELF: tl.constexpr):
    """One key tile of the running max / sum of exponentials (and the support's share,
    without the self position). Returns the new state, the rescale factor and exp(s - m)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    corr = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    l_i = l_i * corr + tl.sum(p, axis=1)
    if EXCLUDE_SELF:
        ls_i = ls_i * corr + tl.sum(tl.where(_is_self(offs_m, offs_n, Tq, Tk), 0.0, p), axis=1)
    return m_new, l_i, ls_i, corr, p


@triton.jit
def _finish_lse(m_i, l_i):
    """``(l_safe, lse)``: the sum with empty rows set to 1, and the log-sum-exp (+inf for
    a row with no key, flash-attn's convention)."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    return l_safe, tl.where(l_i > 0, m_i + tl.log(l_safe), float("inf"))


# --------------------------------------------------------------------------- forward

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASS, KMASK,
    scale_s, Tq, Tk, r0, HQ, GQA,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    D, D_V,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    g = h // GQA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=(offs_m < Tq)[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = K + b * skb + g * skh
    v_base = V + b * svb + g * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    ls_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = _key_end((pid_m + 1) * BLOCK_M, Tq, Tk, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        s, _ = _masked_scores(q, k_base, offs_m, offs_n, offs_d, D, Tq, Tk, skn, scale_s, KMASK, b,
                              CAUSAL, HAS_KMASK, INPUT_PREC)
        m_new, l_i, ls_i, corr, p = _online_softmax(m_i, l_i, ls_i, s, offs_m, offs_n, Tq, Tk, EXCLUDE_SELF)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :],
                    mask=(offs_n < Tk)[:, None] & (offs_dv < D_V)[None, :], other=0.0)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PREC)
        m_i = m_new
    l_safe, lse = _finish_lse(m_i, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m < Tq)[:, None] & (offs_dv < D_V)[None, :])
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=offs_m < Tq)
    if EXCLUDE_SELF:
        R = Tq - r0
        rows = offs_m - r0
        tl.store(MASS + pid_bh * R + rows, ls_i / l_safe, mask=(rows >= 0) & (offs_m < Tq))


@triton.jit
def _old_stats_kernel(
    QO, KO, LSEO, MASSO, KMASK,
    scale_s, Tq, Tk, r0, HO, GQA,
    sqb, sqh, sqm, skb, skh, skn,
    D,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Log-sum-exp and support mass of the old policy on the R cached rows (local row r is
    query row r0 + r)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HO
    h = pid_bh % HO
    g = h // GQA
    R = Tq - r0
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = offs_r + r0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(QO + b * sqb + h * sqh + offs_r[:, None] * sqm + offs_d[None, :],
                mask=(offs_r < R)[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = KO + b * skb + g * skh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    ls_i = tl.zeros([BLOCK_M], tl.float32)
    hi = _key_end(r0 + (pid_m + 1) * BLOCK_M, Tq, Tk, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        s, _ = _masked_scores(q, k_base, offs_m, offs_n, offs_d, D, Tq, Tk, skn, scale_s, KMASK, b,
                              CAUSAL, HAS_KMASK, INPUT_PREC)
        m_i, l_i, ls_i, _, _ = _online_softmax(m_i, l_i, ls_i, s, offs_m, offs_n, Tq, Tk, EXCLUDE_SELF)
    l_safe, lse = _finish_lse(m_i, l_i)
    tl.store(LSEO + pid_bh * R + offs_r, lse, mask=offs_r < R)
    if EXCLUDE_SELF:
        mass = ls_i / l_safe
    else:
        mass = tl.where(l_i > 0, 1.0, 0.0)
    tl.store(MASSO + pid_bh * R + offs_r, mass, mask=offs_r < R)


@triton.jit
def _head_probs(Qh, Kh, LSEh, offs_r, offs_n, offs_d, D, Tk, sqm, skn, scale_s, supp, INPUT_PREC: tl.constexpr):
    """exp(s - lse) of one head on a tile, zero off ``supp``. ``Qh`` / ``LSEh`` point at the
    head's first cached row, ``Kh`` at its first key."""
    q = tl.load(Qh + offs_r[:, None] * sqm + offs_d[None, :], mask=(offs_d < D)[None, :], other=0.0)
    k = tl.load(Kh + offs_n[None, :] * skn + offs_d[:, None],
                mask=(offs_n < Tk)[None, :] & (offs_d < D)[:, None], other=0.0)
    s = tl.dot(q, k, input_precision=INPUT_PREC) * scale_s
    lse_r = tl.load(LSEh + offs_r)
    return tl.where(supp, tl.exp(s - lse_r[:, None]), 0.0)


@triton.jit
def _group_policy(Q, K, LSE, b, grp, n_heads, HQ_GQA, sqb, sqh, sqm, skb, skh, skn, slb, slh,
                  offs_r, offs_n, offs_d, D, Tk, scale_s, supp, INPUT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mean over the group's heads of their support-masked attention on a tile."""
    avg = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for hh in range(0, n_heads):
        h = grp * n_heads + hh
        avg += _head_probs(Q + b * sqb + h * sqh, K + b * skb + (h // HQ_GQA) * skh, LSE + b * slb + h * slh,
                           offs_r, offs_n, offs_d, D, Tk, sqm, skn, scale_s, supp, INPUT_PREC)
    return avg / n_heads


@triton.jit
def _tile_policies(Q, K, LSE, QO, KO, LSEO, KMASK, b, grp, n_heads, n_old, GQA, GQA_OLD,
                   sqb, sqh, sqm, skb, skh, skn, slb, slh,
                   sob, soh, som, sokb, sokh, sokn, solb, solh,
                   z, zo, offs_r, r0, offs_n, offs_d, offs_do, D, D_OLD, Tq, Tk, scale_s, oscale_s,
                   CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                   INPUT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The support mask and the renormalized group policies p (current) and r (old) of a
    tile of cached rows ``offs_r`` (query rows ``r0 + offs_r``)."""
    offs_m = offs_r + r0
    supp = _allowed(offs_m, offs_n, Tq, Tk, KMASK, b, CAUSAL, HAS_KMASK)
    if EXCLUDE_SELF:
        supp = supp & (~_is_self(offs_m, offs_n, Tq, Tk))
    abar = _group_policy(Q, K, LSE, b, grp, n_heads, GQA, sqb, sqh, sqm, skb, skh, skn, slb, slh,
                         offs_r + r0, offs_n, offs_d, D, Tk, scale_s, supp, INPUT_PREC, BLOCK_M, BLOCK_N)
    bbar = _group_policy(QO, KO, LSEO, b, grp, n_old, GQA_OLD, sob, soh, som, sokb, sokh, sokn, solb, solh,
                         offs_r, offs_n, offs_do, D_OLD, Tk, oscale_s, supp, INPUT_PREC, BLOCK_M, BLOCK_N)
    p = abar / z[:, None]
    r = bbar / zo[:, None]
    return supp, p, r


@triton.jit
def _div_fwd_kernel(
    Q, K, LSE, QO, KO, LSEO, Z, ZO, KMASK, DIV, E, A,
    scale_s, oscale_s, Tq, Tk, r0, GROUPS, n_heads, n_old, GQA, GQA_OLD,
    sqb, sqh, sqm, skb, skh, skn, slb, slh,
    sob, soh, som, sokb, sokh, sokn, solb, solh,
    D, D_OLD,
    DIVERGENCE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    INPUT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Divergence, E and A_h of a block of cached rows for one group of heads. Rows past R
    are clamped (their results are masked on store); ``Z == 0`` marks rows to skip."""
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    b = pid_bg // GROUPS
    grp = pid_bg % GROUPS
    R = Tq - r0
    offs_r_raw = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r_raw < R
    offs_r = tl.minimum(offs_r_raw, R - 1)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = tl.arange(0, BLOCK_DO)
    z = tl.load(Z + pid_bg * R + offs_r)
    zo = tl.load(ZO + pid_bg * R + offs_r)
    valid = row_ok & (z > 0)
    z = tl.where(valid, z, 1.0)
    zo = tl.where(valid & (zo > 0), zo, 1.0)
    d_acc = tl.zeros([BLOCK_M], tl.float32)
    e_acc = tl.zeros([BLOCK_M], tl.float32)
    any_valid = tl.max(valid.to(tl.int32), axis=0)
    hi = tl.where(any_valid > 0, _key_end(r0 + (pid_m + 1) * BLOCK_M, Tq, Tk, CAUSAL), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        supp, p, r = _tile_policies(
            Q, K, LSE, QO, KO, LSEO, KMASK, b, grp, n_heads, n_old, GQA, GQA_OLD,
            sqb, sqh, sqm, skb, skh, skn, slb, slh, sob, soh, som, sokb, sokh, sokn, solb, solh,
            z, zo, offs_r, r0, offs_n, offs_d, offs_do, D, D_OLD, Tq, Tk, scale_s, oscale_s,
            CAUSAL, HAS_KMASK, EXCLUDE_SELF, INPUT_PREC, BLOCK_M, BLOCK_N)
        t, gv = _div_terms(p, r, DIVERGENCE)
        d_acc += tl.sum(t, axis=1)
        e_acc += tl.sum(p * gv, axis=1)
        for hh in range(0, n_heads):
            h = grp * n_heads + hh
            alpha = _head_probs(Q + b * sqb + h * sqh, K + b * skb + (h // GQA) * skh, LSE + b * slb + h * slh,
                                offs_r + r0, offs_n, offs_d, D, Tk, sqm, skn, scale_s, supp, INPUT_PREC)
            a_ptr = A + (b * GROUPS * n_heads + h) * R + offs_r
            tl.store(a_ptr, tl.load(a_ptr) + tl.sum(alpha * gv, axis=1), mask=row_ok)
    tl.store(DIV + pid_bg * Tq + r0 + offs_r, tl.where(valid, d_acc, 0.0), mask=row_ok)
    tl.store(E + pid_bg * R + offs_r, tl.where(valid, e_acc, 0.0), mask=row_ok)


# --------------------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KMASK,
    sm_scale, Tq, Tk, HK, GQA,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    D, D_V,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dk, dv of one key block of one KV head, summed over its query heads (float32 out)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HK
    g = pid_bh % HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * skb + g * skh + offs_n[:, None] * skn + offs_d[None, :],
                mask=(offs_n < Tk)[:, None] & (offs_d < D)[None, :], other=0.0)
    v = tl.load(V + b * svb + g * svh + offs_n[:, None] * svn + offs_dv[None, :],
                mask=(offs_n < Tk)[:, None] & (offs_dv < D_V)[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL:  # rows that see this block: i >= j - (Tk - Tq)
        lo = tl.maximum(pid_n * BLOCK_N - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
    for hh in range(0, GQA):
        h = g * GQA + hh
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * HK * GQA + h) * Tq
        for start_m in range(lo, Tq, BLOCK_M):
            offs_m = start_m + offs_m0
            q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :],
                        mask=(offs_m < Tq)[:, None] & (offs_d < D)[None, :], other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PREC) * sm_scale  # [BLOCK_N, BLOCK_M]
            lse_r = tl.load(LSE + row_base + offs_m, mask=offs_m < Tq, other=float("inf"))
            ok = tl.trans(_allowed(offs_m, offs_n, Tq, Tk, KMASK, b, CAUSAL, HAS_KMASK))
            alpha_t = tl.where(ok, tl.exp(s_t - lse_r[None, :]), 0.0)
            do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :],
                         mask=(offs_m < Tq)[:, None] & (offs_dv < D_V)[None, :], other=0.0)
            dv += tl.dot(alpha_t.to(do.dtype), do, input_precision=INPUT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PREC)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Tq, other=0.0)
            ds_t = alpha_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PREC)
    tl.store(DK + (b * HK + g) * Tk * BLOCK_D + offs_n[:, None] * BLOCK_D + offs_d[None, :], dk * sm_scale,
             mask=(offs_n < Tk)[:, None])
    tl.store(DV + (b * HK + g) * Tk * BLOCK_DV + offs_n[:, None] * BLOCK_DV + offs_dv[None, :], dv,
             mask=(offs_n < Tk)[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KMASK,
    sm_scale, Tq, Tk, HQ, GQA,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    D, D_V,
    CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq of one query block of one head (float32 out, padded to BLOCK_D)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    g = h // GQA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=(offs_m < Tq)[:, None] & (offs_d < D)[None, :], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :],
                 mask=(offs_m < Tq)[:, None] & (offs_dv < D_V)[None, :], other=0.0)
    lse_r = tl.load(LSE + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + b * skb + g * skh
    v_base = V + b * svb + g * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = _key_end((pid_m + 1) * BLOCK_M, Tq, Tk, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        s, kt = _masked_scores(q, k_base, offs_m, offs_n, offs_d, D, Tq, Tk, skn, sm_scale, KMASK, b,
                               CAUSAL, HAS_KMASK, INPUT_PREC)
        alpha = tl.exp(s - lse_r[:, None])  # 0 off the allowed keys (s = -inf there)
        vt = tl.load(v_base + offs_n[None, :] * svn + offs_dv[:, None],
                     mask=(offs_n < Tk)[None, :] & (offs_dv < D_V)[:, None], other=0.0)
        dp = tl.dot(do, vt, input_precision=INPUT_PREC)
        ds = alpha * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PREC)
    tl.store(DQ + pid_bh * Tq * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :], dq * sm_scale,
             mask=(offs_m < Tq)[:, None])


@triton.jit
def _div_bwd_kernel(
    Q, K, LSE, QO, KO, LSEO, Z, ZO, E, W, KMASK, DQ, DK,
    sm_scale, old_sm_scale, Tq, Tk, r0, GROUPS, n_heads, n_old, GQA, GQA_OLD, HK,
    sqb, sqh, sqm, skb, skh, skn, slb, slh,
    sob, soh, som, sokb, sokh, sokn, solb, solh,
    D, D_OLD,
    KEY_MAJOR: tl.constexpr, PER_HEAD: tl.constexpr, DIVERGENCE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, INPUT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """The ``w / n * alpha_h * G`` part of dS for the cached rows.

    Row-major (``KEY_MAJOR`` False): program = (row block, batch x group); adds to ``dq``.
    Key-major: program = (key block, batch x owner) where the owner is the whole batch
    ("mean", one group) or one KV head and its query heads ("none"); adds to ``dk``.
    ``DQ``/``DK`` are float32 ``[.., BLOCK_D]``-padded buffers owned exclusively here.
    """
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
        m_lo = 0
        if CAUSAL:
            m_lo = tl.maximum(n_lo - (Tk - Tq) - r0, 0) // BLOCK_M * BLOCK_M
        m_hi = R
        n_hi = n_lo + BLOCK_N
    else:
        pid_m = tl.program_id(0)
        pid_bg = tl.program_id(1).to(tl.int64)
        b = pid_bg // GROUPS
        grp_lo = pid_bg % GROUPS
        grp_hi = grp_lo + 1
        m_lo = pid_m * BLOCK_M
        m_hi = m_lo + BLOCK_M
        n_lo = 0
        n_hi = _key_end(r0 + m_hi, Tq, Tk, CAUSAL)
    for grp in range(grp_lo, grp_hi):
        bg = b * GROUPS + grp
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_r_raw = start_m + offs_m0
            row_ok = offs_r_raw < R
            offs_r = tl.minimum(offs_r_raw, R - 1)
            z = tl.load(Z + bg * R + offs_r)
            zo = tl.load(ZO + bg * R + offs_r)
            valid = row_ok & (z > 0)
            z = tl.where(valid, z, 1.0)
            zo = tl.where(valid & (zo > 0), zo, 1.0)
            e = tl.load(E + bg * R + offs_r)
            w = tl.where(valid, tl.load(W + bg * R + offs_r), 0.0)
            any_valid = tl.max(valid.to(tl.int32), axis=0)
            n_end = tl.where(any_valid > 0, tl.minimum(n_hi, _key_end(r0 + start_m + BLOCK_M, Tq, Tk, CAUSAL)), n_lo)
            for start_n in range(n_lo, n_end, BLOCK_N):
                offs_n = start_n + offs_n0
                supp, p, r = _tile_policies(
                    Q, K, LSE, QO, KO, LSEO, KMASK, b, grp, n_heads, n_old, GQA, GQA_OLD,
                    sqb, sqh, sqm, skb, skh, skn, slb, slh, sob, soh, som, sokb, sokh, sokn, solb, solh,
                    z, zo, offs_r, r0, offs_n, offs_d, offs_do, D, D_OLD, Tq, Tk, sm_scale, old_sm_scale,
                    CAUSAL, HAS_KMASK, EXCLUDE_SELF, INPUT_PREC, BLOCK_M, BLOCK_N)
                _, gv = _div_terms(p, r, DIVERGENCE)
                big_g = tl.where(supp, (gv - e[:, None]) / z[:, None], 0.0) * w[:, None]
                for hh in range(0, n_heads):
                    h = grp * n_heads + hh
                    kv = h // GQA
                    q_ptr = Q + b * sqb + h * sqh
                    k_ptr = K + b * skb + kv * skh
                    alpha = _head_probs(q_ptr, k_ptr, LSE + b * slb + h * slh, offs_r + r0, offs_n, offs_d, D, Tk,
                                        sqm, skn, sm_scale, supp, INPUT_PREC)
                    ds = alpha * big_g * sm_scale
                    if KEY_MAJOR:
                        q = tl.load(q_ptr + (offs_r + r0)[:, None] * sqm + offs_d[None, :],
                                    mask=(offs_d < D)[None, :], other=0.0)
                        dk_ptr = DK + ((b * HK + kv) * Tk + offs_n[:, None]) * BLOCK_D + offs_d[None, :]
                        upd = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=INPUT_PREC)
                        tl.store(dk_ptr, tl.load(dk_ptr, mask=(offs_n < Tk)[:, None], other=0.0) + upd,
                                 mask=(offs_n < Tk)[:, None])
                    else:
                        k = tl.load(k_ptr + offs_n[:, None] * skn + offs_d[None, :],
                                    mask=(offs_n < Tk)[:, None] & (offs_d < D)[None, :], other=0.0)
                        dq_ptr = DQ + ((b * GROUPS * n_heads + h) * Tq + r0 + offs_r[:, None]) * BLOCK_D + offs_d[None, :]
                        upd = tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PREC)
                        tl.store(dq_ptr, tl.load(dq_ptr) + upd, mask=row_ok[:, None])
