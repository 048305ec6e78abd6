// LoraAdd: an adapter's LoRA branches added to a projection's output in one node, an onnxruntime custom op (domain
// "ai.edge_lora") in portable C++: GCC's and Clang's vector extension, lowered for the host it is built on (NEON on
// an Arm board, AVX2 or AVX-512 on x86-64), with only int8 → float written per instruction set (and in plain C++
// for any other). export/kernel_graphs/lora_add.py writes the graph that uses it: the portable graph with each
// projection's MatMul → MatMul (→ Concat) → Add LoRA branches, 3–4 onnxruntime nodes a projection and ~20 a
// layer, replaced by one LoraAdd after the projection's MatMulNBits (BENCHMARKS.md, Runtime).
//
//   z = y + concat_g((x · A_g) · B_g)
//
// Inputs: y (…, N) float, the projection's output; x (…, K) float, its input; lora uint8, the graph's one LoRA
// input (op_common.h: find_slot, parse_lora), of which the node's attribute lora_slot picks its blob: one to three
// pairs — q, k and v share one packed product — of A_g (K, r_g) int8 with a scale per column and B_g (r_g, n_g)
// int8 with a scale per row, B's columns in tiles of 16, Σ n_g = N. The same blobs as MatMulQ4's (matmul_q4.cc).
// Output z, y's shape, which onnxruntime may place in y's buffer.
//
// Written against onnxruntime's C API alone (onnxruntime_c_api.h, version 21 — onnxruntime 1.21 and later).
#include "onnxruntime_c_api.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

