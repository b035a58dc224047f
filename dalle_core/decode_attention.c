/* One sampling step's attention on the CPU, fused with its key/value cache write (built and loaded by
 * dalle_core/cpu_attention.py).
 *
 * A step has one query per (row, head) and reads every cached key and value once. At DALL-E's shape
 * that is tens of MB a step, so the step is bound by memory, and a bf16 cache halves it. PyTorch's CPU
 * kernels are slow for a single query over a bf16 cache (bench dalle_sample_parts), and a step of small
 * ops (split, transposes, cache writes, casts) costs more than its arithmetic; these loops do it in one
 * call per layer, converting bf16 to fp32 in registers and computing in fp32, a (row, head) per OpenMP
 * iteration.
 *
 * qkv: (rows, 3 * heads * hs), the fused projection of this step's token: q, then k, then v, heads
 * side by side. k_cache, v_cache: one layer's cache, (rows, heads, max_len, hs). This step's keys and
 * values are written at position n - 1, then the query attends over positions 0 .. n-1 with scale
 * 1/sqrt(hs). out: (rows, heads * hs), heads side by side. All in one dtype, fp32 or bf16 (uint16).
 * Returns 0, or 1 where the arguments are out of range or the scores' buffer cannot be allocated.
 * Built with -ffast-math: inputs are finite.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float bf16_to_float(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline uint16_t float_to_bf16(float x) { /* round to nearest even, as PyTorch does */
    union { uint32_t u; float f; } c;
    c.f = x;
    return (uint16_t)((c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16);
}

static inline float f32_to_float(float x) { return x; }
static inline float float_to_f32(float x) { return x; }

/* hs is a compile-time constant at each call below, so the inner loops vectorise fully. */
#define DEFINE_STEP(NAME, T, LOAD, STORE)                                                              \
    static inline __attribute__((always_inline)) void NAME##_one(                                      \
        const T *q, const T *k, const T *v, T *out, float *s, long n, const int hs, float scale) {     \
        float qs[hs];                                                                                  \
        for (int d = 0; d < hs; d++) qs[d] = LOAD(q[d]) * scale;                                       \
        for (long j = 0; j < n; j++) {                                                                 \
            const T *kj = k + j * hs;                                                                  \
            float acc = 0.f;                                                                           \
            for (int d = 0; d < hs; d++) acc += qs[d] * LOAD(kj[d]);                                   \
            s[j] = acc;                                                                                \
        }                                                                                              \
        float m = s[0];                                                                                \
        for (long j = 1; j < n; j++) m = s[j] > m ? s[j] : m;                                          \
        float sum = 0.f;                                                                               \
        for (long j = 0; j < n; j++) {                                                                 \
            s[j] = expf(s[j] - m);                                                                     \
            sum += s[j];                                                                               \
        }                                                                                              \
        float o[hs];                                                                                   \
        for (int d = 0; d < hs; d++) o[d] = 0.f;                                                       \
        for (long j = 0; j < n; j++) {                                                                 \
            const T *vj = v + j * hs;                                                                  \
            const float p = s[j];                                                                      \
            for (int d = 0; d < hs; d++) o[d] += p * LOAD(vj[d]);                                      \
        }                                                                                              \
        for (int d = 0; d < hs; d++) out[d] = STORE(o[d] / sum);                                       \
    }                                                                                                  \
                                                                                                       \
    int NAME(const T *qkv, T *k_cache, T *v_cache, T *out, int rows, int heads, int hs, long n,        \
             long max_len) {                                                                           \
        if (rows < 1 || heads < 1 || hs < 1 || n < 1 || n > max_len) return 1;                         \
        const long dim = (long)heads * hs;                                                             \
        const float scale = 1.0f / sqrtf((float)hs);                                                   \
        int failed = 0;                                                                                \
        _Pragma("omp parallel reduction(|: failed)") {                                                 \
            float *s = malloc(sizeof(float) * n);                                                      \
            if (s == NULL) failed = 1;                                                                 \
            _Pragma("omp for schedule(static)") for (int i = 0; i < rows * heads; i++) {               \
                if (s == NULL) continue;                                                               \
                const long b = i / heads, h = i % heads;                                               \
                const T *q = qkv + b * 3 * dim + h * hs;                                               \
                T *k = k_cache + i * max_len * hs, *v = v_cache + i * max_len * hs;                    \
                for (int d = 0; d < hs; d++) {                                                         \
                    k[(n - 1) * hs + d] = q[dim + d];                                                  \
                    v[(n - 1) * hs + d] = q[2 * dim + d];                                              \
                }                                                                                      \
                T *o = out + b * dim + h * hs;                                                         \
                switch (hs) {                                                                          \
                case 32: NAME##_one(q, k, v, o, s, n, 32, scale); break;                               \
                case 64: NAME##_one(q, k, v, o, s, n, 64, scale); break;                               \
                case 16: NAME##_one(q, k, v, o, s, n, 16, scale); break;                               \
                case 128: NAME##_one(q, k, v, o, s, n, 128, scale); break;                             \
                default: NAME##_one(q, k, v, o, s, n, hs, scale);                                      \
                }                                                                                      \
            }                                                                                          \
            free(s);                                                                                   \
        }                                                                                              \
        return failed;                                                                                 \
    }

DEFINE_STEP(dalle_decode_step_bf16, uint16_t, bf16_to_float, float_to_bf16)
DEFINE_STEP(dalle_decode_step_f32, float, f32_to_float, float_to_f32)
