/*
 * Fused schedule-free optimizer steps over lists of float32 CPU tensors.
 *
 * Plain C on purpose: no torch or Python headers, so it compiles in well under a second at first
 * use (see native.py, which builds, caches and loads it with ctypes).
 *
 * Every exported function takes parallel arrays of data pointers, one per tensor, and an array of
 * element counts. The work of all tensors is cut into chunks of SF_CHUNK elements and the chunks are
 * handed out to OpenMP threads one at a time (dynamic schedule), so a list of many small tensors
 * balances as well as one big one, and a thread slowed by another process on a shared CPU takes
 * fewer chunks instead of holding up the step.
 *
 * Gradients are only read. Scalars arrive as doubles and are rounded to float once, as torch does
 * with Python scalars on float32 tensors.
 *
 * Rounding follows torch's eager CPU kernels operation by operation (built with -ffp-contract=off,
 * with explicit fused multiply-adds exactly where torch's kernels use them):
 *   lerp(a, b, w)     = fma(w, b - a, a)               if |w| < 0.5
 *                     = fma(-(b - a), 1 - w, b)        otherwise (torch's at::lerp)
 *   a.add_(b, alpha)  = fma(b, alpha, a)
 *   v.addcmul_(g, g, value=c) = fma(c * g, g, v)
 * so where the hardware has FMA the SGD steps and lerp match an eager implementation of the same
 * formulas bit for bit. The Adam direction differs only by torch's CPU sqrt, which is not always
 * correctly rounded (1 ulp on some builds); sqrtf here is.
 * Every function returns 0, or -1 if it could not allocate its work plan (nothing was modified).
 *
 * The *_lp functions take bfloat16 or float16 parameters (and gradients of the same dtype) with
 * float32 master copies: see the section "Low-precision parameters" at the end.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SF_CHUNK 32768        /* elements per work item: large enough to amortise scheduling */
#define SF_PARALLEL_MIN 65536 /* below this many elements in total, threads cost more than they save */

#ifdef FP_FAST_FMAF
#define SF_FMA(a, b, c) fmaf((a), (b), (c))
#else
#define SF_FMA(a, b, c) ((a) * (b) + (c))
#endif

/* A lerp weight prepared once per call: torch picks the formula by |w| < 0.5. */
typedef struct {
    int small;
    float w;   /* the weight, for the small-weight formula */
    float omw; /* 1 - w, for the large-weight formula */
} sf_lerp_t;

static sf_lerp_t sf_lerp_make(double weight)
{
    sf_lerp_t l;
    l.w = (float)weight;
    l.omw = 1.0f - l.w;
    l.small = fabsf(l.w) < 0.5f;
    return l;
}

static inline float sf_lerp(float a, float b, sf_lerp_t l)
{
    float d = b - a;
    return l.small ? SF_FMA(l.w, d, a) : SF_FMA(-d, l.omw, b);
}

/* Which tensor, and which element range of it, each chunk covers. */
typedef struct {
    int64_t *first; /* first[t]: index of tensor t's first chunk; first[count]: number of chunks */
    int64_t count;
    int64_t total;  /* elements over all tensors */
} sf_plan_t;

static int sf_plan_make(sf_plan_t *p, const int64_t *n, int64_t count)
{
    p->count = count;
    p->total = 0;
    p->first = (int64_t *)malloc((size_t)(count + 1) * sizeof(int64_t));
    if (!p->first)
        return -1;
    int64_t chunks = 0;
    for (int64_t t = 0; t < count; ++t) {
        p->first[t] = chunks;
        chunks += (n[t] + SF_CHUNK - 1) / SF_CHUNK;
        p->total += n[t];
    }
    p->first[count] = chunks;
    return 0;
}

