// Python face of csrc/data: every call releases the GIL while the C++ side works, and the long
// ones (reading a file, the gate) stop at Ctrl-C (see interruptible).
//
// Texts reach C++ without copies where possible: a Python list of str is viewed through each
// str's cached UTF-8 (the list is kept alive for the call), an Arrow string column through its
// data buffer and offsets, and a file read here stays in the TextTable that owns it.
#include "data/bindings.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>
#include <future>
#include <thread>

#include "data/batch_loader.h"
#include "data/heuristics.h"
#include "data/selection.h"
#include "data/text_reader.h"
#include "data/thread_pool.h"

namespace py = pybind11;

namespace tsq::data {
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;
using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

// Views over a list of str (UTF-8 cached inside each str object, which the list keeps alive).
std::vector<std::string_view> views_of(const py::list& texts) {
  std::vector<std::string_view> views;
  views.reserve(texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    PyObject* o = PyList_GET_ITEM(texts.ptr(), i);
    if (!PyUnicode_Check(o)) throw py::type_error("gate: row " + std::to_string(i) + " is not a str");
    Py_ssize_t size;
    const char* data = PyUnicode_AsUTF8AndSize(o, &size);
    if (!data) {
      PyErr_Clear();
      throw py::value_error("gate: row " + std::to_string(i) + " is not valid UTF-8 text (lone surrogate)");
    }
    views.emplace_back(data, static_cast<size_t>(size));
  }
  return views;
}

// f() (pure C++, no Python) on a thread of its own, the GIL released, while this thread looks for
// signals every 50 ms: a Ctrl-C cancels the data pipeline's job and raises KeyboardInterrupt at
// once, where a C++ call holding the interpreter would let it through only when done (minutes of
// gating on millions of rows).
template <class F>
auto interruptible(F f) -> decltype(f()) {
  std::packaged_task<decltype(f())()> task(std::move(f));
  auto result = task.get_future();
  cancel_requested().store(false);
  std::thread worker(std::move(task));
  py::gil_scoped_release release;
  while (result.wait_for(std::chrono::milliseconds(50)) != std::future_status::ready) {
    py::gil_scoped_acquire acquire;
    if (PyErr_CheckSignals() != 0) {
      py::error_already_set interrupt;  // (the KeyboardInterrupt a handler raised)
      cancel_requested().store(true);
      worker.join();  // within a chunk: the job only reads and writes C++ memory
      cancel_requested().store(false);
      throw interrupt;
    }
  }
  worker.join();
  return result.get();
}

py::tuple gate_result(GateResult r, const GateConfig& cfg) {
  const int64_t n = static_cast<int64_t>(r.reasons.size());
  py::array_t<double> feats({n, r.num_features});
  std::copy(r.features.begin(), r.features.end(), feats.mutable_data());
  return py::make_tuple(to_numpy(r.reasons), feats, feature_names(cfg));
}

py::tuple gate_views(const std::vector<std::string_view>& views, const GateConfig& cfg, int threads) {
  GateResult r = interruptible([&] { return run_gate(views, cfg, threads); });
  return gate_result(std::move(r), cfg);
}

py::object optional_label_list(const TextTable& t) {
  if (t.labels.empty() && t.num_rows() > 0) return py::none();
  return py::cast(t.labels);
}

}  // namespace

