// What every kernel family shares: float32 widening and rounding of the storage types, the
// vectorisable exp, argument checks, the parallel grain, the AVX2 and AVX-512 helpers of the
// bfloat16 fast paths, and AMX's permission and tile configuration.
//
// Each kernel accumulates in float32 whatever the storage type, is parallelised with
// at::parallel_for (PyTorch's own OpenMP pool, which carries an exception thrown inside a
// worker back to the caller), and leaves the innermost loops contiguous so the compiler
// vectorises them. Argument checks (TORCH_CHECK) run before any parallel region.

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define SLUICE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace sluice {

#if defined(SLUICE_AMX)
// Linux hands a process the AMX registers' state only when asked (arch_prctl); without it the
// first tile instruction faults. Where it refuses (an older kernel, a seccomp filter), the
// kernels keep their AVX-512 paths.
inline bool amx_granted() {
  static const bool granted = [] {
    constexpr int kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr int kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

constexpr int64_t kTileRowBytes = 64;

// An AMX tile configuration (palette 1): each register's rows of kTileRowBytes unless given, 0
// for unused registers. Loading it zeroes every register.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t row_bytes[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int64_t tile_rows, int64_t bytes_per_row = kTileRowBytes) {
    rows[tile] = static_cast<uint8_t>(tile_rows);
    row_bytes[tile] = static_cast<uint16_t>(tile_rows > 0 ? bytes_per_row : 0);
  }
  // GCC's _tile_loadconfig tells the compiler that it reads 8 bytes of the configuration, which
  // lets it drop the stores to the rest (the tiles then stay unconfigured, and the first tile
  // instruction faults); this operand is the whole of it.
  void load() const { asm volatile("ldtilecfg %0" : : "m"(*this)); }
};
#endif

inline float to_float(float value) { return value; }

inline float to_float(at::BFloat16 value) {
  // The top half of a float32: widening is a shift, which vectorises (c10's operator doesn't).
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

inline float to_float(at::Half value) { return static_cast<float>(value); }
inline float to_float(c10::Float8_e4m3fn value) { return static_cast<float>(value); }
inline float to_float(c10::Float8_e5m2 value) { return static_cast<float>(value); }

template <typename T>
inline T from_float(float value) {
  return static_cast<T>(value);
}

template <>
inline at::BFloat16 from_float<at::BFloat16>(float value) {
  // Round to nearest even without c10's NaN branch, which keeps loops from vectorising. (A NaN
  // stays a NaN unless only its lowest mantissa bits are set.)
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits += 0x7fff + ((bits >> 16) & 1);
  return at::BFloat16(static_cast<uint16_t>(bits >> 16), at::BFloat16::from_bits());
}

template <typename T>
inline void widen(const T* source, float* destination, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) destination[i] = to_float(source[i]);
}

// exp for the vectorised loops: std::exp stays a scalar libm call, which made softmax and SiLU
// the slowest part of their kernels. Range reduction to 2^n * e^r with |r| <= ln2 / 2, then a
// degree-6 Taylor polynomial: relative error below 2e-7 over the clamped range.
inline float vector_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  return p * scale;
}

// tanh for the vectorised loops: m / (m + 2) with m = e^2x - 1. Subtracting 1 from vector_exp's
// result would turn its error near x = 0 into a large relative error of tanh, so m comes from the
// same range reduction as 2^n * (e^r - 1) + (2^n - 1), e^r - 1 being a polynomial without its
// constant term (near 0, n = 0 and m is that polynomial alone). Relative error below 3e-7; large
// |x| saturate to +-1 through the clamp.
inline float vector_tanh(float x) {
  const float y = std::min(std::max(2.f * x, -87.0f), 88.0f);
  const float n = std::floor(y * 1.44269504f + 0.5f);
  const float r = y - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  const float m = scale * p + (scale - 1.f);
  return m / (m + 2.f);
}

inline float dot(const float* a, const float* b, int64_t count) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += a[i] * b[i];
  return sum;
}

inline void check_cpu(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), name, " must be a CPU tensor");
}

