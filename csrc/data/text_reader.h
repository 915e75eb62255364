// Native readers for jsonl and csv/tsv files: one text column and an optional label column.
//
// The whole file is read into one buffer. Every record keeps the byte span [begin, end) of its raw
// text in that buffer (without the line terminator) and the 1-based line where it starts, so the
// selector can write the kept rows back byte for byte in the input's own format.
//
// - jsonl: line boundaries are found in one memchr pass; the lines are then parsed in parallel
//   on the thread pool by a strict JSON parser (RFC 8259) that decodes only the two wanted
//   fields and validates the rest. Blank lines are not records.
// - csv/tsv: RFC 4180 (quoted fields, "" escapes, newlines inside quotes, \r\n or \n, and a lone \r
//   ending the file); the first record is the header. Parsed in one sequential pass: where a record
//   ends depends on every quote before it. In tsv, where quoting is rare, a field is quoted only
//   when its closing quote ends it; one that merely begins with a quotation is text. A quote that
//   never closes makes its line the bad record, and reading goes on at the next line.
// An empty or blank label is a malformed record, as a missing one is.
// A UTF-8 byte-order mark at the start of the file is not part of the first line.
//
// A malformed record (bad JSON, a missing field, a wrong field count, invalid UTF-8, over
// max_line_bytes) raises std::invalid_argument naming the file and line, or, with skip_bad, is
// counted in `bad` and left out. An input with no records is an error either way.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tsq::data {

struct ReadOptions {
  std::string text_field = "text";
  std::string label_field;               // empty: no labels
  bool skip_bad = false;
  int64_t max_line_bytes = 16LL << 20;   // a record longer than this is malformed
  int num_threads = 0;                   // <= 0: all cores
};

struct BadRecord {
  int64_t line;         // 1-based line where the record starts
  std::string message;  // "line 17 of train.jsonl: ..."
};

struct TextTable {
  std::string source;                 // the file name used in messages
  std::string buffer;                 // the whole file
  int64_t header_end = 0;             // bytes [0, header_end): the byte-order mark if any, then
                                      // (csv) the header line with its terminator
  std::string newline = "\n";         // the input's line terminator: "\r\n" when its first line ends so
  std::vector<std::string> texts;     // decoded text field, one per record
  std::vector<std::string> labels;    // decoded label field (its JSON text for numbers/booleans)
  std::vector<int64_t> line_numbers;  // 1-based start line of each record
  std::vector<int64_t> spans;         // [2 * rows]: raw byte span of each record in `buffer`
  std::vector<BadRecord> bad;

  int64_t num_rows() const { return static_cast<int64_t>(texts.size()); }
};

TextTable read_jsonl(const std::string& path, const ReadOptions& opts);
// delimiter ',' for csv, '\t' for tsv.
TextTable read_csv(const std::string& path, char delimiter, const ReadOptions& opts);

}  // namespace tsq::data
