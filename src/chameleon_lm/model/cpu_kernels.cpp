// One decoding step's attention on CPU: each query over its row's cached keys and its own new key.
//
// Built on first use by model/decode_attention.py (torch.utils.cpp_extension) and registered as the
// operator chameleon_lm::decode_attention, so compiled graphs call it like any aten op. Each
// (row, kv-head) streams its keys once for all the query heads of its group, reads only the row's
// own length (no mask, no padding), and accumulates in fp32 over fp32 or bf16 caches.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

inline float hsum(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return x.reduce_add();
#else  // the generic Vectorized's reduce_add does not compile
  float lanes[Vec::size()];
  x.store(lanes);
  float sum = 0;
  for (int i = 0; i < Vec::size(); i++) sum += lanes[i];
  return sum;
#endif
}

template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    // bf16 -> fp32 is a 16-bit shift; Vectorized<BFloat16>::loadu(p, n) copies through the stack and
    // converts twice the lanes, which made a bf16 cache slower to read than an fp32 one
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
#else
    return std::get<0>(at::vec::convert_bfloat16_float(at::vec::Vectorized<at::BFloat16>::loadu(p, Vec::size())));
#endif
  }
}

constexpr int64_t kAhead = 16;  // keys read ahead of the one in use

// Prefetch the cache lines of [p, p + count) (count elements, contiguous).
template <typename T>
inline void prefetch(const T* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < count * static_cast<int64_t>(sizeof(T)); i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
#endif
}

// NV vectors per head (head_dim = NV * Vec::size()).
// T: the cache's element type; U: the queries' and new keys' (the model's dtype, or float).
template <typename T, typename U, int NV>
void attend(const U* q, const T* k, const T* v, const U* k_new, const U* v_new,
            const int64_t* lengths, float* out, int64_t B, int64_t K, int64_t G, int64_t S,
            const int64_t* ks, const int64_t* vs) {
  constexpr int64_t W = Vec::size(), E = NV * W;
  const float scale = 1.f / std::sqrt(static_cast<float>(E));
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S + 1);
    float* sc = scores.data();
    auto length = [&](int64_t bk) { return std::min<int64_t>(std::max<int64_t>(lengths[bk / K], 0), S); };
    auto keys = [&](int64_t bk) { return k + (bk / K) * ks[0] + (bk % K) * ks[1]; };
    for (int64_t bk = begin; bk < end; bk++) {
      const int64_t b = bk / K, h = bk % K;
      const int64_t n = length(bk);
      const T* kb = keys(bk);
      const T* vb = v + b * vs[0] + h * vs[1];
      // read-ahead runs on into the next (row, head) of this thread, never past a row's length
      const T* kb_next = bk + 1 < end ? keys(bk + 1) : nullptr;
      const int64_t n_next = bk + 1 < end ? length(bk + 1) : 0;
      const U* kn = k_new + bk * E;
      const U* vn = v_new + bk * E;
      for (int64_t g = 0; g < G; g++) {
        Vec qv[NV];
        for (int j = 0; j < NV; j++) qv[j] = load_float(q + (bk * G + g) * E + j * W) * Vec(scale);
        int64_t s = 0;
        for (; s + 4 <= n; s += 4) {  // four keys at a time: independent accumulators
          const T* k0 = kb + s * ks[2];
          if (g == 0) {  // one core's demand misses do not fill the memory bus: fetch ahead
            const int64_t ahead = s + kAhead;
            if (ahead + 4 <= n) {
              prefetch(k0 + kAhead * ks[2], 4 * ks[2]);
            } else if (ahead - n + 4 <= n_next) {
              prefetch(kb_next + std::max<int64_t>(ahead - n, 0) * ks[2], 4 * ks[2]);
            }
            prefetch(vb + s * vs[2], 4 * vs[2]);
          }
          Vec a0(0), a1(0), a2(0), a3(0);
          for (int j = 0; j < NV; j++) {
            a0 = at::vec::fmadd(qv[j], load_float(k0 + j * W), a0);
            a1 = at::vec::fmadd(qv[j], load_float(k0 + ks[2] + j * W), a1);
            a2 = at::vec::fmadd(qv[j], load_float(k0 + 2 * ks[2] + j * W), a2);
            a3 = at::vec::fmadd(qv[j], load_float(k0 + 3 * ks[2] + j * W), a3);
          }
          sc[s] = hsum(a0);
          sc[s + 1] = hsum(a1);
          sc[s + 2] = hsum(a2);
          sc[s + 3] = hsum(a3);
        }
        for (; s < n; s++) {
          Vec a(0);
          for (int j = 0; j < NV; j++) a = at::vec::fmadd(qv[j], load_float(kb + s * ks[2] + j * W), a);
          sc[s] = hsum(a);
        }
        Vec a(0);
        for (int j = 0; j < NV; j++) a = at::vec::fmadd(qv[j], load_float(kn + j * W), a);
        sc[n] = hsum(a);  // the new key, last
        const int64_t count = n + 1;
        const float top = at::vec::reduce_all<float>(
            [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, sc, count);
        at::vec::map([top](Vec x) { return (x - Vec(top)).exp(); }, sc, sc, count);
        const float sum = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sc, count);
        Vec acc[NV];
        for (int j = 0; j < NV; j++) acc[j] = load_float(vn + j * W) * Vec(sc[n]);
        for (s = 0; s < n; s++) {
          const Vec p(sc[s]);
          const T* v0 = vb + s * vs[2];
          for (int j = 0; j < NV; j++) acc[j] = at::vec::fmadd(p, load_float(v0 + j * W), acc[j]);
        }
        const Vec inv(1.f / sum);
        for (int j = 0; j < NV; j++) (acc[j] * inv).store(out + (bk * G + g) * E + j * W);
      }
    }
  });
}

