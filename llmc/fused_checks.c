// fused_checks.c: the harness's own compiled helper (not part of the reference trainer).
//
// What harness/metrics.py computes in NumPy (the reference implementation of a
// comparison's metrics) for one pair of tensors, in one pass over memory; the float64
// AdamW reference of an update check with its three comparisons, the expected values
// never stored; and the witness's float32-sized noise. The harness builds this file itself
// (harness/clib/build.py: ensure_helper) with OpenMP and with floating-point contraction
// off, so that each element's arithmetic is the NumPy path's operation for operation;
// only the sums are added in another order, in fixed blocks, so that they do not depend
// on the number of threads. Every entry point takes the number of threads to use.
//
// The bias test's group sums (harness/stats.py): the compared elements fall into G
// contiguous groups (flat boundaries gbound[0..G]); per group the sums F, S, R, N of the
// signed error in the direction of the expected value, the signed error, the expected
// value's share of the denominator and the count. Each block of BLOCK elements is cut at
// the group boundaries into pieces, each piece's sums are kept, and the pieces are added
// into their groups in order afterwards, so that these sums do not depend on the threads
// either.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 4096   // elements per partial sum: the sums' order depends on it alone

// ----------------------------------------------------------------------------------------
// one element, one block

// How a tensor is judged: the element-wise bound (tol_rel, tol_ulp < 0: not checked), the
// size every element is floored at, whether NaN == NaN, and the RMS scale (plus the floor)
// added to every element's denominator.
typedef struct {
    double tol_rel;
    int64_t tol_ulp;
    double floor;
    int32_t nan_equal;
    double scale;
} llmc_rule;

// The running metrics of one block of elements.
typedef struct {
    int64_t n_compared, n_bad, n_nonfinite, first_nonfinite, max_ulp, best_index;
    double best_rel, max_abs;
    double sumsq_diff, sumsq_size;
} block_acc;

// The bias test's sums of one piece of a group (harness/stats.py: SUMS).
typedef struct { double f, s, r, n; } gsums;

static void block_init(block_acc* k) {
    memset(k, 0, sizeof *k);
    k->first_nonfinite = -1;
    k->best_index = -1;
    k->best_rel = -1.0;
}

static inline int32_t ulp_key(float x) {
    int32_t bits;
    memcpy(&bits, &x, 4);
    int32_t sign = bits >> 31;                 // 0 or -1
    int32_t mag = bits & 0x7FFFFFFF;
    return (mag ^ sign) - sign;                // minus the magnitude for negative values
}

// Element i: actual a, expected e, term size es (0 without). As compare.py's _Accumulator:
// a pair with a NaN or an inf is left out of the metrics and counted when the two differ;
// rel = |a - e| / (|e| + scale + es); the norm-wise sums; the float32 ulp distance.
static inline void element(block_acc* k, gsums* g, const llmc_rule* r, int64_t i, double a, double e, double es) {
    k->n_compared++;
    if (!(isfinite(a) && isfinite(e))) {
        int equal = (a == e) || (r->nan_equal && isnan(a) && isnan(e));
        if (!equal) {
            k->n_nonfinite++;
            if (k->first_nonfinite < 0) k->first_nonfinite = i;
        }
        return;
    }
    double diff = fabs(a - e);
    double den = (fabs(e) + r->scale) + es;     // es is 0 without term sizes: adds nothing
    double rel = diff / den;
    if (diff > k->max_abs) k->max_abs = diff;
    k->sumsq_diff += diff * diff;
    double size = (fabs(e) + es) + r->floor;    // with neither: |e| itself, exactly
    k->sumsq_size += size * size;
    double sgn = copysign(rel, a - e);          // the bias test's terms (harness/stats.py)
    g->f += sgn * (double)((e > 0.0) - (e < 0.0));
    g->s += sgn;
    g->r += fabs(e) / den;
    g->n += 1.0;
    if (rel > k->best_rel) { k->best_rel = rel; k->best_index = i; }
    int64_t ulp = (int64_t)ulp_key((float)a) - (int64_t)ulp_key((float)e);
    if (ulp < 0) ulp = -ulp;
    if (ulp > k->max_ulp) k->max_ulp = ulp;
    if (rel > r->tol_rel || (r->tol_ulp >= 0 && ulp > r->tol_ulp)) k->n_bad++;
}

