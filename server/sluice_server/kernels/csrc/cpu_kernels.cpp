// CPU kernels for the shard's forward pass, where PyTorch's generic operators spend more time on
// dispatch, temporaries and extra passes over memory than on arithmetic:
//
//   paged_attention         queries of decodes and prompt chunks against K/V read in place
//                           from the paged cache
//   write_kv                new tokens' K/V into their cache slots (layout: see below)
//   rms_norm, add_rms_norm  RMSNorm, optionally fused with the residual add before it
//   rotary_                 rotary position embedding, in place, "rotate half" layout
//   silu_and_mul            SwiGLU's activation, silu(gate) * up, in one pass
//   linear_bf16             y = x W^T + b in bfloat16 on CPUs with AVX512-BF16, from weights
//                           packed once by pack_linear_bf16
//   argmax_logprob          the greedy token of each row of logits and its log-probability
//
// Each kernel accumulates in float32 whatever the storage type, is parallelised with
// at::parallel_for (PyTorch's own OpenMP pool), and leaves the innermost loops contiguous so the
// compiler vectorises them (built with the flags in sluice_server.kernels).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float value) { return value; }

inline float to_float(at::BFloat16 value) {
  // The top half of a float32: widening is a shift, which vectorises (c10's operator doesn't).
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

inline float to_float(at::Half value) { return static_cast<float>(value); }

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

inline float dot(const float* a, const float* b, int64_t count) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += a[i] * b[i];
  return sum;
}

void check_cpu(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), name, " must be a CPU tensor");
}

void check_rows(const at::Tensor& tensor, const char* name) {
  check_cpu(tensor, name);
  TORCH_CHECK(tensor.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// ---------------------------------------------------------------------------------------------
// The paged cache layout these kernels use. Values: [H_kv, num_blocks, block_size, D], a block's
// tokens as rows. Keys: [H_kv, num_blocks, D, block_size] as a tensor, but within a block the
// elements are stored as [D / 2][block_size][2]: for each pair of dimensions (d, d + 1), every
// key's two elements side by side. Scoring a block against a query is then a sum over the pairs
// of (query[d], query[d + 1]) times one contiguous run of keys: vector multiply-adds with no
// horizontal reduction per key, and on CPUs with AVX512-BF16 one dot-product instruction per
// pair of dimensions and 16 keys, straight from the stored bfloat16.

// A 512-bit vector of float32; also fine as 2 x 256-bit.
constexpr int64_t kLanes = 16;

// Where element d of the key in row `column` of a block sits within the block (see above).
inline int64_t key_offset(int64_t d, int64_t column, int64_t block_size) {
  return (d / 2) * block_size * 2 + column * 2 + (d & 1);
}

// Elements one thread should handle before splitting work pays for waking the others: decode
// batches of the elementwise kernels run on one thread, prefill batches on all.
constexpr int64_t kGrainElements = 32768;

inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// ---------------------------------------------------------------------------------------------
// Block-level attention arithmetic: scoring one cache block's keys against up to kMaxVectors
// query vectors, and adding one block's value rows, weighted, into their accumulators. The
// block is read from memory once per call and worked on in registers, where the accumulators
// also stay for the whole block. A generic version serves every type; bfloat16 on AVX-512
// machines gets an intrinsics version (head sizes 64 and 128, block sizes multiples of 16).

constexpr int64_t kMaxVectors = 4;

// scores[v * stride + c] = queries[v] . (key c) for every column c of the block (columns past
// the sequence's context are scored too and ignored by the caller).
template <typename T>
inline void score_block_generic(int64_t num_vectors, const float* __restrict queries,
                                int64_t head_dim, const T* __restrict keys_t, int64_t block_size,
                                float* __restrict scores, int64_t stride) {
  for (int64_t column = 0; column < block_size; column += kLanes) {
    const int64_t count = std::min(kLanes, block_size - column);
    float sums[kMaxVectors][kLanes] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      float keys[kLanes] = {};
      for (int64_t lane = 0; lane < count; ++lane) {
        keys[lane] = to_float(keys_t[key_offset(d, column + lane, block_size)]);
      }
      for (int64_t v = 0; v < num_vectors; ++v) {
        const float q = queries[v * head_dim + d];
#pragma omp simd
        for (int64_t lane = 0; lane < kLanes; ++lane) sums[v][lane] += q * keys[lane];
      }
    }
    for (int64_t v = 0; v < num_vectors; ++v) {
      for (int64_t lane = 0; lane < count; ++lane) {
        scores[v * stride + column + lane] = sums[v][lane];
      }
    }
  }
}

// accumulators[v][:] += sum over r < num_rows of weights[v * stride + r] * rows[r][:].
template <typename T>
inline void accumulate_block_generic(int64_t num_vectors, float* __restrict accumulators,
                                     int64_t head_dim, const T* __restrict rows, int64_t num_rows,
                                     const float* __restrict weights, int64_t stride) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const T* row = rows + r * head_dim;
    for (int64_t v = 0; v < num_vectors; ++v) {
      const float weight = weights[v * stride + r];
      float* accumulator = accumulators + v * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) accumulator[d] += weight * to_float(row[d]);
    }
  }
}

