/* The weight-linearity block kernel for one vector width: _native.c includes this file once per width,
 * with BLOCK (the function's name), BLOCK_TARGET, LANES and the vector types vd (LANES doubles), vl
 * (LANES int64) and vi (LANES int32) defined; they are undefined at the end, ready for the next width. The results do not depend on the width: each parameter's
 * arithmetic is lane-wise, and sums over parameters go through ACCUMULATE4, four lanes at a time in
 * parameter order. See rlvrx_weight_block in _native.c for the arguments. */

BLOCK_TARGET
int BLOCK(const void *const *rows, int kind, const double *lut, int64_t n, int k, const double *tc,
          double s_tt, const double *holdout, double min_abs_change, int min_unique,
          const double *thresholds, int64_t bins, int64_t *counts, double *sums, int64_t *hist,
          double *values) {
    if (k < 2 || k > MAX_K || element_size(kind) == 0 || n < 0 || bins < 1 || bins > INT32_MAX) return -1;
    /* y: the tile's values, K rows of TILE; acc: 4-lane sums kept over all tiles (kept R², error²,
     * whole change², |d_j|² for the K-1 deltas, <d_j, d_j+1> for the K-2 pairs); order: the steps in
     * the order distinct values are counted */
    double *y = malloc(sizeof(double) * TILE * (size_t)k);
    double *acc = calloc((size_t)(2 * k) * 4, sizeof(double));
    int *order = distinct_order(k, min_unique);
    if (!y || !acc || !order) { free(y); free(acc); free(order); return -2; }
    double r2_of[TILE];
    int64_t keep_of[TILE];
    int32_t bin_of[TILE];
    const vd zero = {0}, one = zero + 1.0;
    const vl none = {0}, all = none - 1;
    vl lane;
    for (int l = 0; l < LANES; l++) lane[l] = l;
    vl n_constant = none, n_small = none, n_few = none, n_kept = none, n_above0 = none, n_above1 = none, n_bad = none;
    /* max - min >= max |y - mean| >= sqrt(S_yy / K): above this S_yy, no parameter is below min_abs_change
     * (the 0.1% margin covers rounding); below it the span is computed exactly */
    const double wide_limit = k * (min_abs_change * 1.001) * (min_abs_change * 1.001);
    /* distinct values of the first `prefix` steps of order are always counted, the rest only for the
     * rare groups where a parameter has not reached min_unique by then */
    const int prefix = min_unique + 1 < k ? min_unique + 1 : k;

    for (int64_t p0 = 0; p0 < n; p0 += TILE) {
        int m = (int)(n - p0 < TILE ? n - p0 : TILE);
        int padded = (m + LANES - 1) / LANES * LANES;
        for (int j = 0; j < k; j++) {
            double *row = y + (size_t)j * TILE;
            widen(rows[j], kind, lut, p0, m, row);
            for (int p = m; p < padded; p++) row[p] = 0.0;
        }
        for (int p = 0; p < padded; p += LANES) {
            const double *yp = y + p;
            const vd first = LOAD(yp);
            vd mean = zero;
            for (int j = 0; j < k; j++) mean += LOAD(yp + (size_t)j * TILE);
            mean /= (double)k;
            vd sty = zero, syy = zero, err = zero;
            for (int j = 0; j < k; j++) {
                vd c = LOAD(yp + (size_t)j * TILE) - mean;
                sty += tc[j] * c;
                syy += c * c;
                err += holdout[j] * c;
            }
            ACCUMULATE4(acc + 4, err * err);
            vd whole = LOAD(yp + (size_t)(k - 1) * TILE) - first;
            ACCUMULATE4(acc + 8, whole * whole);
            vd prev = first, d_prev = zero;
            for (int j = 0; j + 1 < k; j++) {  /* successive deltas, from the stored values */
                vd next = LOAD(yp + (size_t)(j + 1) * TILE), d = next - prev;
                ACCUMULATE4(acc + (size_t)(3 + j) * 4, d * d);
                if (j) ACCUMULATE4(acc + (size_t)(k + 1 + j) * 4, d_prev * d);
                d_prev = d;
                prev = next;
            }
            /* the filters, in order; stored values compared as float64 (-0 == +0, NaN equal to none) */
            vl constant, few = none;
            if (min_unique > 1) {
                vl count = none + 1;
                for (int a = 1; a < k; a++) {
                    if (a >= prefix) {
                        vl enough = count >= min_unique;
                        if (ALL_SET(enough)) break;
                    }
                    vd v = LOAD(yp + (size_t)order[a] * TILE);
                    vl fresh = all;
                    for (int b = 0; b < a; b++) fresh &= v != LOAD(yp + (size_t)order[b] * TILE);
                    count -= fresh;
                }
                constant = count == 1;  /* all K equal: a count below min_unique is exact */
                few = count < min_unique;
            } else {
                constant = all;
                for (int j = 1; j < k; j++) constant &= LOAD(yp + (size_t)j * TILE) == first;
            }
            const vl valid = lane + p < m;
            n_bad -= ~(mean - mean == zero) & valid;  /* a NaN or infinite value: the caller refuses the block */
            constant = (constant | (syy <= zero)) & valid;
            vl small = none, open = valid & ~constant, narrow = open & ~(syy > wide_limit);  /* NaN S_yy too */
            if (min_abs_change > 0.0 && ANY_SET(narrow)) {
                vd lo = first - mean, hi = lo;
                for (int j = 1; j < k; j++) {
                    vd c = LOAD(yp + (size_t)j * TILE) - mean;
                    lo = PICK(c < lo, c, lo);
                    hi = PICK(c > hi, c, hi);
                }
                small = narrow & (hi - lo < min_abs_change);
            }
            open &= ~small;
            few &= open;
            const vl keep = open & ~few;
            vd r2 = sty * sty / (syy * s_tt);
            r2 = PICK(r2 > one, one, r2);
            r2 = PICK(r2 < zero, zero, r2);
            n_constant -= constant;
            n_small -= small;
            n_few -= few;
            n_kept -= keep;
            n_above0 -= keep & (r2 > thresholds[0]);
            n_above1 -= keep & (r2 > thresholds[1]);
            ACCUMULATE4(acc, PICK(keep, r2, zero));
            vd scaled = r2 * (double)bins;
            vi bin = __builtin_convertvector(PICK(scaled == scaled, scaled, zero), vi), top = (vi){0} + (int32_t)(bins - 1);
            vi over = bin > top;
            bin = (bin & ~over) | (top & over);
            memcpy(r2_of + p, &r2, sizeof r2);
            memcpy(keep_of + p, &keep, sizeof keep);
            memcpy(bin_of + p, &bin, sizeof bin);
        }
        if (values)
            for (int p = 0; p < m; p++)
                if (keep_of[p]) *values++ = r2_of[p];
        if (hist)  /* a loop of its own: the increments overlap */
            for (int p = 0; p < m; p++)
                if (keep_of[p]) hist[bin_of[p]]++;
    }
    int64_t total[7] = {0};
    for (int l = 0; l < LANES; l++) {
        total[0] += n_constant[l]; total[1] += n_small[l]; total[2] += n_few[l];
        total[3] += n_kept[l]; total[4] += n_above0[l]; total[5] += n_above1[l]; total[6] += n_bad[l];
    }
    memcpy(counts, total, sizeof total);
    for (int s = 0; s < 2 * k; s++) {  /* kept R², error², whole change², |d_j|², then <d_j, d_j+1> */
        const double *l = acc + (size_t)s * 4;
        sums[s] = (l[0] + l[1]) + (l[2] + l[3]);
    }
    free(order);
    free(acc);
    free(y);
    return 0;
}

#undef BLOCK
#undef BLOCK_TARGET
#undef LANES
#undef vd
#undef vl
#undef vi
