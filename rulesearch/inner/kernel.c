/* The online inner loop of a feedforward network and its adjoint, one C kernel per episode batch
 * (rulesearch.inner.native). Built with the flags of rulesearch.native, once per `real` (float or double, a typedef
 * the caller puts first); the network's activation, loss, feedback and softplus sharpness come with each call.
 *
 * Per layer l (weights W_l of shape n_{l+1} x n_l, row-major), the rule's step is
 *     W_l <- (1 + a) W_l + sum_p u_p Vt_p^T,   Vt_p = sum_q C[p][q] v_q,   C = sum_j g_j C_j,
 * with post vectors u = (1, y_{l+1}, e_{l+1}), pre vectors v = (1, y_l, e_l, W_l^T y_{l+1}) and the step's global
 * factors g = (1, sums of y_{l+1}, e_{l+1}, y_l, e_l, their means, y_{l+1}^T W y_l, e_{l+1}^T W y_l,
 * y_{l+1}^T W e_l).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NP 3
#define NQ 4
#define NC (NP * NQ)
#define NG 12
#define MAXL 32
#define LAYER_INTS (NG * NC + 2)

/* cfg: L, N, B, need_err, err_lo, snap_every, check_every, record, act (0 softplus, 1 tanh, 2 sigmoid, 3 linear),
 * ce (1: softmax + cross-entropy, 0: identity + MSE), bp (1: errors through W^T, 0: through the stored feedback
 * matrices), n_0..n_L, then per layer LAYER_INTS ints: use[NG][3][4] (structural nonzeros of the C_j), decay, wtp (the
 * rule reads W^T post). */
#define HEAD 11

/* Every vector of the tape and the work space starts a 64-byte line: its length is rounded up to ALIGN reals (a
 * vector load or store that splits a line costs two). Addresses only: the arithmetic is the same. */