#if defined(__AVX512F__)
inline __m512 load_bf16x16(const at::BFloat16* source) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// sums[v] += queries[v][d : d + 2] . (16 keys' elements d and d + 1), from one 512-bit load of
// the pair layout: element d in the low half of each 32-bit lane, d + 1 in the high half.
template <int64_t kVectors>
inline void accumulate_key_pairs(__m512* __restrict sums, const float* __restrict queries,
                                 const uint32_t* __restrict query_pairs, int64_t head_dim,
                                 int64_t d, const at::BFloat16* __restrict keys) {
  const __m512i pairs = _mm512_loadu_si512(keys);
#if defined(__AVX512BF16__)
  (void)queries;
  for (int64_t v = 0; v < kVectors; ++v) {
    const __m512i query = _mm512_set1_epi32(static_cast<int>(query_pairs[(v * head_dim + d) / 2]));
    sums[v] = _mm512_dpbf16_ps(sums[v], reinterpret_cast<__m512bh>(pairs),
                               reinterpret_cast<__m512bh>(query));
  }
#else
  (void)query_pairs;
  const __m512 keys_even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  const __m512 keys_odd = _mm512_castsi512_ps(
      _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  for (int64_t v = 0; v < kVectors; ++v) {
    const float* q = queries + v * head_dim + d;
    sums[v] = _mm512_fmadd_ps(_mm512_set1_ps(q[0]), keys_even, sums[v]);
    sums[v] = _mm512_fmadd_ps(_mm512_set1_ps(q[1]), keys_odd, sums[v]);
  }
#endif
}

// The queries' scaling is applied to the sums: with AVX512-BF16 the products come straight from
// the stored bfloat16 queries (query_pairs: each 32-bit word one pair of dimensions) and keys;
// without it, from the float32 queries, already scaled.
template <int64_t kVectors>
inline void score_block_bf16(const float* __restrict queries,
                             const uint32_t* __restrict query_pairs, float scale,
                             int64_t head_dim, const at::BFloat16* __restrict keys_t,
                             int64_t block_size, float* __restrict scores, int64_t stride) {
  // Two partial sums per vector (alternate pairs of dimensions): independent chains of
  // multiply-adds keep more of them in flight. head_dim is a multiple of 16, so of 4.
  for (int64_t column = 0; column < block_size; column += kLanes) {
    __m512 first[kVectors], second[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) first[v] = second[v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 4) {
      accumulate_key_pairs<kVectors>(first, queries, query_pairs, head_dim, d,
                                     keys_t + key_offset(d, column, block_size));
      accumulate_key_pairs<kVectors>(second, queries, query_pairs, head_dim, d + 2,
                                     keys_t + key_offset(d + 2, column, block_size));
    }
    for (int64_t v = 0; v < kVectors; ++v) {
      __m512 total = _mm512_add_ps(first[v], second[v]);
#if defined(__AVX512BF16__)
      total = _mm512_mul_ps(total, _mm512_set1_ps(scale));
#else
      (void)scale;
#endif
      _mm512_storeu_ps(scores + v * stride + column, total);
    }
  }
}

template <int64_t kVectors, int64_t kChunks>
inline void accumulate_block_bf16(float* __restrict accumulators,
                                  const at::BFloat16* __restrict rows, int64_t num_rows,
                                  const float* __restrict weights, int64_t stride) {
  constexpr int64_t head_dim = kChunks * kLanes;
  __m512 sums[kVectors][kChunks];
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t c = 0; c < kChunks; ++c) {
      sums[v][c] = _mm512_loadu_ps(accumulators + v * head_dim + c * kLanes);
    }
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    __m512 row[kChunks];
    for (int64_t c = 0; c < kChunks; ++c) row[c] = load_bf16x16(rows + r * head_dim + c * kLanes);
    for (int64_t v = 0; v < kVectors; ++v) {
      const __m512 weight = _mm512_set1_ps(weights[v * stride + r]);
      for (int64_t c = 0; c < kChunks; ++c) {
        sums[v][c] = _mm512_fmadd_ps(weight, row[c], sums[v][c]);
      }
    }
  }
  for (int64_t v = 0; v < kVectors; ++v) {
    for (int64_t c = 0; c < kChunks; ++c) {
      _mm512_storeu_ps(accumulators + v * head_dim + c * kLanes, sums[v][c]);
    }
  }
}
#endif

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

// Whether the fast path scores keys against the stored bfloat16 queries (AVX512-BF16 dot
// products) rather than against float32 copies of them, scaled.
#if defined(__AVX512BF16__)
constexpr bool kScoresFromBf16 = true;
#else
constexpr bool kScoresFromBf16 = false;
#endif

template <typename T>
inline bool has_fast_path(int64_t head_dim, int64_t block_size) {
#if defined(__AVX512F__)
  return std::is_same_v<T, at::BFloat16> && head_dim % kLanes == 0 && block_size % kLanes == 0 &&
         (head_dim == 64 || head_dim == 128);
#else
  (void)head_dim;
  (void)block_size;
  return false;
#endif
}

