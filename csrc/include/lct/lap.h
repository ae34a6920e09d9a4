// Exact linear assignment (min-cost matching of every one of N rows to a distinct
// column among M >= N) by Jonker-Volgenant-style shortest augmenting paths.
// Host code without torch or out-of-line standard library code, so that it can be
// compiled once per x86 ISA level (csrc/cpu/isa/) under different namespaces
// (LCT_LAP_NS) without one-definition-rule clashes.  The row passes are in
// lct/lap_row_ops.h (scalar, and AVX2 when LCT_LAP_AVX2 is defined); both give
// the same assignment.
//
//   * One streaming pass over the matrix validates it (NaN, -inf, the largest
//     finite |c| for the certificate tolerance) and takes the row minima; for
//     square problems the column minima of c - r are updated while the row is
//     still in L1 (column reduction: v_j = min_i (c_ij - r_i), each column's
//     argmin row takes it when still free).  Rectangular problems keep v = 0
//     (the duals of unassigned columns must stay 0) and each row takes its
//     cheapest column when free.
//   * Augmenting row reduction (JV), capped: a free row takes its cheapest
//     column, lowering that column's v to the runner-up level, and bumps the
//     previous owner.  Every assigned row stays tight at its column, so the cap
//     is safe.  The solve time is nearly flat in the cap (row-reduction steps
//     trade against search steps).  Measured on Gaussian point clouds: one
//     round of n steps is best below N = 512 (up to 40 % faster at N = 64), two
//     rounds of 2n steps from N = 512 on (5-10 % at N = 1024-2048).
//   * Augmentation.  For each free row, a Dijkstra search on reduced costs over
//     dense per-column arrays: key_j is the tentative distance of an unreached
//     column and NaN once reached, so one branch-free pass per scanned column
//     (key = min(key, h)) relaxes its row and yields the next minimum.  All
//     columns at the minimum distance mu are reached together (one "level"), and
//     a column whose key drops to mu during a relaxation joins the level at once;
//     the search stops at the first unassigned column reached.
//   * Predecessors.  The relaxation keeps no predecessor array (that store was a
//     third of its cost).  The path is rebuilt afterwards: a column's predecessor
//     is a row scanned before the column was reached whose h equals the
//     column's distance exactly (recomputed with the same operations).  Any such
//     row lies on a shortest path, and it was reached strictly earlier, so the
//     walk back ends at the free row.  Then the scanned columns' duals move by
//     d_j - mu and the path is flipped.  Ties are exact comparisons throughout.
//   * Duals are float64; costs float or double.  Each step scans one column, so
//     the work is bounded; a step counter enforces the bound (kIterationLimit) --
//     no input can hang the solver.
//   * Certificate.  u_i = c_{i,x(i)} - v_{x(i)}; then c - u - v >= -tol everywhere,
//     and for rectangular problems v <= tol with v_j = 0 on unassigned columns: the
//     LP optimality conditions, so an assignment that passes is optimal.
// +inf entries are forbidden pairs; NaN and -inf are reported, never solved.
#pragma once

#include <cstdint>

#include "lct/lap_status.h"

#if defined(LCT_LAP_AVX2)
#include <immintrin.h>
#endif

#ifndef LCT_LAP_NS
#define LCT_LAP_NS lap
#endif

namespace lct {

// Caller-owned scratch for one problem of up to n rows and m columns.
struct LapBuffers {
  double* key;           // m: search keys (column minima during the initialisation)
  double* level;         // m: distance at which each column was reached
  int64_t* reached_rows; // m: rows scanned when each column was reached (argmin rows at init)
  int64_t* y;            // m: row assigned to each column, -1 if none
  int64_t* order;        // m: columns in the order a search reached them
  int64_t* rows;         // n: free rows (row reduction), then the rows a search scanned
  double* row_base;      // n: c_ij - v_j - mu of each scanned row (h = c - v - base)
};

namespace LCT_LAP_NS {

using namespace lap_status;

#include "lct/lap_row_ops.h"

// Predecessor of column j on the search tree: the latest scanned row, among
// those scanned before j was reached, with h_j equal to j's distance (row 0 is
// the free row, whose h is c - v).  -1 if none (cannot happen; checked).
template <typename T>
inline int64_t predecessor(const T* C, int64_t ld, const double* v, const LapBuffers& b,
                           const Search& s, int64_t j) {
  const double target = s.level[j];
  for (int64_t k = s.reached_rows[j] - 1; k >= 0; --k) {
    const int64_t i = b.rows[k];
    const double c = double(C[i * ld + j]);
    const double h = k == 0 ? c - v[j] : c - v[j] - b.row_base[k];
    if (h == target) return i;
  }
  return -1;
}

template <typename T>
int32_t solve(const T* C, int64_t ld, int64_t n, int64_t m, int64_t* x, double* u, double* v,
              const LapBuffers& b) {
  if (n < 0 || n > m) return kBadShape;
  for (int64_t j = 0; j < m; ++j) v[j] = 0.0;
  for (int64_t i = 0; i < n; ++i) x[i] = -1, u[i] = 0.0;
  if (n == 0) return kOk;
  int64_t* y = b.y;
  for (int64_t j = 0; j < m; ++j) y[j] = -1;

  // ---- one pass: validation, row minima, column reduction (square) ----
  const bool square = n == m;
  double* cmin = b.key;
  int64_t* carg = b.reached_rows;
  if (square)
    for (int64_t j = 0; j < m; ++j) cmin[j] = kInf, carg[j] = -1;
  double scale = 0.0;  // largest finite |c|, for the certificate tolerance
  bool any_nan = false, any_neginf = false, empty_row = false;
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = C + i * ld;
    const RowStats r = row_stats(ci, m);
    any_nan |= r.nan, any_neginf |= r.neginf, scale = dmax(scale, r.absmax);
    if (r.nan || r.neginf || r.min == kInf) {
      empty_row |= r.min == kInf;
      continue;  // reported below, once the whole matrix has been checked
    }
    if (square) {
      column_min_update(ci, m, r.min, i, cmin, carg);
    } else {
      const int64_t arg = find_column(ci, v, 0, m, r.min, -1);  // v = 0 here
      if (y[arg] < 0) x[i] = arg, y[arg] = i;  // tight: v = 0
    }
  }
  if (any_nan) return kNaN;
  if (any_neginf) return kNegInf;
  if (empty_row) return kInfeasible;  // a row with only forbidden pairs
  if (square) {
    for (int64_t j = m - 1; j >= 0; --j) {
      if (carg[j] < 0) return kInfeasible;  // a column with only forbidden pairs
      v[j] = cmin[j];
      if (x[carg[j]] < 0) x[carg[j]] = j, y[j] = carg[j];
    }
  }