namespace {

constexpr const char* kOpName = "LoraAdd";
#include "op_common.h"

// Vectors of the host's width in GCC's and Clang's vector extension (AVX-512: 16 floats, AVX: 8, NEON and the
// rest: 4), F16 = 16 floats in as many of them as that takes: a tile's 16 columns. Only int8 → float is written
// per instruction set: GCC 12 converts a vector of int8 lane by lane, and splits wider vectors through memory.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
constexpr int kParts = 16 / kLanes;
typedef float fv __attribute__((vector_size(4 * kLanes)));
constexpr int64_t kPrefetch = 4096;  // bytes ahead in A's and B's streams, which decode reads from memory

struct F16 {
  fv part[kParts];
};

inline F16 load_i8(const int8_t* p) {  // 16 int8 → 16 floats
  F16 out;
#if defined(__AVX512F__)
  out.part[0] = (fv)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  out.part[0] = (fv)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  out.part[1] = (fv)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
#elif defined(__ARM_NEON)
  const int8x16_t v = vld1q_s8(p);
  const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_high_s8(v);
  out.part[0] = (fv)vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  out.part[1] = (fv)vcvtq_f32_s32(vmovl_high_s16(lo));
  out.part[2] = (fv)vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  out.part[3] = (fv)vcvtq_f32_s32(vmovl_high_s16(hi));
#else
  for (int i = 0; i < 16; ++i) out.part[i / kLanes][i % kLanes] = static_cast<float>(p[i]);
#endif
  return out;
}

inline void fma(F16& acc, float x, const F16& a) {  // acc += x · a
  for (int i = 0; i < kParts; ++i) acc.part[i] += x * a.part[i];
}

inline void add(F16& acc, const F16& a) {
  for (int i = 0; i < kParts; ++i) acc.part[i] += a.part[i];
}

inline F16 load_i8_half(const int8_t* p) {  // 8 int8 → the first 8 of 16 floats, the rest 0 (a rank of 8's A)
  F16 out = {};
#if defined(__AVX512F__)
  out.part[0] = (fv)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  out.part[0] = (fv)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#elif defined(__ARM_NEON)
  const int16x8_t v = vmovl_s8(vld1_s8(p));
  out.part[0] = (fv)vcvtq_f32_s32(vmovl_s16(vget_low_s16(v)));
  out.part[1] = (fv)vcvtq_f32_s32(vmovl_high_s16(v));
#else
  for (int i = 0; i < 8; ++i) out.part[i / kLanes][i % kLanes] = static_cast<float>(p[i]);
#endif
  return out;
}

// t[row][c … c+W) = Σ_k x[row][k] · A[k][c … c+W) for Rows rows of x (A's rows `r` bytes apart; W 16, or 8 for a
// rank of 8 — the rest of a group's 16 lanes then sum zeros). One row: four partial sums over k, so that no add
// waits for the one before it; four rows: each its own sum, A's bytes converted once for them.
template <int Rows, int W>
void down_cols(const float* x, int64_t ldx, const int8_t* a, int64_t r, int64_t k, F16* t) {
  static_assert(W == 16 || W == 8, "16 or 8 columns of A");
  constexpr int S = Rows == 1 ? 4 : 1;  // partial sums a row
  auto load = [a, r](int64_t kk) { return W == 16 ? load_i8(a + kk * r) : load_i8_half(a + kk * r); };
  F16 acc[Rows * S] = {};
  int64_t kk = 0;
  for (; kk + S <= k; kk += S)
    for (int s = 0; s < S; ++s) {
      __builtin_prefetch(a + (kk + s) * r + kPrefetch);
      const F16 av = load(kk + s);
      for (int row = 0; row < Rows; ++row) fma(acc[row * S + s], x[row * ldx + kk + s], av);
    }
  for (; kk < k; ++kk) {  // what is left of k after the groups of S
    const F16 av = load(kk);
    for (int row = 0; row < Rows; ++row) fma(acc[row * S], x[row * ldx + kk], av);
  }
  for (int row = 0; row < Rows; ++row) {
    t[row] = acc[row * S];
    for (int s = 1; s < S; ++s) add(t[row], acc[row * S + s]);
  }
}

// t = (x · A) ⊙ scale for Rows rows and one pair, 16 columns of A at a time, then 8; columns left after those (a
// rank off 8's multiples) are copied beside zeros into 16-byte rows first.
template <int Rows>
void down(const Pair& p, const float* x, int64_t ldx, int64_t k, float* t, int64_t ldt) {
  thread_local std::vector<int8_t> padded;
  for (int64_t c = 0; c < p.r;) {
    const int64_t width = std::min<int64_t>(16, p.r - c);
    F16 sums[Rows];
    if (width == 16) {
      down_cols<Rows, 16>(x, ldx, p.a + c, p.r, k, sums);
    } else if (width >= 8) {
      down_cols<Rows, 8>(x, ldx, p.a + c, p.r, k, sums);
    } else {
      padded.assign(k * 16, 0);
      for (int64_t kk = 0; kk < k; ++kk) std::memcpy(&padded[kk * 16], p.a + kk * p.r + c, width);
      down_cols<Rows, 16>(x, ldx, padded.data(), 16, k, sums);
    }
    const int64_t done = width == 16 ? 16 : width >= 8 ? 8 : width;
    for (int row = 0; row < Rows; ++row)
      for (int64_t i = 0; i < done; ++i) t[row * ldt + c + i] = sums[row].part[i / kLanes][i % kLanes] * p.scale[c + i];
    c += done;
  }
}

// z[row][tile] += t[row] · B[:, tile] for every tile of one pair and `rows` rows; a tile of B is converted to
// floats once for all the rows.
void up(const Pair& p, const float* t, int64_t ldt, int64_t rows, float* z, int64_t ldz) {
  thread_local std::vector<F16> tile_b;
  tile_b.resize(p.r);
  F16* bf = tile_b.data();
  for (int64_t tile = 0; tile < p.n / kTile; ++tile) {
    const int8_t* b = p.b + tile * p.r * kTile;
    for (int64_t j = 0; j < p.r; j += 4) __builtin_prefetch(b + j * kTile + kPrefetch);
    for (int64_t j = 0; j < p.r; ++j) bf[j] = load_i8(b + j * kTile);
    for (int64_t row = 0; row < rows; ++row) {
      const float* tr = t + row * ldt;
      float* out = z + row * ldz + p.offset + tile * kTile;
      F16 acc0, acc1 = {};  // two partial sums over the ranks, the first from z
      std::memcpy(&acc0, out, sizeof acc0);
      int64_t j = 0;
      for (; j + 2 <= p.r; j += 2) {
        fma(acc0, tr[j], bf[j]);
        fma(acc1, tr[j + 1], bf[j + 1]);
      }
      if (j < p.r) fma(acc0, tr[j], bf[j]);
      add(acc0, acc1);
      std::memcpy(out, &acc0, sizeof acc0);
    }
  }
}

struct Work {
  int64_t m, k, n, rank_total;
  const float* x;
  float* z;
  Pairs pairs;
};

constexpr int64_t kRows = 16;  // prefill: rows of a task

// Rows [row0, row1) of z: every pair's branch added.
void add_rows(const Work& w, int64_t row0, int64_t row1) {
  thread_local std::vector<float> t;
  const int64_t rows = row1 - row0;
  t.resize(rows * w.rank_total);
  const float* x = w.x + row0 * w.k;
  float* tp = t.data();
  for (const Pair& p : w.pairs) {
    if (p.r == 0) continue;
    int64_t row = 0;
    for (; row + 4 <= rows; row += 4) down<4>(p, x + row * w.k, w.k, w.k, tp + row * w.rank_total, w.rank_total);
    for (; row < rows; ++row) down<1>(p, x + row * w.k, w.k, w.k, tp + row * w.rank_total, w.rank_total);
    up(p, tp, w.rank_total, rows, w.z + row0 * w.n, w.n);
    tp += p.r;
  }
}

void run_rows(void* data, size_t task) {
  const auto* w = static_cast<const Work*>(data);
  const int64_t row0 = static_cast<int64_t>(task) * kRows;
  add_rows(*w, row0, std::min(w->m, row0 + kRows));
}

struct Kernel {
  int64_t slot = -1;  // the node's place in the LoRA input's table
};

void compute(OrtKernelContext* context, const Kernel& kernel) {
  const OrtValue *y = nullptr, *x = nullptr, *lora = nullptr;
  check(api->KernelContext_GetInput(context, 0, &y));
  check(api->KernelContext_GetInput(context, 1, &x));
  check(api->KernelContext_GetInput(context, 2, &lora));
  const Dims y_shape = shape_of(y), x_shape = shape_of(x);
  if (y_shape.rank == 0 || x_shape.rank == 0) throw Error("y and x must have at least one axis");
  Work w{};
  w.n = y_shape.d[y_shape.rank - 1];
  w.k = x_shape.d[x_shape.rank - 1];
  w.m = w.n ? y_shape.elements() / w.n : 0;
  if ((w.k ? x_shape.elements() / w.k : 0) != w.m)
    throw Error("y and x must have the same rows (all axes but the last): " + std::to_string(w.m) + " and " +
                std::to_string(w.k ? x_shape.elements() / w.k : 0));
  if (kernel.slot < 0) throw Error("a LoraAdd node needs its lora_slot attribute");
  const Slot own = find_slot(data_of<const uint8_t>(lora), shape_of(lora).elements(), kernel.slot);
  parse_lora(own.blob, static_cast<size_t>(own.bytes), w.k, w.n, w.pairs);
  OrtValue* z = nullptr;
  check(api->KernelContext_GetOutput(context, 0, y_shape.d, y_shape.rank, &z));
  const float* y_data = data_of<const float>(y);
  w.z = data_of<float>(z);
  w.x = data_of<const float>(x);
  if (w.z != y_data && w.m > 0 && w.n > 0) std::memcpy(w.z, y_data, sizeof(float) * w.m * w.n);  // not given y's buffer
  for (const Pair& p : w.pairs) w.rank_total += p.r;
  if (w.m == 0 || w.rank_total == 0) return;
  if (w.m == 1) {  // decode: less work than a ParallelFor round trip costs (BENCHMARKS.md, Runtime)
    add_rows(w, 0, 1);
    return;
  }
  check(api->KernelContext_ParallelFor(context, run_rows, static_cast<size_t>((w.m + kRows - 1) / kRows), 0, &w));
}

// --------------------------------------------------------------------------------------- the op, for onnxruntime

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  auto* state = new (std::nothrow) Kernel;
  if (state == nullptr) return api->CreateStatus(ORT_FAIL, "LoraAdd: out of memory");
  state->slot = lora_slot_of(info);
  *kernel = state;
  return nullptr;
}