// Scores `num_vectors` query vectors against one block. queries: float32, scaled; query_pairs:
// the same vectors as stored, unscaled. The fast path reads one or the other (kScoresFromBf16),
// the generic path the float32 ones.
template <typename T>
inline void score_block(bool fast, int64_t num_vectors, const float* queries,
                        const uint32_t* query_pairs, float scale, int64_t head_dim,
                        const T* keys_t, int64_t block_size, float* scores, int64_t stride) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (fast) {
      with_count<kMaxVectors>(num_vectors, [&](auto n) {
        score_block_bf16<decltype(n)::value>(queries, query_pairs, scale, head_dim, keys_t,
                                             block_size, scores, stride);
      });
      return;
    }
  }
#endif
  (void)fast;
  (void)query_pairs;
  (void)scale;
  score_block_generic(num_vectors, queries, head_dim, keys_t, block_size, scores, stride);
}

template <typename T>
inline void accumulate_block(bool fast, int64_t num_vectors, float* accumulators, int64_t head_dim,
                             const T* rows, int64_t num_rows, const float* weights,
                             int64_t stride) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (fast) {
      with_count<kMaxVectors>(num_vectors, [&](auto n) {
        constexpr int64_t kVectors = decltype(n)::value;
        if (head_dim == 64) {
          accumulate_block_bf16<kVectors, 4>(accumulators, rows, num_rows, weights, stride);
        } else {
          accumulate_block_bf16<kVectors, 8>(accumulators, rows, num_rows, weights, stride);
        }
      });
      return;
    }
  }
#endif
  (void)fast;
  accumulate_block_generic(num_vectors, accumulators, head_dim, rows, num_rows, weights, stride);
}

// Asks for `count` elements at `data` to be brought into the caches ahead of use.
template <typename T>
inline void prefetch(const T* data, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(data);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(bytes + offset, 0, 2);
  }
}

// ---------------------------------------------------------------------------------------------
// Paged attention over a flat batch of chunks (decodes are chunks of one token).
//
// Sequence s owns query rows [query_starts[s], query_starts[s + 1]); its row i sits at position
// cache_lens[s] + i and sees the positions up to itself, all of which are in the cache (the new
// tokens' K/V were written first). One work item is one (sequence, KV head, tile of up to
// kTileRows query rows): the tile's rows and the `group` query heads sharing the KV head are
// scored together, so each block is read from memory and widened to float32 once for all of
// them. Then softmax per row and head, then the weighted sum of value rows.

constexpr int64_t kTileRows = 16;
// How many key blocks ahead of use to fetch (see paged_attention_impl).
constexpr int64_t kPrefetchBlocks = 1;

struct AttentionItem {
  int64_t sequence;
  int64_t kv_head;
  int64_t first_row;  // Within the sequence's rows.
  int64_t blocks;     // Cache blocks its rows see.
};

