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
    int32_t has_es;
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
    double den = fabs(e) + r->scale;
    if (r->has_es) den += es;
    double rel = diff / den;
    if (diff > k->max_abs) k->max_abs = diff;
    k->sumsq_diff += diff * diff;
    double size = fabs(e);
    if (r->has_es || r->floor != 0.0) {
        if (r->has_es) size += es;
        size += r->floor;
        k->sumsq_size += size * size;
    } else {
        k->sumsq_size += e * e;
    }
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
    int64_t worst_index;          // flat index; -1: none
    int32_t worst_is_nonfinite;
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
    if (first_nonfinite >= 0) { o->worst_index = first_nonfinite; o->worst_is_nonfinite = 1; }
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

// The pieces of the blocks: block b's elements [lo, hi) cut at the group boundaries. A
// block's pieces are groups gfirst[b] .. glast(b) and their sums are piece[poff[b] + j].
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

// The common piece: every element compared and finite. One vectorised pass computes each
// element's rel (kept for the argmax), the sums and the counts; a block where some pair is
// not finite (its sums come out non-finite) goes through element() instead.
static inline __attribute__((always_inline)) int block_fast(
        block_acc* k, gsums* g, const llmc_rule* r, int64_t lo, int64_t hi, double* relbuf,
        const void* ap, int a64, const void* ep, int e64, const void* esp, int esk) {
    double sd = 0.0, ss = 0.0, gf = 0.0, gs = 0.0, gr = 0.0, mx = 0.0, mr = -1.0;
    int64_t nbad = 0, mu = 0;
    const double scale = r->scale, tol = r->tol_rel, floor_ = r->floor;
    const int64_t tol_ulp = r->tol_ulp;
    const int sized = esk != 0 || floor_ != 0.0;
    #pragma omp simd reduction(+:sd, ss, gf, gs, gr, nbad) reduction(max:mx, mr, mu)
    for (int64_t i = lo; i < hi; i++) {
        double a = a64 ? ((const double*)ap)[i] : (double)((const float*)ap)[i];
        double e = e64 ? ((const double*)ep)[i] : (double)((const float*)ep)[i];
        double es = esk == 0 ? 0.0 : esk == 2 ? ((const double*)esp)[i] : (double)((const float*)esp)[i];
        double diff = fabs(a - e);
        double den = fabs(e) + scale;
        if (esk) den += es;
        double rel = diff / den;
        relbuf[i - lo] = rel;
        mx = diff > mx ? diff : mx;
        mr = rel > mr ? rel : mr;
        sd += diff * diff;
        double size = fabs(e);
        if (esk) size += es;
        if (sized) size += floor_;
        ss += sized ? size * size : e * e;
        double sgn = copysign(rel, a - e);
        gf += sgn * (double)((e > 0.0) - (e < 0.0));
        gs += sgn;
        gr += fabs(e) / den;
        float fa = (float)a, fe = (float)e;
        int32_t ba, be;
        memcpy(&ba, &fa, 4);
        memcpy(&be, &fe, 4);
        int32_t sa = ba >> 31, se = be >> 31;
        int64_t ka = (int64_t)(((ba & 0x7FFFFFFF) ^ sa) - sa), ke = (int64_t)(((be & 0x7FFFFFFF) ^ se) - se);
        int64_t ulp = ka > ke ? ka - ke : ke - ka;
        mu = ulp > mu ? ulp : mu;
        nbad += (rel > tol) | (tol_ulp >= 0 && ulp > tol_ulp);
    }
    if (!(isfinite(sd) && isfinite(ss) && isfinite(gs))) return 0;   // some pair is not finite
    k->n_compared += hi - lo;
    k->n_bad += nbad;
    k->sumsq_diff += sd; k->sumsq_size += ss;
    g->f += gf; g->s += gs; g->r += gr; g->n += (double)(hi - lo);
    if (mx > k->max_abs) k->max_abs = mx;
    if (mu > k->max_ulp) k->max_ulp = mu;
    if (mr > k->best_rel) {
        for (int64_t i = lo; i < hi; i++)
            if (relbuf[i - lo] == mr) { k->best_rel = mr; k->best_index = i; break; }
    }
    return 1;
}

