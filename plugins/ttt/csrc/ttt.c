/* The TTT layers' fused CPU kernels: one decode token of TTT-Linear / TTT-MLP with the inner LayerNorm,
 * and their dual form over whole mini-batches (prefill, no autograd).
 *
 * float32, contiguous rows; single-threaded. Each function is tested against the layer's torch path
 * (tests/test_native.py). Built by seqzoo.native with the system C compiler; without one, the torch
 * paths run.
 */
#include "seqzoo_kernel.h"

#define MAX_DIM 1024

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

/* One layer's output after update_and_read: Gb_out = Gb + g and acc ← acc + b − tok·(accG + Gb_out), which is
 * x·(W − tok·G'_W) + (b − tok·G'_b) (N values); b NULL when acc holds x·W + b already. */
static inline void token_layer_out(int64_t N, const float *b, const float *Gb, const float *g, float tok,
                                   const float *accG, float *Gb_out, float *acc) {
    for (int64_t j = 0; j < N; j++) {
        Gb_out[j] = Gb[j] + g[j];
        acc[j] = acc[j] + (b ? b[j] : 0.0f) - tok * (accG[j] + Gb_out[j]);
    }
}

/* z = q + LN(zbar)·γ + β (d values; x_hat is a workspace) */
static inline void token_z(int64_t d, const float *zbar, const float *q, const float *gamma, const float *beta,
                           float eps, float *x_hat, float *z) {
    normalize(zbar, x_hat, d, eps);
    for (int64_t j = 0; j < d; j++) z[j] = q[j] + (beta[j] + gamma[j] * x_hat[j]);
}

/* ---- products shared by the TTT kernels ------------------------------------------------------------
 *
 * Written with the compilers' generic vectors (16 floats; lowered to whatever the CPU has): for output
 * widths that are multiples of 64, a 64-column panel of four rows is 16 accumulators
 * held in registers, and each row of the right-hand matrix is loaded once for 16 multiply-adds. */
typedef float v16 __attribute__((vector_size(64)));
static inline v16 v_load(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void v_store(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* One 64-column panel (columns p..p+63) of R ≤ 4 rows of out = init + A · M: 4R accumulators held in
 * registers; each row of M's panel loaded once for 4R multiply-adds. Inlined with R a constant. */
static inline __attribute__((always_inline)) void matmul_panel(const int R, int64_t K, int64_t N, int64_t p,
                                                               const float *A, int64_t lda, const float *M,
                                                               const float *init, float *out) {
    v16 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = init ? v_load(init + p + 16 * c) : (v16){0};
    for (int64_t k = 0; k < K; k++) {
        const float *row = M + k * N + p;
        const v16 m0 = v_load(row), m1 = v_load(row + 16), m2 = v_load(row + 32), m3 = v_load(row + 48);
        for (int r = 0; r < R; r++) {
            const float x = A[r * lda + k];
            acc[r][0] += x * m0, acc[r][1] += x * m1, acc[r][2] += x * m2, acc[r][3] += x * m3;
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) v_store(out + r * N + p + 16 * c, acc[r][c]);
}

/* out (rows × N, row stride N) = init (a row of N, or 0) + A (rows × K, row stride lda) · M (K × N). */
static inline void matmul_rows(int64_t rows, int64_t K, int64_t N, const float *A, int64_t lda, const float *M,
                        const float *init, float *out) {
    int64_t i = 0;
    if (N % 64 == 0) {
        for (; i + 4 <= rows; i += 4)
            for (int64_t p = 0; p < N; p += 64) matmul_panel(4, K, N, p, A + i * lda, lda, M, init, out + i * N);
        if (i + 2 <= rows) { /* a decode step's (k, q) pair, or the rest of a block */
            for (int64_t p = 0; p < N; p += 64) matmul_panel(2, K, N, p, A + i * lda, lda, M, init, out + i * N);
            i += 2;
        }
        if (i < rows) {
            for (int64_t p = 0; p < N; p += 64) matmul_panel(1, K, N, p, A + i * lda, lda, M, init, out + i * N);
            i++;
        }
    }
    if (N == 16) { /* one vector per row (a mini-batch-wide product), eight rows at a time: eight chains */
        const v16 start = init ? v_load(init) : (v16){0};
        for (; i + 8 <= rows; i += 8) {
            v16 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = start;
            for (int64_t k = 0; k < K; k++) {
                const v16 m = v_load(M + k * 16);
                for (int r = 0; r < 8; r++) acc[r] += A[(i + r) * lda + k] * m;
            }
            for (int r = 0; r < 8; r++) v_store(out + (i + r) * 16, acc[r]);
        }
        for (; i < rows; i++) {
            const float *x = A + i * lda;
            v16 acc = start;
            for (int64_t k = 0; k < K; k++) acc += x[k] * v_load(M + k * 16);
            v_store(out + i * 16, acc);
        }
    }
    for (; i < rows; i++) {
        float *o = out + i * N;
        const float *x = A + i * lda;
        for (int64_t j = 0; j < N; j++) o[j] = init ? init[j] : 0.0f;
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < N; j++) o[j] += x[k] * M[k * N + j];
    }
}

/* The pieces every TTT decode kernel shares: the row scale tok, the η gate of row n, RoPE of q and k, the
 * fused "G' = G + a ⊗ g, and x·W, x·G'" pass over a K × N weight, the committed weights, the post norm
 * (a row times a weight is matmul_rows with one row). */
static inline float token_scale(const float *token_idx, int64_t p) {
    if (!token_idx) return 1.0f;
    const float tok = token_idx[p] + (float)(1.0 / (double)(p + 1));
    return tok < 0.0f ? 0.0f : tok;
}

static inline float token_gate(const float *x, const float *lr_w, const float *lr_b, float lr_base, int64_t n,
                               int64_t H, int64_t C) {
    if (!lr_w) return lr_base;
    const int64_t h = n % H;
    const float *xb = x + (n / H) * C, *wh = lr_w + h * C;
    float logit = 0.0f;
#pragma omp simd reduction(+ : logit)
    for (int64_t c = 0; c < C; c++) logit += xb[c] * wh[c];
    logit += lr_b[h];
    return lr_base * (1.0f / (1.0f + exp_poly(-logit)));
}

static inline void token_rope(const float *q, const float *k, const float *rope, int64_t p, int64_t d, float *qr,
                              float *kr) {
    if (rope) {
        rotate(q, rope + p * d, qr, d);
        rotate(k, rope + p * d, kr, d);
    } else {
        memcpy(qr, q, d * sizeof(float));
        memcpy(kr, k, d * sizeof(float));
    }
}

/* G_out = G + a ⊗ g (K × N) and, in the same pass over the rows, xG = x·G_out and (unless W is NULL)
 * xW = x·W (N each). Widths that are multiples of 64 go by 64-column panels whose sums stay in registers. */
static inline void update_and_read(int64_t K, int64_t N, const float *a, const float *g, const float *x,
                                   const float *W, const float *G, float *G_out, float *xW, float *xG) {
    int64_t p = 0;
    for (; p + 64 <= N; p += 64) {
        const v16 g0 = v_load(g + p), g1 = v_load(g + p + 16), g2 = v_load(g + p + 32), g3 = v_load(g + p + 48);
        v16 w0 = {0}, w1 = {0}, w2 = {0}, w3 = {0}, c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
        for (int64_t i = 0; i < K; i++) {
            const float xi = x[i], ai = a[i], *grow = G + i * N + p;
            float *orow = G_out + i * N + p;
            const v16 n0 = v_load(grow) + ai * g0, n1 = v_load(grow + 16) + ai * g1;
            const v16 n2 = v_load(grow + 32) + ai * g2, n3 = v_load(grow + 48) + ai * g3;
            v_store(orow, n0), v_store(orow + 16, n1), v_store(orow + 32, n2), v_store(orow + 48, n3);
            c0 += xi * n0, c1 += xi * n1, c2 += xi * n2, c3 += xi * n3;
            if (W) {
                const float *row = W + i * N + p;
                w0 += xi * v_load(row), w1 += xi * v_load(row + 16), w2 += xi * v_load(row + 32);
                w3 += xi * v_load(row + 48);
            }
        }
        v_store(xG + p, c0), v_store(xG + p + 16, c1), v_store(xG + p + 32, c2), v_store(xG + p + 48, c3);
        if (W) v_store(xW + p, w0), v_store(xW + p + 16, w1), v_store(xW + p + 32, w2), v_store(xW + p + 48, w3);
    }
    if (p == N) return;
    for (int64_t j = p; j < N; j++) {
        xG[j] = 0.0f;
        if (W) xW[j] = 0.0f;
    }
    for (int64_t i = 0; i < K; i++) {
        const float xi = x[i], ai = a[i], *grow = G + i * N;
        float *orow = G_out + i * N;
        for (int64_t j = p; j < N; j++) {
            const float gw = grow[j] + ai * g[j];
            orow[j] = gw;
            xG[j] += xi * gw;
        }
        if (W)
            for (int64_t j = p; j < N; j++) xW[j] += xi * W[i * N + j];
    }
}

/* W_out = W − tok·G (n values) */
static inline void commit_weights(int64_t n, float tok, const float *W, const float *G, float *W_out) {
    for (int64_t i = 0; i < n; i++) W_out[i] = W[i] - tok * G[i];
}

/* z (C values) ← LayerNorm(z)·w + b */
static inline void post_layer_norm(float *z, int64_t C, const float *w, const float *b, float eps) {
    float mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
    for (int64_t j = 0; j < C; j++) mean += z[j];
    mean /= (float)C;
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < C; j++) var += (z[j] - mean) * (z[j] - mean);
    var /= (float)C;
    const float rstd = 1.0f / sqrtf(var + eps);
    for (int64_t j = 0; j < C; j++) z[j] = (z[j] - mean) * rstd * w[j] + b[j];
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
    /* k and q as the two rows of kq; kW + b and qW + b as the two rows of out */
    float kq[2 * MAX_DIM], out[2 * MAX_DIM], accG[MAX_DIM], x_hat[MAX_DIM], g[MAX_DIM];
    float *kr = kq, *qr = kq + d, *kW = out, *qW = out + d;
    const float tok = token_scale(token_idx, p);
    for (int64_t n = 0; n < N; n++) {
        const int64_t h = n % H;
        const float *gamma = ln_w + h * d, *beta = ln_b + h * d;
        const float *Wn = W + n * d * d, *bn = bias + n * d, *Gbn = Gb + n * d;
        const float rate = token_gate(x, lr_w, lr_b, lr_base, n, H, C);
        token_rope(q + n * d, k + n * d, rope, p, d, qr, kr);
        /* one pass over W for both products; the gradient at the mini-batch-start weights */
        matmul_rows(2, d, d, kq, d, Wn, bn, out);
        ln_l2_grad_row(kW, kr, v + n * d, gamma, beta, rate, eps, d, x_hat, g);
        /* G' and q·G' in one pass over the rows */
        float *GWo = GW_out + n * d * d, *Gbo = Gb_out + n * d;
        update_and_read(d, d, kr, g, qr, NULL, GW + n * d * d, GWo, NULL, accG);
        token_layer_out(d, NULL, Gbn, g, tok, accG, Gbo, qW);
        token_z(d, qW, qr, gamma, beta, eps, x_hat, Z + n * d);
        if (W_out) {
            commit_weights(d * d, tok, Wn, GWo, W_out + n * d * d);
            commit_weights(d, tok, bn, Gbo, b_out + n * d);
        }
        if (post_w && h == H - 1) post_layer_norm(Z + (n - h) * d, H * d, post_w, post_b, post_eps);
    }
    return 0;
}

/* ---- prefill: the TTT layers' dual form over whole mini-batches (inference: no autograd) ---------- */

/* W (rows × N) −= U (rows × b) · G (b × N): a sum of b rank-one updates, rows of W in registers (two rows
 * of a 64-column panel at a time: eight independent chains). */
static inline void rank_update(int64_t rows, int64_t N, int64_t b, float *W, const float *U, const float *G) {
    int64_t r0 = 0;
    if (N % 64 == 0)
        for (; r0 + 2 <= rows; r0 += 2) {
            float *wa = W + r0 * N, *wb = wa + N;
            const float *ua = U + r0 * b, *ub = ua + b;
            for (int64_t p = 0; p < N; p += 64) {
                v16 a0 = v_load(wa + p), a1 = v_load(wa + p + 16), a2 = v_load(wa + p + 32), a3 = v_load(wa + p + 48);
                v16 b0 = v_load(wb + p), b1 = v_load(wb + p + 16), b2 = v_load(wb + p + 32), b3 = v_load(wb + p + 48);
                for (int64_t j = 0; j < b; j++) {
                    const float *g = G + j * N + p;
                    const v16 g0 = v_load(g), g1 = v_load(g + 16), g2 = v_load(g + 32), g3 = v_load(g + 48);
                    const float sa = ua[j], sb = ub[j];
                    a0 -= sa * g0, a1 -= sa * g1, a2 -= sa * g2, a3 -= sa * g3;
                    b0 -= sb * g0, b1 -= sb * g1, b2 -= sb * g2, b3 -= sb * g3;
                }
                v_store(wa + p, a0), v_store(wa + p + 16, a1), v_store(wa + p + 32, a2), v_store(wa + p + 48, a3);
                v_store(wb + p, b0), v_store(wb + p + 16, b1), v_store(wb + p + 32, b2), v_store(wb + p + 48, b3);
            }
        }
    for (int64_t r = r0; r < rows; r++) {
        float *w = W + r * N;
        const float *u = U + r * b;
        int64_t p = 0;
        for (; p + 64 <= N; p += 64) {
            v16 w0 = v_load(w + p), w1 = v_load(w + p + 16), w2 = v_load(w + p + 32), w3 = v_load(w + p + 48);
            for (int64_t j = 0; j < b; j++) {
                const float s = u[j], *g = G + j * N + p;
                w0 -= s * v_load(g), w1 -= s * v_load(g + 16), w2 -= s * v_load(g + 32), w3 -= s * v_load(g + 48);
            }
            v_store(w + p, w0), v_store(w + p + 16, w1), v_store(w + p + 32, w2), v_store(w + p + 48, w3);
        }
        for (int64_t j = 0; j < b && p < N; j++) /* a width that is not a multiple of 64: the rest */
            for (int64_t c = 0; c < N - p; c++) w[p + c] -= u[j] * G[j * N + p + c];
    }
}

/* dst (cols × rows) = srcᵀ for src (rows × cols, row stride lds), each row of dst scaled by scale[·]
 * (or not, when scale is NULL): dst[c][r] = scale[r] · src[r][c]. */
static inline void transpose_scaled(int64_t rows, int64_t cols, const float *src, int64_t lds, const float *scale,
                             float *dst) {
    /* 16 source rows at a time, so that each column of them is one contiguous 64-byte store (one row per
     * store would scatter the stores a row apart: 4K aliasing for rows of 256 floats) */
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        const int64_t nr = rows - r0 < 16 ? rows - r0 : 16;
        float s[16];
        for (int64_t r = 0; r < nr; r++) s[r] = scale ? scale[r0 + r] : 1.0f;
        for (int64_t c = 0; c < cols; c++) {
            float *out = dst + c * rows + r0;
            const float *x = src + r0 * lds + c;
            for (int64_t r = 0; r < nr; r++) out[r] = s[r] * x[r * lds];
        }
    }
}