template <typename T>
void paged_attention_impl(at::Tensor& output, const at::Tensor& query,
                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& block_tables, const at::Tensor& cache_lens,
                          const at::Tensor& query_starts, double scale) {
  const int64_t num_sequences = cache_lens.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = query.size(2);
  const int64_t num_kv_heads = value_cache.size(0);
  const int64_t num_blocks = value_cache.size(1);
  const int64_t block_size = value_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t block_elements = block_size * head_dim;
  const bool fast = has_fast_path<T>(head_dim, block_size);

  const T* query_data = query.data_ptr<T>();
  const T* key_data = key_cache.data_ptr<T>();
  const T* value_data = value_cache.data_ptr<T>();
  T* output_data = output.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* cached = cache_lens.data_ptr<int32_t>();
  const int32_t* starts = query_starts.data_ptr<int32_t>();
  const int64_t query_row_stride = query.stride(0);
  const int64_t query_head_stride = query.stride(1);
  const float softmax_scale = static_cast<float>(scale);

  std::vector<AttentionItem> items;
  for (int64_t s = 0; s < num_sequences; ++s) {
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t query_len = starts[s + 1] - starts[s];
      for (int64_t row = 0; row < query_len; row += kTileRows) {
        const int64_t context = cached[s] + std::min(query_len, row + kTileRows);
        items.push_back({s, h, row, (context + block_size - 1) / block_size});
      }
    }
  }
  // Items differ a lot in cost (a decode against a prefill tile), so each thread takes every
  // num_threads-th item rather than one contiguous range.
  const int64_t num_threads = std::min<int64_t>(at::get_num_threads(), items.size());
  at::parallel_for(0, num_threads, 1, [&](int64_t thread_begin, int64_t thread_end) {
    std::vector<float> queries(kTileRows * group * head_dim);
    std::vector<uint32_t> query_pairs(kTileRows * group * head_dim / 2);
    std::vector<float> accumulators(kTileRows * group * head_dim);
    std::vector<float> inverse_sums(kTileRows * group);
    std::vector<float> scores;
    for (int64_t thread = thread_begin; thread < thread_end; ++thread) {
      // The key blocks this thread will score, fetched kPrefetchBlocks ahead across the ends of
      // its items: a sequence's blocks lie anywhere in the cache, and without this every item
      // would start with full memory-latency misses.
      size_t ahead_index = thread;
      int64_t ahead_block = 0;
      auto prefetch_ahead = [&] {
        while (ahead_index < items.size() && ahead_block == items[ahead_index].blocks) {
          ahead_index += num_threads;
          ahead_block = 0;
        }
        if (ahead_index >= items.size()) return;
        const AttentionItem& ahead = items[ahead_index];
        const int32_t block = tables[ahead.sequence * max_blocks + ahead_block++];
        prefetch(key_data + (ahead.kv_head * num_blocks + block) * block_elements, block_elements);
      };
      for (int64_t i = 0; i < kPrefetchBlocks; ++i) prefetch_ahead();
      for (size_t index = thread; index < items.size(); index += num_threads) {
        const AttentionItem item = items[index];
        const int64_t row_offset = starts[item.sequence] + item.first_row;
        const int64_t rows =
            std::min(kTileRows, starts[item.sequence + 1] - starts[item.sequence] - item.first_row);
        // Row r sees positions [0, first_context + r).
        const int64_t first_context = cached[item.sequence] + item.first_row + 1;
        const int64_t context = first_context + rows - 1;
        const int64_t context_blocks = item.blocks;
        // Score rows cover whole blocks (the last block's columns past the context are scored
        // and then ignored), so the block loops need no ragged ends.
        const int64_t stride = context_blocks * block_size;
        const int32_t* table = tables + item.sequence * max_blocks;
        const int64_t head_base = item.kv_head * num_blocks;
        // (row, head) pairs, row-major: vector v sees first_context + v / group positions.
        const int64_t vectors = rows * group;
        scores.resize(vectors * stride);

        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t g = 0; g < group; ++g) {
            const T* source = query_data + (row_offset + r) * query_row_stride +
                              (item.kv_head * group + g) * query_head_stride;
            const int64_t vector = r * group + g;
            if constexpr (std::is_same_v<T, at::BFloat16> && kScoresFromBf16) {
              if (fast) {  // Scored straight from the stored bfloat16 (see score_block).
                std::memcpy(query_pairs.data() + vector * head_dim / 2, source,
                            head_dim * sizeof(T));
                continue;
              }
            }
            float* destination = queries.data() + vector * head_dim;
            widen(source, destination, head_dim);
            for (int64_t d = 0; d < head_dim; ++d) destination[d] *= softmax_scale;
          }
        }

        for (int64_t start = 0, block = 0; start < context; start += block_size, ++block) {
          // Keys ahead while these are scored, and this block's values for the value pass.
          prefetch_ahead();
          prefetch(value_data + (head_base + table[block]) * block_elements, block_elements);
          const T* block_keys = key_data + (head_base + table[block]) * block_elements;
          for (int64_t first = 0; first < vectors; first += kMaxVectors) {
            const int64_t count = std::min(kMaxVectors, vectors - first);
            // Vectors see more the later they come: skip a group whose last sees none of this.
            if (first_context + (first + count - 1) / group <= start) continue;
            score_block(fast, count, queries.data() + first * head_dim,
                        query_pairs.data() + first * head_dim / 2, softmax_scale, head_dim,
                        block_keys, block_size, scores.data() + first * stride + start, stride);
          }
        }

        // Softmax per vector over what it sees, in place, zero past that (so the value pass can
        // weight whole blocks); 1/sum goes to the output.
        for (int64_t vector = 0; vector < vectors; ++vector) {
          const int64_t visible = first_context + vector / group;
          float* row_scores = scores.data() + vector * stride;
          float maximum = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : maximum)
          for (int64_t t = 0; t < visible; ++t) {
            maximum = row_scores[t] > maximum ? row_scores[t] : maximum;
          }
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < visible; ++t) {
            row_scores[t] = vector_exp(row_scores[t] - maximum);
            sum += row_scores[t];
          }
          std::fill(row_scores + visible, row_scores + stride, 0.f);
          inverse_sums[vector] = 1.f / sum;
        }

        std::fill(accumulators.begin(), accumulators.begin() + vectors * head_dim, 0.f);
        for (int64_t start = 0, block = 0; start < context; start += block_size, ++block) {
          // Rows past the context may hold anything (even NaN), so they are never read.
          const int64_t block_rows = std::min(block_size, context - start);
          const T* block_values = value_data + (head_base + table[block]) * block_elements;
          for (int64_t first = 0; first < vectors; first += kMaxVectors) {
            const int64_t count = std::min(kMaxVectors, vectors - first);
            if (first_context + (first + count - 1) / group <= start) continue;
            accumulate_block(fast, count, accumulators.data() + first * head_dim, head_dim,
                             block_values, block_rows, scores.data() + first * stride + start,
                             stride);
          }
        }

        for (int64_t vector = 0; vector < vectors; ++vector) {
          const int64_t r = vector / group;
          const int64_t head = item.kv_head * group + vector % group;
          T* destination = output_data + ((row_offset + r) * num_heads + head) * head_dim;
          const float* accumulator = accumulators.data() + vector * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) {
            destination[d] = from_float<T>(accumulator[d] * inverse_sums[vector]);
          }
        }
      }
    }
  });
}

