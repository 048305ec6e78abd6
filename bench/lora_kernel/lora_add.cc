// LoraAdd: an onnxruntime custom op (domain "ai.edge_lora") that adds LoRA branches to a projection's output in
// one node, for bench/lora_kernel.py. It is a measurement, not part of the edge-lora package.
//
//   y = base + concat_g((x · A_g) · B_g)   along the last axis
//
// Inputs: base (…, N) float, x (…, K) float, then one to three pairs A_g (K, r_g) float16, B_g (r_g, n_g)
// float16 with Σ n_g = N (a builder graph packs q, k and v into one product: three pairs, one column slice each).
// A pair of rank 0 adds nothing, so with no adapter bound the node returns base. The scaling is folded into B.
//
// Why fp16 weights: an adapter is fed as graph inputs, so onnxruntime's own low-bit matmul cannot prepack it
// (BENCHMARKS.md, Runtime); here they are converted to fp32 in registers (AVX-512 F16C) as they stream in.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxPairs = 3;
constexpr int64_t kMaxRank = 256;

struct Pair {
  const uint16_t* a;  // (K, r) fp16 bits
  const uint16_t* b;  // (r, n) fp16 bits
  int64_t r, n, offset;  // offset: the pair's first column in the output
};

struct Work {
  const float* x;  // (M, K)
  float* y;        // (M, N)
  int64_t k, n;
  std::vector<Pair> pairs;
};

// IEEE half → float, for CPUs without a conversion instruction (denormals included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    exponent = 113;
    while (!(mantissa & 0x400u)) { mantissa <<= 1; --exponent; }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Any rank, any CPU: t = x · A, then y[offset : offset + n] += t · B.
void pair_row_portable(const float* x, int64_t K, const Pair& p, float* y) {
  float t[kMaxRank] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < p.r; ++j) t[j] += x[k] * half_to_float(p.a[k * p.r + j]);
  for (int64_t j = 0; j < p.r; ++j)
    for (int64_t i = 0; i < p.n; ++i) y[p.offset + i] += t[j] * half_to_float(p.b[j * p.n + i]);
}

#if defined(__AVX512F__)
inline __m512 load16(const uint16_t* p) {  // 16 halves → 16 floats
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Rank 16 (one A row is one vector), n a multiple of 16.
void pair_row_r16(const float* x, int64_t K, const Pair& p, float* y) {
  // The weights were evicted by the base model's since the last token: ask for all of them up front.
  const char* a_bytes = reinterpret_cast<const char*>(p.a);
  const char* b_bytes = reinterpret_cast<const char*>(p.b);
  for (int64_t at = 0; at < K * 16 * 2; at += 64) _mm_prefetch(a_bytes + at, _MM_HINT_T1);
  for (int64_t at = 0; at < 16 * p.n * 2; at += 64) _mm_prefetch(b_bytes + at, _MM_HINT_T1);
  // four accumulators: an FMA chain of one would wait on its own latency every row
  __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    t0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), load16(p.a + k * 16), t0);
    t1 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 1]), load16(p.a + (k + 1) * 16), t1);
    t2 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 2]), load16(p.a + (k + 2) * 16), t2);
    t3 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 3]), load16(p.a + (k + 3) * 16), t3);
  }
  for (; k < K; ++k) t0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), load16(p.a + k * 16), t0);
  alignas(64) float t[16];
  _mm512_store_ps(t, _mm512_add_ps(_mm512_add_ps(t0, t1), _mm512_add_ps(t2, t3)));
  __m512 tj[16];
  for (int j = 0; j < 16; ++j) tj[j] = _mm512_set1_ps(t[j]);
  float* out = y + p.offset;
  for (int64_t i = 0; i < p.n; i += 16) {
    __m512 c0 = _mm512_setzero_ps(), c1 = c0;
    for (int j = 0; j < 16; j += 2) {
      c0 = _mm512_fmadd_ps(tj[j], load16(p.b + j * p.n + i), c0);
      c1 = _mm512_fmadd_ps(tj[j + 1], load16(p.b + (j + 1) * p.n + i), c1);
    }
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(out + i), _mm512_add_ps(c0, c1)));
  }
}
#endif

void pair_row(const float* x, int64_t K, const Pair& p, float* y) {
#if defined(__AVX512F__)
  if (p.r == 16 && p.n % 16 == 0) return pair_row_r16(x, K, p, y);
#endif
  pair_row_portable(x, K, p, y);
}

void run_row(void* data, size_t row) {
  const auto* w = static_cast<const Work*>(data);
  for (const Pair& p : w->pairs) pair_row(w->x + row * w->k, w->k, p, w->y + row * w->n);
}

struct LoraAddKernel {
  LoraAddKernel(const OrtApi&, const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext context(raw);
    const auto base = context.GetInput(0);
    const auto x = context.GetInput(1);
    const std::vector<int64_t> shape = base.GetTensorTypeAndShapeInfo().GetShape();
    const int64_t n = shape.back(), k = x.GetTensorTypeAndShapeInfo().GetShape().back();
    const int64_t m = static_cast<int64_t>(base.GetTensorTypeAndShapeInfo().GetElementCount()) / n;
    auto y = context.GetOutput(0, shape);
    Work work{x.GetTensorData<float>(), y.GetTensorMutableData<float>(), k, n, {}};
    std::memcpy(work.y, base.GetTensorData<float>(), sizeof(float) * m * n);
    int64_t offset = 0;
    for (size_t i = 2; i + 1 < context.GetInputCount(); i += 2) {
      const auto a = context.GetInput(i), b = context.GetInput(i + 1);
      if (!a || !b) break;
      const std::vector<int64_t> a_shape = a.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> b_shape = b.GetTensorTypeAndShapeInfo().GetShape();
      if (a_shape.size() != 2 || b_shape.size() != 2 || a_shape[0] != k || b_shape[0] != a_shape[1] || a_shape[1] > kMaxRank)
        throw Ort::Exception("LoraAdd: A must be (K, r) and B (r, n) with r <= 256", ORT_INVALID_ARGUMENT);
      const Pair pair{reinterpret_cast<const uint16_t*>(a.GetTensorRawData()),
                      reinterpret_cast<const uint16_t*>(b.GetTensorRawData()), a_shape[1], b_shape[1], offset};
      offset += pair.n;
      if (pair.r > 0) work.pairs.push_back(pair);
    }
    if (offset != n) throw Ort::Exception("LoraAdd: the pairs' widths do not add up to base's last axis", ORT_INVALID_ARGUMENT);
    if (work.pairs.empty()) return;
    if (m == 1) return run_row(&work, 0);
    Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(raw, run_row, static_cast<size_t>(m), 0, &work));
  }
};

struct LoraAddOp : Ort::CustomOpBase<LoraAddOp, LoraAddKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new LoraAddKernel(api, info); }
  const char* GetName() const { return "LoraAdd"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2 + 2 * kMaxPairs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i < 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

// onnxruntime calls this when a session registers the library (SessionOptions.register_custom_ops_library).
extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static LoraAddOp op;
  static Ort::CustomOpDomain* domain = nullptr;  // must outlive every session that uses it: never freed
  try {
    if (domain == nullptr) {
      domain = new Ort::CustomOpDomain("ai.edge_lora");
      domain->Add(&op);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