// ----------------------------------------------------------------------------------------
// the result: blocks folded in order (the first largest rel, the first non-finite pair)

typedef struct {
    int64_t n_compared, n_bad, n_nonfinite;
    int64_t worst_index;          // flat index (the first non-finite pair's, if any); -1: none
    double max_abs, max_rel;
    int64_t max_ulp;
    double sumsq_diff, sumsq_size;
} llmc_cmp_out;

static void fold(const block_acc* acc, int64_t nb, int64_t stride, llmc_cmp_out* o) {
    memset(o, 0, sizeof *o);
    o->worst_index = -1;
    double worst_rel = -1.0;
    int64_t first_nonfinite = -1;
    for (int64_t b = 0; b < nb; b++) {
        const block_acc* k = &acc[b * stride];
        o->n_compared += k->n_compared;
        o->n_bad += k->n_bad + k->n_nonfinite;
        o->n_nonfinite += k->n_nonfinite;
        if (k->max_abs > o->max_abs) o->max_abs = k->max_abs;
        if (k->max_ulp > o->max_ulp) o->max_ulp = k->max_ulp;
        if (k->best_rel > worst_rel) { worst_rel = k->best_rel; o->worst_index = k->best_index; }
        if (first_nonfinite < 0 && k->first_nonfinite >= 0) first_nonfinite = k->first_nonfinite;
        o->sumsq_diff += k->sumsq_diff;
        o->sumsq_size += k->sumsq_size;
    }
    o->max_rel = worst_rel > 0.0 ? worst_rel : 0.0;
    if (first_nonfinite >= 0) o->worst_index = first_nonfinite;
}

// ----------------------------------------------------------------------------------------
// a pair of tensors

// a and e are float32 (f64 == 0) or float64 (f64 == 1); es is the term size (es_kind 0:
// none, 1: float32, 2: float64); all contiguous, n elements. causal_T > 0: only elements
// whose last two indices (t, t2), each of size T, have t2 <= t are compared.
typedef struct {
    const void* a; int32_t a_f64;
    const void* e; int32_t e_f64;
    const void* es; int32_t es_kind;
    int64_t n;
    int64_t causal_T;
} llmc_pair;

static inline double get(const void* p, int f64, int64_t i) {
    return f64 ? ((const double*)p)[i] : (double)((const float*)p)[i];
}

static inline int compared(int64_t i, int64_t T) {
    return T <= 0 || i % T <= (i / T) % T;
}

// The sum of squares and the count of the finite compared expected values (the RMS scale).
double llmc_sumsq_expected(const llmc_pair* in, int64_t* count_out, int threads) {
    int64_t nb = (in->n + BLOCK - 1) / BLOCK;
    double* part = malloc(sizeof(double) * (size_t)(nb ? nb : 1));
    int64_t count = 0;
    #pragma omp parallel for schedule(static) reduction(+:count) num_threads(threads)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * BLOCK, hi = lo + BLOCK < in->n ? lo + BLOCK : in->n;
        double s = 0.0;
        for (int64_t i = lo; i < hi; i++) {
            if (!compared(i, in->causal_T)) continue;
            double e = get(in->e, in->e_f64, i);
            if (isfinite(e)) { s += e * e; count++; }
        }
        part[b] = s;
    }
    double total = 0.0;
    for (int64_t b = 0; b < nb; b++) total += part[b];
    free(part);
    *count_out = count;
    return total;
}