void check_cache_layout(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  check_cpu(key_cache, "key_cache");
  check_cpu(value_cache, "value_cache");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4, "caches must be 4-d");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "cache dtypes differ");
  TORCH_CHECK(key_cache.size(0) == value_cache.size(0) &&
                  key_cache.size(1) == value_cache.size(1) &&
                  key_cache.size(2) == value_cache.size(3) &&
                  key_cache.size(3) == value_cache.size(2),
              "key_cache must be [H_kv, blocks, D, block_size] for value_cache "
              "[H_kv, blocks, block_size, D]");
  TORCH_CHECK(value_cache.size(3) % 2 == 0,
              "head_dim must be even: keys are stored in pairs of dimensions");
}

// query [T, H, D] (rows may be strided); caches as described above; block_tables
// [S, max_blocks], cache_lens [S] and query_starts [S + 1], all int32. Returns [T, H, D].
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                           const at::Tensor& cache_lens, const at::Tensor& query_starts,
                           double scale) {
  check_rows(query, "query");
  check_cache_layout(key_cache, value_cache);
  TORCH_CHECK(query.dim() == 3, "query must be [T, H, D]");
  TORCH_CHECK(query.scalar_type() == value_cache.scalar_type(), "query and caches differ in dtype");
  TORCH_CHECK(query.size(2) == value_cache.size(3), "query and cache head_dim differ");
  TORCH_CHECK(query.size(1) % value_cache.size(0) == 0, "heads must be a multiple of KV heads");
  for (const at::Tensor* tensor : {&block_tables, &cache_lens, &query_starts}) {
    TORCH_CHECK(tensor->scalar_type() == at::kInt && tensor->is_contiguous(),
                "block_tables, cache_lens and query_starts must be contiguous int32");
  }
  const int64_t num_sequences = cache_lens.size(0);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_sequences &&
                  query_starts.size(0) == num_sequences + 1,
              "one block table and cache length per sequence, and one more query start");
  const int32_t* starts = query_starts.data_ptr<int32_t>();
  const int32_t* cached = cache_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t block_size = value_cache.size(2);
  TORCH_CHECK(starts[0] == 0 && starts[num_sequences] == query.size(0),
              "query_starts must run from 0 to the number of query rows");
  for (int64_t s = 0; s < num_sequences; ++s) {
    TORCH_CHECK(starts[s + 1] > starts[s] && cached[s] >= 0, "sequence ", s, " has no rows");
    const int64_t context = cached[s] + starts[s + 1] - starts[s];
    TORCH_CHECK((context + block_size - 1) / block_size <= block_tables.size(1),
                "sequence ", s, ": its block table is too short for ", context, " tokens");
    for (int64_t b = 0; b < (context + block_size - 1) / block_size; ++b) {
      const int32_t block = tables[s * block_tables.size(1) + b];
      TORCH_CHECK(block >= 0 && block < value_cache.size(1), "block ", block, " out of range");
    }
  }

  auto output = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  if (num_sequences == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention",
                                  [&] {
                                    paged_attention_impl<scalar_t>(output, query, key_cache,
                                                                   value_cache, block_tables,
                                                                   cache_lens, query_starts, scale);
                                  });
  return output;
}

// ---------------------------------------------------------------------------------------------
// KV cache write: token t's heads go to slot slot_mapping[t] (block slot / block_size, row
// slot % block_size); keys into their block's column, values into its row.

template <typename T>
void write_kv_impl(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key,
                   const at::Tensor& value, const int64_t* slots) {
  const int64_t num_tokens = key.size(0);
  const int64_t num_kv_heads = key.size(1);
  const int64_t head_dim = key.size(2);
  const int64_t num_blocks = value_cache.size(1);
  const int64_t block_size = value_cache.size(2);
  const int64_t block_elements = block_size * head_dim;
  T* keys = key_cache.data_ptr<T>();
  T* values = value_cache.data_ptr<T>();
  const T* key_rows = key.data_ptr<T>();
  const T* value_rows = value.data_ptr<T>();
  at::parallel_for(0, num_tokens * num_kv_heads, grain_for(2 * head_dim),
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item / num_kv_heads;
      const int64_t head = item % num_kv_heads;
      const int64_t block = slots[token] / block_size;
      const int64_t row = slots[token] % block_size;
      T* block_keys = keys + (head * num_blocks + block) * block_elements;
      const T* key_row = key_rows + token * key.stride(0) + head * key.stride(1);
      for (int64_t d = 0; d < head_dim; ++d) {
        block_keys[key_offset(d, row, block_size)] = key_row[d];
      }
      std::memcpy(values + (head * num_blocks + block) * block_elements + row * head_dim,
                  value_rows + token * value.stride(0) + head * value.stride(1),
                  head_dim * sizeof(T));
    }
  });
}

void write_kv(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key,
              const at::Tensor& value, const at::Tensor& slot_mapping) {
  check_rows(key, "key");
  check_rows(value, "value");
  check_cache_layout(key_cache, value_cache);
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "key and value must be [T, H_kv, D]");
  TORCH_CHECK(key.size(1) == value_cache.size(0) && key.size(2) == value_cache.size(3),
              "key and value rows do not match the cache's heads and head_dim");
  TORCH_CHECK(key.scalar_type() == value_cache.scalar_type() &&
                  value.scalar_type() == value_cache.scalar_type(),
              "key, value and cache dtypes differ");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping must be contiguous int64");
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "one slot per token");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = value_cache.size(1) * value_cache.size(2);
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " out of range");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "write_kv", [&] {
    write_kv_impl<scalar_t>(key_cache, value_cache, key, value, slots);
  });
}

