// What edge-lora's onnxruntime ops share (matmul_q4.cc, lora_add.cc): errors as onnxruntime statuses, shapes
// without heap allocations, and the LoRA input — one uint8 table for every node of the graph, each node's slot a
// blob of one to three (A, B) pairs in int8 (runtime/kernels/blobs.py writes them: lora_blob, lora_table).
// Each op includes it once, inside its own anonymous namespace after defining kOpName: every library holds its
// own copy.
// The includer includes onnxruntime_c_api.h, <climits>, <cstdint>, <cstring>, <new> and <string> first.
#pragma once

const OrtApi* api = nullptr;  // set by RegisterCustomOps

struct Error {  // a bad input: becomes an onnxruntime status with this message
  std::string message;
  explicit Error(std::string m) : message(std::string(kOpName) + ": " + std::move(m)) {}
};

void check(OrtStatus* status) {  // an onnxruntime call that failed: its message, as an Error
  if (status == nullptr) return;
  Error error(api->GetErrorMessage(status));
  api->ReleaseStatus(status);
  throw error;
}

struct Dims {  // a tensor's shape, without a heap allocation: every node asks for some, every token
  int64_t d[8];
  size_t rank = 0;
  int64_t elements() const {
    int64_t count = 1;
    for (size_t i = 0; i < rank; ++i) count *= d[i];
    return count;
  }
  bool is(int64_t a, int64_t b, int64_t c) const { return rank == 3 && d[0] == a && d[1] == b && d[2] == c; }
};

Dims shape_of(const OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api->GetTensorTypeAndShape(value, &info));
  Dims dims;
  OrtStatus* status = api->GetDimensionsCount(info, &dims.rank);
  if (status == nullptr && dims.rank > 8) status = api->CreateStatus(ORT_INVALID_ARGUMENT, "more than 8 axes");
  if (status == nullptr) status = api->GetDimensions(info, dims.d, dims.rank);
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(status);
  return dims;
}