// The common block: every element compared and finite. One vectorised pass computes each
// element's rel (kept for the argmax), the sums and the counts; a block where some pair is
// not finite (its sums come out non-finite) goes through element() instead.
static inline __attribute__((always_inline)) int block_fast(
        block_acc* k, gsums* g, const llmc_rule* r, int64_t base, int64_t len, double* relbuf,
        const void* ap, int a64, const void* ep, int e64, const void* esp, int esk) {
    double sd = 0.0, ss = 0.0, gf = 0.0, gs = 0.0, gr = 0.0, mx = 0.0, mr = -1.0, mu = 0.0, nbad = 0.0;
    const double scale = r->scale, tol = r->tol_rel, floor_ = r->floor;
    const double tol_ulp = r->tol_ulp >= 0 ? (double)r->tol_ulp : INFINITY;
    #pragma omp simd reduction(+:sd, ss, gf, gs, gr, nbad) reduction(max:mx, mr, mu)
    for (int64_t i = 0; i < len; i++) {
        double a = a64 ? ((const double*)ap)[i] : (double)((const float*)ap)[i];
        double e = e64 ? ((const double*)ep)[i] : (double)((const float*)ep)[i];
        double es = esk == 0 ? 0.0 : esk == 2 ? ((const double*)esp)[i] : (double)((const float*)esp)[i];
        double diff = fabs(a - e);
        double den = (fabs(e) + scale) + es;
        double rel = diff / den;
        relbuf[i] = rel;
        mx = diff > mx ? diff : mx;
        mr = rel > mr ? rel : mr;
        sd += diff * diff;
        double size = (fabs(e) + es) + floor_;      // with no es and no floor: |e| itself, exactly
        ss += size * size;
        double sgn = copysign(rel, a - e);               // the bias test's terms (harness/stats.py)
        gf += sgn * (double)((e > 0.0) - (e < 0.0));     // (this form vectorises; a select does not)
        gs += sgn;
        gr += fabs(e) / den;
        // the float32 ulp distance: the monotone keys of the two float32 bit patterns,
        // subtracted in double (exact: each key is below 2^31 in magnitude)
        union { float f; int32_t i; } ua = {.f = (float)a}, ue = {.f = (float)e};
        int32_t ba = ua.i, be = ue.i;
        int32_t sa = ba >> 31, se = be >> 31;
        double ulp = fabs((double)(((ba & 0x7FFFFFFF) ^ sa) - sa) - (double)(((be & 0x7FFFFFFF) ^ se) - se));
        mu = ulp > mu ? ulp : mu;
        nbad += (rel > tol || ulp > tol_ulp) ? 1.0 : 0.0;
    }
    if (!(isfinite(sd) && isfinite(ss) && isfinite(gs))) return 0;   // some pair is not finite
    k->n_compared += len;
    k->n_bad += (int64_t)nbad;
    k->sumsq_diff += sd; k->sumsq_size += ss;
    g->f += gf; g->s += gs; g->r += gr; g->n += (double)len;
    if (mx > k->max_abs) k->max_abs = mx;
    if ((int64_t)mu > k->max_ulp) k->max_ulp = (int64_t)mu;
    if (mr > k->best_rel) {
        for (int64_t i = 0; i < len; i++)
            if (relbuf[i] == mr) { k->best_rel = mr; k->best_index = base + i; break; }
    }
    return 1;
}

// Compiled twice, for AVX2 and for any x86-64 (or once elsewhere), chosen at load time: the
// same arithmetic either way (no FMA: contraction is off), wider vectors where they exist.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
int llmc_block(block_acc* k, gsums* g, const llmc_pair* in, const llmc_rule* r, int64_t lo, int64_t hi,
               double* relbuf) {
    int combo = in->a_f64 * 6 + in->e_f64 * 3 + in->es_kind;
    const char* a = (const char*)in->a + lo * (in->a_f64 ? 8 : 4);
    const char* e = (const char*)in->e + lo * (in->e_f64 ? 8 : 4);
    const char* es = in->es ? (const char*)in->es + lo * (in->es_kind == 2 ? 8 : 4) : NULL;
    #define FAST(A, E, S) return block_fast(k, g, r, lo, hi - lo, relbuf, a, A, e, E, es, S)
    switch (combo) {
        case 0: FAST(0, 0, 0); case 1: FAST(0, 0, 1); case 2: FAST(0, 0, 2);
        case 3: FAST(0, 1, 0); case 4: FAST(0, 1, 1); case 5: FAST(0, 1, 2);
        case 6: FAST(1, 0, 0); case 7: FAST(1, 0, 1); case 8: FAST(1, 0, 2);
        case 9: FAST(1, 1, 0); case 10: FAST(1, 1, 1); default: FAST(1, 1, 2);
    }
    #undef FAST
}

