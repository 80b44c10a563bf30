/* Weight-only int8 / int4 matrix products for CPU decode: y[B, rows] = x[B, in] W^T.
 *
 * backends/torch/quant.py packs the weights and compiles this file once per machine (plain
 * `cc -O3`, OpenMP when the compiler has it, else pthreads, else one thread; no -march: each
 * SIMD kernel carries its own target attribute and is picked at run time on the CPU's flags).
 *
 * Arithmetic (llama.cpp's q8_0 x q8_0 and q4_0 x q8_0 dot products): a weight is
 * (u - off) * s with an unsigned code u (off 128 for 8 bits, 8 for 4 bits) and one float scale
 * s per group of G inputs (G = 32, 64 or 128) of a row. Each call quantizes the activations per
 * group of G as well: xq = rint(x / d), d = max|x| / 127. Then, per row and group,
 *     y += s * d * (sum_k u_k xq_k - off * sum_k xq_k),
 * the sum in exact int32; only the last step is float. Rows of x shorter than in_pad (in
 * rounded up to G) are padded with zeros.
 *
 * Layout: rows in tiles of 16 (the last one padded), so one 512-bit register holds one int32
 * sum per row and a tile's output is a plain vector store. 8 bits: a tile is in_pad/4 chunks of
 * [16 rows][4 inputs] bytes. 4 bits: in_pad/8 chunks of [16 rows][4 bytes], byte j of a row
 * holding input 8c+j in its low nibble and 8c+4+j in its high one. Scales: [tile][group][16].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#elif defined(MMQ_PTHREADS)
#include <pthread.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMQ_X86 1
#include <immintrin.h>
#endif

#define TILE 16
#define MAX_THREADS 256
enum { PATH_PORTABLE = 0, PATH_AVX2 = 1, PATH_AVX512VNNI = 2, N_PATHS = 3 };

typedef struct job job_t;
typedef void (*tile_fn)(const job_t *, int tile, int b0, int nb);
struct job {
    const uint8_t *w;   /* packed codes */
    const float *s;     /* scales [tiles][blocks][TILE] */
    const int8_t *xq;   /* quantized activations [batch][in_pad] */
    const float *xd;    /* their scales [batch][blocks] */
    const int32_t *xc;  /* -off * (sum of xq) per group [batch][blocks] */
    float *y;           /* [batch][rows] */
    int batch, rows, in_pad, group, blocks, tiles, bits, max_nb;
    tile_fn fn;
};

static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline const uint8_t *tile_codes(const job_t *j, int t) {
    return j->w + (size_t)t * TILE * j->in_pad * j->bits / 8;
}

static inline int tile_rows(const job_t *j, int t) {
    return j->rows - t * TILE < TILE ? j->rows - t * TILE : TILE;
}

/* Quantize one row of activations per group. Rounding is rint (ties to even) by the
 * 1.5 * 2^23 trick, so every path (and numpy) gets the same codes; it needs -ffp-contract=off.
 * A group holding inf or NaN gets scale NaN, which carries into that row's outputs. */
static void quantize_row(const float *x, int in, int group, int blocks, int off, int8_t *q,
                         float *d, int32_t *c) {
    const float magic = 12582912.0f;
    for (int g = 0; g < blocks; g++) {
        int lo = g * group, n = in - lo < group ? in - lo : group, bad = 0;
        float amax = 0.0f;
        for (int i = 0; i < n; i++) {
            float a = fabsf(x[lo + i]);
            bad |= !(a <= 3.4028235e38f);
            amax = a > amax ? a : amax;
        }
        float dd = amax / 127.0f, id = dd > 0.0f && !bad ? 1.0f / dd : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < n; i++) {
            float v = (x[lo + i] * id + magic) - magic;
            int qi = (int)v;
            q[lo + i] = (int8_t)qi;
            sum += qi;
        }
        memset(q + lo + n, 0, (size_t)(group - n));
        d[g] = bad ? NAN : dd;
        c[g] = -off * sum;
    }
}

