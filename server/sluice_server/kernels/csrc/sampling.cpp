// The sampler's passes over a step's processed logits (float32 [rows, vocab], after temperature):
//
//   top_k_top_p_   keeps each row's top_k most likely tokens (0: all), then the fewest of those,
//                  most likely first, whose probabilities renormalised over them reach top_p
//                  (1: all); every other token becomes -inf. transformers' TopK then TopP.
//   typical_p_     keeps the tokens whose information (-log p) is closest to the row's entropy,
//                  closest first, until they hold typical_p of the mass (1: all); transformers'
//                  TypicalLogitsWarper.
//   draw           one token per row by inverting its distribution at the row's uniform number
//                  in [0, 1), and the row's logsumexp.
//
// None sorts the vocabulary. A token's weight is exp(logit - the row's largest); tokens
// kFloorNats or more below the largest weigh 0 (probabilities under 1e-35, and exp of such values
// is slow), as in the PyTorch sampler. The filters put the tokens in buckets by the key they
// order them by (kBucketsPerNat per nat, the floored ones in a last bucket), count and weigh each
// bucket in one pass, find the bucket the cut falls in, and sort that bucket's tokens alone. Rows
// run in parallel, each on one thread, so a row's result never depends on the batch.

#include <array>
#include <limits>
#include <vector>

#include <ATen/ops/empty.h>

#include "common.h"
#include "kernels.h"

namespace sluice {
namespace {

constexpr float kFloorNats = 80.f;
constexpr int kBucketsPerNat = 8;
constexpr int kBuckets = static_cast<int>(kFloorNats) * kBucketsPerNat + 1;

// One row of logits.
struct LogitRow {
  float* data;
  int64_t vocab;
};

float row_max(const float* logits, int64_t vocab) {
  float largest = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : largest)
  for (int64_t v = 0; v < vocab; ++v) largest = logits[v] > largest ? logits[v] : largest;
  return largest;
}

// weights[v] = exp(logit - largest), 0 at or past the floor (-inf included).
void weigh(const float* logits, int64_t vocab, float largest, float* weights) {
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) {
    const float below = largest - logits[v];
    weights[v] = below < kFloorNats ? vector_exp(-below) : 0.f;
  }
}

// A thread's scratch for one row at a time. Each filter orders the tokens by a key, smallest
// first: top-k and top-p by how far below the largest logit a token is, typical-p by how far
// its information is from the entropy.
struct RowScratch {
  std::vector<float> weights;
  std::vector<float> keys;
  std::vector<int16_t> buckets;
  std::vector<int32_t> tokens;
  std::array<int64_t, kBuckets> counts;
  std::array<double, kBuckets> masses;

  explicit RowScratch(int64_t vocab) : weights(vocab), keys(vocab), buckets(vocab) {}
};

// The row's weights, each token's key its distance below the largest logit; returns the sum of
// the weights.
double weigh_row(LogitRow row, RowScratch& scratch) {
  const float largest = row_max(row.data, row.vocab);
  weigh(row.data, row.vocab, largest, scratch.weights.data());
  double total = 0.0;
  for (int64_t v = 0; v < row.vocab; ++v) {
    scratch.keys[v] = largest - row.data[v];
    total += scratch.weights[v];
  }
  return total;
}

// Each token's bucket by its key (kBucketsPerNat per nat, keys from kFloorNats on and tokens
// without weight in the last), and each bucket's count and weight.
void bucket_by_key(int64_t vocab, RowScratch& scratch) {
  scratch.counts.fill(0);
  scratch.masses.fill(0.0);
  for (int64_t v = 0; v < vocab; ++v) {
    const float key = scratch.keys[v];
    const bool last = !(key < kFloorNats) || scratch.weights[v] <= 0.f;
    const int bucket = last ? kBuckets - 1 : static_cast<int>(key * kBucketsPerNat);
    scratch.buckets[v] = static_cast<int16_t>(std::min(bucket, kBuckets - 1));
    scratch.counts[scratch.buckets[v]] += 1;
    scratch.masses[scratch.buckets[v]] += scratch.weights[v];
  }
}

