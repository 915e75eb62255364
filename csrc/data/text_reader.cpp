// jsonl and csv/tsv readers (see text_reader.h for the contract).
#include "data/text_reader.h"

#include <cstring>
#include <fstream>
#include <optional>
#include <stdexcept>

#include "data/text_util.h"
#include "data/thread_pool.h"

namespace tsq::data {
namespace {

std::string base_name(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::invalid_argument(path + ": cannot open file");
  std::streamsize size = f.tellg();
  f.seekg(0);
  std::string data(static_cast<size_t>(size), '\0');
  if (size > 0 && !f.read(data.data(), size)) throw std::invalid_argument(path + ": read failed");
  return data;
}

// Bytes of a leading UTF-8 byte-order mark (some editors and spreadsheet exports start a file so).
int64_t bom_size(const std::string& buf) { return buf.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0; }

struct ParseError {
  std::string what;
};

// A strict JSON parser over one line that decodes only the wanted top-level fields.
class JsonLine {
 public:
  JsonLine(std::string_view s, const std::string& text_field, const std::string& label_field)
      : s_(s), text_field_(text_field), label_field_(label_field) {}

  // Fills text/label; throws ParseError. `label` stays nullopt when the field is absent.
  void parse(std::optional<std::string>& text, std::optional<std::string>& label) {
    skip_ws();
    if (peek() != '{') fail("expected a JSON object");
    ++p_;
    skip_ws();
    if (peek() == '}') {
      ++p_;
    } else {
      for (;;) {
        skip_ws();
        if (peek() != '"') fail("expected a string key");
        std::string key = parse_string();
        skip_ws();
        if (peek() != ':') fail("expected ':' after a key");
        ++p_;
        skip_ws();
        if (key == text_field_) {
          if (peek() != '"') {
            skip_value(0);
            throw ParseError{"field '" + text_field_ + "' is not a string"};
          }
          text = parse_string();
        } else if (!label_field_.empty() && key == label_field_) {
          label = parse_label();
        } else {
          skip_value(0);
        }
        skip_ws();
        if (peek() == ',') { ++p_; continue; }
        if (peek() == '}') { ++p_; break; }
        fail("expected ',' or '}'");
      }
    }
    skip_ws();
    if (p_ != s_.size()) fail("unexpected text after the JSON object");
  }

 private:
  char peek() const { return p_ < s_.size() ? s_[p_] : '\0'; }
  [[noreturn]] void fail(const std::string& msg) const {
    throw ParseError{"malformed JSON: " + msg + " at column " + std::to_string(p_ + 1)};
  }
  void skip_ws() {
    while (p_ < s_.size() && (s_[p_] == ' ' || s_[p_] == '\t' || s_[p_] == '\r' || s_[p_] == '\n')) ++p_;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t parse_hex4() {
    if (p_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[p_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad hex digit in \\u escape");
    }
    return v;
  }

  // At the opening quote; returns the decoded string (UTF-8 was validated for the whole line).
  std::string parse_string() {
    ++p_;
    std::string out;
    for (;;) {
      size_t run = p_;
      while (p_ < s_.size() && s_[p_] != '"' && s_[p_] != '\\' &&
             static_cast<unsigned char>(s_[p_]) >= 0x20)
        ++p_;
      out.append(s_.data() + run, p_ - run);
      if (p_ >= s_.size()) fail("unterminated string");
      char c = s_[p_];
      if (c == '"') { ++p_; return out; }
      if (c != '\\') fail("raw control character in a string");
      ++p_;
      if (p_ >= s_.size()) fail("unterminated string");
      char e = s_[p_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (p_ + 2 > s_.size() || s_[p_] != '\\' || s_[p_ + 1] != 'u')
              fail("lone surrogate in \\u escape (not valid UTF-8 text)");
            p_ += 2;
            uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("lone surrogate in \\u escape (not valid UTF-8 text)");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("lone surrogate in \\u escape (not valid UTF-8 text)");
          }
          append_utf8(out, cp);
          break;
        }
        default: fail(std::string("bad escape \\") + e);
      }
    }
  }

  void parse_number() {
    size_t start = p_;
    if (peek() == '-') ++p_;
    if (peek() == '0') {
      ++p_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++p_;
    } else {
      p_ = start;
      fail("invalid value");
    }
    if (peek() == '.') {
      ++p_;
      if (!(peek() >= '0' && peek() <= '9')) fail("digit expected after '.'");
      while (peek() >= '0' && peek() <= '9') ++p_;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++p_;
      if (peek() == '+' || peek() == '-') ++p_;
      if (!(peek() >= '0' && peek() <= '9')) fail("digit expected in exponent");
      while (peek() >= '0' && peek() <= '9') ++p_;
    }
  }

