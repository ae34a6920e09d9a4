// Exact linear assignment (min-cost matching of every one of N rows to a distinct
// column among M >= N) by Jonker-Volgenant-style shortest augmenting paths.
// Host code without torch or out-of-line standard library code, so that it can be
// compiled once per x86 ISA level (csrc/cpu/isa/) under different namespaces
// (LCT_LAP_NS) without one-definition-rule clashes.
//
//   * Initialisation.  Square problems: subtract row minima, then reduce the
//     columns (v_j = min_i (c_ij - r_i)) and give each column's argmin row the
//     column when that row is still free.  Rectangular problems: v = 0 (the
//     duals of unassigned columns must stay 0) and each row takes its cheapest
//     column when free.  Then a capped augmenting row reduction (JV): a free row
//     takes its cheapest column, lowering that column's v to the runner-up level,
//     and bumps the previous owner.  Every assigned row stays tight at its column,
//     so the cap is safe.
//   * Augmentation.  For each free row, a Dijkstra search on reduced costs that
//     keeps the columns partitioned (settled | current level | unreached) so
//     relaxations touch only unreached columns: take the minimum distance mu
//     over unreached columns, settle all columns at mu together (one "level"),
//     relax the rows matched to them, and stop at the first unassigned column
//     at mu.  Then the settled columns' duals move by d_j - mu and the path is
//     flipped.  Ties are exact comparisons.
//   * Duals are float64; costs float or double.  Each search settles at least one
//     column per level and per relaxation, so the work is bounded; a step counter
//     enforces the bound (kIterationLimit) -- no input can hang the solver.
//   * Certificate.  u_i = c_{i,x(i)} - v_{x(i)}; then c - u - v >= -tol everywhere,
//     and for rectangular problems v <= tol with v_j = 0 on unassigned columns: the
//     LP optimality conditions, so an assignment that passes is optimal.
// +inf entries are forbidden pairs; NaN and -inf are reported, never solved.
#pragma once

#include <cstdint>

#ifndef LCT_LAP_NS
#define LCT_LAP_NS lap
#endif

namespace lct::lap_status {
enum Status : int32_t {
  kOk = 0,
  kInfeasible = 1,
  kNaN = 2,
  kNegInf = 3,
  kCertificateFailed = 4,
  kIterationLimit = 5,
  kBadShape = 6,
};
}  // namespace lct::lap_status

namespace lct {

// Caller-owned scratch for one problem of up to n rows and m columns.
struct LapBuffers {
  double* d;          // m: distances
  double* h;          // m: a row's reduced costs (augmenting row reduction)
  int64_t* pred;      // m: predecessor row of each column on the search tree
  int64_t* y;         // m: row assigned to each column, -1 if none
  int64_t* scan;      // m: column order of the search (settled | level | unreached)
  int64_t* free_rows; // n
};

namespace LCT_LAP_NS {

using namespace lap_status;

constexpr double kInf = __builtin_inf();

inline double dmax(double a, double b) { return a > b ? a : b; }
inline double dabs(double a) { return a < 0 ? -a : a; }

template <typename T>
int32_t solve(const T* C, int64_t ld, int64_t n, int64_t m, int64_t* x, double* u, double* v,
              const LapBuffers& b) {
  if (n < 0 || n > m) return kBadShape;
  double scale = 0.0;  // largest finite |c|, for the certificate tolerance
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = C + i * ld;
    for (int64_t j = 0; j < m; ++j) {
      const double c = double(ci[j]);
      if (__builtin_isnan(c)) return kNaN;
      if (c == -kInf) return kNegInf;
      if (c != kInf) scale = dmax(scale, dabs(c));
    }
  }
  for (int64_t j = 0; j < m; ++j) v[j] = 0.0;
  for (int64_t i = 0; i < n; ++i) x[i] = -1, u[i] = 0.0;
  if (n == 0) return kOk;
  double* d = b.d;
  double* hrow = b.h;
  int64_t* pred = b.pred;
  int64_t* y = b.y;
  int64_t* scan = b.scan;
  for (int64_t j = 0; j < m; ++j) y[j] = -1;