/* ---- portable C: any CPU, and the reference the SIMD paths must agree with ---- */
static void tile_portable(const job_t *j, int t, int b0, int nb) {
    const int G = j->group, blocks = j->blocks, bits = j->bits;
    const float *s = j->s + (size_t)t * blocks * TILE;
    for (int b = b0; b < b0 + nb; b++) {
        const int8_t *x = j->xq + (size_t)b * j->in_pad;
        const uint8_t *wb = tile_codes(j, t);
        float f[TILE] = {0};
        for (int g = 0; g < blocks; g++) {
            int32_t acc[TILE];
            const int8_t *xb = x + g * G;
            for (int r = 0; r < TILE; r++) acc[r] = j->xc[(size_t)b * blocks + g];
            if (bits == 8) {
                for (int k = 0; k < G; k += 4, wb += 64)
                    for (int r = 0; r < TILE; r++)
                        for (int i = 0; i < 4; i++) acc[r] += wb[r * 4 + i] * xb[k + i];
            } else {
                for (int k = 0; k < G; k += 8, wb += 64)
                    for (int r = 0; r < TILE; r++)
                        for (int i = 0; i < 4; i++) {
                            int u = wb[r * 4 + i];
                            acc[r] += (u & 15) * xb[k + i] + (u >> 4) * xb[k + 4 + i];
                        }
            }
            float dx = j->xd[(size_t)b * blocks + g];
            for (int r = 0; r < TILE; r++) f[r] += (float)acc[r] * dx * s[g * TILE + r];
        }
        memcpy(j->y + (size_t)b * j->rows + (size_t)t * TILE, f, sizeof(float) * tile_rows(j, t));
    }
}

#ifdef MMQ_X86
#define INLINE static inline __attribute__((always_inline))
/* Weights stream from memory once per token: asking for them 4 KB ahead of use keeps enough
 * reads in flight that one core gets ~1.3-1.8x the bandwidth the hardware prefetcher alone
 * gave it here (benchmarks/bench_quant_matmul.py, "one token" rows). Never faults. */
#define AHEAD(p) _mm_prefetch((const char *)(p) + 4096, _MM_HINT_T0)
#define T512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define T256 __attribute__((target("avx2,fma")))

/* AVX-512 VNNI: one vpdpbusd adds 4 products u8 x s8 for each of the 16 rows of a tile; the
 * 4 activations are broadcast. NB batch rows share each load of weights (NB <= 8: 24 of the
 * 32 registers hold sums). Two sums per row (a, c) halve the dependency chain at batch 1. */
T512 INLINE void body512(const job_t *j, int t, int b0, const int NB, const int bits) {
    const int G = j->group, blocks = j->blocks, in_pad = j->in_pad;
    const float *s = j->s + (size_t)t * blocks * TILE;
    const uint8_t *wb = tile_codes(j, t);
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512 f[8];
    for (int b = 0; b < NB; b++) f[b] = _mm512_setzero_ps();
    for (int g = 0; g < blocks; g++) {
        __m512i a[8], c[8];
        const int8_t *xb = j->xq + (size_t)b0 * in_pad + g * G;
        for (int b = 0; b < NB; b++) {
            a[b] = _mm512_set1_epi32(j->xc[(size_t)(b0 + b) * blocks + g]);
            c[b] = _mm512_setzero_si512();
        }
        if (bits == 8) {
            for (int k = 0; k < G; k += 8, wb += 128) {
                AHEAD(wb);
                AHEAD(wb + 64);
                __m512i w0 = _mm512_loadu_si512(wb), w1 = _mm512_loadu_si512(wb + 64);
                for (int b = 0; b < NB; b++) {
                    const int8_t *xk = xb + (size_t)b * in_pad + k;
                    a[b] = _mm512_dpbusd_epi32(a[b], w0, _mm512_set1_epi32(load4(xk)));
                    c[b] = _mm512_dpbusd_epi32(c[b], w1, _mm512_set1_epi32(load4(xk + 4)));
                }
            }
        } else {
            for (int k = 0; k < G; k += 8, wb += 64) {
                AHEAD(wb);
                __m512i v = _mm512_loadu_si512(wb);
                __m512i lo = _mm512_and_si512(v, m4);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                for (int b = 0; b < NB; b++) {
                    const int8_t *xk = xb + (size_t)b * in_pad + k;
                    a[b] = _mm512_dpbusd_epi32(a[b], lo, _mm512_set1_epi32(load4(xk)));
                    c[b] = _mm512_dpbusd_epi32(c[b], hi, _mm512_set1_epi32(load4(xk + 4)));
                }
            }
        }
        __m512 sw = _mm512_loadu_ps(s + g * TILE);
        for (int b = 0; b < NB; b++) {
            __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(a[b], c[b]));
            __m512 dx = _mm512_set1_ps(j->xd[(size_t)(b0 + b) * blocks + g]);
            f[b] = _mm512_fmadd_ps(_mm512_mul_ps(dot, dx), sw, f[b]);
        }
    }
    __mmask16 mask = (__mmask16)((1u << tile_rows(j, t)) - 1);
    for (int b = 0; b < NB; b++)
        _mm512_mask_storeu_ps(j->y + (size_t)(b0 + b) * j->rows + (size_t)t * TILE, mask, f[b]);
}

