// Small text and hashing primitives shared by the reader, the gate and the selector.
//
// - splitmix64: the 64-bit finalizer of Steele et al.; a bijection with full avalanche, used both
//   as a hash mixer and as a counter-based random generator (value i of stream s is
//   splitmix64(s ^ splitmix64(i))), so a random number depends only on (seed, index), never on
//   which thread drew it.
// - fnv1a64: FNV-1a over bytes, optionally ASCII-lowercased (the word hash of the gate).
// - UTF-8: validation (RFC 3629: no overlongs, no surrogates, <= U+10FFFF) and code-point counting.
// tsqlora_ext/reference.py mirrors these bit for bit in its "text heuristics" section.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace tsq::data {

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001b3ULL;

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A uniform double in (0, 1), never 0 or 1, from (seed, index).
inline double uniform_open01(uint64_t seed, uint64_t index) {
  uint64_t bits = splitmix64(seed ^ splitmix64(index));
  return (static_cast<double>(bits >> 11) + 0.5) * 0x1.0p-53;
}

inline char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c; }

inline uint64_t fnv1a64(std::string_view s, bool lowercase) {
  uint64_t h = kFnvOffset;
  for (char c : s) {
    h ^= static_cast<unsigned char>(lowercase ? ascii_lower(c) : c);
    h *= kFnvPrime;
  }
  return h;
}

// The gate's whitespace: ASCII space, \t, \n, \v, \f, \r (Unicode spaces count as word characters).
inline bool is_ascii_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

// Code points of the scripts written without spaces between words that are split at every
// character, each a word of its own (as BERT's tokenizer splits CJK ideographs): the CJK
// ideographs and Hiragana / Katakana. Otherwise a whole Chinese or Japanese sentence would be one
// "word": dropped as too short, and never a near duplicate. (Thai, Lao, Khmer and Myanmar are not:
// a code point there is often a vowel sign or tone mark, and character n-grams of them repeat far
// more than the word n-gram rules allow.)
inline bool is_own_word(uint32_t cp) {
  return (cp >= 0x3040 && cp <= 0x30FF) || (cp >= 0x31F0 && cp <= 0x31FF) ||
         (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x4E00 && cp <= 0x9FFF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x20000 && cp <= 0x3FFFF);
}

// Byte offset of the first invalid UTF-8 sequence in s, or -1 when s is valid UTF-8.
inline int64_t find_invalid_utf8(const char* data, size_t n) {
  const auto* s = reinterpret_cast<const unsigned char*>(data);
  size_t i = 0;
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      __builtin_memcpy(&w, s + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    unsigned char c = s[i];
    if (c < 0x80) { ++i; continue; }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
    else return static_cast<int64_t>(i);
    if (i + len > n) return static_cast<int64_t>(i);
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return static_cast<int64_t>(i);
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
      return static_cast<int64_t>(i);
    i += len;
  }
  return -1;
}

// Number of code points of valid UTF-8 (every byte that is not a continuation byte).
inline int64_t count_code_points(std::string_view s) {
  int64_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

}  // namespace tsq::data
