/* rlvrx's compiled kernels, called through ctypes (rlvrx/kernels/__init__.py), which releases the GIL so that
 * blocks run in parallel on threads:
 *   rlvrx_weight_block  per-parameter R² statistics of a block of K checkpoints, exact in float64
 *                       (rlvrx/linearity/weights.py);
 *   rlvrx_lerp          two-point extrapolation of bf16/fp32 values, bit for bit torch.lerp's result
 *                       (rlvrx/extrapolate/weights.py).
 *
 * rlvrx_weight_block widens each parameter's K values to float64 and reduces a tile of TILE
 * parameters that stays in L1, four or eight parameters side by side in vector registers (the body is
 * _native_block.h, built once per width). Sums run in a fixed order (four per-lane accumulators,
 * whatever the width) and pyproject.toml compiles with -ffp-contract=off, so every build and CPU
 * gives the same bits (shards computed on different machines merge exactly).
 */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 256
#define MAX_K 4096

enum { RAW_BF16 = 0, RAW_F32 = 1, RAW_F64 = 2, RAW_LUT8 = 3, RAW_LUT16 = 4 };

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#define MULTIVERSION_WIDE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define WIDE  /* an AVX-512 build of the block kernel, used where the CPU has it */
#else
#define MULTIVERSION
#define MULTIVERSION_WIDE
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

/* Row k's values [p0, p0 + m) as float64 into out (inlined: compiled for each kernel's target). */
static inline __attribute__((always_inline)) void widen(const void *row, int kind, const double *lut, int64_t p0, int m, double *out) {
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

/* The steps in the order the kernel counts distinct values: min_unique of them spread over the steps
 * first (neighbouring steps are the likeliest to repeat a value), then the rest. */
static int *distinct_order(int k, int min_unique) {
    int *order = malloc(sizeof(int) * (size_t)k);
    char *taken = calloc((size_t)k, 1);
    if (!order || !taken) { free(order); free(taken); return NULL; }
    int n_order = 0, spread = min_unique > 1 && min_unique <= k ? min_unique : 0;
    for (int a = 0; a < spread; a++) {
        int j = (int)((int64_t)a * (k - 1) / (spread - 1));
        order[n_order++] = j;
        taken[j] = 1;
    }
    for (int j = 0; j < k; j++)
        if (!taken[j]) order[n_order++] = j;
    free(taken);
    return order;
}

static inline int all_set(const int64_t *lanes, int n) {
    int64_t r = lanes[0];
    for (int l = 1; l < n; l++) r &= lanes[l];
    return r != 0;
}

static inline int any_set(const int64_t *lanes, int n) {
    int64_t r = 0;
    for (int l = 0; l < n; l++) r |= lanes[l];
    return r != 0;
}

/* for _native_block.h, with vd, vl and LANES defined */
#define LOAD(p) (*(const vd *)(p))
#define PICK(mask, a, b) ((vd)(((mask) & (vl)(a)) | (~(mask) & (vl)(b))))  /* mask ? a : b */
#define ALL_SET(mask) all_set((const int64_t *)&(mask), LANES)
#define ANY_SET(mask) any_set((const int64_t *)&(mask), LANES)
#define ACCUMULATE4(slot, v)                                                        \
    do {                                                                            \
        const vd v_ = (v);                                                          \
        for (int h_ = 0; h_ < LANES; h_ += 4) {                                     \
            vd4 part_;                                                              \
            memcpy(&part_, (const double *)&v_ + h_, sizeof part_);                 \
            *(vd4 *)(slot) += part_;                                                \
        }                                                                           \
    } while (0)

/* loads from double arrays at any 8-byte boundary */
typedef double vd4 __attribute__((vector_size(32), aligned(8), may_alias));
typedef int64_t vl4 __attribute__((vector_size(32)));
typedef int32_t vi4 __attribute__((vector_size(16)));
typedef double vd8 __attribute__((vector_size(64), aligned(8), may_alias));
typedef int64_t vl8 __attribute__((vector_size(64)));
typedef int32_t vi8 __attribute__((vector_size(32)));

/* four parameters side by side: AVX2, or two SSE2 halves */
#define BLOCK rlvrx_weight_block_4
#define BLOCK_TARGET MULTIVERSION
#define LANES 4
#define vd vd4
#define vl vl4
#define vi vi4
#include "_native_block.h"

#ifdef WIDE
/* eight parameters side by side: AVX-512 */
#define BLOCK rlvrx_weight_block_8
#define BLOCK_TARGET __attribute__((target("arch=x86-64-v4")))
#define LANES 8
#define vd vd8
#define vl vl8
#define vi vi8
#include "_native_block.h"
#endif

/* The parameters a call of rlvrx_weight_block reduces side by side: 8 where the CPU has AVX-512, else 4
 * (the same results either way). */
int rlvrx_weight_block_lanes(void) {
#ifdef WIDE
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))  /* x86-64-v4 */
        return 8;
#endif
    return 4;
}

/*
 * rows: K pointers to n raw values each (element p of every row is one parameter).
 * counts (out, int64[7]): constant, min_abs_change, min_unique, kept, kept R² > thresholds[0], > thresholds[1],
 *   then non-finite: parameters with a NaN or infinite value (the other outputs are then meaningless).
 * sums (out, double[2K]): sum of kept R², the held-out error² sum, |W_K - W_1|², |d_i|² for the K-1
 *   successive deltas d_i = W_{i+1} - W_i, then <d_i, d_{i+1}> for the K-2 neighbouring pairs.
 * hist (accumulated, int64[bins]) and values (out, double[n]: kept R² in parameter order) may be NULL.
 * Filters, in order: constant (all K values equal, or S_yy <= 0), max - min of the centred values <
 * min_abs_change, fewer than min_unique distinct values (compared as float64, so -0 == +0).
 * Returns 0, -1 for bad arguments, -2 when out of memory.
 */
int rlvrx_weight_block(const void *const *rows, int kind, const double *lut, int64_t n, int k,
                       const double *tc, double s_tt, const double *holdout, double min_abs_change,
                       int min_unique, const double *thresholds, int64_t bins, int64_t *counts,
                       double *sums, int64_t *hist, double *values) {
#ifdef WIDE
    if (rlvrx_weight_block_lanes() == 8)
        return rlvrx_weight_block_8(rows, kind, lut, n, k, tc, s_tt, holdout, min_abs_change, min_unique,
                                    thresholds, bins, counts, sums, hist, values);
#endif
    return rlvrx_weight_block_4(rows, kind, lut, n, k, tc, s_tt, holdout, min_abs_change, min_unique,
                                thresholds, bins, counts, sums, hist, values);
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
MULTIVERSION_WIDE  /* element-wise: every width gives the same bits */
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