template <typename T, typename U>
void dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_new,
              const at::Tensor& v_new, const at::Tensor& lengths, at::Tensor& out) {
  const int64_t B = q.size(0), K = q.size(1), G = q.size(2), E = q.size(3), S = k.size(2);
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
#define ATTEND(NV)                                                                                     \
  attend<T, U, NV>(q.data_ptr<U>(), k.data_ptr<T>(), v.data_ptr<T>(), k_new.data_ptr<U>(),             \
                   v_new.data_ptr<U>(), lengths.data_ptr<int64_t>(), out.data_ptr<float>(), B, K, G, S,  \
                   ks, vs)
  switch (E / Vec::size()) {
    case 1: ATTEND(1); break;
    case 2: ATTEND(2); break;
    case 4: ATTEND(4); break;
    case 8: ATTEND(8); break;
    case 16: ATTEND(16); break;
    default: TORCH_CHECK(false, "decode_attention: unsupported head_dim ", E);
  }
#undef ATTEND
}

// q [B, K, G, E] (query heads grouped by kv head); k, v [B, K, S, E] cache rows (last dim contiguous);
// k_new, v_new [B, K, E]; lengths [B]: row b's cached keys are k[b, :, :lengths[b]].
// Returns the attention output [B, K, G, E] in fp32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k_new.dim() == 3 && v_new.dim() == 3,
              "decode_attention: expected q [B,K,G,E], k/v [B,K,S,E], k_new/v_new [B,K,E]");
  const int64_t B = q.size(0), K = q.size(1), E = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == K && k.size(3) == E && v.sizes() == k.sizes(),
              "decode_attention: cache shape mismatch");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: cache rows must be contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: the cache must be float32 or bfloat16");
  TORCH_CHECK(E % Vec::size() == 0, "decode_attention: head_dim must be a multiple of ", Vec::size());
  TORCH_CHECK(lengths.numel() == B, "decode_attention: one length per row");
  // queries and new keys are read in the cache's dtype when they have it (a bf16 model's), else as fp32
  const bool native = q.scalar_type() == k.scalar_type() && k_new.scalar_type() == k.scalar_type() &&
                      v_new.scalar_type() == k.scalar_type();
  const auto dt = native ? k.scalar_type() : at::kFloat;
  auto q_ = q.to(dt).contiguous(), kn = k_new.to(dt).contiguous(), vn = v_new.to(dt).contiguous();
  auto len = lengths.to(at::kLong).contiguous();
  auto out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (k.scalar_type() == at::kFloat) {
    dispatch<float, float>(q_, k, v, kn, vn, len, out);
  } else if (native) {
    dispatch<at::BFloat16, at::BFloat16>(q_, k, v, kn, vn, len, out);
  } else {
    dispatch<at::BFloat16, float>(q_, k, v, kn, vn, len, out);
  }
  return out;
}

