// MatMulQ4: edge-lora's int4 matmul for x86-64 CPUs with AVX-512 VNNI, an onnxruntime custom op (domain
// "ai.edge_lora"), with an adapter's LoRA branches computed inside the same node. edge_lora.runtime.kernels
// builds it on the device; export/kernel_graphs/q4.py writes the graph that uses it (BENCHMARKS.md, Runtime).
//
//   y = x · Wᵀ  [+ concat_g((x · A_g) · B_g)]   W: int4, zero point 8, one float16 scale per block of a column
//
// Inputs: x (…, K) float; w (N/16, K/B, 8·B) uint8 and s (N/16, K/B, 16) float16: MatMulNBits' 4-bit weights
// (blocks of B = 32 or 64, no zero points) repacked into tiles of 16 columns (below), the scales rounded to
// float16 as llama.cpp's Q4_0 keeps them (2 bytes a block of a column, not fp32's 4: fewer bytes read a token;
// BENCHMARKS.md, Runtime); optionally the node's LoRA weights, its slot of the graph's one LoRA input
// (op_common.h): one to three pairs — q, k and v share one packed product — of A_g (K, r_g) int8 with a scale per
// column and B_g (r_g, n_g) int8 with a scale per row, B's columns in tiles of 16 as W's, so that a tile's share
// of B is one contiguous run; Σ n_g = N.
// Output y (…, N) float.
//
// Tile layout: for tile t (columns 16t … 16t+15) and block b (k = Bb … Bb+B-1), 8·B bytes = G = B/8 vectors of
// 64; byte 4c + j of vector g holds column c's weight at k = Bb + 4g + j in its low nibble and at
// k = Bb + 4(g+G) + j in its high nibble. One load, a shift and two ANDs give two vectors of 16 columns × 4
// consecutive k, which VPDPBUSD multiplies by 4 broadcast activation bytes: no horizontal sums, no shuffles.
// Activations are quantized per block to int8 with round-to-nearest-even, as MatMulNBits' accuracy_level 4
// does, so the two agree to float rounding (tests/runtime/test_kernels.py).
//
// Written against onnxruntime's C API alone (onnxruntime_c_api.h, version 21 — onnxruntime 1.21 and later).
#include "onnxruntime_c_api.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "MatMulQ4 needs AVX-512 F, BW and VNNI"
#endif

namespace {

constexpr const char* kOpName = "MatMulQ4";
#include "op_common.h"

constexpr int64_t kPrefetch = 4096;  // bytes ahead in the weight stream (BENCHMARKS.md, Runtime)

struct Work {
  int64_t m, k, n, block, blocks, tiles, tiles_per_task;
  int64_t tile_bytes;   // one block of one tile: 16 columns × block weights, 4 bits each (8 · block)
  const float* x;
  const uint8_t* w;
  const uint16_t* s;    // float16
  float* y;
  const int8_t* xq;     // (M, K) int8
  const float* xs;      // (M, blocks) activation scales
  const int32_t* x8;    // (M, blocks) 8 · Σ of each block's int8 activations (the zero point's share)
  float* t;             // (M, Σ r_g) x · A_g, pair after pair (decode: written by the first thread to arrive)
  float* u;             // decode: (N) t · B for every column, written by the same thread after t
  Pairs pairs;
  int64_t rank_total;
  int64_t tile_tasks;   // decode: claims of tiles_per_task tiles
  // decode, lines of their own: the threads write them
  alignas(64) std::atomic<int64_t> next_tile{0};
  alignas(64) std::atomic<int> u_claimed{0};  // with an adapter: t = x · A and u = t · B, computed once, by the
  std::atomic<int> u_ready{0};                // first to arrive
};

inline __m512 load16h(const uint16_t* p) {  // 16 float16 → 16 floats
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 load16b(const int8_t* p) {  // 16 int8 → 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

void quantize_rows(const float* x, int64_t m, int64_t k, int64_t block, int8_t* q, float* scales, int32_t* sums8) {
  const int64_t blocks = k / block;
  for (int64_t row = 0; row < m; ++row)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* in = x + row * k + b * block;
      __m512 mx = _mm512_setzero_ps();
      for (int i = 0; i < block; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(in + i)));
      const float amax = _mm512_reduce_max_ps(mx), scale = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
      __m512i sum = _mm512_setzero_si512();
      for (int i = 0; i < block; i += 16) {
        // round to nearest even
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(in + i), _mm512_set1_ps(inv)));
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + row * k + b * block + i), _mm512_cvtsepi32_epi8(v));
      }
      scales[row * blocks + b] = scale;
      sums8[row * blocks + b] = 8 * _mm512_reduce_add_epi32(sum);
    }
}

