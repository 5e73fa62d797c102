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
#pragma omp simd reduction(+ : mean)
    for (int64_t j = 0; j < d; j++) mean += x[j];
    mean /= (float)d;
#pragma omp simd reduction(+ : var)
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

/* g = scale · ∂/∂z ½‖LN(z)·γ + β − (v − k)‖² for one row (the LayerNorm backward fused with the L2
 * loss): with x̂ = (z − μ)·rstd and ĝ = γ²x̂ + γβ + γ(k − v), g = scale·(ĝ − mean ĝ − x̂·mean(ĝ x̂))·rstd.
 * x_hat is a workspace of d floats. */
static inline void ln_l2_grad_row(const float *z, const float *k, const float *v, const float *gamma,
                                  const float *beta, float scale, float eps, int64_t d, float *x_hat, float *g) {
    const float rstd = normalize(z, x_hat, d, eps);
    float mean_g = 0.0f, mean_gx = 0.0f;
#pragma omp simd reduction(+ : mean_g, mean_gx)
    for (int64_t j = 0; j < d; j++) {
        g[j] = gamma[j] * gamma[j] * x_hat[j] + (gamma[j] * beta[j] + gamma[j] * (k[j] - v[j]));
        mean_g += g[j];
        mean_gx += g[j] * x_hat[j];
    }
    mean_g /= (float)d;
    mean_gx /= (float)d;
    for (int64_t j = 0; j < d; j++) g[j] = scale * ((g[j] - mean_g - x_hat[j] * mean_gx) * rstd);
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
        ln_l2_grad_row(acc, kr, vn, gamma, beta, rate, eps, d, x_hat, g);
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
#pragma omp simd reduction(+ : mean)
            for (int64_t j = 0; j < H * d; j++) mean += zb[j];
            mean /= (float)(H * d);
#pragma omp simd reduction(+ : var)
            for (int64_t j = 0; j < H * d; j++) var += (zb[j] - mean) * (zb[j] - mean);
            var /= (float)(H * d);
            const float rstd = 1.0f / sqrtf(var + post_eps);
            for (int64_t j = 0; j < H * d; j++) zb[j] = (zb[j] - mean) * rstd * post_w[j] + post_b[j];
        }
    }
    return 0;
}

/* ---- prefill: TTT-Linear's dual form over whole mini-batches (inference: no autograd) ---------------- */

/* acc (rows × d) = init (broadcast row, or 0) + A (rows × d, row stride lda) · M (d × d): four rows at a
 * time, so each row of M is loaded once for four broadcast-multiply-adds. */
static inline void rows_times_matrix(int64_t rows, int64_t d, const float *A, int64_t lda, const float *M,
                                     const float *init, float *acc) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) {
        float *a0 = acc + i * d, *a1 = a0 + d, *a2 = a1 + d, *a3 = a2 + d;
        const float *x0 = A + i * lda, *x1 = x0 + lda, *x2 = x1 + lda, *x3 = x2 + lda;
        for (int64_t j = 0; j < d; j++) {
            float v = init ? init[j] : 0.0f;
            a0[j] = v, a1[j] = v, a2[j] = v, a3[j] = v;
        }
        for (int64_t k = 0; k < d; k++) {
            const float *row = M + k * d;
            const float c0 = x0[k], c1 = x1[k], c2 = x2[k], c3 = x3[k];
            for (int64_t j = 0; j < d; j++) {
                a0[j] += c0 * row[j];
                a1[j] += c1 * row[j];
                a2[j] += c2 * row[j];
                a3[j] += c3 * row[j];
            }
        }
    }
    for (; i < rows; i++) {
        float *a = acc + i * d;
        const float *x = A + i * lda;
        for (int64_t j = 0; j < d; j++) a[j] = init ? init[j] : 0.0f;
        for (int64_t k = 0; k < d; k++)
            for (int64_t j = 0; j < d; j++) a[j] += x[k] * M[k * d + j];
    }
}

/* Head dim 64 (the 125M configurations): the same products with the rows held in registers, written with
 * the compilers' generic vectors (16 floats; lowered to whatever the CPU has). */