#define ALIGN ((long)(64 / sizeof(real)))
static long padded(long n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

/* n zeroed reals on a 64-byte line; *raw is what free takes */
static real *alloc_lines(long n, void **raw) {
    char *p = calloc((size_t)n * sizeof(real) + 64, 1);
    *raw = p;
    return p ? (real *)(p + (64 - (uintptr_t)p % 64) % 64) : NULL;
}
typedef struct {
    int L, N, B, need_err, err_lo, snap_every, check_every, record, act, ce, bp;
    real beta; /* softplus sharpness */
    int n[MAXL + 1];
    int use[MAXL][NG][NP][NQ], decay[MAXL], wtp[MAXL];
    int pq[MAXL][NP][NQ], up[MAXL][NP], gused[MAXL][NG]; /* derived: (p, q) used by some C_j; u_p used; g_j used */
    long off_y[MAXL + 1], off_z[MAXL + 1], off_e[MAXL + 1], off_back[MAXL + 1], off_wtp[MAXL + 1];
    int keep_d[MAXL + 1], keep_ez[MAXL + 1]; /* the record keeps sigma'_i, exp(beta z_i) (softplus' hidden layers) */
    long off_d[MAXL + 1], off_ez[MAXL + 1];
    long S, wtot, wsize[MAXL], woff[MAXL];
    int nmax;
} Net;

static int setup(Net *t, const int *cfg, real beta) {
    t->L = cfg[0]; t->N = cfg[1]; t->B = cfg[2]; t->need_err = cfg[3]; t->err_lo = cfg[4];
    t->snap_every = cfg[5]; t->check_every = cfg[6]; t->record = cfg[7];
    t->act = cfg[8]; t->ce = cfg[9]; t->bp = cfg[10]; t->beta = beta;
    if (t->L < 1 || t->L > MAXL || t->act < 0 || t->act > 3) return 1;
    const int L = t->L;
    const int *lay = cfg + HEAD + L + 1;
    t->nmax = 0;
    for (int i = 0; i <= L; i++) {
        t->n[i] = cfg[HEAD + i];
        if (t->n[i] > t->nmax) t->nmax = t->n[i];
    }
    long off = 0;
    for (int i = 1; i <= L; i++) { t->off_y[i] = off; off += padded(t->n[i]); }
    for (int i = 1; i <= L; i++) { t->off_z[i] = off; off += padded(t->n[i]); }
    for (int i = 0; i <= L; i++) { t->off_e[i] = off; off += padded(t->n[i]); }
    for (int i = 1; i < L; i++) { t->off_back[i] = off; off += padded(t->n[i]); } /* back_0: never read back */
    for (int i = 0; i < L; i++) { t->off_wtp[i] = off; off += padded(t->n[i]); }
    /* softplus: the forward's transcendentals that the adjoint needs again, sigma'_i (where the errors are) and
     * exp(beta z_i), are kept; the other activations recompute them from y */
    for (int i = 0; i <= L; i++) {
        t->keep_d[i] = t->act == 0 && t->need_err && i >= 1 && i < L && i >= t->err_lo;
        t->off_d[i] = off;
        off += t->keep_d[i] ? padded(t->n[i]) : 0;
        t->keep_ez[i] = t->act == 0 && i >= 1 && i < L;
        t->off_ez[i] = off;
        off += t->keep_ez[i] ? padded(t->n[i]) : 0;
    }
    t->S = off;
    t->wtot = 0;
    for (int l = 0; l < L; l++) {
        t->wsize[l] = (long)t->n[l + 1] * t->n[l];
        t->woff[l] = t->wtot;
        t->wtot += t->wsize[l];
        for (int p = 0; p < NP; p++) {
            t->up[l][p] = 0;
            for (int q = 0; q < NQ; q++) t->pq[l][p][q] = 0;
        }
        for (int j = 0; j < NG; j++) {
            t->gused[l][j] = 0;
            for (int p = 0; p < NP; p++) {
                for (int q = 0; q < NQ; q++) {
                    const int u = lay[LAYER_INTS * l + NC * j + NQ * p + q];
                    t->use[l][j][p][q] = u;
                    t->pq[l][p][q] |= u;
                    t->up[l][p] |= u;
                    t->gused[l][j] |= u;
                }
            }
        }
        t->decay[l] = lay[LAYER_INTS * l + NG * NC];
        t->wtp[l] = lay[LAYER_INTS * l + NG * NC + 1];
    }
    return 0;
}

/* The numbers in one step's record (S) and in one weight snapshot (wtot), for the caller's buffers; returns 1 for a
 * bad configuration. */
int rs_sizes(const int *cfg, long *out) {
    Net t;
    if (setup(&t, cfg, 1)) return 1;
    out[0] = t.S;
    out[1] = t.wtot;
    return 0;
}

/* ---- elementwise maps (the network's activation, its derivative and their backward passes) ---------------- */

/* sigma(z); softplus also gives exp(beta z) to *ez (when ez and beta z <= 20) */
static real act(const Net *t, real z, real *ez) {
    switch (t->act) {
    case 0: {
        real bz = z * t->beta;
        if (bz > (real)20) return z;
        const double e = exp(bz);
        if (ez) *ez = (real)e;
        return log1p(e) / t->beta;
    }
    case 1: return tanh(z);
    case 2: return (real)1 / ((real)1 + exp(-z));
    default: return z;
    }
}

/* sigma'(z) from y = sigma(z) */
static real deriv(const Net *t, real y) {
    switch (t->act) {
    case 0: return -expm1(-t->beta * y);
    case 1: return (real)1 - y * y;
    case 2: return y * ((real)1 - y);
    default: return (real)1;
    }
}

/* g sigma'(z) as autograd computes it; ez: exp(beta z) as the forward kept it (softplus; unused otherwise) */
static real act_backward(const Net *t, real g, real y, real z, real ez) {
    switch (t->act) {
    case 0: return z * t->beta > (real)20 ? g : g * ez / (ez + (real)1);
    case 1: return g * ((real)1 - y * y);
    case 2: return g * (y * ((real)1 - y));
    default: return g;
    }
}

/* the VJP of e = back * sigma'(z) through sigma' (cotangent of y), given ge and gd = ge * d */
static real deriv_backward(const Net *t, real ge, real gd, real back, real y) {
    switch (t->act) {
    case 0: return (ge - gd) * back * t->beta;
    case 1: return ge * back * y * (real)-2;
    case 2: return ge * back * ((real)1 - (real)2 * y);
    default: return (real)0;
    }
}


/* ---- small linear algebra ------------------------------------------------------------------------------ */

#define LANES 16 /* independent partial sums of a reduction: vector registers that hide the adds' latency */

static real lanes_sum(const real *acc) {
    real s = 0;
    for (int k = 0; k < LANES; k++) s += acc[k];
    return s;
}

/* sum_j a_j b_j over LANES partial sums */
static real dot(const real *restrict a, const real *restrict b, long n) {
    real acc[LANES] = {0};
    long j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int k = 0; k < LANES; k++) acc[k] += a[j + k] * b[j + k];
    real s = lanes_sum(acc);
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* out = W v (W: m x n) */
static void mv(const real *restrict W, const real *restrict v, real *restrict out, int m, int n) {
    for (int i = 0; i < m; i++) out[i] = dot(W + (long)i * n, v, n);
}

/* out += W^T u (W: m x n), four rows per pass over out: out_j + u_i w_ij, then + u_{i+1} w_{i+1,j}, ..., the order of
 * a row at a time */
static void vm_add(const real *restrict W, const real *restrict u, real *restrict out, int m, int n) {
    int i = 0;
    for (; i + 4 <= m; i += 4) {
        const real u0 = u[i], u1 = u[i + 1], u2 = u[i + 2], u3 = u[i + 3];
        const real *restrict w0 = W + (long)i * n, *restrict w1 = w0 + n, *restrict w2 = w1 + n, *restrict w3 = w2 + n;
        for (int j = 0; j < n; j++) out[j] = (((out[j] + u0 * w0[j]) + u1 * w1[j]) + u2 * w2[j]) + u3 * w3[j];
    }
    for (; i < m; i++) {
        const real ui = u[i];
        const real *restrict w = W + (long)i * n;
        for (int j = 0; j < n; j++) out[j] += ui * w[j];
    }
}

/* ---- one layer's update ---------------------------------------------------------------------------------- */

typedef struct {
    int k;                     /* active outer products */
    const real *u[NP];         /* post vectors (NULL: the ones vector) */
    const real *vt[NP];        /* their Vt_p */
} Outer;

/* the layer's active (u_p, Vt_p) from the step's vectors; Vt (NP rows of padded(n_pre)) is written */
static void outer_of(const Net *t, int l, const real *C, const real *const *u, const real *const *v, real *Vt,
                     Outer *o) {
    const int n = t->n[l];
    o->k = 0;
    for (int p = 0; p < NP; p++) {
        if (!t->up[l][p]) continue;
        real *restrict r = Vt + p * padded(n);
        for (int j = 0; j < n; j++) r[j] = 0;
        for (int q = 0; q < NQ; q++) {
            if (!t->pq[l][p][q]) continue;
            const real c = C[NQ * p + q];
            if (q == 0) {
                for (int j = 0; j < n; j++) r[j] += c;
            } else {
                const real *restrict vq = v[q];
                for (int j = 0; j < n; j++) r[j] += c * vq[j];
            }
        }
        o->u[o->k] = u[p];
        o->vt[o->k] = r;
        o->k++;
    }
}

/* ---- one pass over a row ------------------------------------------------------------------------------------ */

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

/* The passes over a weight row (or a row of G) in one loop, on constants NU, ND, NH that the callers' switches fix, so
 * each combination compiles to its own loop:
 *     w <- p (c w + sum_{t < NU} a_t x_t),   d_r = <w, y_r> (r < ND) over LANES partial sums, as dot,
 *     h_r <- h_r + b_r w (r < NH),
 * all of the updated row, which is read and written once. The sums keep the association of separate loops
 * (c w + ((a_0 x_0 + a_1 x_1) + a_2 x_2)), and c = 1 or p = 1 multiply exactly, so the results are those bits. */
INLINE void row_pass(real *restrict w, const int n, const int NU, const real c, const real p, const real *restrict x0,
                     const real *restrict x1, const real *restrict x2, const real a0, const real a1, const real a2,
                     const int ND, const real *restrict y0, const real *restrict y1, const real *restrict y2,
                     real *restrict d, const int NH, real *restrict h0, real *restrict h1, real *restrict h2,
                     const real b0, const real b1, const real b2) {
    real c0[LANES] = {0}, c1[LANES] = {0}, c2[LANES] = {0};
#define ROW_ELEM(J)                                                                                                   \
    real v = c * w[J];                                                                                                \
    if (NU == 1) v = v + a0 * x0[J];                                                                                  \
    if (NU == 2) v = v + (a0 * x0[J] + a1 * x1[J]);                                                                   \
    if (NU == 3) v = v + (a0 * x0[J] + a1 * x1[J] + a2 * x2[J]);                                                      \
    v = v * p;                                                                                                        \
    w[J] = v;                                                                                                         \
    if (NH > 0) h0[J] += b0 * v;                                                                                      \
    if (NH > 1) h1[J] += b1 * v;                                                                                      \
    if (NH > 2) h2[J] += b2 * v;
    int j = 0;
    for (; j + LANES <= n; j += LANES) {
        for (int q = 0; q < LANES; q++) {
            ROW_ELEM(j + q)
            if (ND > 0) c0[q] += v * y0[j + q];
            if (ND > 1) c1[q] += v * y1[j + q];
            if (ND > 2) c2[q] += v * y2[j + q];
        }
    }
    real s0 = ND > 0 ? lanes_sum(c0) : 0, s1 = ND > 1 ? lanes_sum(c1) : 0, s2 = ND > 2 ? lanes_sum(c2) : 0;
    for (; j < n; j++) {
        ROW_ELEM(j)
        if (ND > 0) s0 += v * y0[j];
        if (ND > 1) s1 += v * y1[j];
        if (ND > 2) s2 += v * y2[j];
    }
#undef ROW_ELEM
    if (ND > 0) d[0] = s0;
    if (ND > 1) d[1] = s1;
    if (ND > 2) d[2] = s2;
}

/* A row's update w <- p (c w + sum_k s u_k[i] Vt_k) by the outer products o (u NULL: ones), and its dots with y0, y1
 * (nd of them): the forward's update (with the next step's W_0 x) and the adjoint's reversal. */
static void row_update(real *restrict w, const Outer *o, int i, real c, real s, real p, int n, int nd,
                       const real *y0, const real *y1, real *d) {
    real a[NP] = {0};
    for (int k = 0; k < o->k; k++) a[k] = s * (o->u[k] ? o->u[k][i] : (real)1);
    const real *const *x = o->vt;
#define RU(K, ND_)                                                                                                    \
    case K * 3 + ND_:                                                                                                 \
        row_pass(w, n, K, c, p, x[0], x[1], x[2], a[0], a[1], a[2], ND_, y0, y1, NULL, d, 0, NULL, NULL, NULL, 0, 0,  \
                 0);                                                                                                  \
        break;
#define RU_K(K) RU(K, 0) RU(K, 1) RU(K, 2)
    switch (o->k * 3 + nd) {
        RU_K(0) RU_K(1) RU_K(2) RU_K(3)
    }
#undef RU_K
#undef RU
}

/* W <- c W + sum_k u_k Vt_k^T; with xn, also zn = W xn from the updated rows (the next step's first layer) */
static void apply_outer(real *restrict W, const Outer *o, real c, int m, int n, const real *xn, real *zn) {
    for (int i = 0; i < m; i++)
        row_update(W + (long)i * n, o, i, c, (real)1, (real)1, n, xn ? 1 : 0, xn, NULL, xn ? zn + i : NULL);
}

/* ---- the step's vectors in the tape -------------------------------------------------------------------- */

/* one step's vectors: y_i (y_0 the input x), z_i, e_i, the feedback products back_i of e_i = back_i sigma'_i (back_0
 * in the caller's scratch, NULL in the adjoint, which does not read it), W^T post per layer, the kept sigma'_i and
 * exp(beta z_i) (NULL where not kept); dx = sigma'(x) of the input when e_0 is needed */
typedef struct {
    const real *dx;
    real *y[MAXL + 1], *z[MAXL + 1], *e[MAXL + 1], *back[MAXL + 1], *wtp[MAXL + 1], *d[MAXL + 1], *ez[MAXL + 1];
} Vecs;

static void vecs_of(const Net *t, real *tp, const real *x, const real *dx, real *back0, Vecs *s) {
    s->dx = dx;
    s->y[0] = (real *)x;
    s->z[0] = NULL;
    for (int i = 1; i <= t->L; i++) { s->y[i] = tp + t->off_y[i]; s->z[i] = tp + t->off_z[i]; }
    for (int i = 0; i <= t->L; i++) s->e[i] = tp + t->off_e[i];
    s->back[0] = back0;
    for (int i = 1; i < t->L; i++) s->back[i] = tp + t->off_back[i];
    for (int i = 0; i < t->L; i++) s->wtp[i] = tp + t->off_wtp[i];
    for (int i = 0; i <= t->L; i++) {
        s->d[i] = t->keep_d[i] ? tp + t->off_d[i] : NULL;
        s->ez[i] = t->keep_ez[i] ? tp + t->off_ez[i] : NULL;
    }
}

/* sigma'_i: of the input (from the caller) for i = 0, else as kept, else from y_i */
static real dsig(const Net *t, const Vecs *s, int i, int j) {
    return i == 0 ? s->dx[j] : s->d[i] ? s->d[i][j] : deriv(t, s->y[i][j]);
}

/* the layer's u = (1, post, err) and v = (1, pre, pre_err, W^T post) */
static void layer_vectors(const Net *t, const Vecs *s, int l, const real *u[NP], const real *v[NQ]) {
    int has_e = t->need_err;
    u[0] = NULL;
    u[1] = s->y[l + 1];
    u[2] = has_e ? s->e[l + 1] : NULL;
    v[0] = NULL;
    v[1] = s->y[l];
    v[2] = has_e && l >= t->err_lo ? s->e[l] : NULL;
    v[3] = s->wtp[l];
}

/* a layer's global factors and effective coefficients C = sum_j g_j C_j at one step */
typedef struct {
    real g[NG], c[NC];
} Coef;

static real vsum(const real *restrict v, int n) {
    real acc[LANES] = {0};
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int k = 0; k < LANES; k++) acc[k] += v[j + k];
    real s = lanes_sum(acc);
    for (; j < n; j++) s += v[j];
    return s;
}