/* The b × b matrix A = η ⊙ (X·Yᵀ + 1), lower triangular, η[i, j] = tok[i]·lr[j], from Yᵀ (K × b) (rows of
 * X·Yᵀ as products, without horizontal sums). eta (b × b) receives η (its last row weighs the
 * end-of-mini-batch update). */
static inline void causal_scores(int64_t b, int64_t K, const float *X, int64_t ldx, const float *Yt, const float *tok,
                          const float *lr, float *S, float *eta, float *A) {
    matmul_rows(b, K, b, X, ldx, Yt, NULL, S);
    for (int64_t i = 0; i < b; i++) {
        float *Si = S + i * b;
        for (int64_t j = 0; j < b; j++) Si[j] += 1.0f;
        for (int64_t j = 0; j < b; j++) {
            eta[i * b + j] = tok[i] * lr[j];
            A[i * b + j] = j <= i ? eta[i * b + j] * Si[j] : 0.0f;
        }
    }
}

/* Z (rows × N) −= A (rows × b, lower triangular) · G (b × N). */
static inline void subtract_causal(int64_t rows, int64_t N, int64_t b, const float *A, const float *G, float *Z) {
    for (int64_t i = 0; i < rows; i++) {
        float *z = Z + i * N;
        int64_t p = 0;
        for (; p + 64 <= N; p += 64) {
            v16 z0 = v_load(z + p), z1 = v_load(z + p + 16), z2 = v_load(z + p + 32), z3 = v_load(z + p + 48);
            for (int64_t j = 0; j <= i; j++) {
                const float a = A[i * b + j], *g = G + j * N + p;
                z0 -= a * v_load(g), z1 -= a * v_load(g + 16), z2 -= a * v_load(g + 32), z3 -= a * v_load(g + 48);
            }
            v_store(z + p, z0), v_store(z + p + 16, z1), v_store(z + p + 32, z2), v_store(z + p + 48, z3);
        }
        for (int64_t j = 0; j <= i && p < N; j++)
            for (int64_t c = 0; c < N - p; c++) z[p + c] -= A[i * b + j] * G[j * N + p + c];
    }
}

