// The sampler's passes over a step's processed logits (float32 [rows, vocab], after temperature):
//
//   top_k_top_p_   keeps each row's top_k most likely tokens (0: all), then the fewest of those,
//                  most likely first, whose probabilities renormalised over them reach top_p
//                  (1: all); every other token becomes -inf. transformers' TopK then TopP.
//   draw           one token per row by inverting its distribution at the row's uniform number
//                  in [0, 1), and the row's logsumexp.
//
// Neither sorts the vocabulary. A token's weight is exp(logit - the row's largest); tokens
// kFloorNats or more below the largest weigh 0 (probabilities under 1e-35, and exp of such values
// is slow), as in the PyTorch sampler. top_k_top_p_ puts tokens in buckets by how far below the
// largest they are (kBucketsPerNat per nat, the floored ones in a last bucket), counts and weighs
// each bucket in one pass, finds the bucket the cut falls in, and sorts that bucket's tokens
// alone. Rows run in parallel, each on one thread, so a row's result never depends on the batch.

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

// A thread's scratch for one row at a time.
struct RowScratch {
  std::vector<float> weights;
  std::vector<int16_t> buckets;
  std::vector<int32_t> tokens;
  std::array<int64_t, kBuckets> counts;
  std::array<double, kBuckets> masses;
};

// Fills the scratch's weights, each token's bucket, and each bucket's count and mass.
void bucket_tokens(LogitRow row, float largest, RowScratch& scratch) {
  weigh(row.data, row.vocab, largest, scratch.weights.data());
  scratch.counts.fill(0);
  scratch.masses.fill(0.0);
  for (int64_t v = 0; v < row.vocab; ++v) {
    const float below = largest - row.data[v];
    const int bucket =
        below < kFloorNats ? static_cast<int>(below * kBucketsPerNat) : kBuckets - 1;
    scratch.buckets[v] = static_cast<int16_t>(std::min(bucket, kBuckets - 1));
    scratch.counts[scratch.buckets[v]] += 1;
    scratch.masses[scratch.buckets[v]] += scratch.weights[v];
  }
}

// Most likely first, ties by token id.
void sort_most_likely_first(LogitRow row, std::vector<int32_t>& tokens) {
  std::sort(tokens.begin(), tokens.end(), [&](int32_t a, int32_t b) {
    return row.data[a] > row.data[b] || (row.data[a] == row.data[b] && a < b);
  });
}

// The tokens of bucket `bucket`, most likely first, into scratch.tokens.
void sorted_bucket(LogitRow row, int bucket, RowScratch& scratch) {
  scratch.tokens.clear();
  for (int64_t v = 0; v < row.vocab; ++v) {
    if (scratch.buckets[v] == bucket) scratch.tokens.push_back(static_cast<int32_t>(v));
  }
  sort_most_likely_first(row, scratch.tokens);
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

// Top-p over the whole row: the cut falls in the first bucket whose mass, added to the buckets'
// before it, reaches top_p of the total.
void top_p_row(LogitRow row, float top_p, RowScratch& scratch) {
  double total = 0.0;
  for (const double mass : scratch.masses) total += mass;
  const double target = top_p * total;
  double before = 0.0;
  int bucket = 0;
  while (bucket < kBuckets - 1 && before + scratch.masses[bucket] < target) {
    before += scratch.masses[bucket++];
  }
  sorted_bucket(row, bucket, scratch);
  // A token stays while the tokens before it hold less than top_p; the first always does.
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
  int64_t before = 0;
  int bucket = 0;
  while (before + scratch.counts[bucket] < top_k) before += scratch.counts[bucket++];
  sorted_bucket(row, bucket, scratch);
  cut_after(row, bucket, top_k - before, scratch);
  if (top_p >= 1.f) return;
  // The k tokens left, most likely first: the buckets before the cut's, then its kept tokens.
  std::vector<int32_t> boundary(scratch.tokens.begin(), scratch.tokens.begin() + (top_k - before));
  scratch.tokens.clear();
  for (int64_t v = 0; v < row.vocab; ++v) {
    if (scratch.buckets[v] < bucket) scratch.tokens.push_back(static_cast<int32_t>(v));
  }
  sort_most_likely_first(row, scratch.tokens);
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

}  // namespace

void top_k_top_p_(at::Tensor& logits, const at::Tensor& top_k, const at::Tensor& top_p) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "logits must be float32 [rows, vocab]");
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max(), "vocabulary too large");
  const int64_t num_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(top_k.scalar_type() == at::kLong && top_k.dim() == 1 && top_k.size(0) == num_rows &&
                  top_k.is_contiguous(),
              "top_k must be int64 [rows]");
  TORCH_CHECK(top_p.scalar_type() == at::kFloat && top_p.dim() == 1 && top_p.size(0) == num_rows &&
                  top_p.is_contiguous(),
              "top_p must be float32 [rows]");
  float* data = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  const int64_t* ks = top_k.data_ptr<int64_t>();
  const float* ps = top_p.data_ptr<float>();
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    scratch.weights.resize(vocab);
    scratch.buckets.resize(vocab);
    for (int64_t r = begin; r < end; ++r) {
      const bool has_top_k = ks[r] > 0 && ks[r] < vocab;
      if (!has_top_k && !(ps[r] < 1.f)) continue;
      const LogitRow row{data + r * stride, vocab};
      bucket_tokens(row, row_max(row.data, vocab), scratch);
      if (has_top_k) {
        top_k_row(row, ks[r], ps[r], scratch);
      } else {
        top_p_row(row, ps[r], scratch);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> draw(const at::Tensor& logits, const at::Tensor& uniforms) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "logits must be float32 [rows, vocab]");
  const int64_t num_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 1 &&
                  uniforms.size(0) == num_rows && uniforms.is_contiguous(),
              "uniforms must be float64 [rows]");
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