static void coef_of(const Net *t, const Vecs *s, int l, const real *Cl, Coef *k) {
    const int m = t->n[l + 1], n = t->n[l];
    const real *post = s->y[l + 1], *err = s->e[l + 1], *pre = s->y[l], *pre_err = s->e[l];
    k->g[0] = 1;
    for (int j = 1; j < NG; j++) {
        if (!t->gused[l][j]) { k->g[j] = 0; continue; }
        switch (j) {
        case 1: k->g[j] = vsum(post, m); break;
        case 2: k->g[j] = vsum(err, m); break;
        case 3: k->g[j] = vsum(pre, n); break;
        case 4: k->g[j] = vsum(pre_err, n); break;
        case 5: k->g[j] = vsum(post, m) / (real)m; break;
        case 6: k->g[j] = vsum(err, m) / (real)m; break;
        case 7: k->g[j] = vsum(pre, n) / (real)n; break;
        case 8: k->g[j] = vsum(pre_err, n) / (real)n; break;
        case 9: k->g[j] = dot(post, s->z[l + 1], m); break;
        case 10: k->g[j] = dot(err, s->z[l + 1], m); break;
        default: k->g[j] = dot(s->wtp[l], pre_err, n); break;
        }
    }
    for (int c = 0; c < NC; c++) k->c[c] = 0;
    for (int j = 0; j < NG; j++) {
        if (!t->gused[l][j]) continue;
        for (int c = 0; c < NC; c++) k->c[c] += k->g[j] * Cl[NC * j + c];
    }
}

