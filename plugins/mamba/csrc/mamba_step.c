/* Mamba's fused CPU decode step: one token of the selective state update between in_proj and out_proj.
 *
 * float32, contiguous rows; single-threaded (a token is too little work to share). Tested against the
 * layer's torch step (tests/test_native.py). Built by seqzoo.native with the system C compiler;
 * without one, the torch path runs.
 */
#include "seqzoo_kernel.h"

/* One channel's state row (N values): h' = exp(Δ·A) h + Δx·B, returns C·h'. */
static inline float ssm_row(int64_t N, float delta, float dx, const float *A_log, const float *Bv, const float *Cv,
                            const float *h, float *h_out) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; n++) {
        float decay = exp_poly(-delta * exp_poly(A_log[n]));
        float hn = decay * h[n] + dx * Bv[n];
        h_out[n] = hn;
        acc += hn * Cv[n];
    }
    return acc;
}

/* ssm_row for N = 16 (Mamba's default d_state), four channels at once: each row is one vector, the four
 * are independent chains the core overlaps (one row alone waits on its two exps in turn), and each sum
 * is a tree of halvings instead of a chain of 16 dependent adds. */
static inline void ssm_rows16x4(const float *delta, const float *x, const float *A_log, const float *Bv,
                                const float *Cv, const float *h, float *h_out, float *y) {
    float prod[4][16];
    for (int r = 0; r < 4; r++) {
        const float dr = delta[r], dx = delta[r] * x[r];
        for (int n = 0; n < 16; n++) {
            float decay = exp_poly(-dr * exp_poly(A_log[r * 16 + n]));
            float hn = decay * h[r * 16 + n] + dx * Bv[n];
            h_out[r * 16 + n] = hn;
            prod[r][n] = hn * Cv[n];
        }
    }
    for (int r = 0; r < 4; r++) {
        for (int len = 16; len > 1; len /= 2)
            for (int n = 0; n < len / 2; n++) prod[r][n] += prod[r][n + len / 2];
        y[r] = prod[r][0];
    }
}

/* Mamba's decode step between in_proj and out_proj, for rows b of xz = in_proj(u) = (x, z), per channel
 * d < D (the inner width) and state index n < N:
 *   window = conv_state[d, W−K+1:] ++ x_d,  new conv_state = conv_state[d, 1:] ++ x_d,
 *   xc_d = silu(conv_b_d + Σ_k conv_w[d, k] window_k),
 *   (δ, B, C) = x_proj_w · xc  (R + 2N rows),  Δ_d = softplus(dt_b_d + dt_w[d] · δ),
 *   h'_dn = exp(−Δ_d exp(A_log_dn)) h_dn + Δ_d xc_d B_n,
 *   y_d = (Σ_n C_n h'_dn + D_d xc_d) · silu(z_d).
 * State rows contiguous: conv (B, D, W), h (B, D, N). Returns 0, or 1 if the workspace can't be allocated. */
int32_t sz_mamba_step(int64_t B, int64_t D, int64_t N, int64_t R, int64_t W, int64_t K, const float *xz,
                      int64_t xz_stride, const float *conv_state, float *conv_out, const float *conv_w,
                      const float *conv_b, const float *x_proj_w, const float *dt_w, const float *dt_b,
                      const float *A_log, const float *Dp, const float *h, float *h_out, float *y) {
    float *xc = malloc((size_t)(2 * D + R + 2 * N) * sizeof(float));
    if (!xc) return 1;
    float *delta = xc + D, *dbc = delta + D;
    for (int64_t b = 0; b < B; b++) {
        const float *x = xz + b * xz_stride, *z = x + D, *s = conv_state + b * D * W;
        float *so = conv_out + b * D * W, *yb = y + b * D;
        const float *hb = h + b * D * N;
        float *hob = h_out + b * D * N;
        /* the causal conv of this token, and the state shifted left by one with x appended */
        for (int64_t d = 0; d < D; d++) {
            const float *w = conv_w + d * K, *window = s + d * W + W - (K - 1);
            float acc = w[K - 1] * x[d];
            for (int64_t k = 0; k < K - 1; k++) acc += w[k] * window[k];
            xc[d] = acc;
        }
        if (conv_b)
            for (int64_t d = 0; d < D; d++) xc[d] += conv_b[d];
        for (int64_t d = 0; d < D; d++) xc[d] = silu(xc[d]);
        if (D * W > 1) memcpy(so, s + 1, (size_t)(D * W - 1) * sizeof(float));
        for (int64_t d = 0; d < D; d++) so[d * W + W - 1] = x[d];
        /* (δ, B, C) = x_proj · xc, Δ = softplus(dt_proj · δ + dt_b) */
        gemv(R + 2 * N, D, x_proj_w, xc, dbc);
        gemv(D, R, dt_w, dbc, delta);
        for (int64_t d = 0; d < D; d++) delta[d] = softplus(delta[d] + dt_b[d]);
        const float *Bv = dbc + R, *Cv = dbc + R + N;
        /* the selective state update and the output */
        int64_t d0 = 0;
        if (N == 16)
            for (; d0 + 4 <= D; d0 += 4)
                ssm_rows16x4(delta + d0, xc + d0, A_log + d0 * 16, Bv, Cv, hb + d0 * 16, hob + d0 * 16, yb + d0);
        for (int64_t d = d0; d < D; d++)
            yb[d] = ssm_row(N, delta[d], delta[d] * xc[d], A_log + d * N, Bv, Cv, hb + d * N, hob + d * N);
        for (int64_t d = 0; d < D; d++) yb[d] = (yb[d] + Dp[d] * xc[d]) * silu(z[d]);
    }
    free(xc);
    return 0;
}