  bool literal(std::string_view word) {
    if (s_.substr(p_, word.size()) == word) { p_ += word.size(); return true; }
    return false;
  }

  // A label is a string, a number or a boolean; numbers and booleans keep their JSON text.
  std::string parse_label() {
    char c = peek();
    if (c == '"') return parse_string();
    size_t start = p_;
    if (c == '-' || (c >= '0' && c <= '9')) {
      parse_number();
    } else if (!literal("true") && !literal("false")) {
      skip_value(0);
      throw ParseError{"field '" + label_field_ + "' must be a string, number or boolean"};
    }
    return std::string(s_.substr(start, p_ - start));
  }

  void skip_value(int depth) {
    if (depth > 512) fail("nesting deeper than 512");
    char c = peek();
    if (c == '"') { parse_string(); return; }
    if (c == '{' || c == '[') {
      char close = c == '{' ? '}' : ']';
      ++p_;
      skip_ws();
      if (peek() == close) { ++p_; return; }
      for (;;) {
        skip_ws();
        if (c == '{') {
          if (peek() != '"') fail("expected a string key");
          parse_string();
          skip_ws();
          if (peek() != ':') fail("expected ':' after a key");
          ++p_;
          skip_ws();
        }
        skip_value(depth + 1);
        skip_ws();
        if (peek() == ',') { ++p_; continue; }
        if (peek() == close) { ++p_; return; }
        fail(std::string("expected ',' or '") + close + "'");
      }
    }
    if (literal("true") || literal("false") || literal("null")) return;
    parse_number();
  }

  std::string_view s_;
  size_t p_ = 0;
  const std::string& text_field_;
  const std::string& label_field_;
};

// An empty or all-blank label names no class (it would become a class of its own).
bool blank_text(const std::string& s) {
  for (char c : s)
    if (!is_ascii_space(static_cast<unsigned char>(c))) return false;
  return true;
}

std::string line_prefix(int64_t line, const std::string& source) {
  return "line " + std::to_string(line) + " of " + source + ": ";
}

std::optional<std::string> check_record(std::string_view rec, int64_t max_line_bytes) {
  if (static_cast<int64_t>(rec.size()) > max_line_bytes)
    return std::to_string(rec.size()) + " bytes, over the max_line_bytes limit of " +
           std::to_string(max_line_bytes);
  int64_t bad = find_invalid_utf8(rec.data(), rec.size());
  if (bad >= 0) return "invalid UTF-8 at byte " + std::to_string(bad) + " of the line";
  return std::nullopt;
}

// Either throws (strict) or records the bad record.
void report_bad(TextTable& t, const ReadOptions& opts, int64_t line, const std::string& msg) {
  std::string full = line_prefix(line, t.source) + msg;
  if (!opts.skip_bad) throw std::invalid_argument(full);
  t.bad.push_back({line, std::move(full)});
}

void check_not_empty(const TextTable& t) {
  if (t.num_rows() > 0) return;
  if (t.bad.empty()) throw std::invalid_argument(t.source + ": empty input (no records)");
  throw std::invalid_argument(t.source + ": no valid records (" + std::to_string(t.bad.size()) +
                              " bad, the first: " + t.bad.front().message + ")");
}

}  // namespace

TextTable read_jsonl(const std::string& path, const ReadOptions& opts) {
  TextTable t;
  t.source = base_name(path);
  t.buffer = read_file(path);
  const std::string& buf = t.buffer;

  // Line spans (without "\n" or "\r\n"); blank lines are not records.
  std::vector<int64_t> begins, ends, lines;
  int64_t pos = bom_size(buf), line = 1, n = static_cast<int64_t>(buf.size());
  t.header_end = pos;
  while (pos < n) {
    const void* nl = std::memchr(buf.data() + pos, '\n', n - pos);
    int64_t end = nl ? static_cast<const char*>(nl) - buf.data() : n;
    int64_t e = (end > pos && buf[end - 1] == '\r') ? end - 1 : end;
    bool blank = true;
    for (int64_t k = pos; k < e && blank; ++k) blank = is_ascii_space(buf[k]);
    if (!blank) {
      // The records' terminator, from the first one (a blank line before it may differ).
      if (begins.empty() && e < end) t.newline = "\r\n";
      begins.push_back(pos);
      ends.push_back(e);
      lines.push_back(line);
    }
    pos = end + 1;
    ++line;
  }

  const int64_t m = static_cast<int64_t>(begins.size());
  std::vector<std::string> texts(m), labels(opts.label_field.empty() ? 0 : m), errors(m);
  std::vector<uint8_t> ok(m, 0);
  shared_pool(opts.num_threads)->parallel_for(m, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      std::string_view rec(buf.data() + begins[i], ends[i] - begins[i]);
      if (auto problem = check_record(rec, opts.max_line_bytes)) {
        errors[i] = *problem;
        continue;
      }
      std::optional<std::string> text, label;
      try {
        JsonLine(rec, opts.text_field, opts.label_field).parse(text, label);
      } catch (const ParseError& e) {
        errors[i] = e.what;
        continue;
      }
      if (!text) { errors[i] = "field '" + opts.text_field + "' missing"; continue; }
      if (!opts.label_field.empty() && !label) {
        errors[i] = "field '" + opts.label_field + "' missing";
        continue;
      }
      if (label && blank_text(*label)) {
        errors[i] = "field '" + opts.label_field + "' is empty";
        continue;
      }
      texts[i] = std::move(*text);
      if (label) labels[i] = std::move(*label);
      ok[i] = 1;
    }
  });

  for (int64_t i = 0; i < m; ++i) {
    if (!ok[i]) {
      report_bad(t, opts, lines[i], errors[i]);
      continue;
    }
    t.texts.push_back(std::move(texts[i]));
    if (!opts.label_field.empty()) t.labels.push_back(std::move(labels[i]));
    t.line_numbers.push_back(lines[i]);
    t.spans.push_back(begins[i]);
    t.spans.push_back(ends[i]);
  }
  check_not_empty(t);
  return t;
}

