/* Mamba's selective scan for training on the CPU: the forward and its backward, written out.
 *
 * float32, contiguous; single-threaded. Per batch row b, token t, channel d < D and state index n < N,
 * with a_t = exp(Δ_t A) and u_t = (Δx)_t B_t:
 *
 *   h_t = a_t ⊙ h_{t−1} + u_t,      y_t[d] = Σ_n C_t[n] h_t[d, n]          (forward)
 *
 * and, from the gradients gy (of y) and gh (of the last state), the state's gradient run backwards,
 *
 *   g_t = C_t ⊗ gy_t + a_{t+1} ⊙ g_{t+1}   (g_{T−1} adds gh),
 *
 * from which every input's gradient follows: ∂u_t = g_t, ∂(Δ_t A) = g_t ⊙ a_t ⊙ h_{t−1},
 * ∂C_t[n] = Σ_d gy_t[d] h_t[d, n], ∂h_0 = a_0 ⊙ g_0. A row of states (D × N floats) stays in cache; the
 * backward keeps the forward's states of one batch row (T × D × N floats) in a workspace instead of
 * reading them back from memory the forward wrote. Tested against autograd through the torch scan
 * (tests/test_mamba.py).
 */
#include "seqzoo_kernel.h"

/* Forward: dt, dtx (B, T, D); A (D, N); Bm, Cm (B, T, N); h0 (B, D, N) -> y (B, T, D), hT (B, D, N).
 * Keeps nothing: the backward recomputes the states. */
int32_t sz_mamba_scan_fwd(int64_t B, int64_t T, int64_t D, int64_t N, const float *dt, const float *dtx,
                          const float *A, const float *Bm, const float *Cm, const float *h0, float *y, float *hT) {
    for (int64_t b = 0; b < B; b++) {
        float *h = hT + b * D * N;
        memcpy(h, h0 + b * D * N, (size_t)(D * N) * sizeof(float));
        for (int64_t t = 0; t < T; t++) {
            const int64_t bt = b * T + t;
            const float *Bv = Bm + bt * N, *Cv = Cm + bt * N;
            for (int64_t d = 0; d < D; d++) {
                const float delta = dt[bt * D + d], dx = dtx[bt * D + d];
                const float *Ad = A + d * N;
                float *hd = h + d * N, acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t n = 0; n < N; n++) {
                    float hn = exp_poly(delta * Ad[n]) * hd[n] + dx * Bv[n];
                    hd[n] = hn;
                    acc += hn * Cv[n];
                }
                y[bt * D + d] = acc;
            }
        }
    }
    return 0;
}

/* Backward of sz_mamba_scan_fwd: gy (B, T, D), gh (B, D, N) or NULL -> gdt, gdtx (B, T, D), gA (D, N)
 * (accumulated over the batch: zeroed here), gB, gC (B, T, N), gh0 (B, D, N). Recomputes the states of
 * one batch row at a time into a workspace of T·D·N floats. Returns 0, or 1 if it can't be allocated. */
int32_t sz_mamba_scan_bwd(int64_t B, int64_t T, int64_t D, int64_t N, const float *dt, const float *dtx,
                          const float *A, const float *Bm, const float *Cm, const float *h0, const float *gy,
                          const float *gh, float *gdt, float *gdtx, float *gA, float *gB, float *gC, float *gh0) {
    float *states = malloc((size_t)(T * D * N + 2 * N) * sizeof(float));
    if (!states) return 1;
    float *gBt = states + T * D * N, *gCt = gBt + N;
    memset(gA, 0, (size_t)(D * N) * sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        /* the forward again, keeping every state */
        const float *prev = h0 + b * D * N;
        for (int64_t t = 0; t < T; t++) {
            const int64_t bt = b * T + t;
            const float *Bv = Bm + bt * N;
            float *ht = states + t * D * N;
            for (int64_t d = 0; d < D; d++) {
                const float delta = dt[bt * D + d], dx = dtx[bt * D + d];
                const float *Ad = A + d * N, *pd = prev + d * N;
                float *hd = ht + d * N;
#pragma omp simd
                for (int64_t n = 0; n < N; n++) hd[n] = exp_poly(delta * Ad[n]) * pd[n] + dx * Bv[n];
            }
            prev = ht;
        }
        /* backwards: the carry c = a_{t+1} ⊙ g_{t+1} lives in gh0's row */
        float *c = gh0 + b * D * N;
        if (gh)
            memcpy(c, gh + b * D * N, (size_t)(D * N) * sizeof(float));
        else
            memset(c, 0, (size_t)(D * N) * sizeof(float));
        for (int64_t t = T - 1; t >= 0; t--) {
            const int64_t bt = b * T + t;
            const float *Bv = Bm + bt * N, *Cv = Cm + bt * N;
            const float *ht = states + t * D * N;
            const float *hp = t > 0 ? states + (t - 1) * D * N : h0 + b * D * N;
            memset(gBt, 0, (size_t)(2 * N) * sizeof(float));
            for (int64_t d = 0; d < D; d++) {
                const float delta = dt[bt * D + d], dx = dtx[bt * D + d], gyd = gy ? gy[bt * D + d] : 0.0f;
                const float *Ad = A + d * N, *hd = ht + d * N, *hpd = hp + d * N;
                float *cd = c + d * N, *gAd = gA + d * N;
                float g_dtx = 0.0f, g_dt = 0.0f;
#pragma omp simd reduction(+ : g_dtx, g_dt)
                for (int64_t n = 0; n < N; n++) {
                    const float a = exp_poly(delta * Ad[n]);
                    const float g = Cv[n] * gyd + cd[n];  /* g_t */
                    gCt[n] += gyd * hd[n];
                    gBt[n] += g * dx;
                    g_dtx += g * Bv[n];
                    const float ag = a * g;               /* a_t ⊙ g_t: the carry, and ∂(ΔA) over h_{t−1} */
                    const float gs = ag * hpd[n];
                    g_dt += gs * Ad[n];
                    gAd[n] += gs * delta;
                    cd[n] = ag;
                }
                gdtx[bt * D + d] = g_dtx;
                gdt[bt * D + d] = g_dt;
            }
            memcpy(gB + bt * N, gBt, (size_t)N * sizeof(float));
            memcpy(gC + bt * N, gCt, (size_t)N * sizeof(float));
        }
    }
    free(states);
    return 0;
}