// out = x[k0:k1] · A[k0:k1] for each pair of one row (fp32 x, not the int8 copy: the branch keeps full precision).
void lora_down_range(const Work& w, const float* x, int64_t k0, int64_t k1, float* out) {
  for (const Pair& p : w.pairs) {
    // 16 columns of A at a time, four rows of x in flight; a rank that is not a multiple of 16 ends with a
    // masked group
    for (int64_t c = 0; c < p.r; c += 16) {
      const __mmask16 mask = p.r - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (p.r - c)) - 1);
      const int8_t* a = p.a + c;
      auto load = [&](int64_t k) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, a + k * p.r)));
      };
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = k0;
      for (; k + 4 <= k1; k += 4) {
        if (c == 0)  // the first group's pass brings A in, kPrefetch ahead as W's stream
          for (int64_t at = k * p.r; at < (k + 4) * p.r; at += 64)
            _mm_prefetch(reinterpret_cast<const char*>(p.a) + kPrefetch + at, _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), load(k), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 1]), load(k + 1), a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 2]), load(k + 2), a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 3]), load(k + 3), a3);
      }
      for (; k < k1; ++k) a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), load(k), a0);
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
      _mm512_mask_storeu_ps(out + c, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, p.scale + c), sum));
    }
    out += p.r;
  }
}

constexpr int64_t kDownRows = 16;  // prefill: rows of x per task of x · A

void run_lora_down(void* data, size_t task) {  // prefill: t = x · A for rows [16 task, 16 task + 16)
  const auto* w = static_cast<const Work*>(data);
  const int64_t end = std::min(w->m, (static_cast<int64_t>(task) + 1) * kDownRows);
  for (int64_t row = static_cast<int64_t>(task) * kDownRows; row < end; ++row)
    lora_down_range(*w, w->x + row * w->k, 0, w->k, w->t + row * w->rank_total);
}

// The pair whose columns hold column `col`, and where its ranks start in a row of t (null: no pair does).
inline const Pair* pair_of(const Work& w, int64_t col, int64_t* t_offset) {
  int64_t at = 0;
  for (const Pair& p : w.pairs) {
    if (col >= p.offset && col < p.offset + p.n) {
      *t_offset = at;
      return &p;
    }
    at += p.r;
  }
  return nullptr;
}

// acc + t · B[:, the tile starting at column col] (t: one row's x · A, every pair's).
inline __m512 lora_up(const Work& w, const float* t, int64_t col, __m512 acc) {
  int64_t t_offset = 0;
  const Pair* p = pair_of(w, col, &t_offset);
  if (p == nullptr) return acc;
  t += t_offset;
  const int8_t* b = p->b + (col - p->offset) * p->r;  // this tile's (r, 16)
  __m512 acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= p->r; j += 2) {
    acc = _mm512_fmadd_ps(_mm512_set1_ps(t[j]), load16b(b + j * kTile), acc);
    acc1 = _mm512_fmadd_ps(_mm512_set1_ps(t[j + 1]), load16b(b + (j + 1) * kTile), acc1);
  }
  if (j < p->r) acc = _mm512_fmadd_ps(_mm512_set1_ps(t[j]), load16b(b + j * kTile), acc);
  return _mm512_add_ps(acc, acc1);
}