/* out[c] −= Σ_j w[j] · G[j][c] for G (b × N). */
static inline void subtract_weighted_rows(int64_t b, int64_t N, const float *w, const float *G, float *out) {
    for (int64_t j = 0; j < b; j++)
        for (int64_t c = 0; c < N; c++) out[c] -= w[j] * G[j * N + c];
}

/* z = q + LN(Z̄)·γ + β for b rows, written at out with row stride ld_out. */
static inline void output_rows(int64_t b, int64_t d, const float *Zbar, const float *q, int64_t ldq, const float *gamma,
                        const float *beta, float eps, float *x_hat, float *out, int64_t ld_out) {
    for (int64_t i = 0; i < b; i++) token_z(d, Zbar + i * d, q + i * ldq, gamma, beta, eps, x_hat, out + i * ld_out);
}

/* One layer of the dual form, the output: Z̄ = X·W + b − A·G with A = η ⊙ (X·Yᵀ + 1) (lower triangular),
 * for X (b × K, row stride ldx), Y (b × K, row stride ldy), W (K × N), G (b × N). Fills eta (η) too;
 * Yt (K × b), S and A (b × b) are workspaces. */
static inline void dual_output(int64_t b, int64_t K, int64_t N, const float *X, int64_t ldx, const float *Y,
                               int64_t ldy, const float *tok, const float *lr, const float *W, const float *bias,
                               const float *G, float *Yt, float *S, float *eta, float *A, float *out) {
    transpose_scaled(b, K, Y, ldy, NULL, Yt);
    causal_scores(b, K, X, ldx, Yt, tok, lr, S, eta, A);
    matmul_rows(b, K, N, X, ldx, W, bias, out);
    subtract_causal(b, N, b, A, G, out);
}

/* One layer of the dual form, the end-of-mini-batch update: W (K × N) ← W − (η[b−1, :] ⊙ Y)ᵀ·G and
 * b ← b − η[b−1, :]·G, for Y (b × K, row stride ldy), G (b × N); Yt (K × b) is a workspace. */
static inline void dual_update(int64_t b, int64_t K, int64_t N, const float *Y, int64_t ldy, const float *last,
                               const float *G, float *W, float *bias, float *Yt) {
    transpose_scaled(b, K, Y, ldy, last, Yt);
    rank_update(K, N, b, W, Yt, G);
    subtract_weighted_rows(b, N, last, G, bias);
}

/* One mini-batch of one head of sz_ttt_linear_dual (inlined twice: for d = 64, where the compiler
 * unrolls every loop over d, and for any d). */
static inline void linear_dual_head(int64_t d, int64_t b, const float *q, const float *k, const float *v, int64_t sT,
                                    const float *lr, const float *tok, const float *gamma, const float *beta, float eps,
                                    float *W, float *bias, float *out, int64_t ld_out, float *work) {
    float *Z1 = work, *g = Z1 + b * d, *Zb = g + b * d, *kt = Zb + b * d, *eta = kt + b * d, *A = eta + b * b;
    float *S = A + b * b, *x_hat = S + b * b;
    /* the gradients of the mini-batch's tokens, all at the start weights */
    matmul_rows(b, d, d, k, sT, W, bias, Z1);
    for (int64_t i = 0; i < b; i++)
        ln_l2_grad_row(Z1 + i * d, k + i * sT, v + i * sT, gamma, beta, 1.0f, eps, d, x_hat, g + i * d);
    /* Z̄ = XQ·W + b − (η ⊙ (XQ·XKᵀ + 1))·g; z = XQ + LN(Z̄); W ← W − (η[b−1, :] ⊙ XK)ᵀ·g, b likewise */
    dual_output(b, d, d, q, sT, k, sT, tok, lr, W, bias, g, kt, S, eta, A, Zb);
    output_rows(b, d, Zb, q, sT, gamma, beta, eps, x_hat, out, ld_out);
    dual_update(b, d, d, k, sT, eta + (b - 1) * b, g, W, bias, kt);
}

/* The shape of one dual-form kernel: one mini-batch of one head, its weights (each of sizes[i] floats
 * per head) given by pointer. */
typedef void (*dual_head_fn)(int64_t d, int64_t b, const float *q, const float *k, const float *v, int64_t sT,
                             const float *lr, const float *tok, const float *gamma, const float *beta, float eps,
                             float *const *weights, float *out, int64_t ld_out, float *work);

/* Mini-batch by mini-batch, every head of it: the tokens' rows are read in order, and the heads' weights
 * stay in cache from one mini-batch to the next. weights[i] holds B·H heads of sizes[i] floats. Only the
 * heads row0 ≤ bi·H + h < row1 are handled (the caller runs disjoint ranges on threads). */
static int32_t dual_scan(int64_t B, int64_t H, int64_t T, int64_t d, int64_t b, const float *XQ, const float *XK,
                         const float *XV, int64_t sB, int64_t sH, int64_t sT, const float *lr, const float *tok,
                         const float *ln_w, const float *ln_b, float eps, int n_weights, float *const *weights,
                         const int64_t *sizes, float *Z, size_t work_floats, dual_head_fn head, int64_t row0,
                         int64_t row1) {
    float *work = malloc(work_floats * sizeof(float));
    if (!work) return 1;
    float *w[8];
    for (int64_t bi = row0 / H; bi < B && bi * H < row1; bi++) {
        const int64_t h0 = bi * H < row0 ? row0 - bi * H : 0, h1 = (bi + 1) * H > row1 ? row1 - bi * H : H;
        for (int64_t t0 = 0; t0 + b <= T; t0 += b) {
            for (int64_t h = h0; h < h1; h++) {
                const int64_t base = bi * sB + h * sH + t0 * sT, row = bi * H + h;
                for (int i = 0; i < n_weights; i++) w[i] = weights[i] + row * sizes[i];
                head(d, b, XQ + base, XK + base, XV + base, sT, lr + row * T + t0, tok, ln_w + h * d, ln_b + h * d,
                     eps, w, Z + ((bi * T + t0) * H + h) * d, H * d, work);
            }
        }
    }
    free(work);
    return 0;
}

/* linear_dual_head through the dual_head_fn shape, specialised for d = 64 */
static void linear_head(int64_t d, int64_t b, const float *q, const float *k, const float *v, int64_t sT,
                        const float *lr, const float *tok, const float *gamma, const float *beta, float eps,
                        float *const *w, float *out, int64_t ld_out, float *work) {
    if (d == 64)
        linear_dual_head(64, b, q, k, v, sT, lr, tok, gamma, beta, eps, w[0], w[1], out, ld_out, work);
    else
        linear_dual_head(d, b, q, k, v, sT, lr, tok, gamma, beta, eps, w[0], w[1], out, ld_out, work);
}

/* TTT-Linear with the inner LayerNorm over T = n·b tokens that start at a mini-batch boundary with zero
 * accumulated gradient (seqzoo_plugins.ttt.linear.ttt_linear_dual), per (batch element, head), one
 * mini-batch after another, the head's W and b staying in cache:
 *   Z1 = XK·W + b,  g = ∂/∂Z1 ½‖LN(Z1) − (XV − XK)‖²  (row by row),
 *   η[i, j] = tok[i]·lr[j] (j ≤ i),  Z̄ = XQ·W + b − (η ⊙ (XQ·XKᵀ + 1))·g,  z = XQ + LN(Z̄),
 *   W ← W − (η[b−1, :] ⊙ XK)ᵀ·g,  b ← b − η[b−1, :]·g.
 * XQ, XK, XV (after RoPE) share the strides (sB, sH, sT) (elements; unit stride within a head); lr (B, H, T)
 * and tok (b,) contiguous; W (B, H, d, d) and bias (B, H, 1, d) are updated in place; Z is written as
 * (B, T, H, d), the layout of the output projection's input; only the heads row0 ≤ bi·H + h < row1. Returns 0,
 * or 1 when the workspace can't be allocated. */
int32_t sz_ttt_linear_dual(int64_t B, int64_t H, int64_t T, int64_t d, int64_t b, const float *XQ,
                           const float *XK, const float *XV, int64_t sB, int64_t sH, int64_t sT, const float *lr,
                           const float *tok, const float *ln_w, const float *ln_b, float eps, float *W,
                           float *bias, float *Z, int64_t row0, int64_t row1) {
    float *weights[2] = {W, bias};
    const int64_t sizes[2] = {d * d, d};
    return dual_scan(B, H, T, d, b, XQ, XK, XV, sB, sH, sT, lr, tok, ln_w, ln_b, eps, 2, weights, sizes, Z,
                     (size_t)(4 * b * d + 3 * b * b + d), linear_head, row0, row1);
}