// The pieces of the blocks: block b's elements [lo, hi) cut at the group boundaries. A
// block's pieces are groups gfirst[b] .. and their sums are piece[poff[b] + j].
typedef struct {
    int64_t nb, G, npieces;
    const int64_t* gbound;     // G + 1 flat offsets (NULL: no groups)
    int64_t* gfirst;           // nb + 1: the first group of each block
    int64_t* poff;             // nb + 1: the first piece of each block
} pieces;

static int pieces_init(pieces* p, int64_t n, const int64_t* gbound, int64_t G) {
    memset(p, 0, sizeof *p);
    p->nb = (n + BLOCK - 1) / BLOCK;
    p->G = gbound ? G : 0;
    p->gbound = gbound;
    if (!p->G) return 0;
    p->gfirst = malloc(sizeof(int64_t) * (size_t)(p->nb + 1));
    p->poff = malloc(sizeof(int64_t) * (size_t)(p->nb + 1));
    if (!p->gfirst || !p->poff) return 1;
    int64_t g = 0, off = 0;
    for (int64_t b = 0; b < p->nb; b++) {
        int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        while (g + 1 < p->G && gbound[g + 1] <= lo) g++;
        p->gfirst[b] = g;
        p->poff[b] = off;
        int64_t last = g;
        while (last + 1 < p->G && gbound[last + 1] < hi) last++;
        off += last - g + 1;
    }
    p->gfirst[p->nb] = p->G;
    p->poff[p->nb] = off;
    p->npieces = off;
    return 0;
}

static void pieces_free(pieces* p) {
    free(p->gfirst);
    free(p->poff);
}

// Piece j of block b (lo, hi its elements): its range, or 0 when the block has no more.
static inline int piece_range(const pieces* p, int64_t b, int64_t j, int64_t lo, int64_t hi,
                              int64_t* plo, int64_t* phi) {
    if (!p->G) {
        if (j) return 0;
        *plo = lo; *phi = hi;
        return 1;
    }
    if (p->poff[b] + j >= p->poff[b + 1]) return 0;
    int64_t g = p->gfirst[b] + j;
    *plo = p->gbound[g] > lo ? p->gbound[g] : lo;
    *phi = p->gbound[g + 1] < hi ? p->gbound[g + 1] : hi;
    return 1;
}

// The pieces' sums added into their groups, in order (gout: G sums of F, S, R, N).
static void pieces_fold(const pieces* p, const gsums* piece, int64_t stride, double* gout) {
    if (!p->G) return;
    memset(gout, 0, sizeof(double) * 4 * (size_t)p->G);
    for (int64_t b = 0; b < p->nb; b++)
        for (int64_t q = p->poff[b]; q < p->poff[b + 1]; q++) {
            int64_t g = p->gfirst[b] + (q - p->poff[b]);
            const gsums* x = &piece[q * stride];
            gout[4 * g] += x->f; gout[4 * g + 1] += x->s; gout[4 * g + 2] += x->r; gout[4 * g + 3] += x->n;
        }
}

// The metrics of a pair under rule r (its scale: the RMS scale plus the floor), and the
// bias test's sums of the G groups that gbound delimits into gout (4 G doubles; gbound
// NULL: none).
int llmc_compare(const llmc_pair* in, const llmc_rule* r, llmc_cmp_out* out, const int64_t* gbound,
                 int64_t G, double* gout, int threads) {
    pieces P;
    int64_t nb = (in->n + BLOCK - 1) / BLOCK;
    block_acc* acc = malloc(sizeof(block_acc) * (size_t)(nb ? nb : 1));
    int failed = pieces_init(&P, in->n, gbound, G) || !acc;
    gsums* piece = failed ? NULL : calloc((size_t)(P.G ? P.npieces : nb) + 1, sizeof(gsums));
    if (failed || !piece) { free(acc); free(piece); pieces_free(&P); return 1; }
    #pragma omp parallel num_threads(threads)
    {
        double relbuf[BLOCK];
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            int64_t lo = b * BLOCK, hi = lo + BLOCK < in->n ? lo + BLOCK : in->n, plo, phi;
            gsums* mine = &piece[P.G ? P.poff[b] : b];
            block_acc k;
            block_init(&k);
            int fast = in->causal_T <= 0;
            for (int64_t j = 0; fast && piece_range(&P, b, j, lo, hi, &plo, &phi); j++)
                fast = llmc_block(&k, &mine[j], in, r, plo, phi, relbuf);
            if (!fast) {
                block_init(&k);
                for (int64_t j = 0; piece_range(&P, b, j, lo, hi, &plo, &phi); j++) {
                    gsums* g = &mine[j];
                    memset(g, 0, sizeof *g);
                    for (int64_t i = plo; i < phi; i++) {
                        if (!compared(i, in->causal_T)) continue;
                        double es = in->es_kind ? get(in->es, in->es_kind == 2, i) : 0.0;
                        element(&k, g, r, i, get(in->a, in->a_f64, i), get(in->e, in->e_f64, i), es);
                    }
                }
            }
            acc[b] = k;
        }
    }
    fold(acc, nb, 1, out);
    pieces_fold(&P, piece, 1, gout);
    free(acc);
    free(piece);
    pieces_free(&P);
    return 0;
}