// ---------------------------------------------------------------------------------------------
// RMSNorm. With a residual: residual += hidden (rounded to the storage type, as an unfused add
// would), then output = norm(residual) * weight.

template <typename T>
void rms_norm_impl(T* output, T* residual, const T* input, int64_t input_stride, const T* weight,
                   int64_t num_rows, int64_t width, float eps) {
  at::parallel_for(0, num_rows, grain_for(width), [&](int64_t begin, int64_t end) {
    std::vector<float> row(width);
    for (int64_t r = begin; r < end; ++r) {
      const T* source = input + r * input_stride;
      if (residual != nullptr) {
        T* sum = residual + r * width;
        for (int64_t c = 0; c < width; ++c) {
          sum[c] = from_float<T>(to_float(sum[c]) + to_float(source[c]));
        }
        source = sum;
      }
      widen(source, row.data(), width);
      const float mean_square = dot(row.data(), row.data(), width) / static_cast<float>(width);
      const float inverse_rms = 1.f / std::sqrt(mean_square + eps);
      T* destination = output + r * width;
      for (int64_t c = 0; c < width; ++c) {
        destination[c] = from_float<T>(row[c] * inverse_rms * to_float(weight[c]));
      }
    }
  });
}

void check_norm_inputs(const at::Tensor& input, const at::Tensor& weight) {
  check_rows(input, "input");
  TORCH_CHECK(input.dim() == 2, "input must be [rows, hidden]");
  TORCH_CHECK(weight.is_contiguous() && weight.size(0) == input.size(1),
              "weight must be contiguous [hidden]");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "input and weight dtypes differ");
}

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm_inputs(input, weight);
  auto output = at::empty({input.size(0), input.size(1)}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(output.data_ptr<scalar_t>(), nullptr, input.data_ptr<scalar_t>(),
                            input.stride(0), weight.data_ptr<scalar_t>(), input.size(0),
                            input.size(1), static_cast<float>(eps));
  });
  return output;
}

// Adds `input` into `residual` in place and returns the normalised sum.
at::Tensor add_rms_norm(const at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  check_norm_inputs(input, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == input.sizes() &&
                  residual.scalar_type() == input.scalar_type(),
              "residual must be contiguous and match input");
  auto output = at::empty({input.size(0), input.size(1)}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "add_rms_norm",
                                  [&] {
                                    rms_norm_impl<scalar_t>(
                                        output.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                                        input.data_ptr<scalar_t>(), input.stride(0),
                                        weight.data_ptr<scalar_t>(), input.size(0), input.size(1),
                                        static_cast<float>(eps));
                                  });
  return output;
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding in place on x [T, heads, D] (rows may be strided) with float32 cos and sin
// [T, D / 2]: pairs are (i, i + D / 2).

template <typename T>
void rotary_impl(at::Tensor& x, const float* cos, const float* sin) {
  const int64_t num_tokens = x.size(0);
  const int64_t num_heads = x.size(1);
  const int64_t half = x.size(2) / 2;
  T* data = x.data_ptr<T>();
  const int64_t token_stride = x.stride(0);
  const int64_t head_stride = x.stride(1);
  const int64_t grain = grain_for(num_heads * half * 2);
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* token_cos = cos + t * half;
      const float* token_sin = sin + t * half;
      for (int64_t h = 0; h < num_heads; ++h) {
        T* first = data + t * token_stride + h * head_stride;
        T* second = first + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(first[i]);
          const float b = to_float(second[i]);
          first[i] = from_float<T>(a * token_cos[i] - b * token_sin[i]);
          second[i] = from_float<T>(b * token_cos[i] + a * token_sin[i]);
        }
      }
    }
  });
}

void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "x must be [tokens, heads, even head_dim]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous float32");
  TORCH_CHECK(cos.size(0) == x.size(0) && cos.size(1) == x.size(2) / 2 &&
                  sin.sizes() == cos.sizes(),
              "cos and sin must be [tokens, head_dim / 2]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    rotary_impl<scalar_t>(x, cos.data_ptr<float>(), sin.data_ptr<float>());
  });
}

// ---------------------------------------------------------------------------------------------
// SwiGLU activation: gate_up [T, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:], [T, I], computed
// in float32 and rounded once. PyTorch runs it as two operators with a bfloat16 temporary in
// between; for bfloat16 on AVX-512 this is one pass of intrinsics (the compiler does not
// vectorise the bfloat16 conversions and exp of the portable loop well).

#if defined(__AVX512F__)
// vector_exp, 16 lanes at a time.
inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
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
  const __m512i exponent =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(exponent));
}