  // ---- initialisation (row minima; column reduction for square problems) ----
  double* rmin = u;  // u doubles as the row minima until the certificate
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = C + i * ld;
    double best = kInf;
#pragma omp simd reduction(min : best)
    for (int64_t j = 0; j < m; ++j) best = double(ci[j]) < best ? double(ci[j]) : best;
    if (best == kInf) return kInfeasible;  // a row with only forbidden pairs
    rmin[i] = best;
    if (n < m) {
      int64_t arg = 0;
      while (double(ci[arg]) != best) ++arg;
      if (y[arg] < 0) x[i] = arg, y[arg] = i;  // tight: v = 0
    }
  }
  if (n == m) {
    // Column minima of c - r, row by row (cache-friendly); d and pred hold them.
    double* cmin = d;
    int64_t* carg = pred;
    for (int64_t j = 0; j < m; ++j) cmin[j] = kInf, carg[j] = -1;
    for (int64_t i = 0; i < n; ++i) {
      const T* ci = C + i * ld;
      const double ri = rmin[i];
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const double rc = double(ci[j]) - ri;
        const bool better = rc < cmin[j];
        cmin[j] = better ? rc : cmin[j];
        carg[j] = better ? i : carg[j];
      }
    }
    for (int64_t j = m - 1; j >= 0; --j) {
      if (carg[j] < 0) return kInfeasible;  // a column with only forbidden pairs
      v[j] = cmin[j];
      if (x[carg[j]] < 0) x[carg[j]] = j, y[j] = carg[j];
    }
  }

  // ---- augmenting row reduction ----
  int64_t* free_rows = b.free_rows;
  int64_t n_free = 0;
  for (int64_t i = 0; i < n; ++i)
    if (x[i] < 0) free_rows[n_free++] = i;
  for (int round = 0; round < 2 && n_free > 0; ++round) {
    int64_t k = 0, prev_free = n_free, cap = 2 * n + 16;
    n_free = 0;
    while (k < prev_free && cap-- > 0) {
      const int64_t i = free_rows[k++];
      const T* ci = C + i * ld;
      double u1 = kInf;
#pragma omp simd reduction(min : u1)
      for (int64_t j = 0; j < m; ++j) {
        hrow[j] = double(ci[j]) - v[j];
        u1 = hrow[j] < u1 ? hrow[j] : u1;
      }
      // One more SIMD pass: the first column at u1, how many sit at u1, and the
      // smallest value above u1 -- together the runner-up u2.
      int64_t j1 = m, at_min = 0;
      double above = kInf;
#pragma omp simd reduction(min : j1, above) reduction(+ : at_min)
      for (int64_t j = 0; j < m; ++j) {
        const bool eq = hrow[j] == u1;
        j1 = (eq && j < j1) ? j : j1;
        at_min += eq ? 1 : 0;
        above = (hrow[j] > u1 && hrow[j] < above) ? hrow[j] : above;
      }
      const double u2 = at_min >= 2 ? u1 : above;
      int64_t i0 = y[j1];
      const bool strict = u1 < u2;
      if (strict) {
        if (u2 < kInf) v[j1] -= u2 - u1;  // j1 now as attractive as the runner-up for row i
      } else if (i0 >= 0) {
        int64_t j2 = 0;  // a tie: prefer the runner-up column
        while (j2 == j1 || hrow[j2] != u2) ++j2;
        j1 = j2;
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
  // cols[0, low): settled; cols[low, up): at the current level, to scan;
  // cols[up, m): not reached.  Relaxations touch only unreached columns.
  int64_t* cols = scan;
  int64_t budget = 4 * n * (m + 2) + 64;  // each step settles or queues >= 1 column
  for (int64_t f = 0; f < n; ++f) {
    if (x[f] >= 0) continue;
    const T* cf = C + f * ld;
    for (int64_t j = 0; j < m; ++j) {
      cols[j] = j;
      d[j] = double(cf[j]) - v[j];
      pred[j] = f;
    }
    int64_t low = 0, up = 0, end = -1;
    double mu = 0.0;
    while (end < 0) {
      if (--budget < 0) return kIterationLimit;
      if (low == up) {  // next level: every unreached column at the minimum distance
        mu = kInf;
        for (int64_t k = up; k < m; ++k) {
          const int64_t j = cols[k];
          if (d[j] <= mu) {
            if (d[j] < mu) mu = d[j], up = low;
            const int64_t t = cols[k];
            cols[k] = cols[up];
            cols[up++] = t;
          }
        }
        if (mu == kInf) return kInfeasible;
        for (int64_t k = low; k < up; ++k)
          if (y[cols[k]] < 0) {
            end = cols[k];
            break;
          }
        if (end >= 0) break;
      }
      const int64_t j = cols[low++];  // settle j and relax the row matched to it
      const int64_t i = y[j];
      const T* ci = C + i * ld;
      const double base = double(ci[j]) - v[j] - mu;
      for (int64_t k = up; k < m; ++k) {
        const int64_t jj = cols[k];
        const double h = double(ci[jj]) - v[jj] - base;
        if (h < d[jj]) {
          d[jj] = h;
          pred[jj] = i;
          if (h == mu) {
            if (y[jj] < 0) {
              end = jj;
              break;
            }
            cols[k] = cols[up];
            cols[up++] = jj;
          }
        }
      }
    }
    for (int64_t k = 0; k < low; ++k) v[cols[k]] += d[cols[k]] - mu;  // settled columns
    for (int64_t j = end;;) {  // flip the augmenting path
      const int64_t i = pred[j];
      y[j] = i;
      const int64_t next = x[i];
      x[i] = j;
      if (i == f) break;
      j = next;
    }
  }

  // ---- certificate ----
  for (int64_t i = 0; i < n; ++i) u[i] = double(C[i * ld + x[i]]) - v[x[i]];
  double vmax = 0.0;
  for (int64_t j = 0; j < m; ++j) vmax = dmax(vmax, dabs(v[j]));
  const double tol = 1e-9 * (scale + vmax) + 1e-300;
  for (int64_t i = 0; i < n; ++i) {
    const T* ci = C + i * ld;
    const double ui = u[i];
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t j = 0; j < m; ++j) {
      const double c = double(ci[j]);
      bad |= (c != kInf && c - ui - v[j] < -tol) ? 1 : 0;
    }
    if (bad) return kCertificateFailed;
  }
  if (n < m)
    for (int64_t j = 0; j < m; ++j)
      if (v[j] > tol || (y[j] < 0 && v[j] != 0.0)) return kCertificateFailed;
  return kOk;
}

}  // namespace LCT_LAP_NS
}  // namespace lct