// Decode: u = t · B for every column, two tiles of B at once. One thread does all of it right after t, in one pass
// over B, and each tile then adds its 16 columns of u: cheaper than the same multiply-adds spread over the tiles
// (lora_up on each), on a chain that the int4 product waits for (BENCHMARKS.md, Runtime).
void lora_up_all(const Work& w, const float* t_all, float* u) {
  const float* t = t_all;
  for (const Pair& p : w.pairs) {
    const int64_t tiles = p.n / kTile, row = p.r * kTile;  // a tile of B: r rows of 16
    int64_t c = 0;
    for (; c + 2 <= tiles; c += 2) {
      const int8_t* b = p.b + c * row;
      for (int64_t line = 0; line < 2 * row; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch + line, _MM_HINT_T0);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, c0 = a0, c1 = a0;
      int64_t j = 0;
      for (; j + 2 <= p.r; j += 2) {
        const __m512 t0 = _mm512_set1_ps(t[j]), t1 = _mm512_set1_ps(t[j + 1]);
        a0 = _mm512_fmadd_ps(t0, load16b(b + j * kTile), a0);
        a1 = _mm512_fmadd_ps(t1, load16b(b + (j + 1) * kTile), a1);
        c0 = _mm512_fmadd_ps(t0, load16b(b + row + j * kTile), c0);
        c1 = _mm512_fmadd_ps(t1, load16b(b + row + (j + 1) * kTile), c1);
      }
      if (j < p.r) {
        const __m512 t0 = _mm512_set1_ps(t[j]);
        a0 = _mm512_fmadd_ps(t0, load16b(b + j * kTile), a0);
        c0 = _mm512_fmadd_ps(t0, load16b(b + row + j * kTile), c0);
      }
      _mm512_storeu_ps(u + p.offset + c * kTile, _mm512_add_ps(a0, a1));
      _mm512_storeu_ps(u + p.offset + (c + 1) * kTile, _mm512_add_ps(c0, c1));
    }
    if (c < tiles)  // an odd last tile
      _mm512_storeu_ps(u + p.offset + c * kTile, lora_up(w, t_all, p.offset + c * kTile, _mm512_setzero_ps()));
    t += p.r;
  }
}

// One row (decode): tiles [t0, t1), with the LoRA branch's columns added when `lora_u` (u = t · B) is given.
template <int G>  // vectors of 64 bytes per tile and block: 8 for blocks of 64, 4 for blocks of 32
void gemv_tiles_g(const Work& w, const float* lora_u, int64_t t0, int64_t t1) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int32_t* xq = reinterpret_cast<const int32_t*>(w.xq);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wp = w.w + t * w.blocks * (64 * G);
    const uint16_t* sp = w.s + t * w.blocks * kTile;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    for (int64_t b = 0; b < w.blocks; ++b, wp += 64 * G, sp += kTile) {
      for (int i = 0; i < 64 * G; i += 64) _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetch + i, _MM_HINT_T0);
      // the same blocks' scales
      _mm_prefetch(reinterpret_cast<const char*>(sp + kPrefetch / (64 * G) * kTile), _MM_HINT_T0);
      const int32_t* xb = xq + b * (2 * G);
      __m512i d0 = _mm512_setzero_si512(), d1 = d0;
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const __m512i raw = _mm512_loadu_si512(wp + g * 64);
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(raw, low), _mm512_set1_epi32(xb[g]));
        d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low), _mm512_set1_epi32(xb[g + G]));
      }
      const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(d0, d1), _mm512_set1_epi32(w.x8[b]));
      const __m512 scale = _mm512_mul_ps(load16h(sp), _mm512_set1_ps(w.xs[b]));
      if (b & 1) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc1);
      else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc0);
    }
    __m512 acc = _mm512_add_ps(acc0, acc1);
    if (lora_u) acc = _mm512_add_ps(acc, _mm512_loadu_ps(lora_u + t * kTile));
    _mm512_storeu_ps(w.y + t * kTile, acc);
  }
}

void gemv_tiles(const Work& w, const float* lora_u, int64_t t0, int64_t t1) {
  if (w.block == 64) gemv_tiles_g<8>(w, lora_u, t0, t1);
  else gemv_tiles_g<4>(w, lora_u, t0, t1);
}

