/* Everything a CPU float32 decode step does between its matrix products, one call each.
 *
 * backends/torch/native.py compiles this file once per machine (plain `cc -O3`, no torch
 * headers) and calls it through ctypes; the matrix products stay in torch (MKL, threaded).
 * Each function replaces 5-15 small torch ops, whose dispatch costs more than their arithmetic
 * at batch 1. Shapes follow backends/torch/model.py: rows of a batch are contiguous, the KV
 * cache of one layer is [slots, kv_heads, positions, head_dim], RoPE tables are [positions,
 * head_dim] with the signed sine cat(-sin, sin). ``run_ops`` runs a whole list of these calls
 * (and the int8/int4 products of qkernels.c, through its function pointer) in one call, so a
 * quantized model's decode step is one call from Python.
 *
 * On x86-64 with GCC the hot functions are built three times (AVX-512, AVX2, baseline) and the
 * loader picks the one the CPU runs (``target_clones``); the build keeps -ffp-contract=off, so
 * every clone rounds the same way.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 1024

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define VEC __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VEC
#endif

/* Eight independent partial sums: vectorisable without reassociating a single sum. */
static float dot(const float *a, const float *b, int n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

/* out = x * rsqrt(mean(x^2) + eps) * w over one row of n (out may alias x). */
static void norm_row(float *out, const float *x, const float *w, int n, float eps) {
    float s = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * s * w[i];
}

/* x += delta (when delta is not NULL), then out = rms_norm(x) * w, row by row. */
VEC void add_rms_norm(float *x, const float *delta, float *out, const float *w, int rows, int n,
                  float eps) {
    for (int r = 0; r < rows; r++) {
        float *xr = x + (int64_t)r * n;
        if (delta)
            for (int i = 0; i < n; i++) xr[i] += delta[(int64_t)r * n + i];
        norm_row(out + (int64_t)r * n, xr, w, n, eps);
    }
}

/* e^x for float32 without a libm call, so loops over it vectorise: Cephes' expf (range
 * reduction by ln 2 in two parts, a degree-5 polynomial, the exponent built in the bits), within
 * 2 ulp of expf on [-87, 88]; below it returns ~0, above ~3.4e38 (not inf); NaN stays NaN. */
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* out = silu(gate) * up, with h = [gate | up] per row (the fused gate/up projection). */
VEC void silu_mul(float *out, const float *h, int rows, int ffn) {
    for (int r = 0; r < rows; r++) {
        const float *g = h + (int64_t)r * 2 * ffn, *u = g + ffn;
        float *o = out + (int64_t)r * ffn;
        for (int i = 0; i < ffn; i++) o[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
    }
}

/* dst = (optional per-head RMSNorm of src) rotated by RoPE: x cos + swap_halves(x) sin_signed. */
static void rope_head(float *dst, const float *src, const float *norm_w, float eps,
                      const float *cos, const float *sin, int d) {
    float tmp[MAX_HEAD_DIM];
    if (norm_w) {
        norm_row(tmp, src, norm_w, d, eps);
        src = tmp;
    }
    int half = d / 2;  /* two loops (one per half) so each vectorises */
    for (int i = 0; i < half; i++) dst[i] = src[i] * cos[i] + src[i + half] * sin[i];
    for (int i = half; i < d; i++) dst[i] = src[i] * cos[i] + src[i - half] * sin[i];
}

/* One query per row, each row at its own cache slot and position: RoPE (after MiniMind-3's q/k
 * RMSNorm when qk_w is not NULL) on q and k at positions[b], k and v written to the cache at
 * (slots[b], positions[b]), then softmax(q k^T / sqrt(d)) v over keys 0..positions[b] of that
 * slot. qkv is [rows, (heads + 2 kv_heads) * d]; out is [rows, heads * d]; the cache of one layer
 * is [n_slots, kv_heads, stride, d]; qk_w is [heads + kv_heads, d] (q_norm's weight per q head,
 * then k_norm's); scores needs stride floats. Returns -1 (nothing done) when d is larger than
 * MAX_HEAD_DIM or odd, or a slot or position is outside the cache or the RoPE table. */
VEC int attend(const float *qkv, float *out, float *kc, float *vc, const float *cos_t,
           const float *sin_t, const float *qk_w, float eps, const int64_t *slots,
           const int64_t *positions, int rows, int heads, int kv_heads, int d, int stride,
           int n_slots, int rope_len, float *scores) {
    if (d > MAX_HEAD_DIM || d % 2) return -1;
    for (int b = 0; b < rows; b++)
        if (slots[b] < 0 || slots[b] >= n_slots || positions[b] < 0 || positions[b] >= stride ||
            positions[b] >= rope_len)
            return -1;
    int group = heads / kv_heads, width = (heads + 2 * kv_heads) * d;
    float scale = 1.0f / sqrtf((float)d), q[MAX_HEAD_DIM];
    for (int b = 0; b < rows; b++) {
        const float *row = qkv + (int64_t)b * width;
        int pos = (int)positions[b];
        int64_t slot = slots[b];
        const float *c = cos_t + (int64_t)pos * d, *s = sin_t + (int64_t)pos * d;
        for (int g = 0; g < kv_heads; g++) {
            int64_t at = ((slot * kv_heads + g) * stride + pos) * d;
            rope_head(kc + at, row + (heads + g) * d, qk_w ? qk_w + (heads + g) * d : NULL, eps,
                      c, s, d);
            memcpy(vc + at, row + (heads + kv_heads + g) * d, sizeof(float) * d);
        }
        for (int h = 0; h < heads; h++) {
            int g = h / group;
            const float *k = kc + (slot * kv_heads + g) * stride * d;
            const float *v = vc + (slot * kv_heads + g) * stride * d;
            rope_head(q, row + h * d, qk_w ? qk_w + h * d : NULL, eps, c, s, d);
            float top = -INFINITY, total = 0.0f;
            for (int j = 0; j <= pos; j++) {
                scores[j] = dot(q, k + (int64_t)j * d, d) * scale;
                if (scores[j] > top) top = scores[j];
            }
            for (int j = 0; j <= pos; j++) total += scores[j] = expf(scores[j] - top);
            float inv = 1.0f / total, *o = out + ((int64_t)b * heads + h) * d;
            memset(o, 0, sizeof(float) * d);
            for (int j = 0; j <= pos; j++) {
                float pj = scores[j] * inv;
                const float *vj = v + (int64_t)j * d;
                for (int i = 0; i < d; i++) o[i] += pj * vj[i];
            }
        }
    }
    return 0;
}

/* ---- a list of calls run in one ------------------------------------------------------- */
typedef int (*mmq_fn)(const float *, int, int, const uint8_t *, const float *, int, int, int,
                      float *, int, int);

enum { OP_NORM = 0, OP_SILU = 1, OP_ATTEND = 2, OP_MMQ = 3 };

/* One call: its kind, a function (OP_MMQ: qkernels.c's mmq_matmul), pointer and integer
 * arguments in the order of the function's parameters, and its float (eps). */
typedef struct {
    int64_t kind;
    void *fn;
    void *p[10];
    int64_t n[10];
    float f;
} op_t;

/* Run ops[0..count) in order. Returns 0, or i + 1 for the op i that failed, with the code it
 * returned in *status (attend: -1; mmq_matmul: its -1/-2/-3; -100 an unknown kind). */
int run_ops(const op_t *ops, int count, int *status) {
    for (int i = 0; i < count; i++) {
        const op_t *o = ops + i;
        const int64_t *n = o->n;
        void *const *p = o->p;
        int rc = 0;
        switch (o->kind) {
        case OP_NORM:
            add_rms_norm(p[0], p[1], p[2], p[3], (int)n[0], (int)n[1], o->f);
            break;
        case OP_SILU:
            silu_mul(p[0], p[1], (int)n[0], (int)n[1]);
            break;
        case OP_ATTEND:
            rc = attend(p[0], p[1], p[2], p[3], p[4], p[5], p[6], o->f, p[7], p[8], (int)n[0],
                        (int)n[1], (int)n[2], (int)n[3], (int)n[4], (int)n[5], (int)n[6], p[9]);
            break;
        case OP_MMQ:
            rc = ((mmq_fn)o->fn)(p[0], (int)n[0], (int)n[1], p[1], p[2], (int)n[2], (int)n[3],
                                 (int)n[4], p[3], (int)n[5], (int)n[6]);
            break;
        default:
            rc = -100;
        }
        if (rc) {
            *status = rc;
            return i + 1;
        }
    }
    return 0;
}