// ----------------------------------------------------------------------------------------
// the update check: AdamW in float64 from the pre-step state (pyref.numpy_kernels.adamw,
// operation for operation), its term sizes in float32 (pyref.terms.adamw_magnitudes), and
// the comparisons of params, m and v with the implementation's, in two passes (the RMS
// scales, then the metrics), the expected values never stored

typedef struct {
    double lr, beta1, beta2, eps, wd, bc1, bc2;    // the float32 values, widened; 1 - beta^t
    float b1, one_minus_b1, c1, c2, eps_f, amp, wd_f, lr_f;   // the term sizes' float32 constants
} llmc_adamw_hp;

typedef struct {
    const float *p0, *m0, *v0, *g;       // pre-step state (m0, v0 NULL: zeros) and gradients
    const float *p1, *m1, *v1;           // the implementation's post-step state
    int64_t n;
} llmc_adamw_in;

// One block's expected params, m, v (float64) and the term sizes of params and m (float32),
// into the block buffers, in one vectorised loop; ``state``: m0 and v0 given (else zeros,
// the first step: the caller gives both or neither).
static inline __attribute__((always_inline)) void adamw_fill_state(
        const llmc_adamw_in* in, const llmc_adamw_hp* h, int64_t lo, int64_t len,
        double* pe, double* me, double* ve, float* ps, float* ms, int state) {
    const float *p0 = in->p0 + lo, *g = in->g + lo;
    const float *m0 = state ? in->m0 + lo : NULL, *v0 = state ? in->v0 + lo : NULL;
    #pragma omp simd
    for (int64_t i = 0; i < len; i++) {
        double gi = (double)g[i];
        float m0f = state ? m0[i] : 0.0f;
        double mm = (double)m0f;
        double vv = state ? (double)v0[i] : 0.0;
        mm = mm * h->beta1;
        mm = mm + (1.0 - h->beta1) * gi;
        vv = vv * h->beta2;
        vv = vv + ((1.0 - h->beta2) * gi) * gi;
        double upd = (mm / h->bc1) / (sqrt(vv / h->bc2) + h->eps);
        double pp = (double)p0[i];
        upd = upd + h->wd * pp;
        upd = upd * h->lr;
        pe[i] = pp - upd;
        me[i] = mm;
        ve[i] = vv;
        float m_mag = fabsf(h->b1 * m0f);                       // pyref.terms.adamw_magnitudes
        m_mag = m_mag + fabsf(h->one_minus_b1 * g[i]);
        float u = m_mag / h->c1;
        u = u / (sqrtf((float)vv / h->c2) + h->eps_f);
        u = u * h->amp;
        float absp = fabsf(p0[i]);
        u = u + h->wd_f * absp;
        u = u * h->lr_f;
        ms[i] = m_mag;
        ps[i] = u + absp;
    }
}