// k, v [L, B', K, S, E] cache buffers (B' >= B); k_new, v_new [L, B, K, E]; lengths [B]: writes the
// new keys and values of row b at slot lengths[b] of every layer and head (the caller counts them).
void kv_append(at::Tensor& k, at::Tensor& v, const at::Tensor& k_new, const at::Tensor& v_new,
               const at::Tensor& lengths) {
  TORCH_CHECK(k.dim() == 5 && v.sizes() == k.sizes() && k_new.dim() == 4 && v_new.sizes() == k_new.sizes(),
              "kv_append: expected k/v [L,B,K,S,E] and k_new/v_new [L,B,K,E]");
  const int64_t L = k.size(0), K = k.size(2), S = k.size(3), E = k.size(4), B = k_new.size(1);
  TORCH_CHECK(k_new.size(0) == L && B <= k.size(1) && k_new.size(2) == K && k_new.size(3) == E,
              "kv_append: shape mismatch");
  TORCH_CHECK(k.stride(4) == 1 && v.stride(4) == 1 && k.scalar_type() == v.scalar_type(),
              "kv_append: cache rows must be contiguous, k and v of one dtype");
  TORCH_CHECK(lengths.numel() == B, "kv_append: one length per row");
  auto kn = k_new.to(k.scalar_type()).contiguous(), vn = v_new.to(v.scalar_type()).contiguous();
  auto len = lengths.to(at::kLong).contiguous();
  const int64_t* at_ = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) TORCH_CHECK(at_[b] >= 0 && at_[b] < S, "kv_append: row ", b, " is full");
  const int64_t bytes = E * k.element_size();
  char* kd = static_cast<char*>(k.data_ptr());
  char* vd = static_cast<char*>(v.data_ptr());
  const char* knd = static_cast<const char*>(kn.data_ptr());
  const char* vnd = static_cast<const char*>(vn.data_ptr());
  const int64_t es = k.element_size();
  for (int64_t l = 0; l < L; l++)
    for (int64_t b = 0; b < B; b++)
      for (int64_t h = 0; h < K; h++) {
        const int64_t src = ((l * B + b) * K + h) * bytes;
        std::memcpy(kd + (l * k.stride(0) + b * k.stride(1) + h * k.stride(2) + at_[b] * k.stride(3)) * es,
                    knd + src, bytes);
        std::memcpy(vd + (l * v.stride(0) + b * v.stride(1) + h * v.stride(2) + at_[b] * v.stride(3)) * es,
                    vnd + src, bytes);
      }
}

