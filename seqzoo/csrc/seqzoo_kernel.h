/* seqzoo_kernel.h: what a plugin's C kernel may share — a vectorisable exp and log, silu, softplus and a
 * mat-vec — for the kernels that seqzoo.native builds (``-I`` points at this folder).
 *
 * The loops are written so the compiler vectorises them (-O3): exp is a polynomial (Cephes' expf,
 * relative error below 2e-7 over the float range) instead of a call into libm.
 */
#ifndef SEQZOO_KERNEL_H
#define SEQZOO_KERNEL_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    float u = exp_poly(x > 20.0f ? 20.0f : x), w = 1.0f + u, wm1 = w - 1.0f; /* NaN stays NaN */
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

#endif
