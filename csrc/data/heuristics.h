// The heuristic quality gate: model-free rules that drop documents before any scoring.
//
// Words are maximal runs of non-whitespace (ASCII whitespace only), except that each CJK ideograph
// and kana is a word of its own (is_own_word in text_util.h; Thai and other scripts written
// without spaces are not split, so their short texts fall below min_words); a word's length is its number of code points; "chars" of a
// document is the sum of its word lengths. Rules, in the order a
// document is tested (the first failing rule is its drop reason):
//   length           0 words -> empty; < min_words -> too_short; > max_words -> too_long
//   symbol_ratio     (#'#' + #'...' + #'…') / words  > max_symbol_ratio           (Gopher)
//   non_alpha_ratio  share of words without a letter > max_non_alpha_ratio        (Gopher)
//   repeated_lines   share of non-blank lines (stripped) equal to an earlier line > max_dup_line_frac
//   repeated_ngrams  over word n-grams (ASCII-lowercased words), for docs of >= ngram_min_words:
//                    top:  max over repeated n-grams g of count(g)·chars(g) / chars  > top_ngram[n]
//                    dup:  chars of words covered by a repeated n-gram / chars       > dup_ngram[n]
//   exact_duplicate  same ASCII-lowercased word sequence as an earlier kept-so-far document
//   near_duplicate   MinHash-LSH over word shingles of `shingle_size` words: `bands` × `rows`
//                    32-bit min-hashes; candidates share a band; confirmed when the share of equal
//                    min-hashes with an earlier eligible document is >= near_dup_threshold.
// Only documents passing the per-document rules take part in deduplication, and the earliest
// document of a duplicate group is the one kept. Every stage computes per-document outputs or walks
// documents in index order, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tsq::data {

enum class DropReason : uint8_t {
  kept = 0,
  empty,
  too_short,
  too_long,
  symbol_ratio,
  non_alpha_ratio,
  repeated_lines,
  repeated_ngrams,
  exact_duplicate,
  near_duplicate,
};
constexpr int kNumGateReasons = 10;
const char* reason_name(DropReason r);

struct GateConfig {
  bool length = true;
  int64_t min_words = 3;
  int64_t max_words = 100000;
  bool symbol_ratio = true;
  double max_symbol_ratio = 0.1;
  bool non_alpha_ratio = true;
  double max_non_alpha_ratio = 0.2;
  bool repeated_lines = true;
  double max_dup_line_frac = 0.3;
  bool repeated_ngrams = true;
  int64_t ngram_min_words = 50;
  std::vector<std::pair<int64_t, double>> top_ngram = {{2, 0.20}, {3, 0.18}, {4, 0.16}};
  std::vector<std::pair<int64_t, double>> dup_ngram = {{5, 0.15}, {6, 0.14}, {7, 0.13},
                                                       {8, 0.12}, {9, 0.11}, {10, 0.10}};
  bool exact_dup = true;
  bool near_dup = true;
  int64_t shingle_size = 5;
  int64_t bands = 20;
  int64_t rows = 5;
  double near_dup_threshold = 0.7;
  uint64_t minhash_seed = 0x5eed;
};

// The per-document features, in column order: words, chars, symbol_ratio, non_alpha_ratio,
// dup_line_frac, then top_ngram_<n> for each top_ngram entry and dup_ngram_<n> for each dup_ngram.
std::vector<std::string> feature_names(const GateConfig& cfg);

struct GateResult {
  std::vector<uint8_t> reasons;  // [n] DropReason
  std::vector<double> features;  // [n, num_features] row-major
  int64_t num_features = 0;
};

GateResult run_gate(const std::vector<std::string_view>& texts, const GateConfig& cfg, int num_threads);

}  // namespace tsq::data