// Prefill: y[row, tile] += t[row] · B[:, tile] for every row. At rank 16 the tile's B is converted to floats once,
// into registers, for all the rows; other ranks take lora_up row by row.
void add_lora_rows(const Work& w, int64_t tile) {
  const int64_t col = tile * kTile;
  int64_t t_offset = 0;
  const Pair* p = pair_of(w, col, &t_offset);
  if (p != nullptr && p->r == 16) {
    const int8_t* b = p->b + (col - p->offset) * p->r;
    __m512 bv[16];
    for (int j = 0; j < 16; ++j) bv[j] = load16b(b + j * kTile);
    for (int64_t row = 0; row < w.m; ++row) {
      const float* t = w.t + row * w.rank_total + t_offset;
      __m512 a0 = _mm512_mul_ps(_mm512_set1_ps(t[0]), bv[0]), a1 = _mm512_mul_ps(_mm512_set1_ps(t[1]), bv[1]);
      for (int j = 2; j < 16; j += 2) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(t[j]), bv[j], a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(t[j + 1]), bv[j + 1], a1);
      }
      float* out = w.y + row * w.n + col;
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_add_ps(a0, a1)));
    }
    return;
  }
  for (int64_t row = 0; row < w.m; ++row) {
    float* out = w.y + row * w.n + col;
    _mm512_storeu_ps(out, lora_up(w, w.t + row * w.rank_total, col, _mm512_loadu_ps(out)));
  }
}

// Many rows (prefill): each block of a tile is unpacked once into 16 vectors and applied to every row;
// the rows' running sums live in y itself.
template <int G>
void gemm_tiles_g(const Work& w, int64_t t0, int64_t t1) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t row = 0; row < w.m; ++row) _mm512_storeu_ps(w.y + row * w.n + t * kTile, _mm512_setzero_ps());
    const uint8_t* wp = w.w + t * w.blocks * (64 * G);
    const uint16_t* sp = w.s + t * w.blocks * kTile;
    for (int64_t b = 0; b < w.blocks; ++b, wp += 64 * G, sp += kTile) {
      __m512i lo[G], hi[G];
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const __m512i raw = _mm512_loadu_si512(wp + g * 64);
        lo[g] = _mm512_and_si512(raw, low);
        hi[g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
      }
      const __m512 ws = load16h(sp);
      for (int64_t row = 0; row < w.m; ++row) {
        const int32_t* xb = reinterpret_cast<const int32_t*>(w.xq + row * w.k) + b * (2 * G);
        __m512i d0 = _mm512_setzero_si512(), d1 = d0;
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
          d0 = _mm512_dpbusd_epi32(d0, lo[g], _mm512_set1_epi32(xb[g]));
          d1 = _mm512_dpbusd_epi32(d1, hi[g], _mm512_set1_epi32(xb[g + G]));
        }
        const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(d0, d1), _mm512_set1_epi32(w.x8[row * w.blocks + b]));
        float* out = w.y + row * w.n + t * kTile;
        const __m512 scale = _mm512_mul_ps(ws, _mm512_set1_ps(w.xs[row * w.blocks + b]));
        _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, _mm512_loadu_ps(out)));
      }
    }
    if (w.rank_total) add_lora_rows(w, t);
  }
}

void gemm_tiles(const Work& w, int64_t t0, int64_t t1) {
  if (w.block == 64) gemm_tiles_g<8>(w, t0, t1);
  else gemm_tiles_g<4>(w, t0, t1);
}

// Decode: each invocation claims chunks of tiles from the node's counter, each tile's int4 product with its
// columns of u = (x · A) · B added. Invocations beyond the threads that exist find nothing left and return.
//
// With an adapter, the first invocation to arrive computes t = x · A (all of A), then u = t · B (all of B), and
// publishes u; the others start on their tiles at once and add u to the tiles they claimed before it was ready
// once it is: A and B are each read by one thread, not each, and no thread waits at a barrier (BENCHMARKS.md,
// Runtime).
constexpr int kMaxDeferred = 64;  // claims a thread may finish before u is ready; past that it waits for u