void bind_data(py::module_& m) {
  py::list names;
  for (int r = 0; r < kNumGateReasons; ++r) names.append(reason_name(static_cast<DropReason>(r)));
  m.attr("GATE_REASONS") = names;
  m.def("default_num_threads", &default_num_threads, "All hardware threads: the data pipeline's default.");

  py::class_<GateConfig>(m, "GateConfig", "Rules and thresholds of the heuristic gate (csrc/data/heuristics.h).")
      .def(py::init<>())
      .def_readwrite("length", &GateConfig::length)
      .def_readwrite("min_words", &GateConfig::min_words)
      .def_readwrite("max_words", &GateConfig::max_words)
      .def_readwrite("symbol_ratio", &GateConfig::symbol_ratio)
      .def_readwrite("max_symbol_ratio", &GateConfig::max_symbol_ratio)
      .def_readwrite("non_alpha_ratio", &GateConfig::non_alpha_ratio)
      .def_readwrite("max_non_alpha_ratio", &GateConfig::max_non_alpha_ratio)
      .def_readwrite("repeated_lines", &GateConfig::repeated_lines)
      .def_readwrite("max_dup_line_frac", &GateConfig::max_dup_line_frac)
      .def_readwrite("repeated_ngrams", &GateConfig::repeated_ngrams)
      .def_readwrite("ngram_min_words", &GateConfig::ngram_min_words)
      .def_readwrite("top_ngram", &GateConfig::top_ngram)
      .def_readwrite("dup_ngram", &GateConfig::dup_ngram)
      .def_readwrite("exact_dup", &GateConfig::exact_dup)
      .def_readwrite("near_dup", &GateConfig::near_dup)
      .def_readwrite("shingle_size", &GateConfig::shingle_size)
      .def_readwrite("bands", &GateConfig::bands)
      .def_readwrite("rows", &GateConfig::rows)
      .def_readwrite("near_dup_threshold", &GateConfig::near_dup_threshold)
      .def_readwrite("minhash_seed", &GateConfig::minhash_seed);

  py::class_<TextTable>(m, "TextTable", "Records read natively from a jsonl/csv/tsv file.")
      .def_property_readonly("source", [](const TextTable& t) { return t.source; })
      .def_property_readonly("num_rows", &TextTable::num_rows)
      .def_property_readonly("texts", [](const TextTable& t) { return t.texts; })
      .def_property_readonly("labels", &optional_label_list)
      .def_property_readonly("line_numbers", [](const TextTable& t) { return to_numpy(t.line_numbers); })
      .def_property_readonly("spans", [](const TextTable& t) {
        py::array_t<int64_t> a({t.num_rows(), int64_t{2}});
        std::copy(t.spans.begin(), t.spans.end(), a.mutable_data());
        return a;
      })
      .def_property_readonly("header", [](const TextTable& t) { return py::bytes(t.buffer.substr(0, t.header_end)); })
      .def_property_readonly("newline", [](const TextTable& t) { return py::bytes(t.newline); },
                             "The input's line terminator: \\r\\n when its first line ends so, else \\n.")
      .def_property_readonly("bad", [](const TextTable& t) {
        py::list out;
        for (auto& b : t.bad) out.append(py::make_tuple(b.line, b.message));
        return out;
      })
      .def("raw", [](const TextTable& t, int64_t row) {
        if (row < 0 || row >= t.num_rows()) throw py::index_error("TextTable.raw: row out of range");
        return py::bytes(t.buffer.data() + t.spans[2 * row], t.spans[2 * row + 1] - t.spans[2 * row]);
      }, "The raw bytes of a record, as in the file.");

  m.def("read_table", [](const std::string& path, const std::string& format, const std::string& text_field,
                         const std::string& label_field, bool skip_bad, int64_t max_line_bytes, int threads) {
        ReadOptions o{text_field, label_field, skip_bad, max_line_bytes, threads};
        if (format != "jsonl" && format != "csv" && format != "tsv")
          throw std::invalid_argument("read_table: format must be jsonl, csv or tsv, not '" + format + "'");
        return interruptible([&] {
          return format == "jsonl" ? read_jsonl(path, o) : read_csv(path, format == "csv" ? ',' : '\t', o);
        });
      },
      py::arg("path"), py::arg("format"), py::arg("text_field"), py::arg("label_field") = "",
      py::arg("skip_bad") = false, py::arg("max_line_bytes") = 16LL << 20, py::arg("num_threads") = 0,
      "Reads a jsonl/csv/tsv file natively into a TextTable.");

  m.def("gate_table", [](const TextTable& t, const GateConfig& cfg, int threads) {
        std::vector<std::string_view> views(t.texts.begin(), t.texts.end());
        return gate_views(views, cfg, threads);
      }, py::arg("table"), py::arg("config"), py::arg("num_threads") = 0,
      "Heuristic gate over a TextTable: (reasons uint8 [n], features float64 [n, F], feature names).");
  m.def("gate_texts", [](const py::list& texts, const GateConfig& cfg, int threads) {
        return gate_views(views_of(texts), cfg, threads);
      }, py::arg("texts"), py::arg("config"), py::arg("num_threads") = 0,
      "Heuristic gate over a list of str.");
  m.def("gate_buffer", [](py::buffer data, const I64Array& offsets, const GateConfig& cfg, int threads) {
        py::buffer_info info = data.request();
        const char* base = static_cast<const char*>(info.ptr);
        const int64_t nbytes = info.size * info.itemsize;
        const int64_t* off = offsets.data();
        const int64_t n = offsets.size() - 1;
        if (n < 0) throw py::value_error("gate_buffer: offsets must hold n + 1 entries");
        std::vector<std::string_view> views(n);
        for (int64_t i = 0; i < n; ++i) {
          if (off[i] < 0 || off[i + 1] < off[i] || off[i + 1] > nbytes)
            throw py::value_error("gate_buffer: offsets of row " + std::to_string(i) + " out of range");
          views[i] = std::string_view(base + off[i], off[i + 1] - off[i]);
        }
        return gate_views(views, cfg, threads);
      }, py::arg("data"), py::arg("offsets"), py::arg("config"), py::arg("num_threads") = 0,
      "Heuristic gate over an Arrow-style string column: UTF-8 bytes plus int64 offsets [n + 1].");

  auto selection_input = [](const std::optional<F64Array>& scores, const std::optional<I64Array>& labels,
                            const std::optional<U8Array>& pool, int64_t n) {
    SelectionInput in;
    in.n = n;
    auto check = [&](py::ssize_t size, const char* what) {
      if (size != n) throw py::value_error(std::string("select: ") + what + " must have one entry per row");
    };
    if (scores) { check(scores->size(), "scores"); in.scores = scores->data(); }
    if (labels) { check(labels->size(), "labels"); in.labels = labels->data(); }
    if (pool) { check(pool->size(), "pool"); in.pool = pool->data(); }
    return in;
  };
  m.def("gumbel_top_k", [selection_input](int64_t n, int64_t k, std::optional<F64Array> scores,
                                          std::optional<I64Array> labels, std::optional<U8Array> pool,
                                          double temperature, uint64_t seed, bool stratify, int threads) {
        SelectionInput in = selection_input(scores, labels, pool, n);
        std::vector<int64_t> out;
        {
          py::gil_scoped_release release;
          out = gumbel_top_k(in, k, temperature, seed, stratify, threads);
        }
        return to_numpy(out);
      }, py::arg("n"), py::arg("k"), py::arg("scores") = py::none(), py::arg("labels") = py::none(),
      py::arg("pool") = py::none(), py::arg("temperature") = 1.0, py::arg("seed") = 0,
      py::arg("stratify") = false, py::arg("num_threads") = 0,
      "Seeded Gumbel-top-k of scores/temperature; selected row ids in ascending order.");
  py::class_<BatchLoader>(m, "BatchLoader", "Prefetching, length-bucketed batches over token ids.")
      .def(py::init([](const I64Array& ids, const I64Array& offsets, std::optional<I64Array> labels,
                       int64_t batch_size, int64_t pad_id, int64_t max_length, int64_t pad_to_multiple_of,
                       int64_t bucket_multiplier, bool shuffle, bool drop_last, uint64_t seed, int64_t rank,
                       int64_t world_size, int num_workers, int64_t prefetch) {
             LoaderConfig cfg{batch_size, pad_id, max_length, pad_to_multiple_of, bucket_multiplier, shuffle,
                              drop_last, seed, rank, world_size, num_workers, prefetch};
             std::vector<int64_t> i(ids.data(), ids.data() + ids.size());
             std::vector<int64_t> o(offsets.data(), offsets.data() + offsets.size());
             std::vector<int64_t> l;
             if (labels) l.assign(labels->data(), labels->data() + labels->size());
             py::gil_scoped_release release;
             return std::make_unique<BatchLoader>(std::move(i), std::move(o), std::move(l), cfg);
           }),
           py::arg("ids"), py::arg("offsets"), py::arg("labels"), py::arg("batch_size"), py::arg("pad_id"),
           py::arg("max_length"), py::arg("pad_to_multiple_of"), py::arg("bucket_multiplier"),
           py::arg("shuffle"), py::arg("drop_last"), py::arg("seed"), py::arg("rank"), py::arg("world_size"),
           py::arg("num_workers"), py::arg("prefetch"))
      .def_property_readonly("num_batches", &BatchLoader::num_batches)
      .def_property_readonly("epoch", &BatchLoader::epoch)
      .def_property_readonly("position", &BatchLoader::position)
      .def("seek", &BatchLoader::seek, py::arg("epoch"), py::arg("position"),
           py::call_guard<py::gil_scoped_release>())
      .def("next", [](BatchLoader& l) -> py::object {
        std::optional<Batch> b;
        {
          py::gil_scoped_release release;
          b = l.next();
        }
        if (!b) return py::none();
        return py::make_tuple(b->input_ids, b->attention_mask, b->labels, b->index);
      }, "(input_ids, attention_mask, labels, index) of the next batch, or None at the end of the epoch.")
      .def("plan", &BatchLoader::plan, py::arg("epoch"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace tsq::data