static inline __attribute__((always_inline)) void adamw_fill(
        const llmc_adamw_in* in, const llmc_adamw_hp* h, int64_t lo, int64_t len,
        double* pe, double* me, double* ve, float* ps, float* ms) {
    if (in->m0) adamw_fill_state(in, h, lo, len, pe, me, ve, ps, ms, 1);
    else adamw_fill_state(in, h, lo, len, pe, me, ve, ps, ms, 0);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void llmc_adamw_block_sumsq(const llmc_adamw_in* in, const llmc_adamw_hp* h, int64_t lo, int64_t len,
                            double* buf, double sums[3], int64_t counts[3]) {
    double *pe = buf, *me = buf + BLOCK, *ve = buf + 2 * BLOCK;
    float *ps = (float*)(buf + 3 * BLOCK), *ms = ps + BLOCK;
    adamw_fill(in, h, lo, len, pe, me, ve, ps, ms);
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, c0 = 0.0, c1 = 0.0, c2 = 0.0;
    #pragma omp simd reduction(+:s0, s1, s2, c0, c1, c2)
    for (int64_t i = 0; i < len; i++) {
        double f0 = isfinite(pe[i]) ? 1.0 : 0.0, f1 = isfinite(me[i]) ? 1.0 : 0.0, f2 = isfinite(ve[i]) ? 1.0 : 0.0;
        s0 += f0 != 0.0 ? pe[i] * pe[i] : 0.0;
        s1 += f1 != 0.0 ? me[i] * me[i] : 0.0;
        s2 += f2 != 0.0 ? ve[i] * ve[i] : 0.0;
        c0 += f0; c1 += f1; c2 += f2;
    }
    sums[0] = s0; sums[1] = s1; sums[2] = s2;
    counts[0] = (int64_t)c0; counts[1] = (int64_t)c1; counts[2] = (int64_t)c2;
}

// Pass 1: the sums of squares of the finite expected params, m and v, and their counts.
void llmc_adamw_sumsq(const llmc_adamw_in* in, const llmc_adamw_hp* h, double sumsq[3], int64_t count[3],
                      int threads) {
    int64_t nb = (in->n + BLOCK - 1) / BLOCK;
    double* part = malloc(sizeof(double) * 3 * (size_t)(nb ? nb : 1));
    int64_t* cpart = malloc(sizeof(int64_t) * 3 * (size_t)(nb ? nb : 1));
    #pragma omp parallel num_threads(threads)
    {
        double* buf = malloc(sizeof(double) * 4 * BLOCK);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            int64_t lo = b * BLOCK, len = lo + BLOCK < in->n ? BLOCK : in->n - lo;
            llmc_adamw_block_sumsq(in, h, lo, len, buf, part + 3 * b, cpart + 3 * b);
        }
        free(buf);
    }
    for (int k = 0; k < 3; k++) { sumsq[k] = 0.0; count[k] = 0; }
    for (int64_t b = 0; b < nb; b++)
        for (int k = 0; k < 3; k++) { sumsq[k] += part[3 * b + k]; count[k] += cpart[3 * b + k]; }
    free(part);
    free(cpart);
}

// One block of pass 2: the three comparisons (a block with a non-finite pair element by element).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void llmc_adamw_block(const llmc_adamw_in* in, const llmc_adamw_hp* h, const llmc_rule r[3], int64_t lo,
                      int64_t len, double* buf, double* relbuf, block_acc acc[3], const int64_t* cuts,
                      int64_t ncuts, gsums* g) {
    double *pe = buf, *me = buf + BLOCK, *ve = buf + 2 * BLOCK;
    float *ps = (float*)(buf + 3 * BLOCK), *ms = ps + BLOCK;
    adamw_fill(in, h, lo, len, pe, me, ve, ps, ms);
    const float* actual[3] = {in->p1 + lo, in->m1 + lo, in->v1 + lo};
    const double* expected[3] = {pe, me, ve};
    const float* size[3] = {ps, ms, NULL};
    for (int k = 0; k < 3; k++) {              // each piece [cuts[j], cuts[j+1]) of the block
        block_init(&acc[k]);
        int done = 1;
        for (int64_t j = 0; done && j < ncuts; j++) {
            int64_t o = cuts[j], n = cuts[j + 1] - cuts[j];
            done = size[k] ? block_fast(&acc[k], &g[3 * j + k], &r[k], lo + o, n, relbuf, actual[k] + o, 0,
                                        expected[k] + o, 1, size[k] + o, 1)
                           : block_fast(&acc[k], &g[3 * j + k], &r[k], lo + o, n, relbuf, actual[k] + o, 0,
                                        expected[k] + o, 1, NULL, 0);
        }
        if (!done) {
            block_init(&acc[k]);
            for (int64_t j = 0; j < ncuts; j++) {
                gsums* gj = &g[3 * j + k];
                memset(gj, 0, sizeof *gj);
                for (int64_t i = cuts[j]; i < cuts[j + 1]; i++)
                    element(&acc[k], gj, &r[k], lo + i, (double)actual[k][i], expected[k][i],
                            size[k] ? (double)size[k][i] : 0.0);
            }
        }
    }
}