// Smallest key first, ties by token id.
void sort_by_key(const RowScratch& scratch, std::vector<int32_t>& tokens) {
  const float* keys = scratch.keys.data();
  std::sort(tokens.begin(), tokens.end(), [keys](int32_t a, int32_t b) {
    return keys[a] < keys[b] || (keys[a] == keys[b] && a < b);
  });
}

// The tokens of bucket `bucket`, smallest key first, into scratch.tokens.
void sorted_bucket(int64_t vocab, int bucket, RowScratch& scratch) {
  scratch.tokens.clear();
  for (int64_t v = 0; v < vocab; ++v) {
    if (scratch.buckets[v] == bucket) scratch.tokens.push_back(static_cast<int32_t>(v));
  }
  sort_by_key(scratch, scratch.tokens);
}

// -inf for every token of a bucket past `bucket`, and for the tokens of `bucket` from the
// sorted scratch.tokens[kept:].
void cut_after(LogitRow row, int bucket, int64_t kept, const RowScratch& scratch) {
  constexpr float kCut = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < row.vocab; ++v) {
    if (scratch.buckets[v] > bucket) row.data[v] = kCut;
  }
  for (size_t i = static_cast<size_t>(kept); i < scratch.tokens.size(); ++i) {
    row.data[scratch.tokens[i]] = kCut;
  }
}

// Keeps the fewest tokens, smallest key first, whose weight reaches `target`: a token stays
// while the tokens before it weigh less, the first always does. The cut falls in the first
// bucket whose weight, added to the buckets' before it, reaches the target.
void keep_mass(LogitRow row, double target, RowScratch& scratch) {
  bucket_by_key(row.vocab, scratch);
  double before = 0.0;
  int bucket = 0;
  while (bucket < kBuckets - 1 && before + scratch.masses[bucket] < target) {
    before += scratch.masses[bucket++];
  }
  sorted_bucket(row.vocab, bucket, scratch);
  int64_t kept = 0;
  for (const int32_t token : scratch.tokens) {
    if (kept > 0 && before >= target) break;
    before += scratch.weights[token];
    ++kept;
  }
  cut_after(row, bucket, kept, scratch);
}

// Top-k, then top-p over the k tokens kept.
void top_k_row(LogitRow row, int64_t top_k, float top_p, RowScratch& scratch) {
  bucket_by_key(row.vocab, scratch);
  int64_t before = 0;
  int bucket = 0;
  while (before + scratch.counts[bucket] < top_k) before += scratch.counts[bucket++];
  sorted_bucket(row.vocab, bucket, scratch);
  cut_after(row, bucket, top_k - before, scratch);
  if (top_p >= 1.f) return;
  // The k tokens left, most likely first: the buckets before the cut's, then its kept tokens.
  std::vector<int32_t> boundary(scratch.tokens.begin(), scratch.tokens.begin() + (top_k - before));
  scratch.tokens.clear();
  for (int64_t v = 0; v < row.vocab; ++v) {
    if (scratch.buckets[v] < bucket) scratch.tokens.push_back(static_cast<int32_t>(v));
  }
  sort_by_key(scratch, scratch.tokens);
  scratch.tokens.insert(scratch.tokens.end(), boundary.begin(), boundary.end());
  double total = 0.0;
  for (const int32_t token : scratch.tokens) total += scratch.weights[token];
  const double target = top_p * total;
  double mass_before = 0.0;
  for (const int32_t token : scratch.tokens) {
    if (mass_before >= target) row.data[token] = -std::numeric_limits<float>::infinity();
    mass_before += scratch.weights[token];
  }
}