  // ---- augmenting row reduction (capped; see the header comment) ----
  int64_t* free_rows = b.rows;
  int64_t n_free = 0;
  for (int64_t i = 0; i < n; ++i)
    if (x[i] < 0) free_rows[n_free++] = i;
  const bool large = n >= 512;
  for (int round = 0; round < (large ? 2 : 1) && n_free > 0; ++round) {
    int64_t k = 0, cap = (large ? 2 * n : n) + 16;
    const int64_t prev_free = n_free;
    n_free = 0;
    while (k < prev_free && cap-- > 0) {
      const int64_t i = free_rows[k++];
      const T* ci = C + i * ld;
      const Top2 t = row_top2(ci, v, m);
      int64_t j1 = find_column(ci, v, 0, m, t.u1, -1);  // the first column at the minimum
      int64_t i0 = y[j1];
      const bool strict = t.u1 < t.u2;
      if (strict) {
        if (t.u2 < kInf) v[j1] -= t.u2 - t.u1;  // j1 now as attractive as the runner-up for row i
      } else if (i0 >= 0) {
        j1 = find_column(ci, v, 0, m, t.u2, j1);  // a tie: prefer another column at the minimum
        i0 = y[j1];
      }
      x[i] = j1;
      y[j1] = i;
      if (i0 >= 0) {
        x[i0] = -1;
        if (strict)
          free_rows[--k] = i0;  // retry the bumped row at once
        else
          free_rows[n_free++] = i0;
      }
    }
    while (k < prev_free) free_rows[n_free++] = free_rows[k++];  // cap reached: keep the rest
  }

  // ---- shortest augmenting paths ----
  Search s{b.key, b.level, b.reached_rows, b.order, y, 0, 0, -1};
  int64_t budget = 4 * n * (m + 2) + 64;  // each step scans one column
  for (int64_t f = 0; f < n; ++f) {
    if (x[f] >= 0) continue;
    double next = search_init(C + f * ld, v, s.key, m);  // the smallest unreached key
    double mu = next;
    int64_t low = 0;
    s.up = 0, s.end = -1, s.rows = 1;
    b.rows[0] = f;
    for (;;) {
      if (--budget < 0) return kIterationLimit;
      if (low == s.up) {  // a new level: reach every unreached column at the minimum
        mu = next;
        if (mu == kInf) return kInfeasible;
        reach_level(s, m, mu);
        if (s.end >= 0) break;
      }
      const int64_t j = s.order[low++];  // scan j: relax the row assigned to it
      const int64_t i = y[j];
      const T* ci = C + i * ld;
      const double base = double(ci[j]) - v[j] - mu;
      b.rows[s.rows] = i, b.row_base[s.rows] = base;
      ++s.rows;
      next = relax(ci, v, s, m, base, mu);
      if (s.end >= 0) break;
    }
    // Walk back from the end and flip the path; predecessors read the scanned
    // rows' list and the duals, which change only after the walk.
    for (int64_t j = s.end;;) {
      const int64_t i = predecessor(C, ld, v, b, s, j);
      if (i < 0) return kCertificateFailed;
      y[j] = i;
      const int64_t nx = x[i];
      x[i] = j;
      if (i == f) break;
      j = nx;
    }
    for (int64_t k = 0; k < low; ++k) v[s.order[k]] += s.level[s.order[k]] - mu;  // scanned columns
  }

  // ---- certificate ----
  for (int64_t i = 0; i < n; ++i) u[i] = double(C[i * ld + x[i]]) - v[x[i]];
  double vmax = 0.0;
  for (int64_t j = 0; j < m; ++j) vmax = dmax(vmax, dabs(v[j]));
  const double tol = 1e-9 * (scale + vmax) + 1e-300;
  for (int64_t i = 0; i < n; ++i)
    if (row_violates(C + i * ld, v, m, u[i], tol)) return kCertificateFailed;
  if (n < m)
    for (int64_t j = 0; j < m; ++j)
      if (v[j] > tol || (y[j] < 0 && v[j] != 0.0)) return kCertificateFailed;
  return kOk;
}

}  // namespace LCT_LAP_NS
}  // namespace lct