template <typename T>
T* data_of(const OrtValue* value) {
  void* data = nullptr;
  check(api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  return static_cast<T*>(data);
}

constexpr int64_t kTile = 16;  // B's columns per tile (and MatMulQ4's W's)
constexpr int kMaxPairs = 3;

struct Pair {
  const int8_t* a;     // (K, r)
  const int8_t* b;     // (n/16, r, 16)
  const float* scale;  // (r): A's column scale × B's row scale
  int64_t r, n, offset;
};

struct Pairs {  // a node's LoRA pairs, in the order of its output's columns
  Pair at[kMaxPairs];
  int count = 0;
  const Pair* begin() const { return at; }
  const Pair* end() const { return at + count; }
};

// A node's LoRA blob (its slot of the LoRA input, below; one blob where three inputs a pair cost onnxruntime a
// shape query each, every token). A 64-byte header of int32 — pair count P (0–3), then r and n of each pair —
// and for each pair its scale (r float32), A (K × r int8) and B (n/16 × r × 16 int8), each section starting on
// 64 bytes. P = 0 is no adapter; a pair of rank 0 (a projection the adapter leaves alone) has no sections.
inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

void parse_lora(const uint8_t* blob, size_t bytes, int64_t k, int64_t n, Pairs& pairs) {
  int32_t header[16];
  if (bytes < sizeof header) throw Error("the LoRA input is shorter than its 64-byte header");
  std::memcpy(header, blob, sizeof header);
  if (header[0] < 0 || header[0] > kMaxPairs) throw Error("the LoRA input holds 0 to 3 pairs");
  int64_t at = sizeof header, offset = 0;
  for (int i = 0; i < header[0]; ++i) {
    const int64_t r = header[1 + 2 * i], width = header[2 + 2 * i];
    if (r < 0 || r > 256 || width < kTile || width % kTile)
      throw Error("a LoRA pair needs 0 <= r <= 256 and n a multiple of 16");
    Pair p{};
    p.r = r;
    p.n = width;
    p.offset = offset;
    p.scale = reinterpret_cast<const float*>(blob + at);
    at += align64(r * 4);
    p.a = reinterpret_cast<const int8_t*>(blob + at);
    at += align64(k * r);
    p.b = reinterpret_cast<const int8_t*>(blob + at);
    at += align64(width * r);
    offset += width;
    pairs.at[pairs.count++] = p;
  }
  if (at != static_cast<int64_t>(bytes) || (header[0] && offset != n))
    throw Error("the LoRA input's size or widths do not match its header and the node");
}

// The graph's LoRA input is one uint8 tensor for every node (one input to bind a token, not one a node): a table —
// int64 count, then count + 1 byte offsets, padded to 64 bytes — of the nodes' blobs in the order the nodes run,
// each node finding its own by its attribute lora_slot.
struct Slot {
  const uint8_t* blob = nullptr;
  int64_t bytes = 0;
};

Slot find_slot(const uint8_t* table, int64_t bytes, int64_t slot) {
  int64_t count = 0;
  if (bytes < 16) throw Error("the LoRA input is shorter than its table");
  std::memcpy(&count, table, 8);
  if (count < 1 || 8 * (count + 2) > bytes) throw Error("the LoRA input's table does not fit it");
  if (slot < 0 || slot >= count)
    throw Error("lora_slot " + std::to_string(slot) + " is not in the LoRA input's table of " + std::to_string(count));
  int64_t offsets[2] = {};
  std::memcpy(offsets, table + 8 * (slot + 1), sizeof offsets);
  if (offsets[0] < 8 * (count + 2) || offsets[1] < offsets[0] || offsets[1] > bytes)
    throw Error("the LoRA input's table points outside it");
  return {table + offsets[0], offsets[1] - offsets[0]};
}

// The node's lora_slot attribute (-1 when it has none), read when onnxruntime creates the kernel.
int64_t lora_slot_of(const OrtKernelInfo* info) {
  int64_t slot = -1;
  if (OrtStatus* status = api->KernelInfoGetAttribute_int64(info, "lora_slot", &slot)) {
    api->ReleaseStatus(status);  // no such attribute
    return -1;
  }
  return slot;
}

// ------------------------------------------------------------------------------------ the op, for onnxruntime

// What the op's Kernel (its state, made by create_kernel) runs: compute(context, kernel), its Errors and a
// failed allocation turned into onnxruntime statuses.
template <typename Kernel, void (*Compute)(OrtKernelContext*, const Kernel&)>
OrtStatus* ORT_API_CALL kernel_compute(void* kernel, OrtKernelContext* context) {
  try {
    Compute(context, *static_cast<const Kernel*>(kernel));
  } catch (const Error& e) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, e.message.c_str());
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_FAIL, (std::string(kOpName) + ": out of memory").c_str());
  }
  return nullptr;
}

template <typename Kernel>
void ORT_API_CALL kernel_destroy(void* kernel) {
  delete static_cast<Kernel*>(kernel);
}

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return kOpName; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL float_output(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ORT_API_CALL input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL last_version(const OrtCustomOp*) { return INT_MAX; }
size_t ORT_API_CALL one_output(const OrtCustomOp*) { return 1; }

// The op's description with what every edge-lora op shares: a CPU op of one float output, the Kernel made by
// `create` and run by `Compute`, from opset 1 on; the op sets its inputs.
template <typename Kernel, void (*Compute)(OrtKernelContext*, const Kernel&)>
OrtCustomOp describe_op(OrtStatus*(ORT_API_CALL* create)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*,
                                                          void**)) {
  OrtCustomOp op{};
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetOutputType = float_output;
  op.GetOutputTypeCount = one_output;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = input_memory;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = one;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = one;
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = kernel_compute<Kernel, Compute>;
  op.KernelDestroy = kernel_destroy<Kernel>;
  op.GetStartVersion = one;
  op.GetEndVersion = last_version;
  return op;
}

// The library's RegisterCustomOps: the op in domain ai.edge_lora, added to the session's options.
OrtStatus* register_op(OrtSessionOptions* options, const OrtApiBase* api_base, OrtCustomOp (*make_op)()) {
  api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an onnxruntime older than the header: it logs the mismatch; no op here
  static OrtCustomOp op = make_op();
  static OrtCustomOpDomain* domain = nullptr;  // must outlive every session that uses it: never released
  if (domain == nullptr) {
    if (OrtStatus* status = api->CreateCustomOpDomain("ai.edge_lora", &domain)) return status;
    if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op)) return status;
  }
  return api->AddCustomOpDomain(options, domain);
}