// Typical-p: each token's key becomes |-log p - H|, H the row's entropy, and the tokens closest
// to it are kept until they hold typical_p of the mass.
void typical_row(LogitRow row, float typical_p, RowScratch& scratch) {
  const double total = weigh_row(row, scratch);
  const double log_total = std::log(total);
  // -log p = (distance below the largest) + log(total); H = sum of p * -log p.
  double entropy = 0.0;
  for (int64_t v = 0; v < row.vocab; ++v) {
    if (scratch.weights[v] > 0.f) entropy += scratch.weights[v] * (scratch.keys[v] + log_total);
  }
  entropy /= total;
  for (int64_t v = 0; v < row.vocab; ++v) {
    scratch.keys[v] = static_cast<float>(std::abs(scratch.keys[v] + log_total - entropy));
  }
  keep_mass(row, typical_p * total, scratch);
}

// The first token whose running weight passes target (a token with weight), or the last token
// with weight when rounding leaves the target at the very top.
int64_t invert(const float* weights, int64_t vocab, double target) {
  double running = 0.0;
  int64_t last_weighted = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    if (weights[v] <= 0.f) continue;
    running += weights[v];
    if (running > target) return v;
    last_weighted = v;
  }
  return last_weighted;
}

void check_float_rows(const at::Tensor& logits) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "logits must be float32 [rows, vocab]");
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max(), "vocabulary too large");
}

void check_per_row(const at::Tensor& values, at::ScalarType dtype, int64_t num_rows,
                   const char* message) {
  TORCH_CHECK(values.scalar_type() == dtype && values.dim() == 1 && values.size(0) == num_rows &&
                  values.is_contiguous(),
              message);
}

}  // namespace

void top_k_top_p_(at::Tensor& logits, const at::Tensor& top_k, const at::Tensor& top_p) {
  check_float_rows(logits);
  const int64_t num_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  check_per_row(top_k, at::kLong, num_rows, "top_k must be int64 [rows]");
  check_per_row(top_p, at::kFloat, num_rows, "top_p must be float32 [rows]");
  float* data = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  const int64_t* ks = top_k.data_ptr<int64_t>();
  const float* ps = top_p.data_ptr<float>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch(vocab);
    for (int64_t r = begin; r < end; ++r) {
      const bool has_top_k = ks[r] > 0 && ks[r] < vocab;
      if (!has_top_k && !(ps[r] < 1.f)) continue;
      const LogitRow row{data + r * stride, vocab};
      const double total = weigh_row(row, scratch);
      if (has_top_k) {
        top_k_row(row, ks[r], ps[r], scratch);
      } else {
        keep_mass(row, ps[r] * total, scratch);
      }
    }
  });
}

void typical_p_(at::Tensor& logits, const at::Tensor& typical_p) {
  check_float_rows(logits);
  const int64_t num_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  check_per_row(typical_p, at::kFloat, num_rows, "typical_p must be float32 [rows]");
  float* data = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  const float* masses = typical_p.data_ptr<float>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch(vocab);
    for (int64_t r = begin; r < end; ++r) {
      if (masses[r] < 1.f) typical_row({data + r * stride, vocab}, masses[r], scratch);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> draw(const at::Tensor& logits, const at::Tensor& uniforms) {
  check_float_rows(logits);
  const int64_t num_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  check_per_row(uniforms, at::kDouble, num_rows, "uniforms must be float64 [rows]");
  auto token_ids = at::empty({num_rows}, logits.options().dtype(at::kLong));
  auto log_totals = at::empty({num_rows}, logits.options());
  const float* data = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  const double* us = uniforms.data_ptr<double>();
  int64_t* ids = token_ids.data_ptr<int64_t>();
  float* log_total = log_totals.data_ptr<float>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(vocab);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = data + r * stride;
      const float largest = row_max(row, vocab);
      weigh(row, vocab, largest, weights.data());
      double total = 0.0;
      for (int64_t v = 0; v < vocab; ++v) total += weights[v];
      ids[r] = invert(weights.data(), vocab, us[r] * total);
      log_total[r] = largest + static_cast<float>(std::log(total));
    }
  });
  return {token_ids, log_totals};
}

}  // namespace sluice