// from_float<BFloat16>, 16 lanes at a time: round to nearest even, keep the top halves.
inline void store_bf16x16(at::BFloat16* destination, __m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(destination),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
#endif

template <typename T>
inline void silu_and_mul_row(const T* __restrict gate, const T* __restrict up,
                             T* __restrict out, int64_t width) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + kLanes <= width; i += kLanes) {
      const __m512 g = load_bf16x16(gate + i);
      const __m512 exp_minus_g = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp_minus_g));
      store_bf16x16(out + i, _mm512_mul_ps(silu, load_bf16x16(up + i)));
    }
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < width; ++j) {
    const float g = to_float(gate[j]);
    out[j] = from_float<T>(g / (1.f + vector_exp(-g)) * to_float(up[j]));
  }
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [tokens, 2 * I]");
  const int64_t num_tokens = gate_up.size(0);
  const int64_t width = gate_up.size(1) / 2;
  auto output = at::empty({num_tokens, width}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
        const scalar_t* source = gate_up.data_ptr<scalar_t>();
        scalar_t* destination = output.data_ptr<scalar_t>();
        const int64_t source_stride = gate_up.stride(0);
        at::parallel_for(0, num_tokens, grain_for(2 * width), [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            const scalar_t* gate = source + t * source_stride;
            silu_and_mul_row(gate, gate + width, destination + t * width, width);
          }
        });
      });
  return output;
}

// ---------------------------------------------------------------------------------------------
// bfloat16 matmul for the model's projections, y [M, N] = x [M, K] W^T + b, on CPUs with
// AVX512-BF16. On the row counts of decoding (1 to a few dozen) oneDNN runs at about 60 % of its
// own large-matrix throughput; this is 1.3 to 2 times faster there, and no slower on prompt
// chunks (benchmark/linear_kernel.py).
//
// The weight is packed once into tiles of 32 output columns, [ceil(N / 32)][K / 2][32][2]: for
// each pair of input dimensions, the 32 columns' two weights side by side, 128 bytes, which is
// the pair layout `vdpbf16ps` multiplies (columns past N are zero). A micro-kernel holds an
// 8-row by 32-column block of y in 16 registers and walks K a pair at a time: two loads of the
// tile, eight broadcasts of x's pairs, sixteen dot-product instructions. Threads split the
// tiles; each streams its tiles from memory once per block of rows, prefetching the next tile
// while the current one is reused from cache for each group of 8 rows.

constexpr int64_t kLinearColumns = 32;
constexpr int64_t kLinearRows = 8;
// Rows of x worked on together, so that x's block stays in cache while the tiles stream past.
constexpr int64_t kLinearRowBlock = 256;

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "weight must be bfloat16 [out_features, in_features]");
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  TORCH_CHECK(in_features % 2 == 0, "in_features must be even");
  const int64_t tiles = (out_features + kLinearColumns - 1) / kLinearColumns;
  auto padded = at::zeros({tiles * kLinearColumns, in_features}, weight.options());
  padded.narrow(0, 0, out_features).copy_(weight);
  // [tiles, 32, K/2, 2] -> [tiles, K/2, 32, 2]
  return padded.view({tiles, kLinearColumns, in_features / 2, 2})
      .permute({0, 2, 1, 3})
      .contiguous();
}

#if defined(__AVX512BF16__)
inline __m512bh broadcast_pair(const at::BFloat16* pair) {
  uint32_t bits;
  std::memcpy(&bits, pair, sizeof(bits));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(bits)));
}

// One block of `kRows` rows of y and one tile's 32 columns (`columns` of them kept). `prefetch`,
// if set, is the next tile, of which this call fetches the 64-byte line `prefetch_lane` (0 or
// 1) of every pair of input dimensions, or both lines when `prefetch_lane` is 2.
template <int64_t kRows>
inline void linear_block(const at::BFloat16* __restrict x, int64_t x_stride,
                         const __m512bh* __restrict tile, int64_t pairs,
                         const float* __restrict bias, at::BFloat16* __restrict y,
                         int64_t y_stride, int64_t columns, const char* prefetch,
                         int prefetch_lane) {
  __m512 sums[kRows][2];
  for (int r = 0; r < kRows; ++r) {
    sums[r][0] = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    sums[r][1] = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < pairs; ++k) {
    const __m512bh low = tile[2 * k];
    const __m512bh high = tile[2 * k + 1];
    if (prefetch != nullptr) {
      const char* line = prefetch + k * 2 * sizeof(__m512bh);
      if (prefetch_lane != 1) _mm_prefetch(line, _MM_HINT_T1);
      if (prefetch_lane != 0) _mm_prefetch(line + sizeof(__m512bh), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512bh pair = broadcast_pair(x + r * x_stride + 2 * k);
      sums[r][0] = _mm512_dpbf16_ps(sums[r][0], pair, low);
      sums[r][1] = _mm512_dpbf16_ps(sums[r][1], pair, high);
    }
  }
  const auto mask_for = [](int64_t count) -> __mmask16 {
    return count >= 16 ? 0xffff : count <= 0 ? 0 : (1u << count) - 1;
  };
  const __mmask16 low_mask = mask_for(columns);
  const __mmask16 high_mask = mask_for(columns - 16);
  for (int r = 0; r < kRows; ++r) {
    at::BFloat16* row = y + r * y_stride;
    for (int half = 0; half < 2; ++half) {
      _mm256_mask_storeu_epi16(row + 16 * half, half == 0 ? low_mask : high_mask,
                               reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(sums[r][half])));
    }
  }
}
#endif