/* gelu_tanh(x) = ½x(1 + t), t = tanh u, u = √(2/π)(x + 0.044715x³), and (when dy is given) its
 * derivative ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²), for n values; tanh u = 1 − 2/(e^{2u} + 1). */
static inline void gelu_rows(int64_t n, const float *x, float *y, float *dy) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    if (dy) {
        for (int64_t i = 0; i < n; i++) {
            const float xi = x[i], x2 = xi * xi, t = 1.0f - 2.0f / (exp_poly(2.0f * k0 * (xi + k1 * x2 * xi)) + 1.0f);
            y[i] = 0.5f * xi * (1.0f + t);
            dy[i] = 0.5f * (1.0f + t) + 0.5f * xi * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * x2);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            const float xi = x[i], t = 1.0f - 2.0f / (exp_poly(2.0f * k0 * (xi + k1 * xi * xi * xi)) + 1.0f);
            y[i] = 0.5f * xi * (1.0f + t);
        }
    }
}

/* One mini-batch of one head of sz_ttt_mlp_dual; F = 4d hidden units. */
static inline void mlp_dual_head(int64_t d, int64_t b, const float *q, const float *k, const float *v, int64_t sT,
                                 const float *lr, const float *tok, const float *gamma, const float *beta, float eps,
                                 float *W1, float *b1, float *W2, float *b2, float *out, int64_t ld_out, float *work) {
    const int64_t F = 4 * d;
    float *Z1 = work, *X2 = Z1 + b * F, *gp = X2 + b * F, *G1 = gp + b * F, *Zq = G1 + b * F, *X2b = Zq + b * F;
    float *X2T = X2b + b * F, *G1T = X2T + F * b, *Z2 = G1T + F * b, *G2 = Z2 + b * d, *Z2b = G2 + b * d;
    float *kt = Z2b + b * d, *S = kt + d * b, *eta = S + b * b, *A = eta + b * b, *x_hat = A + b * b;
    /* the inner model's forward and backward on the keys, at the start weights */
    matmul_rows(b, d, F, k, sT, W1, b1, Z1);
    gelu_rows(b * F, Z1, X2, gp);
    matmul_rows(b, F, d, X2, F, W2, b2, Z2);
    for (int64_t i = 0; i < b; i++)
        ln_l2_grad_row(Z2 + i * d, k + i * sT, v + i * sT, gamma, beta, 1.0f, eps, d, x_hat, G2 + i * d);
    /* G1 = (G2·W2ᵀ) ⊙ gelu'(Z1), as (W2·G2ᵀ)ᵀ: W2's rows are read in order, no transpose of W2 */
    transpose_scaled(b, d, G2, d, NULL, kt);
    matmul_rows(F, d, b, W2, d, kt, NULL, G1T);
    for (int64_t i = 0; i < b; i++)
        for (int64_t f = 0; f < F; f++) G1[i * F + f] = G1T[f * b + i] * gp[i * F + f];
    /* the dual form: Z̄1 = XQ·W1 + b1 − A1·G1, X̄2 = gelu(Z̄1), Z̄2 = X̄2·W2 + b2 − A2·G2, z = XQ + LN(Z̄2) */
    dual_output(b, d, F, q, sT, k, sT, tok, lr, W1, b1, G1, kt, S, eta, A, Zq);
    gelu_rows(b * F, Zq, X2b, NULL);
    dual_output(b, F, d, X2b, F, X2, F, tok, lr, W2, b2, G2, X2T, S, eta, A, Z2b);
    output_rows(b, d, Z2b, q, sT, gamma, beta, eps, x_hat, out, ld_out);
    /* W1 ← W1 − (η[b−1, :] ⊙ XK)ᵀ·G1, W2 ← W2 − (η[b−1, :] ⊙ X2)ᵀ·G2, and the biases */
    const float *last = eta + (b - 1) * b;
    dual_update(b, d, F, k, sT, last, G1, W1, b1, kt);
    dual_update(b, F, d, X2, F, last, G2, W2, b2, X2T);
}

/* mlp_dual_head through the dual_head_fn shape, specialised for d = 64 */
static void mlp_head(int64_t d, int64_t b, const float *q, const float *k, const float *v, int64_t sT,
                     const float *lr, const float *tok, const float *gamma, const float *beta, float eps,
                     float *const *w, float *out, int64_t ld_out, float *work) {
    if (d == 64)
        mlp_dual_head(64, b, q, k, v, sT, lr, tok, gamma, beta, eps, w[0], w[1], w[2], w[3], out, ld_out, work);
    else
        mlp_dual_head(d, b, q, k, v, sT, lr, tok, gamma, beta, eps, w[0], w[1], w[2], w[3], out, ld_out, work);
}

/* TTT-MLP with the inner LayerNorm (f(x) = x + LN(gelu_tanh(x·W1 + b1)·W2 + b2), hidden 4d) over T = n·b
 * tokens from a mini-batch boundary (seqzoo_plugins.ttt.mlp.ttt_mlp_dual), in the layout and order of
 * sz_ttt_linear_dual: W1 (B, H, d, 4d), b1 (B, H, 1, 4d), W2 (B, H, 4d, d), b2 (B, H, 1, d) updated in
 * place, Z written as (B, T, H, d). Returns 0, or 1 when the workspace can't be allocated. */
int32_t sz_ttt_mlp_dual(int64_t B, int64_t H, int64_t T, int64_t d, int64_t b, const float *XQ, const float *XK,
                        const float *XV, int64_t sB, int64_t sH, int64_t sT, const float *lr, const float *tok,
                        const float *ln_w, const float *ln_b, float eps, float *W1, float *b1, float *W2, float *b2,
                        float *Z, int64_t row0, int64_t row1) {
    const int64_t F = 4 * d;
    float *weights[4] = {W1, b1, W2, b2};
    const int64_t sizes[4] = {d * F, F, F * d, d};
    return dual_scan(B, H, T, d, b, XQ, XK, XV, sB, sH, sT, lr, tok, ln_w, ln_b, eps, 4, weights, sizes, Z,
                     (size_t)(8 * b * F + 3 * b * d + d * b + 3 * b * b + d), mlp_head, row0, row1);
}

/* One token of TTT-MLP with the inner LayerNorm (f(x) = x + LN(gelu_tanh(x·W1 + b1)·W2 + b2), hidden F = 4d),
 * per row as sz_ttt_linear_token (gate, tok, RoPE, post norm alike):
 *   Z1 = k·W1 + b1, X2 = gelu(Z1), Z2 = X2·W2 + b2, g2 = ∂/∂Z2 ½‖LN(Z2) − (v − k)‖², g1 = (g2·W2ᵀ) ⊙ gelu'(Z1);
 *   G'_W1 = G_W1 + kᵀ(gate·g1), G'_W2 = G_W2 + X2ᵀ(gate·g2), G'_b1 = G_b1 + gate·g1, G'_b2 = G_b2 + gate·g2;
 *   X̄2 = gelu(q·W1 + b1 − tok·(q·G'_W1 + G'_b1)),  z = q + LN(X̄2·W2 + b2 − tok·(X̄2·G'_W2 + G'_b2));
 *   when W1_out is given, W̄ = W − tok·G' for the four weights.
 * Returns 0, 1 when d exceeds MAX_DIM, 2 when the workspace can't be allocated. */
