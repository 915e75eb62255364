// The heuristic gate (rules and definitions in heuristics.h).
#include "data/heuristics.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <unordered_map>

#include "data/text_util.h"
#include "data/thread_pool.h"

namespace tsq::data {

const char* reason_name(DropReason r) {
  static const char* names[kNumGateReasons] = {
      "kept", "empty", "too_short", "too_long", "symbol_ratio", "non_alpha_ratio",
      "repeated_lines", "repeated_ngrams", "exact_duplicate", "near_duplicate"};
  return names[static_cast<int>(r)];
}

std::vector<std::string> feature_names(const GateConfig& cfg) {
  std::vector<std::string> names = {"words", "chars", "symbol_ratio", "non_alpha_ratio", "dup_line_frac"};
  for (auto& [n, thr] : cfg.top_ngram) names.push_back("top_ngram_" + std::to_string(n));
  for (auto& [n, thr] : cfg.dup_ngram) names.push_back("dup_ngram_" + std::to_string(n));
  return names;
}

namespace {

// A "letter": ASCII letters, Latin-1/Latin Extended-A/B letters (U+00C0-U+024F but × and ÷), and
// every code point from U+0370 on outside the punctuation/symbol blocks U+2000-U+2BFF,
// U+3000-U+303F, U+FE00-U+FFFF and U+1F000-U+1FAFF (emoji).
bool is_letter(uint32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  if (cp >= 0xC0 && cp <= 0x24F) return cp != 0xD7 && cp != 0xF7;
  if (cp < 0x370) return false;
  if (cp >= 0x2000 && cp <= 0x2BFF) return false;
  if (cp >= 0x3000 && cp <= 0x303F) return false;
  if (cp >= 0xFE00 && cp <= 0xFFFF) return false;
  if (cp >= 0x1F000 && cp <= 0x1FAFF) return false;
  return true;
}

// Decodes the code point at s[i] and advances i. Valid UTF-8 is expected, but an Arrow buffer may
// end a text inside a sequence: i then stops at the text's end, so no caller reads past it.
uint32_t next_code_point(std::string_view s, size_t& i) {
  auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) { ++i; return c; }
  const int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
  uint32_t cp = c & (0x7F >> len);
  const size_t end = std::min(i + len, s.size());
  for (size_t k = i + 1; k < end; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[k]) & 0x3F);
  i = end;
  return cp;
}

struct Word {
  uint32_t begin, end;  // byte span in the text
  int64_t chars;        // code points
  uint64_t hash;        // fnv1a64 of the ASCII-lowercased bytes
  bool has_letter;
};

// Words: maximal runs of code points that are neither ASCII whitespace nor is_own_word, and each
// is_own_word code point alone.
void split_words(std::string_view t, std::vector<Word>& words) {
  words.clear();
  size_t i = 0;
  while (i < t.size()) {
    while (i < t.size() && is_ascii_space(static_cast<unsigned char>(t[i]))) ++i;
    if (i >= t.size()) break;
    Word w{static_cast<uint32_t>(i), 0, 0, kFnvOffset, false};
    while (i < t.size() && !is_ascii_space(static_cast<unsigned char>(t[i]))) {
      size_t start = i;
      uint32_t cp = next_code_point(t, i);
      const bool alone = is_own_word(cp);
      if (alone && w.chars > 0) {  // it ends the run before it, and starts again here
        i = start;
        break;
      }
      w.chars += 1;
      w.has_letter |= is_letter(cp);
      for (size_t k = start; k < i; ++k) {
        w.hash ^= static_cast<unsigned char>(ascii_lower(t[k]));
        w.hash *= kFnvPrime;
      }
      if (alone) break;
    }
    w.end = static_cast<uint32_t>(i);
    words.push_back(w);
  }
}

// The n-gram key: words' hashes folded FNV-style (the same fold makes the shingle hashes).
inline uint64_t fold(const Word* w, int64_t n) {
  uint64_t h = kFnvOffset;
  for (int64_t k = 0; k < n; ++k) h = (h ^ w[k].hash) * kFnvPrime;
  return h;
}