inline void check_rows(const at::Tensor& tensor, const char* name) {
  check_cpu(tensor, name);
  TORCH_CHECK(tensor.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// A 512-bit vector of float32; also fine as 2 x 256-bit.
constexpr int64_t kLanes = 16;

// Elements one thread should handle before splitting work pays for waking the others: decode
// batches of the elementwise kernels run on one thread, prefill batches on all.
constexpr int64_t kGrainElements = 32768;

inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// Runs [0, count) over the threads in chunks of `chunk`, as at::parallel_for would split it
// (thread i works through the i-th contiguous share from its front), except that a thread done
// with its own share takes the others' remaining chunks from their backs. A static split waits
// for its slowest thread, and on a busy or shared machine one core is often slower: the
// matmul's threads spent up to a tenth of a decode step waiting for each other. Taking from the
// back leaves the owner's stream through memory unbroken. Each thread calls make_worker() once
// and the worker on every chunk it takes.
template <typename MakeWorker>
void parallel_chunks(int64_t count, int64_t chunk, MakeWorker&& make_worker) {
  const int64_t chunks = (count + chunk - 1) / chunk;
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), chunks);
  if (shares <= 1 || at::in_parallel_region()) {
    auto worker = make_worker();
    if (count > 0) worker(int64_t{0}, count);
    return;
  }
  TORCH_CHECK(chunks < (int64_t{1} << 31), "too many chunks");
  // A share's chunks not yet taken, [front, back), packed in one word so that the owner's and a
  // thief's claims cannot both take the last one; a cache line each, so that owners do not
  // contend.
  struct alignas(64) Share {
    std::atomic<uint64_t> range;
  };
  const auto pack = [](uint64_t front, uint64_t back) { return front << 32 | back; };
  std::vector<Share> pending(shares);
  for (int64_t share = 0; share < shares; ++share) {
    pending[share].range = pack(share * chunks / shares, (share + 1) * chunks / shares);
  }
  // The chunk claimed from `share`'s front (or back), or -1 when none is left.
  const auto claim = [&](int64_t share, bool from_front) -> int64_t {
    std::atomic<uint64_t>& range = pending[share].range;
    uint64_t seen = range.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t front = seen >> 32;
      const uint64_t back = seen & 0xffffffffu;
      if (front >= back) return -1;
      const uint64_t next = from_front ? pack(front + 1, back) : pack(front, back - 1);
      if (range.compare_exchange_weak(seen, next, std::memory_order_relaxed)) {
        return static_cast<int64_t>(from_front ? front : back - 1);
      }
    }
  };
  at::parallel_for(0, shares, 1, [&](int64_t begin, int64_t) {
    auto worker = make_worker();
    for (int64_t k = 0; k < shares; ++k) {
      const int64_t share = (begin + k) % shares;
      for (int64_t c = claim(share, k == 0); c >= 0; c = claim(share, k == 0)) {
        worker(c * chunk, std::min(count, (c + 1) * chunk));
      }
    }
  });
}

// Calls body(std::integral_constant<int64_t, n>) for n in 1..kMax (larger n as kMax), so that a
// count (query vectors, rows) is a compile-time constant in the intrinsics loops.
template <int64_t kMax, int64_t kCount = 1, typename Body>
inline void with_count(int64_t n, Body&& body) {
  if constexpr (kCount == kMax) {
    body(std::integral_constant<int64_t, kMax>());
  } else if (n == kCount) {
    body(std::integral_constant<int64_t, kCount>());
  } else {
    with_count<kMax, kCount + 1>(n, std::forward<Body>(body));
  }
}

// Asks for `count` elements at `data` to be brought into the caches ahead of use. A prefetch
// never faults, but `data` must still point into (or one past) the tensor it names.
template <typename T>
inline void prefetch(const T* data, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(data);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(bytes + offset, 0, 2);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// from_float<BFloat16> for 8 lanes: round to nearest even, the 16 bits in each 32-bit lane.
inline __m256i bf16_bits_x8(__m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  return _mm256_srli_epi32(rounded, 16);
}

inline __m256 load_bf16x8(const at::BFloat16* source) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline void store_bf16x8(at::BFloat16* destination, __m256 values) {
  const __m256i bits = bf16_bits_x8(values);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(destination),
                   _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                    _mm256_extracti128_si256(bits, 1)));
}

// 8 values of a float32 or bfloat16 row as float32, exactly, and back (bfloat16 rounded).
inline __m256 load_floats_x8(const float* source) { return _mm256_loadu_ps(source); }
inline __m256 load_floats_x8(const at::BFloat16* source) { return load_bf16x8(source); }
inline void store_floats_x8(float* destination, __m256 values) {
  _mm256_storeu_ps(destination, values);
}
inline void store_floats_x8(at::BFloat16* destination, __m256 values) {
  store_bf16x8(destination, values);
}

// vector_exp, 8 lanes at a time.
inline __m256 exp_avx2(__m256 x) {
  // x second: a NaN stays NaN through the clamp, as in vector_exp.
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i exponent =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}
#endif

#if defined(__AVX512F__)
inline __m512 load_bf16x16(const at::BFloat16* source) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// from_float<BFloat16>, 16 lanes at a time: round to nearest even, keep the top halves.
inline void store_bf16x16(at::BFloat16* destination, __m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(destination),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// 16 values of a float32 or bfloat16 row as float32, exactly, and back (bfloat16 rounded).
inline __m512 load_floats_x16(const float* source) { return _mm512_loadu_ps(source); }
inline __m512 load_floats_x16(const at::BFloat16* source) { return load_bf16x16(source); }
inline void store_floats_x16(float* destination, __m512 values) {
  _mm512_storeu_ps(destination, values);
}
inline void store_floats_x16(at::BFloat16* destination, __m512 values) {
  store_bf16x16(destination, values);
}

// The first `count` of 16 lanes (all when count >= 16, none when count <= 0).
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? 0xffff : count <= 0 ? 0 : (1u << count) - 1;
}

// vector_exp, 16 lanes at a time; 2^n applied by scalef, one instruction for the four that
// build the exponent's bits.
inline __m512 exp_avx512(__m512 x) {
  // x second: a NaN stays NaN through the clamp, as in vector_exp.
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace sluice