int32_t sz_ttt_mlp_token(int64_t N, int64_t H, int64_t d, int64_t C, const float *q, const float *k, const float *v,
                         const float *x, const float *lr_w, const float *lr_b, float lr_base, const float *rope,
                         const float *token_idx, int64_t p, const float *W1, const float *b1, const float *W2,
                         const float *b2, const float *GW1, const float *Gb1, const float *GW2, const float *Gb2,
                         const float *ln_w, const float *ln_b, float eps, const float *post_w, const float *post_b,
                         float post_eps, float *Z, float *GW1_out, float *Gb1_out, float *GW2_out, float *Gb2_out,
                         float *W1_out, float *b1_out, float *W2_out, float *b2_out) {
    if (d > MAX_DIM) return 1;
    const int64_t F = 4 * d;
    float *work = malloc((size_t)(6 * F + 6 * d) * sizeof(float));
    if (!work) return 2;
    /* (k, q) and their layer-1 products (kW1 + b1, qW1 + b1) as pairs of rows */
    float *Z1 = work, *a1 = Z1 + F, *X2 = a1 + F, *gp = X2 + F, *g1 = gp + F, *a2 = g1 + F;
    float *kr = a2 + F, *qr = kr + d, *g2 = qr + d, *c1 = g2 + d, *c2 = c1 + d, *x_hat = c2 + d;
    const float tok = token_scale(token_idx, p);
    for (int64_t n = 0; n < N; n++) {
        const int64_t h = n % H;
        const float *gamma = ln_w + h * d, *beta = ln_b + h * d;
        const float *W1n = W1 + n * d * F, *b1n = b1 + n * F, *W2n = W2 + n * F * d, *b2n = b2 + n * d;
        const float rate = token_gate(x, lr_w, lr_b, lr_base, n, H, C);
        token_rope(q + n * d, k + n * d, rope, p, d, qr, kr);
        /* the inner model's forward and backward on k at the mini-batch-start weights, scaled by the gate */
        matmul_rows(2, d, F, kr, d, W1n, b1n, Z1);
        gelu_rows(F, Z1, X2, gp);
        matmul_rows(1, F, d, X2, F, W2n, b2n, c1);
        ln_l2_grad_row(c1, kr, v + n * d, gamma, beta, rate, eps, d, x_hat, g2);
        gemv(F, d, W2n, g2, g1);
        for (int64_t f = 0; f < F; f++) g1[f] *= gp[f];
        /* layer 1: G'_W1 and q·G'_W1 in one pass (q·W1 + b1 is a1); X̄2 */
        float *GW1o = GW1_out + n * d * F, *Gb1o = Gb1_out + n * F;
        update_and_read(d, F, kr, g1, qr, NULL, GW1 + n * d * F, GW1o, NULL, a2);
        token_layer_out(F, NULL, Gb1 + n * F, g1, tok, a2, Gb1o, a1);
        gelu_rows(F, a1, Z1, NULL); /* X̄2, in Z1's place */
        /* layer 2: G'_W2, X̄2·W2, X̄2·G'_W2 in one pass; z */
        float *GW2o = GW2_out + n * F * d, *Gb2o = Gb2_out + n * d;
        update_and_read(F, d, X2, g2, Z1, W2n, GW2 + n * F * d, GW2o, c1, c2);
        token_layer_out(d, b2n, Gb2 + n * d, g2, tok, c2, Gb2o, c1);
        token_z(d, c1, qr, gamma, beta, eps, x_hat, Z + n * d);
        if (W1_out) {
            commit_weights(d * F, tok, W1n, GW1o, W1_out + n * d * F);
            commit_weights(F, tok, b1n, Gb1o, b1_out + n * F);
            commit_weights(F * d, tok, W2n, GW2o, W2_out + n * F * d);
            commit_weights(d, tok, b2n, Gb2o, b2_out + n * d);
        }
        if (post_w && h == H - 1) post_layer_norm(Z + (n - h) * d, H * d, post_w, post_b, post_eps);
    }
    free(work);
    return 0;
}

/* ---- training: the dual form's backward (seqzoo_plugins.ttt.scan_grad) -----------------------------
 *
 * Per head: the weights at every mini-batch start are replayed first (the forward's updates only), then
 * the mini-batches are taken last to first: each recomputes its forward from its start weights and runs
 * the backward, carrying (dW, db), the gradient of the weights after it. The math is written out in
 * scan_grad.py's docstring, in its names. */

/* dst (cols × rows, row stride ldd) = −srcᵀ for src (rows × cols, row stride lds). */
static inline void transpose_neg(int64_t rows, int64_t cols, const float *src, int64_t lds, float *dst, int64_t ldd) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16) { /* as transpose_scaled; dst (cols × rows) has row stride ldd */
        const int64_t nr = rows - r0 < 16 ? rows - r0 : 16;
        for (int64_t c = 0; c < cols; c++) {
            float *out = dst + c * ldd + r0;
            const float *x = src + r0 * lds + c;
            for (int64_t r = 0; r < nr; r++) out[r] = -x[r * lds];
        }
    }
}

/* C (K × N) += Σ_p A_pᵀ · B_p over p < parts, for A_p (b × K, row stride lda[p]) and B_p (b × N, contiguous):
 * one update of rank parts·b, so C is read and written once. At (K × parts·b) and Bs (parts·b × N) are
 * workspaces. */
static inline void add_tn(int parts, int64_t b, int64_t K, int64_t N, const float *const *A, const int64_t *lda,
                          const float *const *B, float *C, float *At, float *Bs) {
    for (int p = 0; p < parts; p++) {
        transpose_neg(b, K, A[p], lda[p], At + p * b, parts * b);
        if (parts > 1) memcpy(Bs + p * b * N, B[p], b * N * sizeof(float));
    }
    rank_update(K, N, parts * b, C, At, parts > 1 ? Bs : B[0]);
}

/* out (rows × N) = A (rows × K, row stride lda) · Mᵀ for M (N × K); Mt (K × N) is a workspace. */
static inline void matmul_nt(int64_t rows, int64_t K, int64_t N, const float *A, int64_t lda, const float *M,
                             float *Mt, float *out) {
    transpose_scaled(N, K, M, K, NULL, Mt);
    matmul_rows(rows, K, N, A, lda, Mt, NULL, out);
}

/* The backward of y = x̂·rstd-normalised rows (a LayerNorm without affine) for one row: dx = rstd·(dy −
 * mean dy − x̂·mean(dy ⊙ x̂)). */
static inline void ln_bwd_row(int64_t d, const float *dy, const float *x_hat, float rstd, float *dx) {
    float m = 0.0f, mx = 0.0f;
#pragma omp simd reduction(+ : m, mx)
    for (int64_t j = 0; j < d; j++) m += dy[j], mx += dy[j] * x_hat[j];
    m /= (float)d, mx /= (float)d;
    for (int64_t j = 0; j < d; j++) dx[j] = rstd * (dy[j] - m - x_hat[j] * mx);
}

/* The forward of one mini-batch's key side, kept for the backward: Zk = k·W + b, per row x̂, rstd,
 * u = γ²x̂ + γβ + γ(k − v), g = rstd·P(u) and mean(u ⊙ x̂). */
static inline void key_side(int64_t d, int64_t b, const float *k, const float *v, int64_t sT, const float *gamma,
                            const float *beta, float eps, const float *Zk, float *x_hat, float *rstd, float *u,
                            float *m_u, float *g) {
    for (int64_t i = 0; i < b; i++) {
        const float *ki = k + i * sT, *vi = v + i * sT;
        float *xh = x_hat + i * d, *ui = u + i * d;
        const float r = rstd[i] = normalize(Zk + i * d, xh, d, eps);
        float mean = 0.0f, mean_x = 0.0f;
        for (int64_t j = 0; j < d; j++) {
            ui[j] = gamma[j] * gamma[j] * xh[j] + (gamma[j] * beta[j] + gamma[j] * (ki[j] - vi[j]));
            mean += ui[j], mean_x += ui[j] * xh[j];
        }
        mean /= (float)d, mean_x /= (float)d;
        m_u[i] = mean_x;
        for (int64_t j = 0; j < d; j++) g[i * d + j] = (ui[j] - mean - xh[j] * mean_x) * r;
    }
}

/* The backward of g = rstd·P(u(x̂)) for one row (dg given): dZk, du. */
static inline void key_side_bwd_row(int64_t d, const float *dg, const float *x_hat, float rstd, const float *u,
                                    float m_u, const float *g, const float *gamma, float *du, float *dx_hat,
                                    float *dZk) {
    ln_bwd_row(d, dg, x_hat, rstd, du);
    float m_dg = 0.0f, dgg = 0.0f;
    for (int64_t j = 0; j < d; j++) m_dg += dg[j] * x_hat[j], dgg += dg[j] * g[j];
    m_dg /= (float)d;
    const float drstd = dgg / rstd;
    for (int64_t j = 0; j < d; j++) dx_hat[j] = gamma[j] * gamma[j] * du[j] - rstd * (dg[j] * m_u + u[j] * m_dg);
    ln_bwd_row(d, dx_hat, x_hat, rstd, dZk);
    const float s = drstd * rstd * rstd / (float)d;
    for (int64_t j = 0; j < d; j++) dZk[j] -= s * x_hat[j];
}

/* The key side's backward for b rows (dg given): dZk and du written, and what du reaches through
 * u = γ²x̂ + γβ + γ(k − v): dk += γ·du (dk accumulated), dv = −γ·du, dγ and dβ accumulated. */
static inline void key_side_bwd(int64_t d, int64_t b, const float *k, const float *v, int64_t sT, const float *dg,
                                const float *x_hat, const float *rstd, const float *u, const float *m_u,
                                const float *g, const float *gamma, const float *beta, float *du, float *dx_hat,
                                float *dZk, float *dk, float *dv, float *dgamma, float *dbeta) {
    for (int64_t r = 0; r < b; r++) {
        const float *kr = k + r * sT, *vr = v + r * sT, *xh = x_hat + r * d;
        float *dur = du + r * d;
        key_side_bwd_row(d, dg + r * d, xh, rstd[r], u + r * d, m_u[r], g + r * d, gamma, dur, dx_hat, dZk + r * d);
        for (int64_t j = 0; j < d; j++) {
            const float gdu = gamma[j] * dur[j];
            dk[r * d + j] += gdu;
            dv[r * d + j] = -gdu;
            dgamma[j] += dur[j] * (2.0f * gamma[j] * xh[j] + beta[j] + kr[j] - vr[j]);
            dbeta[j] += gdu;
        }
    }
}