static int block_dispatch(block_acc* k, gsums* g, const llmc_pair* in, const llmc_rule* r, int64_t lo, int64_t hi,
                          double* relbuf) {
    int combo = in->a_f64 * 6 + in->e_f64 * 3 + in->es_kind;
    #define FAST(A, E, S) return block_fast(k, g, r, lo, hi, relbuf, in->a, A, in->e, E, in->es, S)
    switch (combo) {
        case 0: FAST(0, 0, 0); case 1: FAST(0, 0, 1); case 2: FAST(0, 0, 2);
        case 3: FAST(0, 1, 0); case 4: FAST(0, 1, 1); case 5: FAST(0, 1, 2);
        case 6: FAST(1, 0, 0); case 7: FAST(1, 0, 1); case 8: FAST(1, 0, 2);
        case 9: FAST(1, 1, 0); case 10: FAST(1, 1, 1); default: FAST(1, 1, 2);
    }
    #undef FAST
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
                fast = block_dispatch(&k, &mine[j], in, r, plo, phi, relbuf);
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

static inline void adamw_expected(const llmc_adamw_in* in, const llmc_adamw_hp* h, int64_t i,
                                  double* p, double* m, double* v) {
    double g = (double)in->g[i];
    double mm = in->m0 ? (double)in->m0[i] : 0.0;
    double vv = in->v0 ? (double)in->v0[i] : 0.0;
    mm = mm * h->beta1;
    mm = mm + (1.0 - h->beta1) * g;
    vv = vv * h->beta2;
    vv = vv + ((1.0 - h->beta2) * g) * g;
    double m_hat = mm / h->bc1, v_hat = vv / h->bc2;
    double upd = m_hat / (sqrt(v_hat) + h->eps);
    double pp = (double)in->p0[i];
    upd = upd + h->wd * pp;
    upd = upd * h->lr;
    *p = pp - upd;
    *m = mm;
    *v = vv;
}

static inline void adamw_sizes(const llmc_adamw_in* in, const llmc_adamw_hp* h, int64_t i, double v,
                               float* m_size, float* p_size) {
    float m0 = in->m0 ? in->m0[i] : 0.0f;
    float m_mag = fabsf(h->b1 * m0);
    m_mag = m_mag + fabsf(h->one_minus_b1 * in->g[i]);
    float upd = m_mag / h->c1;
    upd = upd / (sqrtf((float)v / h->c2) + h->eps_f);
    upd = upd * h->amp;
    float absp = fabsf(in->p0[i]);
    upd = upd + h->wd_f * absp;
    upd = upd * h->lr_f;
    upd = upd + absp;
    *m_size = m_mag;
    *p_size = upd;
}

// Pass 1: the sums of squares of the finite expected params, m and v, and their counts.
void llmc_adamw_sumsq(const llmc_adamw_in* in, const llmc_adamw_hp* h, double sumsq[3], int64_t count[3],
                      int threads) {
    int64_t nb = (in->n + BLOCK - 1) / BLOCK;
    double* part = malloc(sizeof(double) * 3 * (size_t)(nb ? nb : 1));
    int64_t c0 = 0, c1 = 0, c2 = 0;
    #pragma omp parallel for schedule(static) reduction(+:c0, c1, c2) num_threads(threads)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * BLOCK, hi = lo + BLOCK < in->n ? lo + BLOCK : in->n;
        double s0 = 0.0, s1 = 0.0, s2 = 0.0;
        for (int64_t i = lo; i < hi; i++) {
            double p, m, v;
            adamw_expected(in, h, i, &p, &m, &v);
            if (isfinite(p)) { s0 += p * p; c0++; }
            if (isfinite(m)) { s1 += m * m; c1++; }
            if (isfinite(v)) { s2 += v * v; c2++; }
        }
        part[3 * b] = s0; part[3 * b + 1] = s1; part[3 * b + 2] = s2;
    }
    sumsq[0] = sumsq[1] = sumsq[2] = 0.0;
    for (int64_t b = 0; b < nb; b++)
        for (int k = 0; k < 3; k++) sumsq[k] += part[3 * b + k];
    count[0] = c0; count[1] = c1; count[2] = c2;
    free(part);
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
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * BLOCK, hi = lo + BLOCK < in->n ? lo + BLOCK : in->n, plo, phi;
        gsums* mine = &piece[3 * (P.G ? P.poff[b] : b)];
        block_acc kp, km, kv;
        block_init(&kp); block_init(&km); block_init(&kv);
        for (int64_t j = 0; piece_range(&P, b, j, lo, hi, &plo, &phi); j++) {
            gsums* g = &mine[3 * j];
            for (int64_t i = plo; i < phi; i++) {
                double p, m, v;
                float m_size, p_size;
                adamw_expected(in, h, i, &p, &m, &v);
                adamw_sizes(in, h, i, v, &m_size, &p_size);
                element(&kp, &g[0], &r[0], i, (double)in->p1[i], p, (double)p_size);
                element(&km, &g[1], &r[1], i, (double)in->m1[i], m, (double)m_size);
                element(&kv, &g[2], &r[2], i, (double)in->v1[i], v, 0.0);
            }
        }
        acc[3 * b] = kp; acc[3 * b + 1] = km; acc[3 * b + 2] = kv;
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