/* ---- forward ---------------------------------------------------------------------------------------------- */

/* Forward pass, loss and correctness, errors, W^T post: everything of one step before the update. */
static void step_signals(const Net *t, real *const *W, real *const *F, const real *tgt, long label, Vecs *s,
                         const real *z1, real *loss, real *correct) {
    const int L = t->L;
    for (int l = 0; l < L; l++) {
        const int m = t->n[l + 1], n = t->n[l];
        if (l == 0 && z1)
            memcpy(s->z[1], z1, sizeof(real) * m);
        else
            mv(W[l], s->y[l], s->z[l + 1], m, n);
        real *z = s->z[l + 1], *y = s->y[l + 1];
        if (l < L - 1) {
            real *ez = s->ez[l + 1];
            for (int i = 0; i < m; i++) y[i] = act(t, z[i], ez ? ez + i : NULL);
        }
    }
    {
        const int m = t->n[L];
        real *z = s->z[L], *y = s->y[L];
        if (t->ce) {
            real mx = z[0];
            for (int i = 1; i < m; i++) mx = z[i] > mx ? z[i] : mx;
            real sum = 0;
            for (int i = 0; i < m; i++) { y[i] = exp(z[i] - mx); sum += y[i]; }
            real zt = 0;
            for (int i = 0; i < m; i++) { y[i] = y[i] / sum; zt += z[i] * tgt[i]; }
            *loss = (mx + log(sum)) - zt;
        } else {
            real acc = 0;
            for (int i = 0; i < m; i++) { y[i] = z[i]; real d = y[i] - tgt[i]; acc += d * d; }
            *loss = (real)0.5 * acc;
        }
        if (label >= 0) {
            int am = 0;
            for (int i = 1; i < m; i++) if (y[i] > y[am]) am = i;
            *correct = am == label ? (real)1 : (real)0;
        } else {
            *correct = (real)NAN;
        }
    }
    if (t->need_err) {
        real *eL = s->e[L];
        for (int i = 0; i < t->n[L]; i++) eL[i] = s->y[L][i] - tgt[i];
        for (int i = L - 1; i >= t->err_lo; i--) {
            const int m = t->n[i + 1], n = t->n[i];
            real *back = s->back[i], *e = s->e[i];
            for (int j = 0; j < n; j++) back[j] = 0;
            vm_add(t->bp ? W[i] : F[i], s->e[i + 1], back, m, n); /* backprop: the errors go back through W itself */
            real *d = s->d[i]; /* computed here, kept for the adjoint where the record has room */
            for (int j = 0; j < n; j++) {
                const real dj = i == 0 ? s->dx[j] : deriv(t, s->y[i][j]);
                if (d) d[j] = dj;
                e[j] = back[j] * dj;
            }
        }
    }
    for (int l = 0; l < L; l++) {
        if (!t->wtp[l]) continue;
        real *r = s->wtp[l];
        for (int j = 0; j < t->n[l]; j++) r[j] = 0;
        vm_add(W[l], s->y[l + 1], r, t->n[l + 1], t->n[l]);
    }
}