namespace {

// One csv record: its fields, raw span and the line after it.
struct CsvRecord {
  std::vector<std::string> fields;
  int64_t begin = 0, end = 0;  // raw span without the terminator
  int64_t first_line = 1;
  std::string error;           // non-empty: malformed
};

// Whether the quote at `open` starts a well-formed quoted field: its closing quote (the first one
// not doubled) is followed by the delimiter, a line end or the end of the file. A tsv field that
// merely begins with a quotation ("Best movie ever" said nobody) is not one and is read as text.
bool closes_field(const std::string& buf, int64_t open, char delim) {
  const int64_t n = static_cast<int64_t>(buf.size());
  for (int64_t k = open + 1; k < n; ++k) {
    if (buf[k] != '"') continue;
    if (k + 1 < n && buf[k + 1] == '"') { ++k; continue; }
    const int64_t after = k + 1;
    return after == n || buf[after] == delim || buf[after] == '\n' ||
           (buf[after] == '\r' && (after + 1 == n || buf[after + 1] == '\n'));
  }
  return false;
}

// Parses the record starting at `pos`; advances pos past its terminator and `line` past its lines.
CsvRecord next_csv_record(const std::string& buf, int64_t& pos, int64_t& line, char delim) {
  CsvRecord r;
  r.begin = pos;
  r.first_line = line;
  const int64_t n = static_cast<int64_t>(buf.size());
  std::string field;
  bool quoted = false;     // the current field started with a quote
  bool in_quotes = false;  // inside its quotes
  bool after_quote = false;
  int64_t quote_pos = 0, quote_line = 0;  // where the open quote is
  // A quote that does not close where its field should end: the bad record ends with the line the
  // quote opened on, and reading goes on after it (with skip_bad; otherwise this is the error),
  // rather than taking the lines it swallowed with it.
  auto unterminated = [&](const std::string& how) {
    r.error = "unterminated quoted field (the quote opened on line " + std::to_string(quote_line) + how + ")";
    const void* nl = std::memchr(buf.data() + quote_pos, '\n', n - quote_pos);
    const int64_t eol = nl ? static_cast<const char*>(nl) - buf.data() : n;
    r.end = (eol > r.begin && buf[eol - 1] == '\r') ? eol - 1 : eol;
    pos = eol < n ? eol + 1 : n;
    line = quote_line + 1;
    return r;
  };
  for (;;) {
    if (pos >= n) {
      if (in_quotes) return unterminated(" never closes");
      r.end = n;
      r.fields.push_back(std::move(field));
      return r;
    }
    char c = buf[pos];
    if (in_quotes) {
      if (c == '"') {
        if (pos + 1 < n && buf[pos + 1] == '"') { field += '"'; pos += 2; continue; }
        in_quotes = false;
        after_quote = true;
        ++pos;
        continue;
      }
      if (c == '\n') ++line;
      field += c;
      ++pos;
      continue;
    }
    // A lone \r ends a record only at the end of the file (an editor's last line); elsewhere it is
    // text.
    if (c == '\n' || (c == '\r' && (pos + 1 == n || buf[pos + 1] == '\n'))) {
      r.end = pos;
      pos += c == '\r' && pos + 1 < n ? 2 : 1;
      ++line;
      r.fields.push_back(std::move(field));
      return r;
    }
    if (c == delim) {
      r.fields.push_back(std::move(field));
      field.clear();
      quoted = after_quote = false;
      ++pos;
      continue;
    }
    if (after_quote) {
      // The quote closed on a later line, where the next line's own quoted field opens.
      if (quote_line < line) return unterminated(" closes only on line " + std::to_string(line) + ", mid-field");
      if (r.error.empty())
        r.error = "unexpected character after a closing quote (field " +
                  std::to_string(r.fields.size() + 1) + ")";
      field += c;
      ++pos;
      continue;
    }
    if (c == '"' && field.empty() && !quoted && (delim != '\t' || closes_field(buf, pos, delim))) {
      quoted = in_quotes = true;
      quote_pos = pos, quote_line = line;
      ++pos;
      continue;
    }
    field += c;
    ++pos;
  }
}

bool blank_record(const CsvRecord& r) { return r.fields.size() == 1 && r.fields[0].empty() && r.error.empty(); }

}  // namespace