#define SPECIALIZE(name, body, bits)                                       \
    static void name(const job_t *j, int t, int b0, int nb) {              \
        switch (nb) {                                                      \
        case 1: body(j, t, b0, 1, bits); break;                            \
        case 2: body(j, t, b0, 2, bits); break;                            \
        case 3: body(j, t, b0, 3, bits); break;                            \
        case 4: body(j, t, b0, 4, bits); break;                            \
        case 5: body(j, t, b0, 5, bits); break;                            \
        case 6: body(j, t, b0, 6, bits); break;                            \
        case 7: body(j, t, b0, 7, bits); break;                            \
        default: body(j, t, b0, 8, bits); break;                           \
        }                                                                  \
    }

T512 SPECIALIZE(tile512_q8, body512, 8)
T512 SPECIALIZE(tile512_q4, body512, 4)

/* AVX2: vpmaddubsw (u8 x s8 pairs -> saturating int16) then vpmaddwd with ones -> int32.
 * 4 bits: codes 0..15 times |x| <= 127 cannot saturate. 8 bits: codes 1..255 could, so the
 * code is made signed again and llama.cpp's trick is used: |w| * (x with w's sign), no offset.
 * A tile is two halves of 8 rows (bytes 0-31 and 32-63 of each chunk). NB <= 4. */
T256 INLINE void body256(const job_t *j, int t, int b0, const int NB, const int bits) {
    const int G = j->group, blocks = j->blocks, in_pad = j->in_pad;
    const float *s = j->s + (size_t)t * blocks * TILE;
    const uint8_t *wb = tile_codes(j, t);
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(15);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 f[4][2];
    for (int b = 0; b < NB; b++) f[b][0] = f[b][1] = _mm256_setzero_ps();
    for (int g = 0; g < blocks; g++) {
        __m256i a[4][2];
        const int8_t *xb = j->xq + (size_t)b0 * in_pad + g * G;
        for (int b = 0; b < NB; b++)
            a[b][0] = a[b][1] = bits == 8 ? _mm256_setzero_si256()
                                          : _mm256_set1_epi32(j->xc[(size_t)(b0 + b) * blocks + g]);
        if (bits == 8) {
            for (int k = 0; k < G; k += 4, wb += 64) {
                AHEAD(wb);
                for (int h = 0; h < 2; h++) {
                    __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + 32 * h)), flip);
                    __m256i aq = _mm256_abs_epi8(q);
                    for (int b = 0; b < NB; b++) {
                        __m256i xv = _mm256_set1_epi32(load4(xb + (size_t)b * in_pad + k));
                        __m256i p = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv, q));
                        a[b][h] = _mm256_add_epi32(a[b][h], _mm256_madd_epi16(p, ones));
                    }
                }
            }
        } else {
            for (int k = 0; k < G; k += 8, wb += 64) {
                AHEAD(wb);
                for (int h = 0; h < 2; h++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * h));
                    __m256i lo = _mm256_and_si256(v, m4);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    for (int b = 0; b < NB; b++) {
                        const int8_t *xk = xb + (size_t)b * in_pad + k;
                        __m256i p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(xk))),
                            _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(xk + 4))));
                        a[b][h] = _mm256_add_epi32(a[b][h], _mm256_madd_epi16(p, ones));
                    }
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 sw = _mm256_loadu_ps(s + g * TILE + 8 * h);
            for (int b = 0; b < NB; b++) {
                __m256 dx = _mm256_set1_ps(j->xd[(size_t)(b0 + b) * blocks + g]);
                f[b][h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[b][h]), dx), sw, f[b][h]);
            }
        }
    }
    for (int b = 0; b < NB; b++) {
        float out[TILE];
        _mm256_storeu_ps(out, f[b][0]);
        _mm256_storeu_ps(out + 8, f[b][1]);
        memcpy(j->y + (size_t)(b0 + b) * j->rows + (size_t)t * TILE, out,
               sizeof(float) * tile_rows(j, t));
    }
}

#define SPECIALIZE4(name, body, bits)                                      \
    static void name(const job_t *j, int t, int b0, int nb) {              \
        switch (nb) {                                                      \
        case 1: body(j, t, b0, 1, bits); break;                            \
        case 2: body(j, t, b0, 2, bits); break;                            \
        case 3: body(j, t, b0, 3, bits); break;                            \
        default: body(j, t, b0, 4, bits); break;                           \
        }                                                                  \
    }

T256 SPECIALIZE4(tile256_q8, body256, 8)
T256 SPECIALIZE4(tile256_q4, body256, 4)
#endif /* MMQ_X86 */

/* Bit p set: path p runs on this CPU (the OS saving its registers included). */
int mmq_paths(void) {
    int mask = 1 << PATH_PORTABLE;
#ifdef MMQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) mask |= 1 << PATH_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        mask |= 1 << PATH_AVX512VNNI;
#endif
    return mask;
}