static int is_check(const Net *t, int s) { return (s + 1) % t->check_every == 0 || s == t->N - 1; }

static int n_checks(const Net *t) {
    int c = 0;
    for (int s = 0; s < t->N; s++) c += is_check(t, s);
    return c;
}

/* The online steps of every episode, in place on W (B x n_{l+1} x n_l per layer). With cfg's record, each
 * step's vectors go to tape (B x N x S) and W_s to snaps (B x ceil(N / snap_every) x wtot) for s = 0, snap, ...
 * Per step: loss, correctness (NaN without labels); per check step and layer: 1 where |W| exceeds bound or W or
 * the layer's errors are not finite. Returns 0, or 1 for a bad configuration, 2 when out of memory. */
int rs_forward(const int *cfg, real beta, real bound, real **Wp, real **Fp, const real *x, const real *dx,
               const real *tgt, const int64_t *labels, const real *C, const real *A, real *tape, real *snaps,
               real *loss_out, real *correct_out, uint8_t *bad_out) {
    Net t;
    if (setup(&t, cfg, beta)) return 1;
    const int L = t.L, N = t.N;
    const int nsnap = (N + t.snap_every - 1) / t.snap_every, nchk = n_checks(&t);
    void *raw;
    real *scratch = alloc_lines(t.S + NP * padded(t.nmax) + padded(t.n[1]) + padded(t.n[0]), &raw);
    if (!scratch) return 2;
    real *Vt = scratch + t.S, *z1 = Vt + NP * padded(t.nmax); /* z1: the next step's W_0 x, from the update's pass */
    real *back0 = z1 + padded(t.n[1]);
    for (int b = 0; b < t.B; b++) {
        real *W[MAXL], *F[MAXL];
        for (int l = 0; l < L; l++) {
            W[l] = Wp[l] + b * t.wsize[l];
            F[l] = Fp[l] ? Fp[l] + b * t.wsize[l] : NULL;
        }
        const real *Cb = C + (long)b * L * NG * NC, *Ab = A + (long)b * L;
        int chk = 0;
        for (int s = 0; s < N; s++) {
            const long bs = (long)b * N + s;
            real *tp = t.record ? tape + bs * t.S : scratch;
            if (t.record && s % t.snap_every == 0) {
                real *dst = snaps + ((long)b * nsnap + s / t.snap_every) * t.wtot;
                for (int l = 0; l < L; l++) memcpy(dst + t.woff[l], W[l], sizeof(real) * t.wsize[l]);
            }
            Vecs v;
            vecs_of(&t, tp, x + bs * t.n[0], dx ? dx + bs * t.n[0] : NULL, back0, &v);
            step_signals(&t, W, F, tgt + bs * t.n[L], labels ? (long)labels[bs] : -1, &v, s > 0 ? z1 : NULL,
                         loss_out + bs, correct_out + bs);
            for (int l = 0; l < L; l++) {
                const real *u[NP], *vv[NQ];
                layer_vectors(&t, &v, l, u, vv);
                Outer o;
                Coef k;
                coef_of(&t, &v, l, Cb + l * NG * NC, &k);
                outer_of(&t, l, k.c, u, vv, Vt, &o);
                const int fuse = l == 0 && s + 1 < N;
                apply_outer(W[l], &o, t.decay[l] ? (real)1 + Ab[l] : (real)1, t.n[l + 1], t.n[l],
                            fuse ? x + (bs + 1) * t.n[0] : NULL, z1);
            }
            if (is_check(&t, s)) {
                uint8_t *bad = bad_out + ((long)b * nchk + chk) * L;
                for (int l = 0; l < L; l++) {
                    int k = 0;
                    const real *w = W[l];
                    for (long j = 0; j < t.wsize[l]; j++) k |= !(fabs(w[j]) <= bound);
                    if (t.need_err) {
                        for (int i = l; i <= l + 1; i++) {
                            if (i < t.err_lo || (i == l && l > 0)) continue;
                            for (int j = 0; j < t.n[i]; j++) k |= !isfinite(v.e[i][j]);
                        }
                    }
                    bad[l] = (uint8_t)k;
                }
                chk++;
            }
        }
    }
    free(raw);
    return 0;
}

