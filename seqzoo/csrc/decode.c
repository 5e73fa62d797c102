/* seqzoo's fused CPU decode steps: one token of a layer's state update between its weight projections.
 *
 * float32, contiguous rows; single-threaded (a token is too little work to share). Each function has a
 * readable torch twin that it is tested against (seqzoo/native.py names them). Built once per machine
 * by seqzoo.native with the system C compiler; without one, the torch paths run.
 *
 * The loops are written so the compiler vectorises them (-O3): exp is a polynomial (Cephes' expf,
 * relative error below 2e-7 over the float range) instead of a call into libm.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIM 1024

static inline float exp_poly(float x) {
    /* e^x = 2^n · e^r, n = round(x / ln 2), |r| ≤ ln2 / 2; 0 below the smallest normal float, ∞ above
     * 88.376 (2.4e38: a hair early, Cephes' bound that keeps 2^n finite). n is rounded by adding
     * 1.5·2^23 (the float's last mantissa bits then hold n), which vectorises. */
    const float hi = 88.3762626647949f, lo = -87.3365447504f, shifter = 12582912.0f;
    float xc = x > hi ? hi : (x < lo ? lo : x);
    float t = xc * 1.44269504088896341f + shifter;
    float n = t - shifter;
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t ti, si;
    memcpy(&ti, &t, sizeof ti);
    si = (ti - 0x4B400000 + 127) << 23; /* 0x4B400000: the bits of 1.5·2^23 */
    float scale;
    memcpy(&scale, &si, sizeof scale);
    float y = p * scale;
    return x < lo ? 0.0f : (x > hi ? INFINITY : y); /* NaN passes through as NaN */
}

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

static inline float silu(float x) { return x / (1.0f + exp_poly(-x)); }

static inline float log_poly(float x) {
    /* ln x for normal x > 0 (Cephes' logf): x = m·2^e with m in [√½, √2), a polynomial in m − 1. */
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    float e = (float)(((bits >> 23) & 0xff) - 126);
    int32_t mbits = (bits & 0x007fffff) | 0x3f000000; /* m in [0.5, 1) */
    float m;
    memcpy(&m, &mbits, sizeof m);
    int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return m + y + 0.693359375f * e;
}

static inline float softplus(float x) {
    /* torch's softplus (β = 1, threshold 20): x above 20, else log1p(e^x), log1p(u) = ln(w)·u/(w − 1)
     * with w = 1 + u (exact to rounding where w − 1 loses u's low bits). */
    float u = exp_poly(x < 20.0f ? x : 20.0f), w = 1.0f + u, wm1 = w - 1.0f;
    float l = log_poly(w) * (u / (wm1 == 0.0f ? 1.0f : wm1));
    return x > 20.0f ? x : (wm1 == 0.0f ? u : l);
}

/* out = M · v for M (rows, cols) row-major: four rows at a time, so four independent sums keep the
 * FMA units busy instead of waiting on one chain. */
static void gemv(int64_t rows, int64_t cols, const float *restrict M, const float *restrict v, float *restrict out) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *m0 = M + r * cols, *m1 = m0 + cols, *m2 = m1 + cols, *m3 = m2 + cols;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t c = 0; c < cols; c++) {
            a0 += m0[c] * v[c];
            a1 += m1[c] * v[c];
            a2 += m2[c] * v[c];
            a3 += m3[c] * v[c];
        }
        out[r] = a0, out[r + 1] = a1, out[r + 2] = a2, out[r + 3] = a3;
    }
    for (; r < rows; r++) {
        const float *m = M + r * cols;
        float a = 0.0f;
#pragma omp simd reduction(+ : a)
        for (int64_t c = 0; c < cols; c++) a += m[c] * v[c];
        out[r] = a;
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

/* x̂ = (x − μ)·rstd over d values; returns rstd (biased variance, as LayerNorm). */
static float normalize(const float *x, float *x_hat, int64_t d, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int64_t j = 0; j < d; j++) mean += x[j];
    mean /= (float)d;
    for (int64_t j = 0; j < d; j++) {
        float c = x[j] - mean;
        var += c * c;
    }
    var /= (float)d;
    float rstd = 1.0f / sqrtf(var + eps);
    for (int64_t j = 0; j < d; j++) x_hat[j] = (x[j] - mean) * rstd;
    return rstd;
}

static void rotate(const float *x, const float *rope, float *out, int64_t d) {
    for (int64_t i = 0; i < d / 2; i++) {
        float a = x[2 * i], b = x[2 * i + 1], c = rope[2 * i], s = rope[2 * i + 1];
        out[2 * i] = a * c - b * s;
        out[2 * i + 1] = a * s + b * c;
    }
}

/* One token of TTT-Linear with the inner LayerNorm (f(x) = x + LN(xW + b)), per row n = 0..N−1 of
 * (batch element n / H, head h = n mod H), in the primal form of seqzoo.learner.TTTLayer.step:
 *   gate = lr_base · σ(lr_b_h + lr_w_h · x)  (lr_base alone when lr_w is NULL);
 *   tok = max(token_idx[p] + 1/(p + 1), 0)  (1 when token_idx is NULL);
 *   q, k ← RoPE(q), RoPE(k)  (rope: the (cos, sin) pairs of positions 0..b−1, (b, d/2, 2), or NULL);
 *   g = ∂/∂(kW + b) ½‖LN(kW + b) − (v − k)‖²  (the LayerNorm backward fused with the L2 loss);
 *   G'_W = G_W + kᵀ(gate·g),  G'_b = G_b + gate·g;
 *   z = q + LN(qW + b − tok·(q G'_W + G'_b));  and when W_out is given, W̄ = W − tok·G'_W, b̄ = b − tok·G'_b;
 *   when post_w is given, each batch element's z (its H heads, C = H·d values) ← LayerNorm(z)·post_w + post_b.
 * Returns 0, or 1 when d exceeds MAX_DIM (nothing written). */