/* η[r, j] = tok[r]·lr[j] (j ≤ r) and M = η ⊙ (S + 1), for one mini-batch. */
static inline void causal_rates(int64_t b, const float *tok, const float *lr, const float *S, float *eta, float *M) {
    for (int64_t r = 0; r < b; r++)
        for (int64_t j = 0; j < b; j++) {
            eta[r * b + j] = j <= r ? tok[r] * lr[j] : 0.0f;
            M[r * b + j] = eta[r * b + j] * (S[r * b + j] + 1.0f);
        }
}

/* The backward of η[r, j] = tok[r]·lr[j] (j ≤ r) for de (its lower triangle): dlr written, dtok accumulated. */
static inline void causal_rates_bwd(int64_t b, const float *de, const float *tok, const float *lr, float *dlr,
                                    float *dtok) {
    for (int64_t j = 0; j < b; j++) dlr[j] = 0.0f;
    for (int64_t r = 0; r < b; r++)
        for (int64_t j = 0; j <= r; j++) {
            dlr[j] += de[r * b + j] * tok[r];
            dtok[r] += de[r * b + j] * lr[j];
        }
}

/* The backward of the layer's output z = XQ + LN(Z̄)·γ + β for b rows (dz rows at stride ldz): dZ̄ written,
 * dγ and dβ accumulated; z_hat (b × d) and tmp (b × d) are workspaces. */
static inline void output_ln_bwd(int64_t b, int64_t d, const float *Zb, const float *dz, int64_t ldz,
                                 const float *gamma, float eps, float *z_hat, float *tmp, float *dZb, float *dgamma,
                                 float *dbeta) {
    for (int64_t r = 0; r < b; r++) {
        const float *dzr = dz + r * ldz;
        float *zh = z_hat + r * d;
        const float rstd = normalize(Zb + r * d, zh, d, eps);
        for (int64_t j = 0; j < d; j++) {
            dgamma[j] += dzr[j] * zh[j];
            dbeta[j] += dzr[j];
            tmp[r * d + j] = dzr[j] * gamma[j];
        }
        ln_bwd_row(d, tmp + r * d, zh, rstd, dZb + r * d);
    }
}

/* The backward of one dual-form layer's output Z̄ = X·W + b − M·G with M = η ⊙ (X·Yᵀ + 1) (lower
 * triangular), for dZ̄ given: dX = dZ̄·Wᵀ + dS·Y, dY = dSᵀ·X and dG = −Mᵀ·dZ̄ are written (dS = dM ⊙ η,
 * dM = −dZ̄·Gᵀ), the gradient of η, dM ⊙ (X·Yᵀ + 1), is added to de (lower triangle). X, Y (b × K, row
 * strides ldx, ldy), W (K × N), G and dZ̄ (b × N), S = X·Yᵀ; Wt (N × K) receives Wᵀ, dM (b × b) is a
 * workspace. */
static inline void dual_output_bwd(int64_t b, int64_t K, int64_t N, const float *X, int64_t ldx, const float *Y,
                                   int64_t ldy, const float *W, float *Wt, const float *G, const float *eta,
                                   const float *M, const float *S, const float *dZ, float *dX, float *dY, float *dG,
                                   float *de, float *dM) {
    matmul_nt(b, N, K, dZ, N, W, Wt, dX);
    for (int64_t r = 0; r < b; r++)
        for (int64_t j = 0; j <= r; j++) {
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < N; c++) s += dZ[r * N + c] * G[j * N + c];
            dM[r * b + j] = -s;
        }
    memset(dY, 0, b * K * sizeof(float));
    memset(dG, 0, b * N * sizeof(float));
    for (int64_t r = 0; r < b; r++)
        for (int64_t j = 0; j <= r; j++) {
            const float dS = dM[r * b + j] * eta[r * b + j], m = M[r * b + j];
            const float *yj = Y + j * ldy, *xr = X + r * ldx;
            for (int64_t c = 0; c < K; c++) {
                dX[r * K + c] += dS * yj[c];
                dY[j * K + c] += dS * xr[c];
            }
            for (int64_t c = 0; c < N; c++) dG[j * N + c] -= m * dZ[r * N + c];
            de[r * b + j] += dM[r * b + j] * (S[r * b + j] + 1.0f);
        }
}

/* The backward of one head of sz_ttt_linear_dual. q, k, v rows at stride sT; lr (n·b), tok (b); dz rows at
 * stride ldz; dW, db hold the gradient of the end weights and receive that of W0, b0; dq, dk, dv (n·b × d),
 * dlr (n·b), dtok, dgamma, dbeta (b, d, d) are written. Ws holds (n + 1)(d² + d) floats. */
static void linear_bwd_head(int64_t d, int64_t b, int64_t n, const float *q, const float *k, const float *v,
                            int64_t sT, const float *lr, const float *tok, const float *gamma, const float *beta,
                            float eps, const float *W0, const float *b0, const float *dz, int64_t ldz, float *dW,
                            float *db, float *dq, float *dk, float *dv, float *dlr, float *dtok, float *dgamma,
                            float *dbeta, float *Ws, float *work) {
    const int64_t bd = b * d, dd = d * d, bb = b * b;
    float *Zk = work, *x_hat = Zk + bd, *u = x_hat + bd, *g = u + bd, *Zb = g + bd, *z_hat = Zb + bd;
    float *dZb = z_hat + bd, *dg = dZb + bd, *R = dg + bd, *dZk = R + bd, *tmp = dZk + bd, *du = tmp + bd;
    float *dx_hat = du + bd, *kt = dx_hat + d, *Wt = kt + bd, *dWt = Wt + dd, *S = dWt + dd, *eta = S + bb;
    float *M = eta + bb, *dM = M + bb, *last = dM + bb, *rstd = last + b, *rstd_z = rstd + b, *m_u = rstd_z + b;
    float *At = m_u + b, *Bs = At + 2 * bd, *de = Bs + 2 * bd; /* de: the gradient of η */
    memset(dtok, 0, b * sizeof(float));
    memset(dgamma, 0, d * sizeof(float));
    memset(dbeta, 0, d * sizeof(float));
    /* the weights at every mini-batch start */
    memcpy(Ws, W0, dd * sizeof(float));
    memcpy(Ws + dd, b0, d * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        const float *W = Ws + i * (dd + d), *bias = W + dd, *ki = k + i * b * sT, *vi = v + i * b * sT;
        float *Wn = Ws + (i + 1) * (dd + d);
        matmul_rows(b, d, d, ki, sT, W, bias, Zk);
        for (int64_t r = 0; r < b; r++)
            ln_l2_grad_row(Zk + r * d, ki + r * sT, vi + r * sT, gamma, beta, 1.0f, eps, d, x_hat, g + r * d);
        for (int64_t j = 0; j < b; j++) last[j] = tok[b - 1] * lr[i * b + j];
        memcpy(Wn, W, (dd + d) * sizeof(float));
        dual_update(b, d, d, ki, sT, last, g, Wn, Wn + dd, kt);
    }
    for (int64_t i = n - 1; i >= 0; i--) {
        const float *W = Ws + i * (dd + d), *bias = W + dd;
        const float *qi = q + i * b * sT, *ki = k + i * b * sT, *vi = v + i * b * sT, *lri = lr + i * b;
        const float *dzi = dz + i * b * ldz;
        float *dqi = dq + i * bd, *dki = dk + i * bd, *dvi = dv + i * bd, *dlri = dlr + i * b;
        /* the forward, again */
        matmul_rows(b, d, d, ki, sT, W, bias, Zk);
        key_side(d, b, ki, vi, sT, gamma, beta, eps, Zk, x_hat, rstd, u, m_u, g);
        transpose_scaled(b, d, ki, sT, NULL, kt);
        matmul_rows(b, d, b, qi, sT, kt, NULL, S);
        causal_rates(b, tok, lri, S, eta, M);
        matmul_rows(b, d, d, qi, sT, W, bias, Zb);
        subtract_causal(b, d, b, M, g, Zb);
        output_ln_bwd(b, d, Zb, dzi, ldz, gamma, eps, z_hat, tmp, dZb, dgamma, dbeta);
        /* Z̄ = XQ·W + b − M·g, and the residual */
        memset(de, 0, bb * sizeof(float));
        dual_output_bwd(b, d, d, qi, sT, ki, sT, W, Wt, g, eta, M, S, dZb, dqi, dki, dg, de, dM);
        for (int64_t r = 0; r < b; r++)
            for (int64_t j = 0; j < d; j++) dqi[r * d + j] += dzi[r * ldz + j];
        /* the update W' = W − XKᵀ(e ⊙ g), b' = b − eᵀg reads the carried (dW, db): R = −(XK·dW + db) */
        matmul_rows(b, d, d, ki, sT, dW, db, R);
        transpose_scaled(d, d, dW, d, NULL, dWt);
        matmul_rows(b, d, d, g, d, dWt, NULL, tmp);  /* g·dWᵀ */
        for (int64_t j = 0; j < b; j++) {
            const float e = eta[(b - 1) * b + j];
            float s = 0.0f;
            for (int64_t c = 0; c < d; c++) {
                R[j * d + c] = -R[j * d + c];
                s += g[j * d + c] * R[j * d + c];
                dg[j * d + c] += e * R[j * d + c];
                dki[j * d + c] -= e * tmp[j * d + c];
            }
            de[(b - 1) * b + j] += s;
        }
        /* the key side: dZk and du */
        key_side_bwd(d, b, ki, vi, sT, dg, x_hat, rstd, u, m_u, g, gamma, beta, du, dx_hat, dZk, dki, dvi, dgamma,
                     dbeta);
        matmul_rows(b, d, d, dZk, d, Wt, NULL, tmp);  /* dZk·Wᵀ */
        for (int64_t j = 0; j < bd; j++) dki[j] += tmp[j];
        /* the gradient of the weights at the mini-batch start */
        add_tn(2, b, d, d, (const float *[]){qi, ki}, (const int64_t[]){sT, sT}, (const float *[]){dZb, dZk}, dW, At,
               Bs);
        for (int64_t r = 0; r < b; r++)
            for (int64_t j = 0; j < d; j++) db[j] += dZb[r * d + j] + dZk[r * d + j];
        causal_rates_bwd(b, de, tok, lri, dlri, dtok);
    }
}

