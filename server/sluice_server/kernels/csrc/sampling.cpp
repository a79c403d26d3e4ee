// The sampler's passes over a step's processed logits (float32 [rows, vocab], after temperature):
//
//   top_k_top_p_   keeps each row's top_k most likely tokens (0: all), then the fewest of those,
//                  most likely first, whose probabilities renormalised over them reach top_p
//                  (1: all); every other token becomes -inf. transformers' TopK then TopP.
//   min_p_         cuts the tokens whose probability is below min_p times the most likely one's
//                  (0: none), that is whose logit is below the largest plus log(min_p), without an
//                  exp; transformers' MinPLogitsWarper.
//   typical_p_     keeps the tokens whose information (-log p) is closest to the row's entropy,
//                  closest first, until they hold typical_p of the mass (1: all); transformers'
//                  TypicalLogitsWarper.
//   draw           one token per row by inverting its distribution at the row's uniform number
//                  in [0, 1), and the row's logsumexp.
//
// None sorts the vocabulary. A token's weight is exp(logit - the row's largest); tokens kFloorNats
// or more below the largest weigh 0 (probabilities under 1e-35, and exp of such values is slow), as
// in the PyTorch sampler. Top-k and top-p first look at the row's head, the tokens within a few
// nats of the largest logit, where a language model's cut nearly always falls: the pass that weighs
// the row also counts and weighs the head, and where it holds the k tokens or the target mass, only
// the head is sorted. Otherwise the filters put the tokens in buckets by the key they order them by
// (kBucketsPerNat per nat, the floored ones in a last bucket), count and weigh each bucket in one
// pass, find the bucket the cut falls in, and sort that bucket's tokens alone. Sums over a row run
// in vector lanes, a running sum being one long chain of dependent additions. Rows run in parallel,
// each on one thread, so a row's result never depends on the batch.

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
// Tokens per block: the draw's partial sums (the PyTorch draw's DRAW_CHUNK) and the spans the
// head is looked for in.
constexpr int64_t kBlock = 256;
// The heads top-k and top-p try, nats below the largest logit, narrowest first; and the most
// tokens a head may hold before the bucketed cut is cheaper than sorting it.
constexpr std::array<float, 3> kHeadNats = {4.f, 8.f, 16.f};
constexpr size_t kMostHeadTokens = 2048;

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

int64_t blocks_of(int64_t vocab) { return (vocab + kBlock - 1) / kBlock; }

// The row's largest logit (NaN ignored), and each block's into block_max.
float block_maxima(const float* logits, int64_t vocab, std::vector<float>& block_max) {
  float largest = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < blocks_of(vocab); ++b) {
    const int64_t start = b * kBlock;
    block_max[b] = row_max(logits + start, std::min(kBlock, vocab - start));
    largest = std::max(largest, block_max[b]);
  }
  return largest;
}

// The row's weights (as weigh()) and each block's sum, in float lanes; returns their total, in
// double.
double weigh_blocks(const float* logits, int64_t vocab, float largest, float* weights,
                    double* block_sums) {
  double total = 0.0;
  for (int64_t b = 0; b < blocks_of(vocab); ++b) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t v = b * kBlock; v < std::min(vocab, (b + 1) * kBlock); ++v) {
      const float below = largest - logits[v];
      weights[v] = below < kFloorNats ? vector_exp(-below) : 0.f;
      sum += weights[v];
    }
    block_sums[b] = sum;
    total += sum;
  }
  return total;
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
  std::vector<float> block_max;

  explicit RowScratch(int64_t vocab)
      : weights(vocab), keys(vocab), buckets(vocab), block_max(blocks_of(vocab)) {}
};

// The row's weights, each token's key its distance below the largest logit; returns the sum of
// the weights.
double weigh_row(LogitRow row, RowScratch& scratch) {
  const float largest = row_max(row.data, row.vocab);
  weigh(row.data, row.vocab, largest, scratch.weights.data());
  double total = 0.0;
#pragma omp simd reduction(+ : total)
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

// A row's weights' total, and the mass and number of tokens of each of kHeadNats' heads.
struct HeadMasses {
  double total = 0.0;
  std::array<double, kHeadNats.size()> heads{};
  std::array<double, kHeadNats.size()> counts{};
};

// Each block's sums in float lanes (at most kBlock weights of at most 1 each), the blocks' in
// double: summing every weight in double took most of the pass.
HeadMasses weigh_heads(const float* logits, int64_t vocab, float largest, float* weights) {
  static_assert(kHeadNats.size() == 3, "one sum per head below");
  HeadMasses masses;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    float total = 0.f, head0 = 0.f, head1 = 0.f, head2 = 0.f;
    float count0 = 0.f, count1 = 0.f, count2 = 0.f;
#pragma omp simd reduction(+ : total, head0, head1, head2, count0, count1, count2)
    for (int64_t v = start; v < std::min(vocab, start + kBlock); ++v) {
      const float below = largest - logits[v];
      const float weight = below < kFloorNats ? vector_exp(-below) : 0.f;
      weights[v] = weight;
      total += weight;
      head0 += below < kHeadNats[0] ? weight : 0.f;
      head1 += below < kHeadNats[1] ? weight : 0.f;
      head2 += below < kHeadNats[2] ? weight : 0.f;
      count0 += below < kHeadNats[0] ? 1.f : 0.f;
      count1 += below < kHeadNats[1] ? 1.f : 0.f;
      count2 += below < kHeadNats[2] ? 1.f : 0.f;
    }
    masses.total += total;
    masses.heads[0] += head0;
    masses.heads[1] += head1;
    masses.heads[2] += head2;
    masses.counts[0] += count0;
    masses.counts[1] += count1;
    masses.counts[2] += count2;
  }
  return masses;
}