size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 3; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  return i < 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
}

// z has y's shape (onnxruntime then knows the two are the same size, which it needs to give z y's buffer)
OrtStatus* ORT_API_CALL infer_shape(const OrtCustomOp*, OrtShapeInferContext* context) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // the context's own: not released here
  if (OrtStatus* status = api->ShapeInferContext_GetInputTypeShape(context, 0, &info)) return status;
  return api->ShapeInferContext_SetOutputTypeShape(context, 0, info);
}

// z may take y's buffer: y is the projection's output, which nothing else reads
size_t ORT_API_CALL may_inplace(int** input_index, int** output_index) {
  *input_index = new (std::nothrow) int[1]{0};
  *output_index = new (std::nothrow) int[1]{0};
  if (*input_index == nullptr || *output_index == nullptr) {
    delete[] *input_index;
    delete[] *output_index;
    *input_index = *output_index = nullptr;
    return 0;
  }
  return 1;
}
void ORT_API_CALL release_inplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

OrtCustomOp make_op() {
  OrtCustomOp op = describe_op<Kernel, compute>(create_kernel);
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetInputCharacteristic = required;
  op.InferOutputShapeFn = infer_shape;
  op.GetMayInplace = may_inplace;
  op.ReleaseMayInplace = release_inplace;
  return op;
}

}  // namespace

// onnxruntime calls this when a session registers the library (SessionOptions.register_custom_ops_library).
extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return register_op(options, api_base, make_op);
}