TextTable read_csv(const std::string& path, char delim, const ReadOptions& opts) {
  TextTable t;
  t.source = base_name(path);
  t.buffer = read_file(path);
  const std::string& buf = t.buffer;
  const int64_t n = static_cast<int64_t>(buf.size());
  int64_t pos = bom_size(buf), line = 1;

  CsvRecord header;
  do {
    if (pos >= n) throw std::invalid_argument(t.source + ": empty input (no header line)");
    header = next_csv_record(buf, pos, line, delim);
  } while (header.end == header.begin && blank_record(header));
  std::string_view raw_header(buf.data() + header.begin, header.end - header.begin);
  if (auto problem = check_record(raw_header, opts.max_line_bytes))
    throw std::invalid_argument(line_prefix(header.first_line, t.source) + "header: " + *problem);
  if (!header.error.empty())
    throw std::invalid_argument(line_prefix(header.first_line, t.source) + "header: " + header.error);
  t.header_end = pos;
  if (header.end < n && buf[header.end] == '\r') t.newline = "\r\n";

  // A name the header holds twice is refused: which column is meant cannot be told (the first
  // one was read, though the text could be in the second).
  auto column = [&](const std::string& name) -> int64_t {
    int64_t found = -1;
    for (size_t k = 0; k < header.fields.size(); ++k) {
      if (header.fields[k] != name) continue;
      if (found >= 0)
        throw std::invalid_argument(line_prefix(header.first_line, t.source) + "header: field '" +
                                    name + "' is both column " + std::to_string(found + 1) +
                                    " and column " + std::to_string(k + 1));
      found = static_cast<int64_t>(k);
    }
    if (found >= 0) return found;
    std::string have;
    for (size_t k = 0; k < header.fields.size(); ++k) have += (k ? ", " : "") + header.fields[k];
    throw std::invalid_argument(t.source + ": field '" + name + "' missing from the header (columns: " +
                                have + ")");
  };
  const int64_t text_col = column(opts.text_field);
  const int64_t label_col = opts.label_field.empty() ? -1 : column(opts.label_field);
  const size_t width = header.fields.size();

  while (pos < n) {
    CsvRecord r = next_csv_record(buf, pos, line, delim);
    if (r.end == r.begin && blank_record(r)) continue;
    std::string_view raw(buf.data() + r.begin, r.end - r.begin);
    if (auto problem = check_record(raw, opts.max_line_bytes)) {
      report_bad(t, opts, r.first_line, *problem);
      continue;
    }
    if (!r.error.empty()) {
      report_bad(t, opts, r.first_line, r.error);
      continue;
    }
    if (r.fields.size() != width) {
      report_bad(t, opts, r.first_line,
                 std::to_string(r.fields.size()) + " fields, the header has " + std::to_string(width));
      continue;
    }
    if (label_col >= 0 && blank_text(r.fields[label_col])) {
      report_bad(t, opts, r.first_line, "field '" + opts.label_field + "' is empty");
      continue;
    }
    t.texts.push_back(std::move(r.fields[text_col]));
    if (label_col >= 0) t.labels.push_back(std::move(r.fields[label_col]));
    t.line_numbers.push_back(r.first_line);
    t.spans.push_back(r.begin);
    t.spans.push_back(r.end);
  }
  check_not_empty(t);
  return t;
}

}  // namespace tsq::data