bool has_linear_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed,
                       const c10::optional<at::Tensor>& bias, int64_t out_features) {
#if defined(__AVX512BF16__)
  check_rows(x, "x");
  check_cpu(packed, "packed");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bfloat16 [rows, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(2) == kLinearColumns &&
                  packed.size(3) == 2 && packed.scalar_type() == at::kBFloat16,
              "packed must come from pack_linear_bf16");
  const int64_t rows = x.size(0);
  const int64_t pairs = packed.size(1);
  const int64_t tiles = packed.size(0);
  TORCH_CHECK(x.size(1) == 2 * pairs, "x has ", x.size(1), " columns, the weight ", 2 * pairs);
  TORCH_CHECK(out_features > (tiles - 1) * kLinearColumns && out_features <= tiles * kLinearColumns,
              "out_features does not match the packed weight");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == tiles * kLinearColumns,
                "bias must be float32, padded to the packed weight's tiles");
    bias_data = bias->data_ptr<float>();
  }
  auto y = at::empty({rows, out_features}, x.options());
  const at::BFloat16* x_data = x.data_ptr<at::BFloat16>();
  const int64_t x_stride = x.stride(0);
  const auto* weight = reinterpret_cast<const __m512bh*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* y_data = y.data_ptr<at::BFloat16>();
  const int64_t tile_vectors = 2 * pairs;  // 512-bit vectors per tile
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row_start = 0; row_start < rows; row_start += kLinearRowBlock) {
      const int64_t block_rows = std::min(kLinearRowBlock, rows - row_start);
      const int64_t passes = (block_rows + kLinearRows - 1) / kLinearRows;
      for (int64_t t = begin; t < end; ++t) {
        const __m512bh* tile = weight + t * tile_vectors;
        const char* next =
            t + 1 < end ? reinterpret_cast<const char*>(tile + tile_vectors) : nullptr;
        const int64_t columns = std::min(kLinearColumns, out_features - t * kLinearColumns);
        const float* tile_bias = bias_data ? bias_data + t * kLinearColumns : nullptr;
        for (int64_t pass = 0; pass < passes; ++pass) {
          const int64_t r = row_start + pass * kLinearRows;
          // The first two passes fetch the next tile, a line of each pair each.
          const char* prefetch = pass < 2 ? next : nullptr;
          const int prefetch_lane = passes == 1 ? 2 : static_cast<int>(pass);
          with_count<kLinearRows>(std::min(kLinearRows, rows - r), [&](auto count) {
            at::BFloat16* y_block = y_data + r * out_features + t * kLinearColumns;
            linear_block<decltype(count)::value>(x_data + r * x_stride, x_stride, tile, pairs,
                                                 tile_bias, y_block, out_features, columns,
                                                 prefetch, prefetch_lane);
          });
        }
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16");
#endif
}

// ---------------------------------------------------------------------------------------------
// Greedy pick: per row of logits [S, V] (float32 or the model's dtype, read as float32), the
// first index of the maximum (as torch.argmax) and its log-probability,
// max - logsumexp(row) = -log(sum(exp(row - max))). Reading the model's bfloat16 logits directly
// saves converting the whole [S, V] block to float32 first, the largest copy of a decode step.

template <typename T>
void argmax_logprob_impl(const at::Tensor& logits, int64_t* ids, float* out) {
  const int64_t num_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const T* data = logits.data_ptr<T>();
  const int64_t row_stride = logits.stride(0);
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = data + r * row_stride;
      float maximum = to_float(row[0]);
#pragma omp simd reduction(max : maximum)
      for (int64_t v = 0; v < vocab; ++v) {
        const float value = to_float(row[v]);
        maximum = value > maximum ? value : maximum;
      }
      int64_t index = 0;
      while (index < vocab - 1 && !(to_float(row[index]) == maximum)) ++index;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t v = 0; v < vocab; ++v) sum += vector_exp(to_float(row[v]) - maximum);
      ids[r] = index;
      out[r] = -std::log(sum);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> argmax_logprob(const at::Tensor& logits) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits must be [rows, vocab]");
  const int64_t num_rows = logits.size(0);
  auto token_ids = at::empty({num_rows}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({num_rows}, logits.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "argmax_logprob",
                                  [&] {
                                    argmax_logprob_impl<scalar_t>(logits,
                                                                  token_ids.data_ptr<int64_t>(),
                                                                  logprobs.data_ptr<float>());
                                  });
  return {token_ids, logprobs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("paged_attention", &paged_attention);
  module.def("write_kv", &write_kv);
  module.def("rms_norm", &rms_norm);
  module.def("add_rms_norm", &add_rms_norm);
  module.def("rotary_", &rotary_);
  module.def("silu_and_mul", &silu_and_mul);
  module.def("has_linear_bf16", &has_linear_bf16);
  module.def("pack_linear_bf16", &pack_linear_bf16);
  module.def("linear_bf16", &linear_bf16);
  module.def("argmax_logprob", &argmax_logprob);
}