// x [N, D] @ W.T for a weight reordered by mkldnn::_reorder_linear_weight: oneDNN's inner product
// through the dispatcher, so that a compiled graph calls it without a trip through Python.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(packed);
  stack.emplace_back(c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// --- fp32 linear layers on panels -----------------------------------------------------------------
// x [M, K] @ W.T with W [N, K] repacked once into panels of NR columns, [P, K, NR] (k-major, the last
// panel zero-padded): a k step loads NR contiguous weights. Threads take runs of panels; a row tile
// of 8 (AVX2: 6) rows keeps 3 (2) vectors of each in registers. Decoding's few rows make the weights
// the traffic: while a panel is computed (for every row tile, from L2), the next one is prefetched,
// spread over all the tiles, so the weight stream overlaps the arithmetic (oneDNN's inner product did
// one after the other, bench/RESULTS.md).
// the register type R and its operations, P the intrinsics' prefix (_mm512, _mm256)
#define CHAMELEON_PANEL_OPS(R, P)                                                 \
  using Reg = R;                                                                  \
  inline Reg reg_zero() { return P##_setzero_ps(); }                              \
  inline Reg reg_load(const float* p) { return P##_loadu_ps(p); }                 \
  inline Reg reg_set1(float x) { return P##_set1_ps(x); }                         \
  inline Reg reg_fma(Reg a, Reg b, Reg c) { return P##_fmadd_ps(a, b, c); }       \
  inline Reg reg_add(Reg a, Reg b) { return P##_add_ps(a, b); }                   \
  inline void reg_store(float* p, Reg x) { P##_storeu_ps(p, x); }
#if defined(CPU_CAPABILITY_AVX512)
CHAMELEON_PANEL_OPS(__m512, _mm512)
constexpr int kPanelVecs = 3, kTileRows = 8;
#define CHAMELEON_PANELS 1
#elif defined(CPU_CAPABILITY_AVX2)
CHAMELEON_PANEL_OPS(__m256, _mm256)
constexpr int kPanelVecs = 2, kTileRows = 6;  // 12 accumulators + 3 operands of 16 registers
#define CHAMELEON_PANELS 1
#endif
#undef CHAMELEON_PANEL_OPS

#ifdef CHAMELEON_PANELS
constexpr int64_t kLanes = sizeof(Reg) / sizeof(float);
constexpr int64_t kPanel = kPanelVecs * kLanes;  // NR, columns per panel
constexpr int64_t kBlockK = 128;  // partial sums leave the registers every 128 k: shorter rounding chains

// c[m, :ncols] = a[m, :K] . panel [K, NR] for R rows, prefetching `lines` cache lines from `pf`.
template <int R>
void panel_tile(const float* a, int64_t lda, const float* panel, int64_t K, float* c, int64_t ldc,
                int64_t ncols, const char* pf, int64_t lines) {
  alignas(64) float sums[R][kPanel];
  int64_t credit = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t k1 = std::min(K, k0 + kBlockK);
    Reg acc[R][kPanelVecs];
#pragma GCC unroll 8
    for (int m = 0; m < R; m++)
#pragma GCC unroll 4
      for (int j = 0; j < kPanelVecs; j++) acc[m][j] = reg_zero();
    for (int64_t k = k0; k < k1; k++) {
      for (credit += lines; credit >= K; credit -= K) {  // `lines` spread evenly over the K steps
        _mm_prefetch(pf, _MM_HINT_T1);
        pf += 64;
      }
      Reg b[kPanelVecs];
#pragma GCC unroll 4
      for (int j = 0; j < kPanelVecs; j++) b[j] = reg_load(panel + k * kPanel + j * kLanes);
#pragma GCC unroll 8
      for (int m = 0; m < R; m++) {
        const Reg x = reg_set1(a[m * lda + k]);
#pragma GCC unroll 4
        for (int j = 0; j < kPanelVecs; j++) acc[m][j] = reg_fma(x, b[j], acc[m][j]);
      }
    }
    for (int m = 0; m < R; m++)
      for (int j = 0; j < kPanelVecs; j++)
        reg_store(sums[m] + j * kLanes, k0 == 0 ? acc[m][j] : reg_add(reg_load(sums[m] + j * kLanes), acc[m][j]));
  }
  for (int m = 0; m < R; m++) std::memcpy(c + m * ldc, sums[m], ncols * sizeof(float));
}

using PanelTile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, const char*,
                           int64_t);
template <int... I>
constexpr std::array<PanelTile, sizeof...(I)> panel_tiles(std::integer_sequence<int, I...>) {
  return {&panel_tile<I + 1>...};
}
constexpr auto kPanelTiles = panel_tiles(std::make_integer_sequence<int, kTileRows>{});  // by rows - 1
#else
constexpr int64_t kPanel = 0;  // no panel kernel in a build without vector intrinsics
#endif

int64_t panel_width() { return kPanel; }

// W [N, K] float32 -> panels [ceil(N / NR), K, NR].
at::Tensor pack_panels(const at::Tensor& w) {
  TORCH_CHECK(kPanel > 0, "pack_panels: this build has no panel kernel");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_panels: expected a 2-D float32 weight");
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / std::max<int64_t>(kPanel, 1);
  auto out = at::zeros({P, K, kPanel}, w.options());
  const auto wc = w.contiguous();
  const float* src = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; p++)
      for (int64_t n = p * kPanel; n < std::min(N, (p + 1) * kPanel); n++)
        for (int64_t k = 0; k < K; k++) dst[(p * K + k) * kPanel + n - p * kPanel] = src[n * K + k];
  });
  return out;
}

// x [M, K] float32 @ W.T for W packed by pack_panels: [M, out_features].
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features) {
  TORCH_CHECK(kPanel > 0, "panel_linear: this build has no panel kernel");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat,
              "panel_linear: expected float32 x [M, K]");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.size(1) == x.size(1) && panels.is_contiguous(),
              "panel_linear: panels ", panels.sizes(), " are not pack_panels' of a weight with ", x.size(1),
              " inputs");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0), N = out_features;
  TORCH_CHECK(N > (P - 1) * kPanel && N <= P * kPanel, "panel_linear: ", P, " panels do not hold ", N, " outputs");
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  if (K == 0) return out.zero_();
#ifdef CHAMELEON_PANELS
  const auto xc = x.contiguous();
  const float* a = xc.data_ptr<float>();
  const float* b = panels.data_ptr<float>();
  float* c = out.data_ptr<float>();
  const int64_t tiles = (M + kTileRows - 1) / kTileRows, panel_lines = K * kPanel * 4 / 64;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; p++) {
      const float* panel = b + p * K * kPanel;
      const char* next = reinterpret_cast<const char*>(panel + K * kPanel);
      const int64_t lines = p + 1 < end ? panel_lines : 0, ncols = std::min(kPanel, N - p * kPanel);
      for (int64_t t = 0; t < tiles; t++) {
        const int64_t m = t * kTileRows, rows = std::min<int64_t>(kTileRows, M - m);
        const int64_t l0 = lines * t / tiles, l1 = lines * (t + 1) / tiles;
        kPanelTiles[rows - 1](a + m * K, K, panel, K, c + m * N + p * kPanel, N, ncols, next + l0 * 64, l1 - l0);
      }
    }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chameleon_lm, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor k_new, Tensor v_new, Tensor lengths) -> Tensor");
  m.def("kv_append(Tensor(a!) k, Tensor(b!) v, Tensor k_new, Tensor v_new, Tensor lengths) -> ()");
  m.def("packed_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("panel_width() -> int", &panel_width);  // NR of this build (0: no panel kernel)
  m.def("pack_panels(Tensor w) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor panels, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(chameleon_lm, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("kv_append", &kv_append);
  m.impl("packed_linear", &packed_linear);
  m.impl("pack_panels", &pack_panels);
  m.impl("panel_linear", &panel_linear);
}

// the weight reordered by mkldnn::_reorder_linear_weight may be an opaque MKL-DNN tensor
TORCH_LIBRARY_IMPL(chameleon_lm, MkldnnCPU, m) { m.impl("packed_linear", &packed_linear); }