/* The backward of sz_ttt_linear_dual (its inputs as there; W0, b0 the start weights), per head:
 * dz (B, T, H, d) the gradient of Z; dW, db (B, H, d, d), (B, H, 1, d) hold the gradient of the end weights
 * and receive that of the start weights; dXQ, dXK, dXV (B, H, T, d), dlr (B, H, T) are written; dtok
 * (B·H, b), dgamma, dbeta (B·H, d) are written per head (the caller sums them). Only the heads row0 ≤
 * bi·H + h < row1 are handled (the caller runs disjoint ranges on threads). Returns 0, or 1 when the
 * workspace can't be allocated. */
int32_t sz_ttt_linear_dual_bwd(int64_t B, int64_t H, int64_t T, int64_t d, int64_t b, const float *XQ,
                               const float *XK, const float *XV, int64_t sB, int64_t sH, int64_t sT, const float *lr,
                               const float *tok, const float *ln_w, const float *ln_b, float eps, const float *W0,
                               const float *b0, const float *dz, float *dW, float *db, float *dXQ, float *dXK,
                               float *dXV, float *dlr, float *dtok, float *dgamma, float *dbeta, int64_t row0,
                               int64_t row1) {
    const int64_t n = T / b;
    float *Ws = malloc((size_t)(n + 1) * (d * d + d) * sizeof(float));
    float *work = malloc((size_t)(18 * b * d + d + 2 * d * d + 5 * b * b + 4 * b) * sizeof(float));
    if (!Ws || !work) {
        free(Ws), free(work);
        return 1;
    }
    for (int64_t row = row0; row < row1 && row < B * H; row++) {
        const int64_t bi = row / H, h = row % H, base = bi * sB + h * sH;
        linear_bwd_head(d, b, n, XQ + base, XK + base, XV + base, sT, lr + row * T, tok, ln_w + h * d,
                        ln_b + h * d, eps, W0 + row * d * d, b0 + row * d, dz + bi * T * H * d + h * d, H * d,
                        dW + row * d * d, db + row * d, dXQ + row * T * d, dXK + row * T * d, dXV + row * T * d,
                        dlr + row * T, dtok + row * b, dgamma + row * d, dbeta + row * d, Ws, work);
    }
    free(Ws), free(work);
    return 0;
}

/* gelu_tanh and its first two derivatives for n values: with t = tanh u, u = √(2/π)(x + 0.044715x³),
 * u' = √(2/π)(1 + 3·0.044715x²): φ = ½x(1 + t), φ' = ½(1 + t) + ½x(1 − t²)u',
 * φ'' = (1 − t²)(u' − x·t·u'² + 3·0.044715·√(2/π)·x²). */
static inline void gelu_parts_rows(int64_t n, const float *x, float *y, float *dy, float *d2y) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    for (int64_t i = 0; i < n; i++) {
        const float xi = x[i], x2 = xi * xi, t = 1.0f - 2.0f / (exp_poly(2.0f * k0 * (xi + k1 * x2 * xi)) + 1.0f);
        const float du = k0 * (1.0f + 3.0f * k1 * x2), one_t2 = 1.0f - t * t;
        y[i] = 0.5f * xi * (1.0f + t);
        dy[i] = 0.5f * (1.0f + t) + 0.5f * xi * one_t2 * du;
        d2y[i] = one_t2 * (du - xi * t * du * du + 3.0f * k1 * k0 * x2);
    }
}

/* The backward of one head of sz_ttt_mlp_dual, as linear_bwd_head (F = 4d hidden units; the weights W1
 * (d × F), b1 (F), W2 (F × d), b2 (d) laid end to end, dW the same for their gradients). Ws holds
 * (n + 1)(2dF + F + d) floats, Ks n(2bF + bd): the replay keeps each mini-batch's Z1, h and Z2 there, and
 * the backward recomputes only the elementwise rest of the key side. The names are scan_grad.py's (TTT-MLP
 * section). */
