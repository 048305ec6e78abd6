// LoraAdd's arithmetic (add_rows) against a double-precision sum over the same int8 values, without onnxruntime:
// built for another CPU (tests/runtime/test_lora_op.py builds it for aarch64 and runs it under qemu) it checks that CPU's
// code path — NEON's — where the op's own tests cannot run. Ranks as tests/runtime/test_lora_op.py's; one row (decode's
// path) and 5 and 37 (prefill's, off 4's and 16's multiples). Exit status: the number of failed cases.
#include "lora_add.cc"
#include <cmath>
#include <cstdio>
#include <random>
int main() {
  std::mt19937 g(1);
  int fails = 0;
  const int64_t rank_sets[3][3] = {{16, 0, 8}, {32, 24, 64}, {1, 17, 48}};
  for (const auto& ranks : rank_sets)
    for (int64_t m : {1, 5, 37}) {
      const int64_t k = 96, ns[3] = {64, 32, 48}, n = 144;
      std::vector<std::vector<int8_t>> A(3), B(3);
      std::vector<std::vector<float>> S(3);
      Work w{};
      w.m = m; w.k = k; w.n = n;
      int64_t off = 0;
      for (int p = 0; p < 3; ++p) {
        A[p].resize(k * ranks[p]); B[p].resize(ranks[p] * ns[p]); S[p].resize(ranks[p]);
        for (auto& v : A[p]) v = int(g() % 255) - 127;
        for (auto& v : B[p]) v = int(g() % 255) - 127;
        for (auto& v : S[p]) v = (g() % 1000) * 1e-5f;
        Pair q{A[p].data(), B[p].data(), S[p].data(), ranks[p], ns[p], off};
        off += ns[p]; w.pairs.at[w.pairs.count++] = q; w.rank_total += ranks[p];
      }
      std::vector<float> x(m * k), z(m * n);
      for (auto& v : x) v = (int(g() % 2001) - 1000) * 1e-3f;
      for (auto& v : z) v = (int(g() % 2001) - 1000) * 1e-3f;
      std::vector<float> y = z;
      w.x = x.data(); w.z = z.data();
      if (m == 1) add_rows(w, 0, 1); else for (int64_t r = 0; r < m; r += kRows) add_rows(w, r, std::min(m, r + kRows));
      double worst = 0, scale = 0;
      for (int64_t row = 0; row < m; ++row)
        for (int p = 0; p < 3; ++p) {
          const int64_t r = ranks[p];
          std::vector<double> t(r, 0.0);
          for (int64_t j = 0; j < r; ++j) {
            for (int64_t kk = 0; kk < k; ++kk) t[j] += double(x[row * k + kk]) * A[p][kk * r + j];
            t[j] *= S[p][j];
          }
          const int64_t p_off = w.pairs.at[p].offset;
          for (int64_t c = 0; c < ns[p]; ++c) {
            double ref = y[row * n + p_off + c];
            for (int64_t j = 0; j < r; ++j) ref += t[j] * B[p][(c / 16) * r * 16 + j * 16 + c % 16];
            worst = std::max(worst, std::fabs(ref - z[row * n + p_off + c]));
            scale = std::max(scale, std::fabs(ref));
          }
        }
      const bool ok = worst <= 1e-5 * scale;
      fails += !ok;
      std::printf("ranks %ld,%ld,%ld rows %ld: max |error| %.3g of %.3g %s\n", long(ranks[0]), long(ranks[1]),
                  long(ranks[2]), long(m), worst, scale, ok ? "ok" : "FAIL");
    }
  std::printf("lanes %d\n", kLanes);
  return fails;
}