void add_lora_u(const Work& w, const float* u, int64_t t0, int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile)
    _mm512_storeu_ps(w.y + tile * kTile,
                     _mm512_add_ps(_mm512_loadu_ps(w.y + tile * kTile), _mm512_loadu_ps(u + tile * kTile)));
}

void run_decode(void* data, size_t) {
  auto* w = static_cast<Work*>(data);
  const float* lora_u = nullptr;
  if (w->rank_total && w->u_claimed.exchange(1, std::memory_order_acq_rel) == 0) {
    lora_down_range(*w, w->x, 0, w->k, w->t);
    lora_up_all(*w, w->t, w->u);
    w->u_ready.store(1, std::memory_order_release);
    lora_u = w->u;
  }
  int64_t deferred[kMaxDeferred];  // claims done without u
  int n_deferred = 0;
  auto wait_for_u = [w] {
    while (!w->u_ready.load(std::memory_order_acquire)) _mm_pause();  // the thread computing it is running
    return w->u;
  };
  for (int64_t task; (task = w->next_tile.fetch_add(1)) < w->tile_tasks;) {
    const int64_t t0 = task * w->tiles_per_task, t1 = std::min(w->tiles, t0 + w->tiles_per_task);
    if (w->rank_total && lora_u == nullptr &&
        (n_deferred == kMaxDeferred || w->u_ready.load(std::memory_order_acquire)))
      lora_u = wait_for_u();
    gemv_tiles(*w, lora_u, t0, t1);
    if (w->rank_total && lora_u == nullptr) deferred[n_deferred++] = task;
  }
  if (n_deferred) {
    lora_u = wait_for_u();
    for (int i = 0; i < n_deferred; ++i) {
      const int64_t t0 = deferred[i] * w->tiles_per_task;
      add_lora_u(*w, lora_u, t0, std::min(w->tiles, t0 + w->tiles_per_task));
    }
  }
}

void run_prefill(void* data, size_t task) {
  const auto* w = static_cast<const Work*>(data);
  gemm_tiles(*w, static_cast<int64_t>(task), static_cast<int64_t>(task) + 1);
}

struct Kernel {
  int64_t slot = -1;  // the node's place in the LoRA input's table (-1: a node without LoRA input)
  // w's and s's shapes when both are initializers, read once here: each shape query costs onnxruntime a heap
  // allocation, and a node would ask for both every token
  bool constant_weights = false;
  Dims w_shape, s_shape;
};