int64_t symbol_count(std::string_view t) {
  int64_t n = 0;
  for (size_t i = 0; i < t.size();) {
    if (t[i] == '#') { ++n; ++i; continue; }
    if (t.compare(i, 3, "...") == 0) { ++n; i += 3; continue; }
    if (t.compare(i, 3, "\xE2\x80\xA6") == 0) { ++n; i += 3; continue; }  // U+2026 …
    ++i;
  }
  return n;
}

double dup_line_frac(std::string_view t, std::vector<uint64_t>& scratch) {
  scratch.clear();
  size_t i = 0;
  while (i <= t.size()) {
    size_t nl = t.find('\n', i);
    if (nl == std::string_view::npos) nl = t.size();
    size_t a = i, b = nl;
    while (a < b && is_ascii_space(static_cast<unsigned char>(t[a]))) ++a;
    while (b > a && is_ascii_space(static_cast<unsigned char>(t[b - 1]))) --b;
    if (b > a) scratch.push_back(fnv1a64(t.substr(a, b - a), false));
    i = nl + 1;
  }
  if (scratch.empty()) return 0.0;
  size_t total = scratch.size();
  std::sort(scratch.begin(), scratch.end());
  size_t distinct = std::unique(scratch.begin(), scratch.end()) - scratch.begin();
  return static_cast<double>(total - distinct) / static_cast<double>(total);
}

// Scratch buffers reused across the documents of one chunk.
struct Scratch {
  std::vector<Word> words;
  std::vector<uint64_t> lines;
  std::vector<std::pair<uint64_t, int64_t>> grams;  // (key, start)
  std::vector<int64_t> prefix;                      // prefix[i] = chars of words [0, i)
  std::vector<uint8_t> covered;
};

// top: max over repeated n-grams of count·chars / total;  dup: covered chars / total.
void ngram_fracs(Scratch& s, int64_t n, double total, double* top, double* dup) {
  const auto& words = s.words;
  const int64_t m = static_cast<int64_t>(words.size()) - n + 1;
  *top = *dup = 0.0;
  if (m < 2 || total <= 0) return;
  s.grams.resize(m);
  for (int64_t i = 0; i < m; ++i) s.grams[i] = {fold(&words[i], n), i};
  std::sort(s.grams.begin(), s.grams.end());
  s.covered.assign(words.size(), 0);
  int64_t best = 0;
  for (int64_t a = 0; a < m;) {
    int64_t b = a;
    while (b < m && s.grams[b].first == s.grams[a].first) ++b;
    int64_t count = b - a;
    if (count >= 2) {
      int64_t start = s.grams[a].second;
      best = std::max(best, count * (s.prefix[start + n] - s.prefix[start]));
      for (int64_t k = a; k < b; ++k)
        std::fill_n(s.covered.begin() + s.grams[k].second, n, 1);
    }
    a = b;
  }
  int64_t cov = 0;
  for (size_t w = 0; w < words.size(); ++w)
    if (s.covered[w]) cov += words[w].chars;
  *top = static_cast<double>(best) / total;
  *dup = static_cast<double>(cov) / total;
}

// Word-sequence equality after ASCII lowercasing (the exact-duplicate test behind a hash match).
bool same_words(std::string_view a, std::string_view b) {
  size_t i = 0, j = 0;
  for (;;) {
    while (i < a.size() && is_ascii_space(static_cast<unsigned char>(a[i]))) ++i;
    while (j < b.size() && is_ascii_space(static_cast<unsigned char>(b[j]))) ++j;
    if (i >= a.size() || j >= b.size()) return i >= a.size() && j >= b.size();
    while (i < a.size() && j < b.size() && !is_ascii_space(static_cast<unsigned char>(a[i])) &&
           !is_ascii_space(static_cast<unsigned char>(b[j]))) {
      if (ascii_lower(a[i]) != ascii_lower(b[j])) return false;
      ++i, ++j;
    }
    bool end_a = i >= a.size() || is_ascii_space(static_cast<unsigned char>(a[i]));
    bool end_b = j >= b.size() || is_ascii_space(static_cast<unsigned char>(b[j]));
    if (end_a != end_b) return false;
  }
}

}  // namespace