typedef float v16 __attribute__((vector_size(64)));
static inline v16 v_load(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void v_store(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* acc (rows × 64) = init + A · M (64 × 64), four rows at a time: 16 accumulators, one load of M's row k
 * for 16 multiply-adds. */
static inline void rows_times_matrix64(int64_t rows, const float *A, int64_t lda, const float *M, const float *init,
                                       float *acc) {
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) {
        v16 a[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) a[r][c] = init ? v_load(init + 16 * c) : (v16){0};
        for (int64_t k = 0; k < 64; k++) {
            const v16 m0 = v_load(M + k * 64), m1 = v_load(M + k * 64 + 16), m2 = v_load(M + k * 64 + 32),
                      m3 = v_load(M + k * 64 + 48);
            for (int r = 0; r < 4; r++) {
                const float x = A[(i + r) * lda + k];
                a[r][0] += x * m0, a[r][1] += x * m1, a[r][2] += x * m2, a[r][3] += x * m3;
            }
        }
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) v_store(acc + (i + r) * 64 + 16 * c, a[r][c]);
    }
    if (i < rows) rows_times_matrix(rows - i, 64, A + i * lda, lda, M, init, acc + i * 64);
}

/* W (64 × 64) −= Σ_j kt[:, j] ⊗ g[j] (kt 64 × b, g b × 64): each row of W in registers while the b
 * rank-one updates are added. */
static inline void rank_update64(float *W, const float *kt, const float *g, int64_t b) {
    for (int64_t r = 0; r < 64; r++) {
        v16 w0 = v_load(W + r * 64), w1 = v_load(W + r * 64 + 16), w2 = v_load(W + r * 64 + 32),
            w3 = v_load(W + r * 64 + 48);
        for (int64_t j = 0; j < b; j++) {
            const float s = kt[r * b + j];
            const float *gj = g + j * 64;
            w0 -= s * v_load(gj), w1 -= s * v_load(gj + 16), w2 -= s * v_load(gj + 32), w3 -= s * v_load(gj + 48);
        }
        v_store(W + r * 64, w0), v_store(W + r * 64 + 16, w1), v_store(W + r * 64 + 32, w2);
        v_store(W + r * 64 + 48, w3);
    }
}

/* TTT-Linear with the inner LayerNorm over T = n·b tokens that start at a mini-batch boundary with zero
 * accumulated gradient (seqzoo_plugins.ttt.linear.ttt_linear_dual), per (batch element, head), one
 * mini-batch after another, the head's W and b staying in cache:
 *   Z1 = XK·W + b,  g = ∂/∂Z1 ½‖LN(Z1) − (XV − XK)‖²  (row by row),
 *   η[i, j] = tok[i]·lr[j] (j ≤ i),  Z̄ = XQ·W + b − (η ⊙ (XQ·XKᵀ + 1))·g,  z = XQ + LN(Z̄),
 *   W ← W − (η[b−1, :] ⊙ XK)ᵀ·g,  b ← b − η[b−1, :]·g.
 * XQ, XK, XV (after RoPE) share the strides (sB, sH, sT) (elements; unit stride within a head); lr (B, H, T)
 * and tok (b,) contiguous; W (B, H, d, d) and bias (B, H, 1, d) are updated in place; Z is written as
 * (B, T, H, d), the layout of the output projection's input. Returns 0, 1 when d or b exceeds MAX_DIM,
 * 2 when the workspace can't be allocated. */