static void mlp_bwd_head(int64_t d, int64_t b, int64_t n, const float *q, const float *k, const float *v,
                         int64_t sT, const float *lr, const float *tok, const float *gamma, const float *beta,
                         float eps, const float *W0, const float *dz, int64_t ldz, float *dW, float *dq, float *dk,
                         float *dv, float *dlr, float *dtok, float *dgamma, float *dbeta, float *Ws, float *Ks,
                         float *work) {
    const int64_t F = 4 * d, bF = b * F, bd = b * d, bb = b * b, size = 2 * d * F + F + d;
    float *X2 = work, *dphi = X2 + bF, *d2phi = dphi + bF, *g1 = d2phi + bF;
    float *Z1b = g1 + bF, *X2b = Z1b + bF, *dphib = X2b + bF, *dX2b = dphib + bF, *dZ1b = dX2b + bF;
    float *dg1 = dZ1b + bF, *R1 = dg1 + bF, *dX2 = R1 + bF, *dZ1 = dX2 + bF, *dh = dZ1 + bF, *tmpF = dh + bF;
    float *X2t = tmpF + bF, *At = X2t + bF, *x_hat = At + 3 * bF, *u = x_hat + bd, *g2 = u + bd;
    float *Z2b = g2 + bd, *z_hat = Z2b + bd, *dZ2b = z_hat + bd, *dg2 = dZ2b + bd, *R2 = dg2 + bd;
    float *dZ2 = R2 + bd, *du = dZ2 + bd, *tmpd = du + bd, *kt = tmpd + bd, *dx_hat = kt + bd;
    float *W1t = dx_hat + d, *W2t = W1t + F * d, *dW1t = W2t + F * d, *dW2t = dW1t + F * d;
    float *S1 = dW2t + F * d, *S2 = S1 + bb, *eta = S2 + bb, *M1 = eta + bb, *M2 = M1 + bb, *dM = M2 + bb;
    float *rstd = dM + bb, *rstd_z = rstd + b, *m_u = rstd_z + b, *last = m_u + b, *Bs = last + b;
    float *de = Bs + 3 * bF; /* the gradient of η */
    float *dW1 = dW, *db1 = dW1 + d * F, *dW2 = db1 + F, *db2 = dW2 + F * d;
    memset(dtok, 0, b * sizeof(float));
    memset(dgamma, 0, d * sizeof(float));
    memset(dbeta, 0, d * sizeof(float));
    /* the weights at every mini-batch start */
    memcpy(Ws, W0, size * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        const float *W1 = Ws + i * size, *b1 = W1 + d * F, *W2 = b1 + F, *b2 = W2 + F * d;
        const float *ki = k + i * b * sT, *vi = v + i * b * sT;
        float *Wn = Ws + (i + 1) * size;
        float *Z1 = Ks + i * (2 * bF + bd), *h = Z1 + bF, *Z2 = h + bF; /* kept for the backward */
        matmul_rows(b, d, F, ki, sT, W1, b1, Z1);
        gelu_rows(bF, Z1, X2, dphi);
        matmul_rows(b, F, d, X2, F, W2, b2, Z2);
        for (int64_t r = 0; r < b; r++)
            ln_l2_grad_row(Z2 + r * d, ki + r * sT, vi + r * sT, gamma, beta, 1.0f, eps, d, x_hat, g2 + r * d);
        matmul_nt(b, d, F, g2, d, W2, W2t, h);
        for (int64_t j = 0; j < bF; j++) g1[j] = h[j] * dphi[j];
        for (int64_t j = 0; j < b; j++) last[j] = tok[b - 1] * lr[i * b + j];
        memcpy(Wn, W1, size * sizeof(float));
        dual_update(b, d, F, ki, sT, last, g1, Wn, Wn + d * F, kt);
        dual_update(b, F, d, X2, F, last, g2, Wn + d * F + F, Wn + 2 * d * F + F, X2t);
    }
    for (int64_t i = n - 1; i >= 0; i--) {
        const float *W1 = Ws + i * size, *b1 = W1 + d * F, *W2 = b1 + F, *b2 = W2 + F * d;
        const float *qi = q + i * b * sT, *ki = k + i * b * sT, *vi = v + i * b * sT, *lri = lr + i * b;
        const float *dzi = dz + i * b * ldz;
        float *dqi = dq + i * bd, *dki = dk + i * bd, *dvi = dv + i * bd, *dlri = dlr + i * b;
        /* the forward, again: the key side from what the replay kept, then the query side */
        const float *Z1 = Ks + i * (2 * bF + bd), *h = Z1 + bF, *Z2 = h + bF;
        gelu_parts_rows(bF, Z1, X2, dphi, d2phi);
        key_side(d, b, ki, vi, sT, gamma, beta, eps, Z2, x_hat, rstd, u, m_u, g2);
        for (int64_t j = 0; j < bF; j++) g1[j] = h[j] * dphi[j];
        transpose_scaled(b, d, ki, sT, NULL, kt);
        matmul_rows(b, d, b, qi, sT, kt, NULL, S1);
        causal_rates(b, tok, lri, S1, eta, M1);
        matmul_rows(b, d, F, qi, sT, W1, b1, Z1b);
        subtract_causal(b, F, b, M1, g1, Z1b);
        gelu_rows(bF, Z1b, X2b, dphib);
        transpose_scaled(b, F, X2, F, NULL, X2t);
        matmul_rows(b, F, b, X2b, F, X2t, NULL, S2);
        for (int64_t j = 0; j < bb; j++) M2[j] = eta[j] * (S2[j] + 1.0f);
        matmul_rows(b, F, d, X2b, F, W2, b2, Z2b);
        subtract_causal(b, d, b, M2, g2, Z2b);
        output_ln_bwd(b, d, Z2b, dzi, ldz, gamma, eps, z_hat, tmpd, dZ2b, dgamma, dbeta);
        /* Z̄2 = X̄2·W2 + b2 − M2·g2, X̄2 = φ(Z̄1), Z̄1 = XQ·W1 + b1 − M1·g1, and the residual */
        memset(de, 0, bb * sizeof(float));
        dual_output_bwd(b, F, d, X2b, F, X2, F, W2, W2t, g2, eta, M2, S2, dZ2b, dX2b, dX2, dg2, de, dM);
        for (int64_t j = 0; j < bF; j++) dZ1b[j] = dX2b[j] * dphib[j];
        dual_output_bwd(b, d, F, qi, sT, ki, sT, W1, W1t, g1, eta, M1, S1, dZ1b, dqi, dki, dg1, de, dM);
        for (int64_t r = 0; r < b; r++)
            for (int64_t j = 0; j < d; j++) dqi[r * d + j] += dzi[r * ldz + j];
        /* the updates read the carried gradients: R1 = −(XK·dW1 + db1), R2 = −(X2·dW2 + db2) */
        matmul_rows(b, d, F, ki, sT, dW1, db1, R1);
        matmul_rows(b, F, d, X2, F, dW2, db2, R2);
        matmul_nt(b, F, d, g1, F, dW1, dW1t, tmpd);  /* g1·dW1ᵀ */
        matmul_nt(b, d, F, g2, d, dW2, dW2t, tmpF);  /* g2·dW2ᵀ */
        for (int64_t j = 0; j < b; j++) {
            const float e = eta[(b - 1) * b + j];
            float s = 0.0f;
            for (int64_t c = 0; c < F; c++) {
                const float r1 = -R1[j * F + c];
                s += g1[j * F + c] * r1;
                dg1[j * F + c] += e * r1;
                dX2[j * F + c] -= e * tmpF[j * F + c];
            }
            for (int64_t c = 0; c < d; c++) {
                const float r2 = -R2[j * d + c];
                s += g2[j * d + c] * r2;
                dg2[j * d + c] += e * r2;
                dki[j * d + c] -= e * tmpd[j * d + c];
            }
            de[(b - 1) * b + j] += s;
        }
        /* g1 = h ⊙ φ'(Z1), h = g2·W2ᵀ */
        for (int64_t j = 0; j < bF; j++) dh[j] = dg1[j] * dphi[j];
        matmul_rows(b, F, d, dh, F, W2, NULL, tmpd);
        for (int64_t j = 0; j < bd; j++) dg2[j] += tmpd[j];
        /* the key side's LayerNorm: dZ2 and du */
        key_side_bwd(d, b, ki, vi, sT, dg2, x_hat, rstd, u, m_u, g2, gamma, beta, du, dx_hat, dZ2, dki, dvi, dgamma,
                     dbeta);
        /* Z2 = X2·W2 + b2, X2 = φ(Z1), Z1 = XK·W1 + b1 */
        matmul_rows(b, d, F, dZ2, d, W2t, NULL, tmpF);
        for (int64_t j = 0; j < bF; j++) {
            dX2[j] += tmpF[j];
            dZ1[j] = dX2[j] * dphi[j] + dg1[j] * h[j] * d2phi[j];
        }
        matmul_rows(b, F, d, dZ1, F, W1t, NULL, tmpd);
        for (int64_t j = 0; j < bd; j++) dki[j] += tmpd[j];
        /* the gradient of the weights at the mini-batch start */
        add_tn(2, b, d, F, (const float *[]){qi, ki}, (const int64_t[]){sT, sT}, (const float *[]){dZ1b, dZ1}, dW1,
               At, Bs);
        add_tn(3, b, F, d, (const float *[]){X2b, dh, X2}, (const int64_t[]){F, F, F}, (const float *[]){dZ2b, g2, dZ2},
               dW2, At, Bs);
        for (int64_t r = 0; r < b; r++) {
            for (int64_t j = 0; j < F; j++) db1[j] += dZ1b[r * F + j] + dZ1[r * F + j];
            for (int64_t j = 0; j < d; j++) db2[j] += dZ2b[r * d + j] + dZ2[r * d + j];
        }
        causal_rates_bwd(b, de, tok, lri, dlri, dtok);
    }
}

/* The backward of sz_ttt_mlp_dual, as sz_ttt_linear_dual_bwd: W0 the start weights (B·H heads of W1, b1,
 * W2, b2 laid end to end, 2dF + F + d floats each, F = 4d), dW the same layout (the end weights' gradient
 * in, the start weights' out). */
int32_t sz_ttt_mlp_dual_bwd(int64_t B, int64_t H, int64_t T, int64_t d, int64_t b, const float *XQ, const float *XK,
                            const float *XV, int64_t sB, int64_t sH, int64_t sT, const float *lr, const float *tok,
                            const float *ln_w, const float *ln_b, float eps, const float *W0, const float *dz,
                            float *dW, float *dXQ, float *dXK, float *dXV, float *dlr, float *dtok, float *dgamma,
                            float *dbeta, int64_t row0, int64_t row1) {
    const int64_t n = T / b, F = 4 * d, size = 2 * d * F + F + d;
    float *Ws = malloc((size_t)(n + 1) * size * sizeof(float));
    float *Ks = malloc((size_t)n * (2 * b * F + b * d) * sizeof(float));
    float *work = malloc((size_t)(21 * b * F + 13 * b * d + d + 4 * F * d + 7 * b * b + 4 * b + 3 * b * F)
                         * sizeof(float));
    if (!Ws || !Ks || !work) {
        free(Ws), free(Ks), free(work);
        return 1;
    }
    for (int64_t row = row0; row < row1 && row < B * H; row++) {
        const int64_t bi = row / H, h = row % H, base = bi * sB + h * sH;
        mlp_bwd_head(d, b, n, XQ + base, XK + base, XV + base, sT, lr + row * T, tok, ln_w + h * d, ln_b + h * d,
                     eps, W0 + row * size, dz + bi * T * H * d + h * d, H * d, dW + row * size, dXQ + row * T * d,
                     dXK + row * T * d, dXV + row * T * d, dlr + row * T, dtok + row * b, dgamma + row * d,
                     dbeta + row * d, Ws, Ks, work);
    }
    free(Ws), free(Ks), free(work);
    return 0;
}