/* ---- adjoint ---------------------------------------------------------------------------------------------- */

/* Row i of G: g <- c g + sum_t a_t x_t (nu vectors), then, with the step before's outers o, k_r = g . Vt_r and
 * h_r += u_r[i] g (h: NP rows of padded(n), accumulating), in one pass */
static void g_row(real *restrict g, int n, real c, int nu, const real *const *x, const real *a, const Outer *o, int i,
                  int m, real *k, real *h) {
    real b[NP] = {0}, d[NP];
    const long hs = padded(n);
    for (int r = 0; r < o->k; r++) b[r] = o->u[r] ? o->u[r][i] : (real)1;
    const real *const *vt = o->vt;
#define GR(NU, K)                                                                                                     \
    case NU * 4 + K:                                                                                                  \
        row_pass(g, n, NU, c, 1, x[0], x[1], x[2], a[0], a[1], a[2], K, vt[0], vt[1], vt[2], d, K, h, h + hs,         \
                 h + 2 * hs, b[0], b[1], b[2]);                                                                       \
        break;
#define GR_NU(NU) GR(NU, 0) GR(NU, 1) GR(NU, 2) GR(NU, 3)
    switch (nu * 4 + o->k) {
        GR_NU(0) GR_NU(1) GR_NU(2) GR_NU(3)
    }
#undef GR_NU
#undef GR
    for (int r = 0; r < o->k; r++) k[(long)r * m + i] = d[r];
}

/* The meta-gradient by the adjoint of rs_forward's recorded run: W holds W_N on entry and W_0 on exit (reversed
 * step by step, reset from the snapshots), G holds dL/dW_N on entry and dL/dW_0 on exit; dC (B x L x 3 x 4) and
 * dA (B x L) receive dL/dC and dL/da summed over the steps. Per step and layer, one pass over W (reversal, with
 * <G, W_s> and W_s dv3) and one over G (its update, with the factor products k, h of the step before). */
