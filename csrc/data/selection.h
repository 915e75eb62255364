// Seeded Gumbel-top-k selection of k rows from a pool, optionally stratified by label.
//
// Row i gets the key  Q_i + τ·g_i,  g_i = -log(-log u_i),  u_i = uniform(seed, i) in (0, 1)
// (counter-based: u_i depends on (seed, i) only), which orders rows as Q_i/τ + g_i does without
// overflowing for a tiny τ. The k largest keys are a sample without replacement with
// P(first = i) ∝ exp(Q_i/τ), each next pick following the same law on the rest (Plackett-Luce).
// Rows of equal key are ranked by u_i (the limit τ → 0), so the seed draws among ties: τ = 0 gives
// the exact top-k of Q, and so does a τ so small that τ·g_i vanishes beside Q_i. τ = +inf ignores
// Q (uniform sampling). Remaining ties fall to the lower index, so the output is a pure function
// of the inputs.
//
// Stratified: class c, with n_c rows in the pool, receives k·n_c/n slots by largest remainder
// (ties to the lower class id) and its slots are filled by Gumbel-top-k within the class.
#pragma once

#include <cstdint>
#include <vector>

namespace tsq::data {

struct SelectionInput {
  const double* scores = nullptr;  // [n] Q, or null for all zeros
  const int64_t* labels = nullptr; // [n] class ids >= 0, required when stratify
  const uint8_t* pool = nullptr;   // [n] 1 = may be selected, or null for every row
  int64_t n = 0;
};

// Returns the selected row indices in ascending order.
std::vector<int64_t> gumbel_top_k(const SelectionInput& in, int64_t k, double temperature, uint64_t seed,
                                  bool stratify, int num_threads);

}  // namespace tsq::data