// Pass 2: the three comparisons (params, m, v: rules r[0..2], results out[0..2]), and the
// bias test's sums of each over the G groups gbound delimits (gout: 3 x 4 G doubles, params
// then m then v; gbound NULL: none).
int llmc_adamw_compare(const llmc_adamw_in* in, const llmc_adamw_hp* h, const llmc_rule r[3],
                       llmc_cmp_out out[3], const int64_t* gbound, int64_t G, double* gout, int threads) {
    pieces P;
    int64_t nb = (in->n + BLOCK - 1) / BLOCK;
    block_acc* acc = malloc(sizeof(block_acc) * 3 * (size_t)(nb ? nb : 1));
    int failed = pieces_init(&P, in->n, gbound, G) || !acc;
    gsums* piece = failed ? NULL : calloc(3 * ((size_t)(P.G ? P.npieces : nb) + 1), sizeof(gsums));
    if (failed || !piece) { free(acc); free(piece); pieces_free(&P); return 1; }
    #pragma omp parallel num_threads(threads)
    {
        double* buf = malloc(sizeof(double) * 4 * BLOCK);
        double* relbuf = malloc(sizeof(double) * BLOCK);
        int64_t cuts[BLOCK + 1];
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            int64_t lo = b * BLOCK, len = lo + BLOCK < in->n ? BLOCK : in->n - lo, plo, phi, ncuts = 0;
            for (int64_t j = 0; piece_range(&P, b, j, lo, lo + len, &plo, &phi); j++) {
                cuts[ncuts++] = plo - lo;
                cuts[ncuts] = phi - lo;
            }
            llmc_adamw_block(in, h, r, lo, len, buf, relbuf, acc + 3 * b, cuts, ncuts,
                             &piece[3 * (P.G ? P.poff[b] : b)]);
        }
        free(buf);
        free(relbuf);
    }
    for (int k = 0; k < 3; k++) {
        fold(acc + k, nb, 3, &out[k]);
        pieces_fold(&P, piece + k, 3, gout ? gout + 4 * k * P.G : NULL);
    }
    free(acc);
    free(piece);
    pieces_free(&P);
    return 0;
}

// ----------------------------------------------------------------------------------------
// the witness's noise: x (1 + s xi), xi uniform on [-sqrt 3, sqrt 3] (mean 0, variance 1,
// as a rounding error is uniform), drawn by a counter-based generator (splitmix64 of the
// stream position), so that the draws depend on (seed, position) alone, not on the threads

static inline double draw(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((double)(z >> 11) * 0x1.0p-53 * 2.0 - 1.0) * 1.7320508075688772;   // [-sqrt 3, sqrt 3)
}

// x[i] += x[i] * (s * xi[offset + i]), in place.
void llmc_noise(double* x, int64_t n, double s, uint64_t seed, uint64_t offset, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(n > 65536)
    for (int64_t i = 0; i < n; i++) x[i] = x[i] + x[i] * (s * draw(seed, offset + (uint64_t)i));
}

// buf[i] += c[i] + c[i] * (s * xi[offset + i]): a backward's contribution, noised, added.
void llmc_add_noisy(double* buf, const double* c, int64_t n, double s, uint64_t seed, uint64_t offset,
                    int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(n > 65536)
    for (int64_t i = 0; i < n; i++) buf[i] = buf[i] + (c[i] + c[i] * (s * draw(seed, offset + (uint64_t)i)));
}