/* How this build splits work: 1 OpenMP, 2 pthreads, 0 one thread. */
int mmq_threading(void) {
#if defined(_OPENMP)
    return 1;
#elif defined(MMQ_PTHREADS)
    return 2;
#else
    return 0;
#endif
}

static void run_tiles(const job_t *j, int t0, int t1) {
    for (int t = t0; t < t1; t++)
        for (int b0 = 0; b0 < j->batch; b0 += j->max_nb)
            j->fn(j, t, b0, j->batch - b0 < j->max_nb ? j->batch - b0 : j->max_nb);
}

#if defined(_OPENMP) || defined(MMQ_PTHREADS)
/* Tiles are handed out in small chunks as threads come for them (not split in fixed halves):
 * on a busy machine a thread that loses its core holds up only the chunk it has. */
static int chunk_of(const job_t *j, int threads) {
    int c = j->tiles / (threads * 8);
    return c < 1 ? 1 : c;
}
#endif

#if defined(MMQ_PTHREADS) && !defined(_OPENMP)
typedef struct { const job_t *j; int *next, chunk; } share_t;

static void *run_share(void *arg) {
    const share_t *sh = arg;
    for (;;) {
        int t0 = __atomic_fetch_add(sh->next, sh->chunk, __ATOMIC_RELAXED);
        if (t0 >= sh->j->tiles) return NULL;
        run_tiles(sh->j, t0, t0 + sh->chunk < sh->j->tiles ? t0 + sh->chunk : sh->j->tiles);
    }
}

/* Threads started per call: the fallback for compilers without OpenMP. */
static void run_threads(const job_t *j, int n) {
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS], next = 0;
    share_t sh = {j, &next, chunk_of(j, n)};
    for (int i = 1; i < n; i++) started[i] = pthread_create(&th[i], NULL, run_share, &sh) == 0;
    run_share(&sh);  /* if no thread could start, this one does every tile */
    for (int i = 1; i < n; i++)
        if (started[i]) pthread_join(th[i], NULL);
}
#endif

/* y[batch, rows] = x[batch, in] W^T for W packed by quant.py (bits 8 or 4, group 32/64/128),
 * on `threads` threads, with kernel `path` (PATH_*). Returns 0; -1 for bad arguments, -2 when
 * the path does not run on this CPU, -3 when out of memory. */
int mmq_matmul(const float *x, int batch, int in, const uint8_t *w, const float *s, int bits,
               int group, int rows, float *y, int threads, int path) {
    if (!x || !w || !s || !y || batch < 1 || in < 1 || rows < 1 || threads < 1 ||
        (bits != 8 && bits != 4) || (group != 32 && group != 64 && group != 128) || path < 0 ||
        path >= N_PATHS)
        return -1;
    if (!(mmq_paths() >> path & 1)) return -2;
    job_t j = {.w = w, .s = s, .y = y, .batch = batch, .rows = rows, .group = group, .bits = bits};
    j.blocks = (in + group - 1) / group;
    j.in_pad = j.blocks * group;
    j.tiles = (rows + TILE - 1) / TILE;
    j.fn = tile_portable;
    j.max_nb = 1;
#ifdef MMQ_X86
    if (path == PATH_AVX512VNNI) j.fn = bits == 8 ? tile512_q8 : tile512_q4, j.max_nb = 8;
    if (path == PATH_AVX2) j.fn = bits == 8 ? tile256_q8 : tile256_q4, j.max_nb = 4;
#endif
    size_t nq = (size_t)batch * j.in_pad, ns = (size_t)batch * j.blocks;
    char *buf = malloc(nq + ns * (sizeof(float) + sizeof(int32_t)) + 16);
    if (!buf) return -3;
    float *xd = (float *)(buf + ((nq + 15) & ~(size_t)15));
    int32_t *xc = (int32_t *)(xd + ns);
    j.xq = (const int8_t *)buf, j.xd = xd, j.xc = xc;
    int off = bits == 8 ? 128 : 8;
    if (threads > j.tiles) threads = j.tiles;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    /* one pass over x, before the threads: cheap next to the products, and no barrier */
    for (int b = 0; b < batch; b++)
        quantize_row(x + (size_t)b * in, in, group, j.blocks, off,
                     (int8_t *)buf + (size_t)b * j.in_pad, xd + (size_t)b * j.blocks,
                     xc + (size_t)b * j.blocks);
#ifdef _OPENMP
    if (threads > 1) {
        int chunk = chunk_of(&j, threads);
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk)
        for (int t = 0; t < j.tiles; t++) run_tiles(&j, t, t + 1);
        free(buf);
        return 0;
    }
#elif defined(MMQ_PTHREADS)
    if (threads > 1) {
        run_threads(&j, threads);
        free(buf);
        return 0;
    }
#endif
    run_tiles(&j, 0, j.tiles);
    free(buf);
    return 0;
}