GateResult run_gate(const std::vector<std::string_view>& texts, const GateConfig& cfg, int num_threads) {
  for (auto& [n, thr] : cfg.top_ngram)
    if (n < 1) throw std::invalid_argument("gate: top_ngram sizes must be >= 1");
  for (auto& [n, thr] : cfg.dup_ngram)
    if (n < 1) throw std::invalid_argument("gate: dup_ngram sizes must be >= 1");
  if (cfg.near_dup && (cfg.shingle_size < 1 || cfg.bands < 1 || cfg.rows < 1))
    throw std::invalid_argument("gate: shingle_size, bands and rows must be >= 1");

  const int64_t n = static_cast<int64_t>(texts.size());
  const int64_t nt = static_cast<int64_t>(cfg.top_ngram.size());
  const int64_t nf = 5 + nt + static_cast<int64_t>(cfg.dup_ngram.size());
  GateResult out;
  out.num_features = nf;
  out.reasons.assign(n, 0);
  out.features.assign(n * nf, 0.0);
  std::vector<uint64_t> exact_hash(n, 0);
  auto pool = shared_pool(num_threads);

  // 1. Per-document features and rules.
  pool->parallel_for(n, 64, [&](int64_t lo, int64_t hi) {
    Scratch s;
    for (int64_t d = lo; d < hi; ++d) {
      std::string_view t = texts[d];
      double* f = &out.features[d * nf];
      split_words(t, s.words);
      const int64_t nw = static_cast<int64_t>(s.words.size());
      s.prefix.assign(nw + 1, 0);
      int64_t no_letter = 0;
      for (int64_t k = 0; k < nw; ++k) {
        s.prefix[k + 1] = s.prefix[k] + s.words[k].chars;
        no_letter += !s.words[k].has_letter;
      }
      const double chars = static_cast<double>(s.prefix[nw]);
      f[0] = static_cast<double>(nw);
      f[1] = chars;
      f[2] = static_cast<double>(symbol_count(t)) / static_cast<double>(std::max<int64_t>(nw, 1));
      f[3] = nw ? static_cast<double>(no_letter) / static_cast<double>(nw) : 0.0;
      f[4] = dup_line_frac(t, s.lines);
      bool ngram_fail = false;
      if (cfg.repeated_ngrams && nw >= cfg.ngram_min_words) {
        for (int64_t k = 0; k < nt; ++k) {
          double top, dup;
          ngram_fracs(s, cfg.top_ngram[k].first, chars, &top, &dup);
          f[5 + k] = top;
          ngram_fail |= top > cfg.top_ngram[k].second;
        }
        for (size_t k = 0; k < cfg.dup_ngram.size(); ++k) {
          double top, dup;
          ngram_fracs(s, cfg.dup_ngram[k].first, chars, &top, &dup);
          f[5 + nt + k] = dup;
          ngram_fail |= dup > cfg.dup_ngram[k].second;
        }
      }
      DropReason r = DropReason::kept;
      if (cfg.length && nw == 0) r = DropReason::empty;
      else if (cfg.length && nw < cfg.min_words) r = DropReason::too_short;
      else if (cfg.length && nw > cfg.max_words) r = DropReason::too_long;
      else if (cfg.symbol_ratio && f[2] > cfg.max_symbol_ratio) r = DropReason::symbol_ratio;
      else if (cfg.non_alpha_ratio && f[3] > cfg.max_non_alpha_ratio) r = DropReason::non_alpha_ratio;
      else if (cfg.repeated_lines && f[4] > cfg.max_dup_line_frac) r = DropReason::repeated_lines;
      else if (ngram_fail) r = DropReason::repeated_ngrams;
      out.reasons[d] = static_cast<uint8_t>(r);
      if (cfg.exact_dup) exact_hash[d] = fold(s.words.data(), nw);
    }
  });

  // 2. Exact duplicates, in index order: the first of each group stays.
  if (cfg.exact_dup) {
    std::unordered_map<uint64_t, std::vector<int64_t>> seen;
    seen.reserve(n);
    for (int64_t d = 0; d < n; ++d) {
      if (out.reasons[d] != 0) continue;
      auto& group = seen[exact_hash[d]];
      bool dup = false;
      for (int64_t e : group)
        if ((dup = same_words(texts[e], texts[d]))) break;
      if (dup) out.reasons[d] = static_cast<uint8_t>(DropReason::exact_duplicate);
      else group.push_back(d);
    }
  }
  if (!cfg.near_dup) return out;

  // 3. MinHash signatures of the eligible documents: value j = high 32 bits of
  //    min over shingles s of splitmix64(hash(s) ^ perm_seed[j]).
  std::vector<int64_t> eligible;
  for (int64_t d = 0; d < n; ++d)
    if (out.reasons[d] == 0) eligible.push_back(d);
  const int64_t ne = static_cast<int64_t>(eligible.size());
  const int64_t P = cfg.bands * cfg.rows;
  std::vector<uint64_t> perm_seed(P);
  for (int64_t j = 0; j < P; ++j) perm_seed[j] = splitmix64(cfg.minhash_seed + static_cast<uint64_t>(j));
  std::vector<uint32_t> sig(ne * P, 0);
  std::vector<uint8_t> has_sig(ne, 0);
  pool->parallel_for(ne, 64, [&](int64_t lo, int64_t hi) {
    std::vector<Word> words;
    std::vector<uint64_t> mins(P);
    for (int64_t e = lo; e < hi; ++e) {
      split_words(texts[eligible[e]], words);
      const int64_t nw = static_cast<int64_t>(words.size());
      if (nw == 0) continue;
      const int64_t width = std::min(nw, cfg.shingle_size);
      std::fill(mins.begin(), mins.end(), ~0ULL);
      for (int64_t i = 0; i + width <= nw; ++i) {
        uint64_t sh = splitmix64(fold(&words[i], width));
        for (int64_t j = 0; j < P; ++j) mins[j] = std::min(mins[j], splitmix64(sh ^ perm_seed[j]));
      }
      for (int64_t j = 0; j < P; ++j) sig[e * P + j] = static_cast<uint32_t>(mins[j] >> 32);
      has_sig[e] = 1;
    }
  });

  // 4. One sorted (band hash, eligible position) table per band.
  std::vector<std::vector<std::pair<uint64_t, int64_t>>> tables(cfg.bands);
  pool->parallel_for(cfg.bands, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      auto& tab = tables[b];
      tab.reserve(ne);
      for (int64_t e = 0; e < ne; ++e) {
        if (!has_sig[e]) continue;
        uint64_t h = static_cast<uint64_t>(b);
        for (int64_t r = 0; r < cfg.rows; ++r) h = splitmix64(h ^ sig[e * P + b * cfg.rows + r]);
        tab.emplace_back(h, e);
      }
      std::sort(tab.begin(), tab.end());
    }
  });

  // 5. A document is a near duplicate when an earlier eligible one in a shared bucket agrees on
  //    enough min-hashes.
  const double need = cfg.near_dup_threshold * static_cast<double>(P);
  pool->parallel_for(ne, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) {
      if (!has_sig[e]) continue;
      bool dup = false;
      for (int64_t b = 0; b < cfg.bands && !dup; ++b) {
        uint64_t h = static_cast<uint64_t>(b);
        for (int64_t r = 0; r < cfg.rows; ++r) h = splitmix64(h ^ sig[e * P + b * cfg.rows + r]);
        const auto& tab = tables[b];
        auto it = std::lower_bound(tab.begin(), tab.end(), std::make_pair(h, int64_t{0}));
        for (; it != tab.end() && it->first == h && it->second < e; ++it) {
          const uint32_t* x = &sig[e * P];
          const uint32_t* y = &sig[it->second * P];
          int64_t agree = 0;
          for (int64_t j = 0; j < P; ++j) agree += x[j] == y[j];
          if (static_cast<double>(agree) >= need) { dup = true; break; }
        }
      }
      if (dup) out.reasons[eligible[e]] = static_cast<uint8_t>(DropReason::near_duplicate);
    }
  });
  return out;
}

}  // namespace tsq::data