// The tokens whose logit is above `floor`, into scratch.tokens, from the blocks that have any;
// false where there are more than kMostHeadTokens.
bool collect_above(LogitRow row, float floor, RowScratch& scratch) {
  scratch.tokens.clear();
  for (int64_t b = 0; b < blocks_of(row.vocab); ++b) {
    if (!(scratch.block_max[b] > floor)) continue;
    const int64_t end = std::min(row.vocab, (b + 1) * kBlock);
    for (int64_t v = b * kBlock; v < end; ++v) {
      if (row.data[v] > floor) scratch.tokens.push_back(static_cast<int32_t>(v));
    }
    if (scratch.tokens.size() > kMostHeadTokens) return false;
  }
  return true;
}

// The tokens of the narrowest head `holds` accepts into scratch.tokens, most likely first (ties
// by token id); false where no head does or the one that does has too many tokens.
template <typename Holds>
bool sorted_head(LogitRow row, float largest, Holds holds, RowScratch& scratch) {
  size_t head = 0;
  while (head < kHeadNats.size() && !holds(head)) ++head;
  if (head == kHeadNats.size() || !collect_above(row, largest - kHeadNats[head], scratch)) {
    return false;
  }
  const float* logits = row.data;
  std::sort(scratch.tokens.begin(), scratch.tokens.end(), [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  return true;
}

// How many of the first `count` sorted head tokens top-p keeps: while the tokens before one
// weigh less than `target`, it stays (the first always does). `reached`: whether they weigh
// that much.
struct MassCut {
  size_t kept = 0;
  bool reached = false;
};

MassCut cut_at_mass(const RowScratch& scratch, size_t count, double target) {
  double before = 0.0;
  size_t kept = 0;
  while (kept < count && (kept == 0 || before < target)) {
    before += scratch.weights[scratch.tokens[kept++]];
  }
  return {kept, before >= target};
}

// Cuts every token after the sorted head's `kept` first.
void keep_first(LogitRow row, const RowScratch& scratch, size_t kept) {
  const int32_t last_kept = scratch.tokens[kept - 1];
  const float cut = row.data[last_kept];
#pragma omp simd
  for (int64_t v = 0; v < row.vocab; ++v) {
    const float logit = row.data[v];
    const bool stays = logit > cut || (logit == cut && v <= last_kept);
    row.data[v] = stays ? logit : -std::numeric_limits<float>::infinity();
  }
}

// Each token's key for the buckets of top-k and top-p: its distance below the largest logit.
void key_by_distance(LogitRow row, float largest, RowScratch& scratch) {
#pragma omp simd
  for (int64_t v = 0; v < row.vocab; ++v) scratch.keys[v] = largest - row.data[v];
}

// Top-p alone: in the narrowest head that holds the target where it can, else by buckets of
// each token's distance below the largest logit.
void top_p_row(LogitRow row, float top_p, RowScratch& scratch) {
  const float largest = block_maxima(row.data, row.vocab, scratch.block_max);
  const HeadMasses masses = weigh_heads(row.data, row.vocab, largest, scratch.weights.data());
  const double target = top_p * masses.total;
  const auto holds = [&](size_t head) { return masses.heads[head] >= target; };
  // A row without weight (every logit NaN or -inf, or one +inf) goes to the buckets, which cut
  // every token of it.
  if (masses.total > 0.0 && sorted_head(row, largest, holds, scratch)) {
    // Summed token by token, the head can fall just short of the target its sum reached.
    const MassCut cut = cut_at_mass(scratch, scratch.tokens.size(), target);
    if (cut.reached) {
      keep_first(row, scratch, cut.kept);
      return;
    }
  }
  key_by_distance(row, largest, scratch);
  keep_mass(row, target, scratch);
}

// Top-k, then top-p over the k tokens kept, by buckets (keys and weights filled).
void top_k_by_buckets(LogitRow row, int64_t top_k, float top_p, RowScratch& scratch) {
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

// Top-k, then top-p over the k tokens kept: in the narrowest head of at least k tokens where
// there is one, else by buckets.
void top_k_row(LogitRow row, int64_t top_k, float top_p, RowScratch& scratch) {
  const float largest = block_maxima(row.data, row.vocab, scratch.block_max);
  const HeadMasses masses = weigh_heads(row.data, row.vocab, largest, scratch.weights.data());
  const auto holds = [&](size_t head) { return masses.counts[head] >= top_k; };
  const size_t k = static_cast<size_t>(top_k);
  if (masses.total > 0.0 && sorted_head(row, largest, holds, scratch) &&
      scratch.tokens.size() >= k) {
    size_t kept = k;
    if (top_p < 1.f) {
      double total = 0.0;
      for (size_t i = 0; i < k; ++i) total += scratch.weights[scratch.tokens[i]];
      kept = cut_at_mass(scratch, k, top_p * total).kept;
    }
    keep_first(row, scratch, kept);
    return;
  }
  key_by_distance(row, largest, scratch);
  top_k_by_buckets(row, top_k, top_p, scratch);
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

// The first token whose running weight passes target (a token with weight), searched as the
// PyTorch draw does: the first block whose running end passes it, then that block's tokens one
// by one. Where rounding leaves the target at the very top, or the block's tokens summed one by
// one fall short of its sum, the last token with weight before the block's end.
int64_t invert(const float* weights, int64_t vocab, const double* block_sums, double target) {
  const int64_t blocks = blocks_of(vocab);
  double end = 0.0;
  int64_t block = 0;
  while (block < blocks - 1 && !(end + block_sums[block] > target)) end += block_sums[block++];
  const int64_t start = block * kBlock;
  double within = 0.0;
  for (int64_t v = start; v < std::min(vocab, start + kBlock); ++v) {
    if (weights[v] <= 0.f) continue;
    within += weights[v];
    if (end + within > target) return v;
  }
  int64_t last = std::min(vocab, start + kBlock) - 1;
  while (last > 0 && !(weights[last] > 0.f)) --last;
  return last;
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

// A step's float32 logits and one checked parameter per row, for the cuts that take one.
template <typename Parameter>
struct RowsWith {
  float* data;
  int64_t stride;
  int64_t num_rows;
  int64_t vocab;
  const Parameter* parameters;

  LogitRow row(int64_t r) const { return {data + r * stride, vocab}; }
};

template <typename Parameter>
RowsWith<Parameter> rows_with(at::Tensor& logits, const at::Tensor& parameters,
                              at::ScalarType dtype, const char* message) {
  check_float_rows(logits);
  check_per_row(parameters, dtype, logits.size(0), message);
  return {logits.data_ptr<float>(), logits.stride(0), logits.size(0), logits.size(1),
          parameters.data_ptr<Parameter>()};
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
      if (has_top_k) {
        top_k_row(row, ks[r], ps[r], scratch);
      } else {
        top_p_row(row, ps[r], scratch);
      }
    }
  });
}

void min_p_(at::Tensor& logits, const at::Tensor& min_p) {
  const auto rows = rows_with<float>(logits, min_p, at::kFloat, "min_p must be float32 [rows]");
  at::parallel_for(0, rows.num_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (!(rows.parameters[r] > 0.f)) continue;
      const LogitRow row = rows.row(r);
      const float threshold = row_max(row.data, row.vocab) + std::log(rows.parameters[r]);
      constexpr float kCut = -std::numeric_limits<float>::infinity();
#pragma omp simd
      for (int64_t v = 0; v < row.vocab; ++v) {
        row.data[v] = row.data[v] < threshold ? kCut : row.data[v];
      }
    }
  });
}

void typical_p_(at::Tensor& logits, const at::Tensor& typical_p) {
  const auto rows =
      rows_with<float>(logits, typical_p, at::kFloat, "typical_p must be float32 [rows]");
  at::parallel_for(0, rows.num_rows, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch(rows.vocab);
    for (int64_t r = begin; r < end; ++r) {
      if (rows.parameters[r] < 1.f) typical_row(rows.row(r), rows.parameters[r], scratch);
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
    std::vector<double> block_sums(blocks_of(vocab));
    for (int64_t r = begin; r < end; ++r) {
      const float* row = data + r * stride;
      const float largest = row_max(row, vocab);
      const double total = weigh_blocks(row, vocab, largest, weights.data(), block_sums.data());
      // A row without weight draws token 0, as the PyTorch draw does.
      ids[r] = total > 0.0 ? invert(weights.data(), vocab, block_sums.data(), us[r] * total) : 0;
      log_total[r] = largest + static_cast<float>(std::log(total));
    }
  });
  return {token_ids, log_totals};
}

}  // namespace sluice
