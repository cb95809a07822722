/* rlvrx's compiled kernels, called through ctypes (rlvrx/native.py), which releases the GIL so that
 * blocks run in parallel on threads:
 *   rlvrx_weight_block  per-parameter R² statistics of a block of K checkpoints, exact in float64
 *                       (rlvrx/linearity/weights.py);
 *   rlvrx_lerp          two-point extrapolation of bf16/fp32 values, bit for bit torch.lerp's result
 *                       (rlvrx/extrapolate/weights.py).
 *
 * rlvrx_weight_block widens each parameter's K values to float64 and reduces a tile of TILE
 * parameters that stays in L1, four parameters side by side in vector registers. Sums run in a fixed
 * order (per-lane accumulators) and pyproject.toml compiles with -ffp-contract=off, so every build and
 * CPU gives the same bits (shards computed on different machines merge exactly).
 */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 256
#define MAX_K 4096

enum { RAW_BF16 = 0, RAW_F32 = 1, RAW_F64 = 2, RAW_LUT8 = 3, RAW_LUT16 = 4 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

static int element_size(int kind) {
    switch (kind) {
    case RAW_BF16: case RAW_LUT16: return 2;
    case RAW_F32: return 4;
    case RAW_F64: return 8;
    case RAW_LUT8: return 1;
    }
    return 0;
}

/* Row k's values [p0, p0 + m) as float64 into out. */
static void widen(const void *row, int kind, const double *lut, int64_t p0, int m, double *out) {
    switch (kind) {
    case RAW_BF16: {
        const uint16_t *src = (const uint16_t *)row + p0;
        for (int p = 0; p < m; p++) {
            uint32_t bits = (uint32_t)src[p] << 16;
            float f;
            memcpy(&f, &bits, 4);
            out[p] = f;
        }
        break;
    }
    case RAW_F32: {
        const float *src = (const float *)row + p0;
        for (int p = 0; p < m; p++) out[p] = src[p];
        break;
    }
    case RAW_F64:
        memcpy(out, (const double *)row + p0, (size_t)m * 8);
        break;
    case RAW_LUT8: {
        const uint8_t *src = (const uint8_t *)row + p0;
        for (int p = 0; p < m; p++) out[p] = lut[src[p]];
        break;
    }
    case RAW_LUT16: {
        const uint16_t *src = (const uint16_t *)row + p0;
        for (int p = 0; p < m; p++) out[p] = lut[src[p]];
        break;
    }
    }
}

/*
 * rows: K pointers to n raw values each (element p of every row is one parameter).
 * counts (out, int64[6]): constant, min_abs_change, min_unique, kept, kept R² > thresholds[0], > thresholds[1].
 * sums (out, double[2K]): sum of kept R², the held-out error² sum, |W_K - W_1|², |d_i|² for the K-1
 *   successive deltas d_i = W_{i+1} - W_i, then <d_i, d_{i+1}> for the K-2 neighbouring pairs.
 * hist (accumulated, int64[bins]) and values (out, double[n]: kept R² in parameter order) may be NULL.
 * Filters, in order: constant (all K values equal, or S_yy <= 0), max - min of the centred values <
 * min_abs_change, fewer than min_unique distinct values (compared as float64, so -0 == +0).
 * Returns 0, -1 for bad arguments, -2 when out of memory.
 */
typedef double vd __attribute__((vector_size(32)));  /* 4 parameters side by side (AVX2, or 2 SSE2 halves) */
typedef int64_t vl __attribute__((vector_size(32)));
#define LANES 4

static inline vd load(const double *p) { vd v; memcpy(&v, p, sizeof v); return v; }
static inline void store(double *p, vd v) { memcpy(p, &v, sizeof v); }
static inline vd pick(vl mask, vd a, vd b) { return (vd)((mask & (vl)a) | (~mask & (vl)b)); }  /* mask ? a : b */
static inline void add(double *p, vd v) { store(p, load(p) + v); }

MULTIVERSION
int rlvrx_weight_block(const void *const *rows, int kind, const double *lut, int64_t n, int k,
                       const double *tc, double s_tt, const double *holdout, double min_abs_change,
                       int min_unique, const double *thresholds, int64_t bins, int64_t *counts,
                       double *sums, int64_t *hist, double *values) {
    if (k < 2 || k > MAX_K || element_size(kind) == 0 || n < 0 || bins < 1 || bins > INT32_MAX) return -1;
    /* y: the tile's values, K rows of TILE; acc: per-lane sums kept over all tiles (error², whole
     * change², |d_j|² for the K-1 deltas, <d_j, d_j+1> for the K-2 pairs) */
    double *y = malloc(sizeof(double) * TILE * (size_t)k);
    double *acc = calloc((size_t)(2 * k - 1) * LANES, sizeof(double));
    if (!y || !acc) { free(y); free(acc); return -2; }
    double mean_of[TILE], s_yy[TILE], r2[TILE];
    int64_t equal[TILE], wide[TILE], distinct[TILE];
    int32_t bin_of[TILE];
    int64_t constant = 0, small = 0, few = 0, kept = 0, above0 = 0, above1 = 0;
    double sum_r2 = 0.0;
    const vd zero = {0}, one = zero + 1.0;
    /* max - min >= max |y - mean| >= sqrt(S_yy / K): above this S_yy, no parameter is below min_abs_change
     * (the 0.1% margin covers rounding); below it the span is computed exactly */
    const double wide_limit = k * (min_abs_change * 1.001) * (min_abs_change * 1.001);
    /* min_unique values at these positions all different: enough distinct values without counting */
    int probe[16], n_probe = 0;
    if (min_unique > 1 && min_unique <= k && min_unique <= 16)
        for (n_probe = 0; n_probe < min_unique; n_probe++) probe[n_probe] = n_probe * (k - 1) / (min_unique - 1);

    for (int64_t p0 = 0; p0 < n; p0 += TILE) {
        int m = (int)(n - p0 < TILE ? n - p0 : TILE);
        int padded = (m + LANES - 1) / LANES * LANES;
        for (int j = 0; j < k; j++) {
            double *row = y + (size_t)j * TILE;
            widen(rows[j], kind, lut, p0, m, row);
            for (int p = m; p < padded; p++) row[p] = 0.0;
        }
        for (int p = 0; p < padded; p += LANES) {
            vd first = load(y + p), mean = zero;
            vl same = (vl){0} - 1;
            for (int j = 0; j < k; j++) {
                vd v = load(y + (size_t)j * TILE + p);
                mean += v;
                same &= v == first;
            }
            mean /= (double)k;
            vd sty = zero, syy = zero, err = zero;
            for (int j = 0; j < k; j++) {
                vd c = load(y + (size_t)j * TILE + p) - mean;
                sty += tc[j] * c;
                syy += c * c;
                err += holdout[j] * c;
            }
            add(acc, err * err);
            vd whole = load(y + (size_t)(k - 1) * TILE + p) - first;
            add(acc + LANES, whole * whole);
            vd prev = first, d_prev = zero;
            for (int j = 0; j + 1 < k; j++) {  /* successive deltas, from the stored values */
                vd next = load(y + (size_t)(j + 1) * TILE + p), d = next - prev;
                add(acc + (size_t)(2 + j) * LANES, d * d);
                if (j) add(acc + (size_t)(k + j) * LANES, d_prev * d);
                d_prev = d;
                prev = next;
            }
            if (min_unique > 1) {  /* distinct stored values (compared as float64: -0 == +0) */
                vl enough = (vl){0} - (n_probe > 0);
                for (int a = 0; a < n_probe; a++)
                    for (int b = a + 1; b < n_probe; b++)
                        enough &= load(y + (size_t)probe[a] * TILE + p) != load(y + (size_t)probe[b] * TILE + p);
                vl count = (vl){0} + min_unique;
                if (!(enough[0] & enough[1] & enough[2] & enough[3])) {
                    count = (vl){0} + 1;
                    for (int j = 1; j < k; j++) {
                        vd v = load(y + (size_t)j * TILE + p);
                        vl fresh = (vl){0} - 1;
                        for (int i = 0; i < j; i++) fresh &= v != load(y + (size_t)i * TILE + p);
                        count -= fresh;
                    }
                }
                memcpy(distinct + p, &count, sizeof count);
            }
            vd v = sty * sty / (syy * s_tt);
            v = pick(v > one, one, v);
            v = pick(v < zero, zero, v);
            vl is_wide = syy > wide_limit;
            store(r2 + p, v);
            store(s_yy + p, syy);
            store(mean_of + p, mean);
            memcpy(equal + p, &same, sizeof same);
            memcpy(wide + p, &is_wide, sizeof is_wide);
        }
        int n_kept = 0;
        for (int p = 0; p < m; p++) {
            if (equal[p] || s_yy[p] <= 0.0) { constant++; continue; }
            if (min_abs_change > 0.0 && !wide[p]) {
                double lo = y[p] - mean_of[p], hi = lo;
                for (int j = 1; j < k; j++) {
                    double c = y[(size_t)j * TILE + p] - mean_of[p];
                    lo = c < lo ? c : lo;
                    hi = c > hi ? c : hi;
                }
                if (hi - lo < min_abs_change) { small++; continue; }
            }
            if (min_unique > 1 && distinct[p] < min_unique) { few++; continue; }
            double v = r2[p];
            sum_r2 += v;
            above0 += v > thresholds[0];
            above1 += v > thresholds[1];
            if (values) values[kept] = v;
            double scaled = v * (double)bins;
            int64_t b = scaled == scaled ? (int64_t)scaled : 0;
            bin_of[n_kept++] = (int32_t)(b < bins ? b : bins - 1);
            kept++;
        }
        if (hist)  /* a loop of its own: the increments overlap instead of waiting on the branches */
            for (int i = 0; i < n_kept; i++) hist[bin_of[i]]++;
    }
    sums[0] = sum_r2;
    for (int s = 0; s < 2 * k - 1; s++) {  /* error², whole change², |d_j|², then <d_j, d_j+1> */
        const double *l = acc + (size_t)s * LANES;
        sums[1 + s] = (l[0] + l[1]) + (l[2] + l[3]);
    }
    free(acc);
    free(y);
    counts[0] = constant; counts[1] = small; counts[2] = few; counts[3] = kept;
    counts[4] = above0; counts[5] = above1;
    return 0;
}

/* torch's float -> bfloat16 rounding: to nearest even, NaN -> 0x7FC0 */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/*
 * out[i] = lerp(a[i], b[i], w) for n bf16 (kind RAW_BF16) or float32 (RAW_F32) values, computed as
 * torch.lerp does on CPU: in float32, with w rounded to float, coeff = |w| < 0.5 ? w : w - 1,
 * base = |w| < 0.5 ? a : b, and one fused multiply-add coeff * (b - a) + base, rounded to the
 * storage type (bf16: to nearest even). Returns the number of non-finite results, or -1 for a bad kind.
 */
MULTIVERSION
int64_t rlvrx_lerp(int kind, const void *a, const void *b, double weight, void *out, int64_t n) {
    const float w = (float)weight;
    const int small = fabsf(w) < 0.5f;
    const float coeff = small ? w : w - 1.0f;
    int64_t bad = 0;
    if (kind == RAW_BF16) {
        const uint16_t *x = a, *y = b;
        uint16_t *z = out;
        for (int64_t i = 0; i < n; i++) {
            float s = from_bf16(x[i]), e = from_bf16(y[i]);
            z[i] = to_bf16(fmaf(coeff, e - s, small ? s : e));
            bad += (z[i] & 0x7f80u) == 0x7f80u;
        }
        return bad;
    }
    if (kind == RAW_F32) {
        const float *x = a, *y = b;
        float *z = out;
        for (int64_t i = 0; i < n; i++) {
            z[i] = fmaf(coeff, y[i] - x[i], small ? x[i] : y[i]);
            uint32_t u;
            memcpy(&u, &z[i], 4);
            bad += (u & 0x7f800000u) == 0x7f800000u;
        }
        return bad;
    }
    return -1;
}

/* Importable as a module so that a missing build shows up as an ImportError; the code is called
 * through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "rlvrx's compiled kernels (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