int rs_adjoint(const int *cfg, real beta, real **Wp, real **Fp, real **Gp, const real *x, const real *dx,
               const real *C, const real *A, real *tape, const real *snaps, real *dC, real *dA) {
    Net t;
    if (setup(&t, cfg, beta)) return 1;
    const int L = t.L, N = t.N, nm = t.nmax;
    const int nsnap = (N + t.snap_every - 1) / t.snap_every;
    /* per layer two Vt (3 rows of padded(n) each: this step's and the one before), k (3 m), h (3 rows), dv3 (n);
     * per index gy, ge, gz, gback; every vector on a line */
    long need = 0;
    for (int l = 0; l < L; l++) need += 3 * NP * padded(t.n[l]) + padded(NP * t.n[l + 1]) + padded(t.n[l]);
    need += 4 * (L + 1) * padded(nm);
    void *raw;
    real *work = alloc_lines(need, &raw);
    if (!work) return 2;
    real *Vt[MAXL][2], *K[MAXL], *H[MAXL], *dv3[MAXL], *gy[MAXL + 1], *ge[MAXL + 1], *gz[MAXL + 1], *gb[MAXL + 1];
    {
        real *p = work;
        for (int l = 0; l < L; l++) {
            Vt[l][0] = p; p += NP * padded(t.n[l]);
            Vt[l][1] = p; p += NP * padded(t.n[l]);
            K[l] = p; p += padded(NP * t.n[l + 1]);
            H[l] = p; p += NP * padded(t.n[l]);
            dv3[l] = p; p += padded(t.n[l]);
        }
        const long sv = padded(nm);
        for (int i = 0; i <= L; i++) { gy[i] = p; p += sv; ge[i] = p; p += sv; gz[i] = p; p += sv; gb[i] = p; p += sv; }
    }
    for (int b = 0; b < t.B; b++) {
        real *W[MAXL], *F[MAXL], *G[MAXL];
        for (int l = 0; l < L; l++) {
            W[l] = Wp[l] + b * t.wsize[l];
            F[l] = Fp[l] ? Fp[l] + b * t.wsize[l] : NULL;
            G[l] = Gp[l] + b * t.wsize[l];
        }
        const real *Cb = C + (long)b * L * NG * NC, *Ab = A + (long)b * L;
        real *dCb = dC + (long)b * L * NG * NC, *dAb = dA + (long)b * L;
        Vecs v, vp; /* this step's vectors and the step before's */
        Outer o[MAXL], op[MAXL], o0 = {0}; /* o0: no outer products */
        Coef kc[MAXL], kp[MAXL];
        const real *u[MAXL][NP], *vv[MAXL][NQ], *up[MAXL][NP], *vvp[MAXL][NQ];
        int cur = 0;
        vecs_of(&t, tape + ((long)b * N + N - 1) * t.S, x + ((long)b * N + N - 1) * t.n[0],
                dx ? dx + ((long)b * N + N - 1) * t.n[0] : NULL, NULL, &v);
        for (int l = 0; l < L; l++) { /* the last step's factor products, from G = dL/dW_N */
            const int m = t.n[l + 1], n = t.n[l];
            layer_vectors(&t, &v, l, u[l], vv[l]);
            coef_of(&t, &v, l, Cb + l * NG * NC, &kc[l]);
            outer_of(&t, l, kc[l].c, u[l], vv[l], Vt[l][cur], &o[l]);
            memset(H[l], 0, sizeof(real) * NP * padded(n));
            {
                const real *none[NP] = {0}, zero[NP] = {0};
                for (int i = 0; i < m; i++) g_row(G[l] + (long)i * n, n, 1, 0, none, zero, &o[l], i, m, K[l], H[l]);
            }
        }
        for (int s = N - 1; s >= 0; s--) {
            for (int i = 0; i <= L; i++) {
                memset(gy[i], 0, sizeof(real) * nm);
                memset(ge[i], 0, sizeof(real) * nm);
                memset(gz[i], 0, sizeof(real) * nm);
                memset(gb[i], 0, sizeof(real) * nm);
            }
            /* cotangents of the post vectors, of the C_j, the global factors and the pre vectors, from k and h */
            for (int l = 0; l < L; l++) {
                const int m = t.n[l + 1], n = t.n[l];
                const real *Cl = Cb + l * NG * NC, *c = kc[l].c, *g = kc[l].g;
                real dg[NG] = {0};
                if (t.wtp[l]) memset(dv3[l], 0, sizeof(real) * n);
                int r = 0;
                for (int p = 0; p < NP; p++) {
                    if (!t.up[l][p]) continue;
                    const real *kr = K[l] + (long)r * m, *hr = H[l] + r * padded(n);
                    if (p == 1)
                        for (int i = 0; i < m; i++) gy[l + 1][i] += kr[i];
                    if (p == 2)
                        for (int i = 0; i < m; i++) ge[l + 1][i] += kr[i];
                    for (int q = 0; q < NQ; q++) {
                        if (!t.pq[l][p][q]) continue;
                        real acc = 0;
                        if (q == 0) {
                            acc = vsum(hr, n);
                        } else {
                            acc = dot(vv[l][q], hr, n);
                            const real cpq = c[NQ * p + q];
                            real *dst = q == 1 ? (l > 0 ? gy[l] : NULL) : q == 2 ? ge[l] : dv3[l];
                            if (dst)
                                for (int j = 0; j < n; j++) dst[j] += cpq * hr[j];
                        }
                        for (int j = 0; j < NG; j++) { /* dL/dC_j += g_j dL/dC, dL/dg_j = <C_j, dL/dC> */
                            if (!t.use[l][j][p][q]) continue;
                            dCb[(l * NG + j) * NC + NQ * p + q] += g[j] * acc;
                            dg[j] += Cl[NC * j + NQ * p + q] * acc;
                        }
                    }
                    r++;
                }
                for (int j = 1; j < NG; j++) { /* the global factors' cotangents to the step's vectors */
                    if (!t.gused[l][j]) continue;
                    const real d = dg[j], dm = d / (real)m, dn = d / (real)n;
                    real *gpost = gy[l + 1], *gerr = ge[l + 1], *gpre = l > 0 ? gy[l] : NULL, *gpe = ge[l];
                    const real *z = v.z[l + 1];
                    switch (j) {
                    case 1: for (int i = 0; i < m; i++) gpost[i] += d; break;
                    case 2: for (int i = 0; i < m; i++) gerr[i] += d; break;
                    case 3: if (gpre) for (int i = 0; i < n; i++) gpre[i] += d; break;
                    case 4: for (int i = 0; i < n; i++) gpe[i] += d; break;
                    case 5: for (int i = 0; i < m; i++) gpost[i] += dm; break;
                    case 6: for (int i = 0; i < m; i++) gerr[i] += dm; break;
                    case 7: if (gpre) for (int i = 0; i < n; i++) gpre[i] += dn; break;
                    case 8: for (int i = 0; i < n; i++) gpe[i] += dn; break;
                    case 9: /* post^T z, z = W pre: dz joins the forward pass's VJP */
                        for (int i = 0; i < m; i++) { gpost[i] += d * z[i]; gz[l + 1][i] += d * v.y[l + 1][i]; }
                        break;
                    case 10:
                        for (int i = 0; i < m; i++) { gerr[i] += d * z[i]; gz[l + 1][i] += d * v.e[l + 1][i]; }
                        break;
                    default: /* (W^T post)^T pre_err */
                        for (int i = 0; i < n; i++) { dv3[l][i] += d * v.e[l][i]; gpe[i] += d * v.wtp[l][i]; }
                    }
                }
            }
            /* W_{s+1} -> W_s, one row at a time, with da = <G, W_s> and dL/dpost += W_s dv3 (W^T post in the rule) */
            for (int l = 0; l < L; l++) {
                const int m = t.n[l + 1], n = t.n[l];
                const real one_a = t.decay[l] ? (real)1 + Ab[l] : (real)1;
                const real inv = (real)1 / one_a;
                const real *snap = s % t.snap_every == 0
                    ? snaps + ((long)b * nsnap + s / t.snap_every) * t.wtot + t.woff[l] : NULL;
                const int undo = o[l].k > 0 || one_a != (real)1;
                real da = 0;
                const int nd = (t.decay[l] != 0) + (t.wtp[l] != 0);
                for (int i = 0; i < m; i++) {
                    real *w = W[l] + (long)i * n, *gi = G[l] + (long)i * n, d[2];
                    const real *y0 = t.decay[l] ? gi : dv3[l], *y1 = dv3[l];
                    if (snap) memcpy(w, snap + (long)i * n, sizeof(real) * n);
                    if (snap || !undo) {
                        if (nd) row_update(w, &o0, i, 1, 1, 1, n, nd, y0, y1, d);
                    } else {
                        row_update(w, &o[l], i, (real)1, (real)-1, inv, n, nd, y0, y1, d);
                    }
                    if (t.decay[l]) da += d[0];
                    if (t.wtp[l]) gy[l + 1][i] += d[nd - 1];
                }
                dAb[l] += da;
            }
            /* the network's step VJP: errors (ascending), output, forward pass (descending) */
            if (t.need_err) {
                for (int i = t.err_lo; i < L; i++) {
                    const int m = t.n[i + 1], n = t.n[i];
                    real *g_back = gb[i];
                    for (int j = 0; j < n; j++) g_back[j] = ge[i][j] * dsig(&t, &v, i, j);
                    const real *M = t.bp ? W[i] : F[i];
                    for (int a = 0; a < m; a++) ge[i + 1][a] += dot(M + (long)a * n, g_back, n);
                    if (i > 0) {
                        for (int j = 0; j < n; j++)
                            gy[i][j] += deriv_backward(&t, ge[i][j], g_back[j], v.back[i][j], v.y[i][j]);
                    }
                }
                for (int j = 0; j < t.n[L]; j++) gy[L][j] += ge[L][j];
            }
            { /* the output map's VJP: softmax under CE, the identity under MSE */
                const int m = t.n[L];
                if (t.ce) {
                    const real *y = v.y[L];
                    real d = 0;
                    for (int j = 0; j < m; j++) d += gy[L][j] * y[j];
                    for (int j = 0; j < m; j++) gz[L][j] += y[j] * (gy[L][j] - d);
                } else {
                    for (int j = 0; j < m; j++) gz[L][j] += gy[L][j];
                }
            }
            for (int i = L; i >= 1; i--) {
                const int m = t.n[i], n = t.n[i - 1];
                if (i < L)
                    for (int j = 0; j < m; j++)
                        gz[i][j] += act_backward(&t, gy[i][j], v.y[i][j], v.z[i][j], v.ez[i] ? v.ez[i][j] : 0);
                if (i > 1) vm_add(W[i - 1], gz[i], gy[i - 1], m, n);
            }
            /* the step before's vectors and factors */
            if (s > 0) {
                vecs_of(&t, tape + ((long)b * N + s - 1) * t.S, x + ((long)b * N + s - 1) * t.n[0],
                        dx ? dx + ((long)b * N + s - 1) * t.n[0] : NULL, NULL, &vp);
                for (int l = 0; l < L; l++) {
                    layer_vectors(&t, &vp, l, up[l], vvp[l]);
                    coef_of(&t, &vp, l, Cb + l * NG * NC, &kp[l]);
                    outer_of(&t, l, kp[l].c, up[l], vvp[l], Vt[l][1 - cur], &op[l]);
                }
            }
            /* G_l <- (1 + a) G_l + gz_{l+1} y_l^T + y_{l+1} dv3^T + (bp) e_{l+1} gback_l^T, one row at a time,
             * with the step before's k and h */
            for (int l = 0; l < L; l++) {
                const int m = t.n[l + 1], n = t.n[l];
                const real one_a = t.decay[l] ? (real)1 + Ab[l] : (real)1;
                const real *yl = v.y[l], *d3 = dv3[l], *gbl = gb[l];
                const int w3 = t.wtp[l];
                const int bp = t.bp && t.need_err && l >= t.err_lo;
                if (s > 0) memset(H[l], 0, sizeof(real) * NP * padded(n));
                const real *x[NP] = {yl, w3 ? d3 : gbl, gbl};
                const int nu = 1 + w3 + bp;
                for (int i = 0; i < m; i++) {
                    const real a[NP] = {gz[l + 1][i], w3 ? v.y[l + 1][i] : bp ? v.e[l + 1][i] : (real)0,
                                        bp ? v.e[l + 1][i] : (real)0};
                    g_row(G[l] + (long)i * n, n, one_a, nu, x, a, s > 0 ? &op[l] : &o0, i, m, K[l], H[l]);
                }
            }
            if (s > 0) {
                v = vp;
                cur = 1 - cur;
                for (int l = 0; l < L; l++) {
                    o[l] = op[l];
                    kc[l] = kp[l];
                    for (int p = 0; p < NP; p++) u[l][p] = up[l][p];
                    for (int q = 0; q < NQ; q++) vv[l][q] = vvp[l][q];
                }
            }
        }
    }
    free(raw);
    return 0;
}