/* Tensor index of chunk c: the last t with first[t] <= c (empty tensors own no chunk). */
static inline int64_t sf_plan_tensor(const sf_plan_t *p, int64_t c)
{
    int64_t lo = 0, hi = p->count - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (p->first[mid] <= c)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

#ifdef _OPENMP
#define SF_OMP_FOR_CHUNKS \
    _Pragma("omp parallel for schedule(dynamic) num_threads(threads_) if(plan_.total >= SF_PARALLEL_MIN)")
#else
#define SF_OMP_FOR_CHUNKS
#endif

/*
 * Runs BODY once per chunk, in parallel, with t (tensor index), lo (first element) and m (element
 * count) in scope. Returns -1 from the enclosing function if the plan cannot be allocated.
 */
#define SF_FOR_CHUNKS(n, count, num_threads, BODY)                                                \
    do {                                                                                          \
        sf_plan_t plan_;                                                                          \
        if (sf_plan_make(&plan_, (n), (count)))                                                   \
            return -1;                                                                            \
        const int64_t chunks_ = plan_.first[(count)];                                             \
        const int threads_ = (num_threads) > 0 ? (num_threads) : 1;                              \
        (void)threads_;                                                                           \
        SF_OMP_FOR_CHUNKS                                                                         \
        for (int64_t c_ = 0; c_ < chunks_; ++c_) {                                                \
            const int64_t t = sf_plan_tensor(&plan_, c_);                                         \
            const int64_t lo = (c_ - plan_.first[t]) * SF_CHUNK;                                  \
            const int64_t m = ((n)[t] - lo) < SF_CHUNK ? ((n)[t] - lo) : SF_CHUNK;               \
            BODY;                                                                                 \
        }                                                                                         \
        free(plan_.first);                                                                        \
    } while (0)

/* Scalars of one schedule-free step, rounded to float as torch rounds Python scalars. */
typedef struct {
    float beta2, one_minus_beta2, bias_correction2, eps; /* Adam direction */
    int adaptive;
    float inner, one_minus_inner, bias_correction1; /* Adam's inner momentum (EMA of g), when it has one */
    float weight_decay;
    int decay;         /* weight_decay != 0: eager code skips the add otherwise */
    float neg_lr;      /* z <- z - lr u, as torch's sub_(alpha=lr) */
    float y_coef;      /* lr (beta (1 - ckp1) - 1), computed in double as the eager code does */
    sf_lerp_t to_z;    /* y <- lerp(y, z, ckp1) and closure x <- lerp(x, z, ckp1) */
    sf_lerp_t to_x;    /* closure form: x <- lerp(y, z, 1 - 1/beta) */
} sf_scalars_t;

static sf_scalars_t sf_scalars_make(double lr, double beta, double beta2, double eps, double weight_decay,
                                    double ckp1, double bias_correction2, int adaptive)
{
    sf_scalars_t s;
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = (float)(1.0 - beta2);
    s.bias_correction2 = (float)bias_correction2;
    s.eps = (float)eps;
    s.adaptive = adaptive != 0;
    s.weight_decay = (float)weight_decay;
    s.decay = weight_decay != 0.0;
    s.neg_lr = -(float)lr;
    s.y_coef = (float)(lr * (beta * (1.0 - ckp1) - 1.0));
    s.to_z = sf_lerp_make(ckp1);
    s.to_x = sf_lerp_make(1.0 - 1.0 / beta);
    s.inner = 0.0f;
    s.one_minus_inner = 1.0f;
    s.bias_correction1 = 1.0f;
    return s;
}

/* The scalars of an Adam step with inner momentum: those of sf_scalars_make plus the EMA's. */
static sf_scalars_t sf_scalars_inner(sf_scalars_t s, double inner_momentum, double bias_correction1)
{
    s.inner = (float)inner_momentum;
    s.one_minus_inner = (float)(1.0 - inner_momentum);
    s.bias_correction1 = (float)bias_correction1;
    return s;
}

/* u = direction + weight_decay * y, with direction g / (sqrt(v / bc2) + eps) or g; v updated first. */
static inline float sf_adam_direction(float gi, float yi, float *vi, const sf_scalars_t *s)
{
    float v = SF_FMA(s->one_minus_beta2 * gi, gi, s->beta2 * *vi);
    *vi = v;
    float u = s->adaptive ? gi / (sqrtf(v / s->bias_correction2) + s->eps) : gi;
    return s->decay ? SF_FMA(yi, s->weight_decay, u) : u;
}

/* As sf_adam_direction with g replaced by the bias-corrected EMA of g: m <- inner m + (1 - inner) g
 * (torch's m.mul_(inner).add_(g, alpha=1 - inner)), then (m / bc1) / (sqrt(v / bc2) + eps). */
static inline float sf_adam_inner_direction(float gi, float yi, float *vi, float *mi, const sf_scalars_t *s)
{
    float v = SF_FMA(s->one_minus_beta2 * gi, gi, s->beta2 * *vi);
    *vi = v;
    float m = SF_FMA(gi, s->one_minus_inner, s->inner * *mi);
    *mi = m;
    float num = m / s->bias_correction1;
    float u = s->adaptive ? num / (sqrtf(v / s->bias_correction2) + s->eps) : num;
    return s->decay ? SF_FMA(yi, s->weight_decay, u) : u;
}

static inline float sf_sgd_direction(float gi, float yi, const sf_scalars_t *s)
{
    return s->decay ? SF_FMA(yi, s->weight_decay, gi) : gi;
}

/* y <- lerp(y, z, ckp1) + y_coef u;  z <- z - lr u. */
#define SF_PRIMAL_UPDATE(yp, zp, i, u, s)                                                         \
    do {                                                                                          \
        const float zi_ = (zp)[i];                                                                \
        (yp)[i] = SF_FMA((u), (s).y_coef, sf_lerp((yp)[i], zi_, (s).to_z));                       \
        (zp)[i] = SF_FMA((u), (s).neg_lr, zi_);                                                   \
    } while (0)

/* Closure form, slot holds y on entry and x on exit: x <- lerp(y, z, 1 - 1/beta); z <- z - lr u;
 * x <- lerp(x, z, ckp1). */
#define SF_CLOSURE_UPDATE(xp, zp, i, u, s)                                                        \
    do {                                                                                          \
        const float zi_ = (zp)[i];                                                                \
        const float z_new_ = SF_FMA((u), (s).neg_lr, zi_);                                        \
        (xp)[i] = sf_lerp(sf_lerp((xp)[i], zi_, (s).to_x), z_new_, (s).to_z);                     \
        (zp)[i] = z_new_;                                                                         \
    } while (0)

static void sf_adam_chunk(float *restrict y, const float *restrict g, float *restrict z, float *restrict v,
                          int64_t m, sf_scalars_t s, int closure)
{
    if (closure) {
        for (int64_t i = 0; i < m; ++i) {
            const float u = sf_adam_direction(g[i], y[i], &v[i], &s);
            SF_CLOSURE_UPDATE(y, z, i, u, s);
        }
    } else {
        for (int64_t i = 0; i < m; ++i) {
            const float u = sf_adam_direction(g[i], y[i], &v[i], &s);
            SF_PRIMAL_UPDATE(y, z, i, u, s);
        }
    }
}

static void sf_adam_inner_chunk(float *restrict y, const float *restrict g, float *restrict z, float *restrict v,
                                float *restrict e, int64_t m, sf_scalars_t s, int closure)
{
    if (closure) {
        for (int64_t i = 0; i < m; ++i) {
            const float u = sf_adam_inner_direction(g[i], y[i], &v[i], &e[i], &s);
            SF_CLOSURE_UPDATE(y, z, i, u, s);
        }
    } else {
        for (int64_t i = 0; i < m; ++i) {
            const float u = sf_adam_inner_direction(g[i], y[i], &v[i], &e[i], &s);
            SF_PRIMAL_UPDATE(y, z, i, u, s);
        }
    }
}

static void sf_sgd_chunk(float *restrict y, const float *restrict g, float *restrict z, int64_t m,
                         sf_scalars_t s, int closure)
{
    if (closure) {
        for (int64_t i = 0; i < m; ++i) {
            const float u = sf_sgd_direction(g[i], y[i], &s);
            SF_CLOSURE_UPDATE(y, z, i, u, s);
        }
    } else {
        for (int64_t i = 0; i < m; ++i) {
            const float u = sf_sgd_direction(g[i], y[i], &s);
            SF_PRIMAL_UPDATE(y, z, i, u, s);
        }
    }
}

static int sf_adam(float *const *y, const float *const *g, float *const *z, float *const *v, const int64_t *n,
                   int64_t count, double lr, double beta1, double beta2, double eps, double weight_decay,
                   double ckp1, double bias_correction2, int adaptive, int closure, int num_threads)
{
    const sf_scalars_t s = sf_scalars_make(lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2, adaptive);
    SF_FOR_CHUNKS(n, count, num_threads, sf_adam_chunk(y[t] + lo, g[t] + lo, z[t] + lo, v[t] + lo, m, s, closure));
    return 0;
}

static int sf_adam_inner(float *const *y, const float *const *g, float *const *z, float *const *v,
                         float *const *e, const int64_t *n, int64_t count, double lr, double beta1, double beta2,
                         double eps, double weight_decay, double ckp1, double bias_correction2, int adaptive,
                         double inner_momentum, double bias_correction1, int closure, int num_threads)
{
    const sf_scalars_t s = sf_scalars_inner(
        sf_scalars_make(lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2, adaptive), inner_momentum,
        bias_correction1);
    SF_FOR_CHUNKS(n, count, num_threads,
                  sf_adam_inner_chunk(y[t] + lo, g[t] + lo, z[t] + lo, v[t] + lo, e[t] + lo, m, s, closure));
    return 0;
}

static int sf_sgd(float *const *y, const float *const *g, float *const *z, const int64_t *n, int64_t count,
                  double lr, double momentum, double weight_decay, double ckp1, int closure, int num_threads)
{
    const sf_scalars_t s = sf_scalars_make(lr, momentum, 0.0, 0.0, weight_decay, ckp1, 1.0, 0);
    SF_FOR_CHUNKS(n, count, num_threads, sf_sgd_chunk(y[t] + lo, g[t] + lo, z[t] + lo, m, s, closure));
    return 0;
}

/* v <- beta2 v + (1 - beta2) g g;  u <- g / (sqrt(v / bias_correction2) + eps) (or g if !adaptive)
 * + weight_decay y;  y <- lerp(y, z, ckp1) + lr (beta1 (1 - ckp1) - 1) u;  z <- z - lr u. */
int sf_adam_step_f32(float *const *y, const float *const *g, float *const *z, float *const *v, const int64_t *n,
                     int64_t count, double lr, double beta1, double beta2, double eps, double weight_decay,
                     double ckp1, double bias_correction2, int adaptive, int num_threads)
{
    return sf_adam(y, g, z, v, n, count, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2, adaptive, 0,
                   num_threads);
}

/* Same u; the slot holds y on entry and x on exit (see SF_CLOSURE_UPDATE). */
int sf_adam_closure_step_f32(float *const *x, const float *const *g, float *const *z, float *const *v,
                             const int64_t *n, int64_t count, double lr, double beta1, double beta2, double eps,
                             double weight_decay, double ckp1, double bias_correction2, int adaptive,
                             int num_threads)
{
    return sf_adam(x, g, z, v, n, count, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2, adaptive, 1,
                   num_threads);
}

/* sf_adam_step_f32 with inner momentum: m <- inner_momentum m + (1 - inner_momentum) g, and u uses
 * m / bias_correction1 in place of g. */
int sf_adam_inner_step_f32(float *const *y, const float *const *g, float *const *z, float *const *v,
                           float *const *e, const int64_t *n, int64_t count, double lr, double beta1, double beta2,
                           double eps, double weight_decay, double ckp1, double bias_correction2, int adaptive,
                           double inner_momentum, double bias_correction1, int num_threads)
{
    return sf_adam_inner(y, g, z, v, e, n, count, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2,
                         adaptive, inner_momentum, bias_correction1, 0, num_threads);
}

int sf_adam_inner_closure_step_f32(float *const *x, const float *const *g, float *const *z, float *const *v,
                                   float *const *e, const int64_t *n, int64_t count, double lr, double beta1,
                                   double beta2, double eps, double weight_decay, double ckp1,
                                   double bias_correction2, int adaptive, double inner_momentum,
                                   double bias_correction1, int num_threads)
{
    return sf_adam_inner(x, g, z, v, e, n, count, lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2,
                         adaptive, inner_momentum, bias_correction1, 1, num_threads);
}

/* u <- g + weight_decay y; then the y and z updates of sf_adam_step_f32 with beta1 = momentum. */
int sf_sgd_step_f32(float *const *y, const float *const *g, float *const *z, const int64_t *n, int64_t count,
                    double lr, double momentum, double weight_decay, double ckp1, int num_threads)
{
    return sf_sgd(y, g, z, n, count, lr, momentum, weight_decay, ckp1, 0, num_threads);
}

int sf_sgd_closure_step_f32(float *const *x, const float *const *g, float *const *z, const int64_t *n,
                            int64_t count, double lr, double momentum, double weight_decay, double ckp1,
                            int num_threads)
{
    return sf_sgd(x, g, z, n, count, lr, momentum, weight_decay, ckp1, 1, num_threads);
}

/* a <- lerp(a, b, weight). */
int sf_lerp_f32(float *const *a, const float *const *b, const int64_t *n, int64_t count, double weight,
                int num_threads)
{
    const sf_lerp_t l = sf_lerp_make(weight);
    SF_FOR_CHUNKS(n, count, num_threads, {
        float *restrict ap = a[t] + lo;
        const float *restrict bp = b[t] + lo;
        for (int64_t i = 0; i < m; ++i)
            ap[i] = sf_lerp(ap[i], bp[i], l);
    });
    return 0;
}

/*
 * ScheduleFreeWrapper, around an opaque base step on z. The parameter slot p holds y between steps
 * and the z slot holds z; during the base step p must hold z, so the slots trade contents, and x
 * is kept in the z slot. Each pass reads and writes each slot once; no temporaries.
 */

/* enter: (if decay) z <- z - decay y;  y <- y y_scale;  then x <- lerp(y, z, to_x);  p <- z;  zslot <- x. */
static void sf_enter_chunk(float *restrict p, float *restrict z, int64_t m, int decay, float neg_decay,
                           float y_scale, sf_lerp_t to_x)
{
    for (int64_t i = 0; i < m; ++i) {
        float yi = p[i];
        float zi = z[i];
        if (decay) {
            zi = SF_FMA(yi, neg_decay, zi);
            yi = yi * y_scale;
        }
        p[i] = zi;
        z[i] = sf_lerp(yi, zi, to_x);
    }
}

/* exit: p holds the new z, the z slot x:  x <- lerp(x, z, ckp1);  y <- lerp(x, z, to_y);  p <- y;  zslot <- z. */
static void sf_exit_chunk(float *restrict p, float *restrict z, int64_t m, sf_lerp_t to_z, sf_lerp_t to_y)
{
    for (int64_t i = 0; i < m; ++i) {
        const float zi = p[i];
        const float xi = sf_lerp(z[i], zi, to_z);
        p[i] = sf_lerp(xi, zi, to_y);
        z[i] = zi;
    }
}

int sf_wrapper_enter_f32(float *const *p, float *const *z, const int64_t *n, int64_t count, double decay,
                         double y_scale, double to_x, int num_threads)
{
    const sf_lerp_t l = sf_lerp_make(to_x);
    const int has_decay = decay != 0.0;
    const float neg_decay = -(float)decay;
    const float scale = (float)y_scale;
    SF_FOR_CHUNKS(n, count, num_threads, sf_enter_chunk(p[t] + lo, z[t] + lo, m, has_decay, neg_decay, scale, l));
    return 0;
}

int sf_wrapper_exit_f32(float *const *p, float *const *z, const int64_t *n, int64_t count, double ckp1,
                        double to_y, int num_threads)
{
    const sf_lerp_t to_z = sf_lerp_make(ckp1);
    const sf_lerp_t l = sf_lerp_make(to_y);
    SF_FOR_CHUNKS(n, count, num_threads, sf_exit_chunk(p[t] + lo, z[t] + lo, m, to_z, l));
    return 0;
}


/*
 * Low-precision parameters with float32 master weights.
 *
 * The parameter p (bfloat16 or float16) holds its master m (float32) rounded to nearest, ties to
 * even, as torch's .to(dtype) rounds. The gradient has p's dtype and is widened exactly. Before a
 * tensor is updated, p is compared with its rounded master, by value as torch.equal compares: if
 * any element differs (someone wrote p since the optimizer did), the whole master takes p's value,
 * as the eager path's check does. Then the step runs on m, z and the moments in float32, exactly
 * as the float32 kernels above do, and writes m and the rounded p in the same pass. Nothing is
 * allocated but the work plan.
 *
 * Tensors are taken in batches of consecutive tensors of about SF_LP_BATCH elements (a tensor
 * larger than that is a batch alone): each batch is compared, then updated, so the second read of
 * p and m mostly hits the cache.
 */
#define SF_LP_BATCH 131072
enum { SF_BF16 = 1, SF_F16 = 2 };

static inline float sf_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t sf_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float sf_bf16_load(uint16_t h) { return sf_bits_f32((uint32_t)h << 16); }

/* c10::BFloat16's round_to_nearest_even: NaN becomes the quiet NaN 0x7FC0. */
static inline uint16_t sf_bf16_store(float f)
{
    const uint32_t u = sf_f32_bits(f);
    if (f != f)
        return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* IEEE half to float, exactly (the FP16 library's fp16_ieee_to_fp32_value, which torch uses). */
static inline float sf_f16_load(uint16_t h)
{
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = sf_bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = sf_bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    return sf_bits_f32(sign | (two_w < (1u << 27) ? sf_f32_bits(denormalized) : sf_f32_bits(normalized)));
}

/* Float to IEEE half, round to nearest even (fp16_ieee_from_fp32_value); NaN becomes 0x7E00 with its sign. */
static inline uint16_t sf_f16_store(float f)
{
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = sf_f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = sf_bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = sf_f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

#define SF_LOAD(kind, h) ((kind) == SF_BF16 ? sf_bf16_load(h) : sf_f16_load(h))
#define SF_STORE(kind, f) ((kind) == SF_BF16 ? sf_bf16_store(f) : sf_f16_store(f))

/* Whether some element of p differs (by value) from its master rounded to p's dtype. */
static inline __attribute__((always_inline)) int sf_lp_written(int kind, const uint16_t *restrict p,
                                                               const float *restrict m, int64_t len)
{
    int differ = 0;
    for (int64_t i = 0; i < len; ++i)
        differ |= SF_LOAD(kind, p[i]) != SF_LOAD(kind, SF_STORE(kind, m[i]));
    return differ;
}

static void sf_lp_written_chunk(int kind, const uint16_t *p, const float *m, int64_t len, int *flag)
{
    int differ = kind == SF_BF16 ? sf_lp_written(SF_BF16, p, m, len) : sf_lp_written(SF_F16, p, m, len);
    if (differ)
        __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
}

/* m <- p (widened), for a tensor that was written. */
static void sf_lp_adopt(int kind, const uint16_t *restrict p, float *restrict m, int64_t len)
{
    if (kind == SF_BF16)
        for (int64_t i = 0; i < len; ++i)
            m[i] = sf_bf16_load(p[i]);
    else
        for (int64_t i = 0; i < len; ++i)
            m[i] = sf_f16_load(p[i]);
}

/* The step's operation on one chunk: which op, its scalars, and the moment arrays when it has them
 * (v: Adam's second moment; e: the EMA of g of Adam with inner momentum). */
enum { SF_OP_ADAM = 0, SF_OP_SGD = 1, SF_OP_LERP = 2, SF_OP_ADAM_INNER = 3 };

static inline __attribute__((always_inline)) void sf_lp_update(int kind, int op, int closure, uint16_t *restrict p,
                                                               const uint16_t *restrict g, float *restrict m,
                                                               float *restrict z,
                                                               float *restrict v, float *restrict e,
                                                               int64_t len, const sf_scalars_t sc, sf_lerp_t l)
{
    const sf_scalars_t *s = &sc; /* a local copy: no store through m, z or v can change it */
    for (int64_t i = 0; i < len; ++i) {
        float mi;
        if (op == SF_OP_LERP) {
            mi = sf_lerp(m[i], z[i], l);
        } else {
            const float gi = SF_LOAD(kind, g[i]);
            const float yi = m[i];
            const float u = op == SF_OP_ADAM         ? sf_adam_direction(gi, yi, &v[i], s)
                            : op == SF_OP_ADAM_INNER ? sf_adam_inner_direction(gi, yi, &v[i], &e[i], s)
                                                     : sf_sgd_direction(gi, yi, s);
            const float zi = z[i];
            if (closure) {
                const float z_new = SF_FMA(u, s->neg_lr, zi);
                mi = sf_lerp(sf_lerp(yi, zi, s->to_x), z_new, s->to_z);
                z[i] = z_new;
            } else {
                mi = SF_FMA(u, s->y_coef, sf_lerp(yi, zi, s->to_z));
                z[i] = SF_FMA(u, s->neg_lr, zi);
            }
        }
        m[i] = mi;
        p[i] = SF_STORE(kind, mi);
    }
}

/* Dispatch to a body specialised for the kind, op and form, so every inner loop is branch-free. */
static void sf_lp_chunk(int kind, int op, int closure, uint16_t *p, const uint16_t *g, float *m, float *z, float *v,
                        float *e, int64_t len, const sf_scalars_t *s, sf_lerp_t l)
{
#define SF_LP_CASE(K, O, C)                                                                       \
    if (kind == (K) && op == (O) && closure == (C)) {                                             \
        sf_lp_update((K), (O), (C), p, g, m, z, v, e, len, *s, l);                                \
        return;                                                                                   \
    }
    SF_LP_CASE(SF_BF16, SF_OP_ADAM, 0) SF_LP_CASE(SF_BF16, SF_OP_ADAM, 1)
    SF_LP_CASE(SF_BF16, SF_OP_ADAM_INNER, 0) SF_LP_CASE(SF_BF16, SF_OP_ADAM_INNER, 1)
    SF_LP_CASE(SF_BF16, SF_OP_SGD, 0) SF_LP_CASE(SF_BF16, SF_OP_SGD, 1) SF_LP_CASE(SF_BF16, SF_OP_LERP, 0)
    SF_LP_CASE(SF_F16, SF_OP_ADAM, 0) SF_LP_CASE(SF_F16, SF_OP_ADAM, 1)
    SF_LP_CASE(SF_F16, SF_OP_ADAM_INNER, 0) SF_LP_CASE(SF_F16, SF_OP_ADAM_INNER, 1)
    SF_LP_CASE(SF_F16, SF_OP_SGD, 0) SF_LP_CASE(SF_F16, SF_OP_SGD, 1) SF_LP_CASE(SF_F16, SF_OP_LERP, 0)
#undef SF_LP_CASE
}

/* Compare, adopt written tensors, and update, batch by batch (see above). Returns 0, -1 on allocation
 * failure (nothing modified), -2 on an unknown kind. */
static int sf_lp_run(int kind, int op, int closure, uint16_t *const *p, const uint16_t *const *g, float *const *m,
                     float *const *z, float *const *v, float *const *e, const int64_t *n, int64_t count,
                     const sf_scalars_t *s, sf_lerp_t l, int num_threads)
{
    if (kind != SF_BF16 && kind != SF_F16)
        return -2;
    sf_plan_t plan;
    if (sf_plan_make(&plan, n, count))
        return -1;
    int *written = (int *)calloc((size_t)(count > 0 ? count : 1), sizeof(int));
    if (!written) {
        free(plan.first);
        return -1;
    }
    const int threads = num_threads > 0 ? num_threads : 1;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (plan.total >= SF_PARALLEL_MIN)
#endif
    {
        int64_t begin = 0;
        while (begin < count) {
            int64_t end = begin, elements = 0;
            while (end < count && (elements == 0 || elements + n[end] <= SF_LP_BATCH))
                elements += n[end++];
            const int64_t c0 = plan.first[begin], c1 = plan.first[end];
#ifdef _OPENMP
#pragma omp for schedule(dynamic)
#endif
            for (int64_t c = c0; c < c1; ++c) {
                const int64_t t = sf_plan_tensor(&plan, c);
                const int64_t lo = (c - plan.first[t]) * SF_CHUNK;
                const int64_t len = (n[t] - lo) < SF_CHUNK ? (n[t] - lo) : SF_CHUNK;
                if (!__atomic_load_n(&written[t], __ATOMIC_RELAXED))
                    sf_lp_written_chunk(kind, p[t] + lo, m[t] + lo, len, &written[t]);
            }
#ifdef _OPENMP
#pragma omp for schedule(dynamic)
#endif
            for (int64_t c = c0; c < c1; ++c) {
                const int64_t t = sf_plan_tensor(&plan, c);
                const int64_t lo = (c - plan.first[t]) * SF_CHUNK;
                const int64_t len = (n[t] - lo) < SF_CHUNK ? (n[t] - lo) : SF_CHUNK;
                if (written[t])
                    sf_lp_adopt(kind, p[t] + lo, m[t] + lo, len);
                sf_lp_chunk(kind, op, closure, p[t] + lo, g ? g[t] + lo : NULL, m[t] + lo, z[t] + lo,
                            v ? v[t] + lo : NULL, e ? e[t] + lo : NULL, len, s, l);
            }
            begin = end;
        }
    }
    free(written);
    free(plan.first);
    return 0;
}

/* sf_adam_step_f32 on the master m of a bfloat16 (kind 1) or float16 (kind 2) parameter p; p <- round(m). */
int sf_adam_step_lp(uint16_t *const *p, const uint16_t *const *g, float *const *m, float *const *z, float *const *v,
                    const int64_t *n, int64_t count, double lr, double beta1, double beta2, double eps,
                    double weight_decay, double ckp1, double bias_correction2, int adaptive, int kind,
                    int num_threads)
{
    const sf_scalars_t s = sf_scalars_make(lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2, adaptive);
    return sf_lp_run(kind, SF_OP_ADAM, 0, p, g, m, z, v, NULL, n, count, &s, s.to_z, num_threads);
}

int sf_adam_closure_step_lp(uint16_t *const *p, const uint16_t *const *g, float *const *m, float *const *z,
                            float *const *v, const int64_t *n, int64_t count, double lr, double beta1, double beta2,
                            double eps, double weight_decay, double ckp1, double bias_correction2, int adaptive,
                            int kind, int num_threads)
{
    const sf_scalars_t s = sf_scalars_make(lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2, adaptive);
    return sf_lp_run(kind, SF_OP_ADAM, 1, p, g, m, z, v, NULL, n, count, &s, s.to_z, num_threads);
}

/* sf_adam_inner_step_f32 on the master m of a bfloat16 (kind 1) or float16 (kind 2) parameter p; p <- round(m). */
int sf_adam_inner_step_lp(uint16_t *const *p, const uint16_t *const *g, float *const *m, float *const *z,
                          float *const *v, float *const *e, const int64_t *n, int64_t count, double lr, double beta1,
                          double beta2, double eps, double weight_decay, double ckp1, double bias_correction2,
                          int adaptive, double inner_momentum, double bias_correction1, int kind, int num_threads)
{
    const sf_scalars_t s = sf_scalars_inner(
        sf_scalars_make(lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2, adaptive), inner_momentum,
        bias_correction1);
    return sf_lp_run(kind, SF_OP_ADAM_INNER, 0, p, g, m, z, v, e, n, count, &s, s.to_z, num_threads);
}

int sf_adam_inner_closure_step_lp(uint16_t *const *p, const uint16_t *const *g, float *const *m, float *const *z,
                                  float *const *v, float *const *e, const int64_t *n, int64_t count, double lr,
                                  double beta1, double beta2, double eps, double weight_decay, double ckp1,
                                  double bias_correction2, int adaptive, double inner_momentum,
                                  double bias_correction1, int kind, int num_threads)
{
    const sf_scalars_t s = sf_scalars_inner(
        sf_scalars_make(lr, beta1, beta2, eps, weight_decay, ckp1, bias_correction2, adaptive), inner_momentum,
        bias_correction1);
    return sf_lp_run(kind, SF_OP_ADAM_INNER, 1, p, g, m, z, v, e, n, count, &s, s.to_z, num_threads);
}

int sf_sgd_step_lp(uint16_t *const *p, const uint16_t *const *g, float *const *m, float *const *z, const int64_t *n,
                   int64_t count, double lr, double momentum, double weight_decay, double ckp1, int kind,
                   int num_threads)
{
    const sf_scalars_t s = sf_scalars_make(lr, momentum, 0.0, 0.0, weight_decay, ckp1, 1.0, 0);
    return sf_lp_run(kind, SF_OP_SGD, 0, p, g, m, z, NULL, NULL, n, count, &s, s.to_z, num_threads);
}

int sf_sgd_closure_step_lp(uint16_t *const *p, const uint16_t *const *g, float *const *m, float *const *z,
                           const int64_t *n, int64_t count, double lr, double momentum, double weight_decay,
                           double ckp1, int kind, int num_threads)
{
    const sf_scalars_t s = sf_scalars_make(lr, momentum, 0.0, 0.0, weight_decay, ckp1, 1.0, 0);
    return sf_lp_run(kind, SF_OP_SGD, 1, p, g, m, z, NULL, NULL, n, count, &s, s.to_z, num_threads);
}

/* m <- lerp(m, z, weight); p <- round(m) (the train/eval switches of a low-precision parameter). */
int sf_lerp_lp(uint16_t *const *p, float *const *m, const float *const *z, const int64_t *n, int64_t count,
               double weight, int kind, int num_threads)
{
    const sf_scalars_t s = sf_scalars_make(0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0);
    return sf_lp_run(kind, SF_OP_LERP, 0, p, NULL, m, (float *const *)z, NULL, NULL, n, count, &s, sf_lerp_make(weight),
                     num_threads);
}