int32_t sz_ttt_linear_token(int64_t N, int64_t H, int64_t d, int64_t C, const float *q, const float *k,
                            const float *v, const float *x, const float *lr_w, const float *lr_b, float lr_base,
                            const float *rope, const float *token_idx, int64_t p, const float *W,
                            const float *bias, const float *GW, const float *Gb, const float *ln_w,
                            const float *ln_b, float eps, const float *post_w, const float *post_b,
                            float post_eps, float *Z, float *GW_out, float *Gb_out, float *W_out, float *b_out) {
    if (d > MAX_DIM) return 1;
    float qr[MAX_DIM], kr[MAX_DIM], acc[MAX_DIM], acc2[MAX_DIM], x_hat[MAX_DIM], g[MAX_DIM];
    float tok = 1.0f;
    if (token_idx) {
        tok = token_idx[p] + (float)(1.0 / (double)(p + 1));
        tok = tok < 0.0f ? 0.0f : tok;
    }
    for (int64_t n = 0; n < N; n++) {
        const int64_t h = n % H;
        const float *gamma = ln_w + h * d, *beta = ln_b + h * d;
        const float *Wn = W + n * d * d, *GWn = GW + n * d * d, *bn = bias + n * d, *Gbn = Gb + n * d;
        const float *vn = v + n * d;
        float rate = lr_base;
        if (lr_w) {
            const float *xb = x + (n / H) * C, *wh = lr_w + h * C;
            float logit = 0.0f;
#pragma omp simd reduction(+ : logit)
            for (int64_t c = 0; c < C; c++) logit += xb[c] * wh[c];
            logit += lr_b[h];
            rate = lr_base * (1.0f / (1.0f + exp_poly(-logit)));
        }
        if (rope) {
            rotate(q + n * d, rope + p * d, qr, d);
            rotate(k + n * d, rope + p * d, kr, d);
        } else {
            memcpy(qr, q + n * d, d * sizeof(float));
            memcpy(kr, k + n * d, d * sizeof(float));
        }
        /* the gradient at the mini-batch-start weights */
        for (int64_t j = 0; j < d; j++) acc[j] = bn[j];
        for (int64_t i = 0; i < d; i++) {
            const float ki = kr[i], *row = Wn + i * d;
            for (int64_t j = 0; j < d; j++) acc[j] += ki * row[j];
        }
        float rstd = normalize(acc, x_hat, d, eps);
        float mean_g = 0.0f, mean_gx = 0.0f;
        for (int64_t j = 0; j < d; j++) {
            g[j] = gamma[j] * gamma[j] * x_hat[j] + (gamma[j] * beta[j] + gamma[j] * (kr[j] - vn[j]));
            mean_g += g[j];
            mean_gx += g[j] * x_hat[j];
        }
        mean_g /= (float)d;
        mean_gx /= (float)d;
        for (int64_t j = 0; j < d; j++) g[j] = rate * ((g[j] - mean_g - x_hat[j] * mean_gx) * rstd);
        /* G' and the output's two products in one pass over the rows */
        float *GWo = GW_out + n * d * d, *Gbo = Gb_out + n * d;
        for (int64_t j = 0; j < d; j++) {
            acc[j] = 0.0f;
            acc2[j] = 0.0f;
        }
        for (int64_t i = 0; i < d; i++) {
            const float qi = qr[i], ki = kr[i], *row = Wn + i * d, *grow = GWn + i * d;
            float *orow = GWo + i * d;
            for (int64_t j = 0; j < d; j++) {
                float gw = grow[j] + ki * g[j];
                orow[j] = gw;
                acc[j] += qi * row[j];
                acc2[j] += qi * gw;
            }
        }
        for (int64_t j = 0; j < d; j++) {
            Gbo[j] = Gbn[j] + g[j];
            acc[j] = acc[j] + bn[j] - tok * (acc2[j] + Gbo[j]);
        }
        normalize(acc, x_hat, d, eps);
        float *Zn = Z + n * d;
        for (int64_t j = 0; j < d; j++) Zn[j] = qr[j] + (beta[j] + gamma[j] * x_hat[j]);
        if (W_out) {
            float *Wo = W_out + n * d * d, *bo = b_out + n * d;
            for (int64_t i = 0; i < d * d; i++) Wo[i] = Wn[i] - tok * GWo[i];
            for (int64_t j = 0; j < d; j++) bo[j] = bn[j] - tok * Gbo[j];
        }
        if (post_w && h == H - 1) { /* the batch element's last head: its whole z is done */
            float *zb = Z + (n - h) * d;
            float mean = 0.0f, var = 0.0f;
            for (int64_t j = 0; j < H * d; j++) mean += zb[j];
            mean /= (float)(H * d);
            for (int64_t j = 0; j < H * d; j++) var += (zb[j] - mean) * (zb[j] - mean);
            var /= (float)(H * d);
            const float rstd = 1.0f / sqrtf(var + post_eps);
            for (int64_t j = 0; j < H * d; j++) zb[j] = (zb[j] - mean) * rstd * post_w[j] + post_b[j];
        }
    }
    return 0;
}
