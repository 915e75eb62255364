// Gumbel-top-k selection (see selection.h).
#include "data/selection.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>

#include "data/text_util.h"
#include "data/thread_pool.h"

namespace tsq::data {
namespace {

// The stream of the uniforms u_i behind the Gumbel noise.
uint64_t noise_stream(uint64_t seed) { return splitmix64(seed ^ 0x6a09e667f3bcc908ULL); }

// The keys (selection.h), -inf outside the pool.
std::vector<double> gumbel_keys(const SelectionInput& in, double temperature, uint64_t seed, int num_threads) {
  if (!(temperature >= 0.0)) throw std::invalid_argument("select: temperature must be >= 0 (got NaN or < 0)");
  const double ninf = -std::numeric_limits<double>::infinity();
  const bool top_k = temperature == 0.0;
  const bool uniform = std::isinf(temperature);
  const uint64_t stream = noise_stream(seed);
  std::vector<double> keys(in.n);
  shared_pool(num_threads)->parallel_for(in.n, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (in.pool && !in.pool[i]) { keys[i] = ninf; continue; }
      double q = in.scores ? in.scores[i] : 0.0;
      if (top_k) { keys[i] = q; continue; }
      double g = -std::log(-std::log(uniform_open01(stream, static_cast<uint64_t>(i))));
      keys[i] = uniform ? g : q + temperature * g;
    }
  });
  return keys;
}

// The k best of `rows` by (key desc, tie desc when given, index asc).
void take_best(std::vector<int64_t>& rows, int64_t k, const std::vector<double>& keys,
               const std::vector<double>& ties, std::vector<int64_t>& out) {
  auto better = [&](int64_t a, int64_t b) {
    if (keys[a] != keys[b]) return keys[a] > keys[b];
    if (!ties.empty() && ties[a] != ties[b]) return ties[a] > ties[b];
    return a < b;
  };
  k = std::min<int64_t>(k, static_cast<int64_t>(rows.size()));
  if (k <= 0) return;
  std::nth_element(rows.begin(), rows.begin() + (k - 1), rows.end(), better);
  out.insert(out.end(), rows.begin(), rows.begin() + k);
}

}  // namespace

std::vector<int64_t> gumbel_top_k(const SelectionInput& in, int64_t k, double temperature, uint64_t seed,
                                  bool stratify, int num_threads) {
  if (in.scores)
    for (int64_t i = 0; i < in.n; ++i)
      if ((!in.pool || in.pool[i]) && !std::isfinite(in.scores[i]))
        throw std::invalid_argument("select: score of row " + std::to_string(i) + " is not finite");
  if (stratify && !in.labels) throw std::invalid_argument("select: stratify needs labels");
  std::vector<double> keys = gumbel_keys(in, temperature, seed, num_threads);
  // τ = 0 ranks by Q alone (and a tiny τ nearly so: τ·g_i rounds away beside Q_i), so rows of
  // equal Q would fall to the lowest indices whatever the seed (with the default 'uniform'
  // preference every score is 0: always the first k rows). Equal keys are ranked by their noise
  // instead, the limit of Q/τ + g_i as τ → 0; u_i orders them as g_i does.
  std::vector<double> ties;
  if (!std::isinf(temperature)) {
    ties.resize(in.n);
    const uint64_t stream = noise_stream(seed);
    for (int64_t i = 0; i < in.n; ++i) ties[i] = uniform_open01(stream, static_cast<uint64_t>(i));
  }

  std::map<int64_t, std::vector<int64_t>> classes;  // ordered by class id
  int64_t pool_size = 0;
  for (int64_t i = 0; i < in.n; ++i) {
    if (in.pool && !in.pool[i]) continue;
    ++pool_size;
    int64_t c = 0;
    if (stratify) {
      c = in.labels[i];
      if (c < 0) throw std::invalid_argument("select: row " + std::to_string(i) + " has no label (stratify)");
    }
    classes[c].push_back(i);
  }
  if (k < 0 || k > pool_size)
    throw std::invalid_argument("select: k = " + std::to_string(k) + " outside [0, " +
                                std::to_string(pool_size) + "] (rows in the pool)");

  std::vector<int64_t> chosen;
  chosen.reserve(k);
  if (classes.size() <= 1) {
    if (!classes.empty()) take_best(classes.begin()->second, k, keys, ties, chosen);
  } else {
    // Largest-remainder allocation of k over classes in proportion to their sizes.
    std::vector<std::pair<int64_t, std::vector<int64_t>*>> order;
    std::vector<int64_t> quota;
    std::vector<std::pair<int64_t, size_t>> remainders;  // (k·n_c mod n, position) → sort
    int64_t given = 0;
    for (auto& [c, rows] : classes) {
      int64_t num = k * static_cast<int64_t>(rows.size());
      quota.push_back(num / pool_size);
      given += num / pool_size;
      remainders.emplace_back(num % pool_size, order.size());
      order.emplace_back(c, &rows);
    }
    std::stable_sort(remainders.begin(), remainders.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    for (size_t r = 0; given < k && r < remainders.size(); ++r, ++given) quota[remainders[r].second] += 1;
    for (size_t c = 0; c < order.size(); ++c) take_best(*order[c].second, quota[c], keys, ties, chosen);
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

}  // namespace tsq::data