int32_t sz_ttt_linear_dual(int64_t B, int64_t H, int64_t T, int64_t d, int64_t b, const float *XQ,
                           const float *XK, const float *XV, int64_t sB, int64_t sH, int64_t sT, const float *lr,
                           const float *tok, const float *ln_w, const float *ln_b, float eps, float *W,
                           float *bias, float *Z) {
    if (d > MAX_DIM || b > MAX_DIM) return 1;
    float *work = malloc((size_t)(4 * b * d + 3 * b * b + 2 * d) * sizeof(float));
    if (!work) return 2;
    float *Z1 = work, *g = Z1 + b * d, *Zb = g + b * d, *kt = Zb + b * d, *eta = kt + b * d, *A = eta + b * b;
    float *S = A + b * b, *x_hat = S + b * b, *row = x_hat + d;
    const int64_t n_mb = T / b;
    /* mini-batch by mini-batch, every head of it: the tokens' rows are read in order, and the heads'
     * weights (H·d² floats) stay in cache from one mini-batch to the next */
    for (int64_t bi = 0; bi < B; bi++) {
        for (int64_t m = 0; m < n_mb; m++) {
            const int64_t t0 = m * b;
            for (int64_t h = 0; h < H; h++) {
                const int64_t base = bi * sB + h * sH + t0 * sT;
                const float *gamma = ln_w + h * d, *beta = ln_b + h * d;
                float *Wn = W + (bi * H + h) * d * d, *bn = bias + (bi * H + h) * d;
                const float *lrn = lr + (bi * H + h) * T + t0;
                const float *q = XQ + base, *k = XK + base, *v = XV + base;
                /* the gradients of the mini-batch's tokens, all at the start weights */
                if (d == 64)
                    rows_times_matrix64(b, k, sT, Wn, bn, Z1);
                else
                    rows_times_matrix(b, d, k, sT, Wn, bn, Z1);
                for (int64_t i = 0; i < b; i++)
                    ln_l2_grad_row(Z1 + i * d, k + i * sT, v + i * sT, gamma, beta, 1.0f, eps, d, x_hat, g + i * d);
                /* S = XQ·XKᵀ from XKᵀ (d × b), a row of S at a time without horizontal sums;
                 * A = η ⊙ (S + 1), lower triangular */
                for (int64_t j = 0; j < b; j++)
                    for (int64_t c = 0; c < d; c++) kt[c * b + j] = k[j * sT + c];
                for (int64_t i = 0; i < b; i++) {
                    const float *qi = q + i * sT;
                    float *Si = S + i * b;
                    for (int64_t j = 0; j < b; j++) Si[j] = 1.0f;
                    for (int64_t c = 0; c < d; c++) {
                        const float qc = qi[c], *ktc = kt + c * b;
                        for (int64_t j = 0; j < b; j++) Si[j] += qc * ktc[j];
                    }
                    for (int64_t j = 0; j < b; j++) {
                        eta[i * b + j] = tok[i] * lrn[j];
                        A[i * b + j] = j <= i ? eta[i * b + j] * Si[j] : 0.0f;
                    }
                }
                /* Z̄ = XQ·W + b − A·g, then z = XQ + LN(Z̄) into (B, T, H, d) */
                if (d == 64)
                    rows_times_matrix64(b, q, sT, Wn, bn, Zb);
                else
                    rows_times_matrix(b, d, q, sT, Wn, bn, Zb);
                for (int64_t i = 0; i < b; i++) {
                    float *zi = Zb + i * d;
                    if (d == 64) {
                        v16 z0 = v_load(zi), z1 = v_load(zi + 16), z2 = v_load(zi + 32), z3 = v_load(zi + 48);
                        for (int64_t j = 0; j <= i; j++) {
                            const float a = A[i * b + j], *gj = g + j * 64;
                            z0 -= a * v_load(gj), z1 -= a * v_load(gj + 16), z2 -= a * v_load(gj + 32);
                            z3 -= a * v_load(gj + 48);
                        }
                        v_store(zi, z0), v_store(zi + 16, z1), v_store(zi + 32, z2), v_store(zi + 48, z3);
                    } else {
                        for (int64_t j = 0; j <= i; j++) {
                            const float a = A[i * b + j], *gj = g + j * d;
                            for (int64_t c = 0; c < d; c++) zi[c] -= a * gj[c];
                        }
                    }
                    normalize(zi, x_hat, d, eps);
                    const float *qi = q + i * sT;
                    float *out = Z + ((bi * T + t0 + i) * H + h) * d;
                    for (int64_t c = 0; c < d; c++) out[c] = qi[c] + (beta[c] + gamma[c] * x_hat[c]);
                }
                /* W ← W − (η[b−1, :] ⊙ XK)ᵀ·g, b ← b − η[b−1, :]·g */
                const float *last = eta + (b - 1) * b;
                for (int64_t c = 0; c < d; c++)
                    for (int64_t j = 0; j < b; j++) kt[c * b + j] *= last[j];
                for (int64_t c = 0; c < d; c++) row[c] = 0.0f;
                for (int64_t j = 0; j < b; j++)
                    for (int64_t c = 0; c < d; c++) row[c] += last[j] * g[j * d + c];
                for (int64_t c = 0; c < d; c++) bn[c] -= row[c];
                if (d == 64) {
                    rank_update64(Wn, kt, g, b);
                } else {
                    for (int64_t r = 0; r < d; r++) {
                        float *wr = Wn + r * d;
                        const float *ktr = kt + r * b;
                        for (int64_t j = 0; j < b; j++) {
                            const float sj = ktr[j], *gj = g + j * d;
                            for (int64_t c = 0; c < d; c++) wr[c] -= sj * gj[c];
                        }
                    }
                }
            }
        }
    }
    free(work);
    return 0;
}