void compute(OrtKernelContext* context, const Kernel& kernel) {
  size_t inputs = 0;
  check(api->KernelContext_GetInputCount(context, &inputs));
  const OrtValue *x = nullptr, *wq = nullptr, *ws = nullptr, *lora = nullptr;
  check(api->KernelContext_GetInput(context, 0, &x));
  check(api->KernelContext_GetInput(context, 1, &wq));
  check(api->KernelContext_GetInput(context, 2, &ws));
  if (inputs > 3) check(api->KernelContext_GetInput(context, 3, &lora));
  Dims shape = shape_of(x);
  const Dims w_shape = kernel.constant_weights ? kernel.w_shape : shape_of(wq);
  const Dims s_shape = kernel.constant_weights ? kernel.s_shape : shape_of(ws);
  if (shape.rank == 0) throw Error("x must have at least one axis");
  const int64_t k = shape.d[shape.rank - 1];
  // w's last axis says the block: 512 bytes a tile-block for blocks of 64, 256 for blocks of 32
  if (w_shape.rank != 3 || (w_shape.d[2] != 512 && w_shape.d[2] != 256) || w_shape.d[1] * (w_shape.d[2] / 8) != k)
    throw Error("w must be (N/16, K/block, 8 · block), block 32 or 64, for x's K = " + std::to_string(k));
  if (!s_shape.is(w_shape.d[0], w_shape.d[1], kTile)) throw Error("s must be (N/16, K/block, 16), as w");
  Work w{};
  w.k = k;
  w.block = w_shape.d[2] / 8;
  w.tile_bytes = w_shape.d[2];
  w.blocks = k / w.block;
  w.tiles = w_shape.d[0];
  w.n = w.tiles * kTile;
  w.m = k ? shape.elements() / k : 0;
  shape.d[shape.rank - 1] = w.n;
  OrtValue* y = nullptr;
  check(api->KernelContext_GetOutput(context, 0, shape.d, shape.rank, &y));
  w.x = data_of<const float>(x);
  w.w = data_of<const uint8_t>(wq);
  w.s = data_of<const uint16_t>(ws);
  w.y = data_of<float>(y);
  if (w.m == 0) return;
  if (lora) {
    if (kernel.slot < 0) throw Error("a node with a LoRA input needs its lora_slot attribute");
    const Slot own = find_slot(data_of<const uint8_t>(lora), shape_of(lora).elements(), kernel.slot);
    parse_lora(own.blob, static_cast<size_t>(own.bytes), w.k, w.n, w.pairs);
  }

  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xs, t, u;
  thread_local std::vector<int32_t> x8;
  xq.resize(w.m * k);
  xs.resize(w.m * w.blocks);
  x8.resize(w.m * w.blocks);
  quantize_rows(w.x, w.m, k, w.block, xq.data(), xs.data(), x8.data());
  w.xq = xq.data();
  w.xs = xs.data();
  w.x8 = x8.data();
  for (const Pair& p : w.pairs) w.rank_total += p.r;
  if (w.rank_total > kMaxPairs * 256) throw Error("more than 768 LoRA ranks in one node");
  if (w.rank_total) {
    t.resize(w.m * w.rank_total);
    w.t = t.data();
    if (w.m == 1) {
      u.resize(w.n);
      w.u = u.data();
    }
  }
  if (w.m > 1) {  // prefill: x · A for every row first, then every tile is its own task
    const auto down_tasks = static_cast<size_t>((w.m + kDownRows - 1) / kDownRows);
    if (w.rank_total) check(api->KernelContext_ParallelFor(context, run_lora_down, down_tasks, 0, &w));
    check(api->KernelContext_ParallelFor(context, run_prefill, static_cast<size_t>(w.tiles), 0, &w));
    return;
  }
  // Decode: claims of ~64 KB of weights. Each claim is an atomic add on a line the threads share: much smaller
  // claims cost more than they balance (BENCHMARKS.md, Runtime).
  w.tiles_per_task = std::max<int64_t>(1, 65536 / (w.blocks * w.tile_bytes));
  w.tile_tasks = (w.tiles + w.tiles_per_task - 1) / w.tiles_per_task;
  // more invocations than an edge CPU has threads: the surplus find nothing to claim and return
  check(api->KernelContext_ParallelFor(context, run_decode, 8, 0, &w));
}

// --------------------------------------------------------------------------------------- the op, for onnxruntime


OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  auto* state = new (std::nothrow) Kernel;
  if (state == nullptr) return api->CreateStatus(ORT_FAIL, "MatMulQ4: out of memory");
  state->slot = lora_slot_of(info);
  auto constant_input = [info](size_t index) -> const OrtValue* {  // an initializer's value, else null
    int is_constant = 0;
    const OrtValue* value = nullptr;
    if (OrtStatus* status = api->KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value)) {
      api->ReleaseStatus(status);
      return nullptr;
    }
    return is_constant ? value : nullptr;
  };
  const OrtValue *w = constant_input(1), *s = constant_input(2);
  if (w && s) {
    try {
      state->w_shape = shape_of(w);
      state->s_shape = shape_of(s);
      state->constant_weights = true;
    } catch (const Error&) {  // left to compute(), which asks again and reports it
    }
  }
  *kernel = state;
  return nullptr;
}

size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 4; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
         : i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t i) {
  return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtCustomOp make_op() {
  OrtCustomOp op = describe_op<Kernel, compute>(create_kernel);
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetInputCharacteristic = input_characteristic;
  return op;
}

}  // namespace

// onnxruntime calls this when a session registers the library (SessionOptions.register_custom_ops_library).
extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return register_op(options, api_base, make_op);
}
