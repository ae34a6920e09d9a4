// Row passes of the assignment solver (lct/lap.h): each reads one cost row of m
// entries (float or double, widened to double) against the column duals v.
// Every pass has a scalar form; a build that defines LCT_LAP_AVX2 (and compiles
// for AVX2, csrc/cpu/isa/lap_avx2.cpp) gets hand-vectorised forms.  Both forms
// compute every value with the same operations in the same order and visit
// columns in the same order wherever order matters, so the two builds return the
// same assignment bit for bit.
//
// The vector forms keep two accumulators where a reduction would otherwise chain
// one 4-cycle min per four columns, and use min_pd's NaN rule (the second
// operand is returned when either is NaN) so that a reached column (key NaN) is
// skipped without a mask.  Included inside namespace lct::LCT_LAP_NS.
#pragma once

constexpr double kInf = __builtin_inf();

inline double dmax(double a, double b) { return a > b ? a : b; }
inline double dabs(double a) { return a < 0 ? -a : a; }

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------
// One validation pass over a row.
struct RowStats {
  double min;     // smallest entry (+inf if all are forbidden)
  double absmax;  // largest finite |c|
  bool nan, neginf;
};

// The smallest and second smallest (with multiplicity) of h_j = c_j - v_j.
struct Top2 {
  double u1, u2;
};

// State of one shortest-path search.  order[0, low) are scanned columns,
// order[low, up) columns reached at the current level mu and not yet scanned.
// key_j is the tentative distance of an unreached column and NaN once reached;
// level_j the distance it was reached at; reached_rows_j how many rows had been
// scanned then (the candidates for its predecessor on the path).
struct Search {
  double* key;
  double* level;
  int64_t* reached_rows;
  int64_t* order;
  const int64_t* y;  // row assigned to each column, -1 if none
  int64_t up, rows;  // rows: rows scanned so far (the free row included)
  int64_t end;       // the unassigned column that ends the search, or -1
};

// Column j is reached at distance mu: it joins the level; an unassigned column
// ends the search (returns true).
inline bool reach(Search& s, int64_t j, double mu) {
  s.key[j] = __builtin_nan("");
  s.level[j] = mu;
  s.reached_rows[j] = s.rows;
  s.order[s.up++] = j;
  if (s.y[j] >= 0) return false;
  s.end = j;
  return true;
}

// ---------------------------------------------------------------------------
// Scalar forms (also the tails of the vector forms)
// ---------------------------------------------------------------------------
template <typename T>
inline RowStats row_stats_scalar(const T* c, int64_t m) {
  RowStats r{kInf, 0.0, false, false};
  for (int64_t j = 0; j < m; ++j) {
    const double x = double(c[j]);
    if (x != x) {
      r.nan = true;
      continue;
    }
    r.neginf |= x == -kInf;
    r.min = x < r.min ? x : r.min;
    if (dabs(x) != kInf) r.absmax = dmax(r.absmax, dabs(x));
  }
  return r;
}

// Column minima of c - r and the first row reaching them, updated by row i.
template <typename T>
inline void column_min_update_scalar(const T* c, int64_t m, double r, int64_t i, double* cmin,
                                     int64_t* carg) {
  for (int64_t j = 0; j < m; ++j) {
    const double rc = double(c[j]) - r;
    if (rc < cmin[j]) cmin[j] = rc, carg[j] = i;
  }
}

// Add one value to a running smallest-two (a tie makes u2 equal u1).
inline void top2_push(Top2& t, double h) {
  t.u2 = h < t.u1 ? t.u1 : (h < t.u2 ? h : t.u2);
  t.u1 = h < t.u1 ? h : t.u1;
}

template <typename T>
inline Top2 row_top2_scalar(const T* c, const double* v, int64_t m) {
  Top2 t{kInf, kInf};
  for (int64_t j = 0; j < m; ++j) top2_push(t, double(c[j]) - v[j]);
  return t;
}

// First column j >= j0 with c_j - v_j == target and j != skip, or m.
template <typename T>
inline int64_t find_column_scalar(const T* c, const double* v, int64_t j0, int64_t m,
                                  double target, int64_t skip) {
  for (int64_t j = j0; j < m; ++j)
    if (j != skip && double(c[j]) - v[j] == target) return j;
  return m;
}

// Search start for a free row: key_j = c_j - v_j; returns the smallest key.
template <typename T>
inline double search_init_scalar(const T* c, const double* v, double* key, int64_t m) {
  double mn = kInf;
  for (int64_t j = 0; j < m; ++j) {
    key[j] = double(c[j]) - v[j];
    mn = key[j] < mn ? key[j] : mn;
  }
  return mn;
}

// Reach every unreached column whose key equals mu, in column order.
inline void reach_level_scalar(Search& s, int64_t j0, int64_t m, double mu) {
  for (int64_t j = j0; j < m; ++j)
    if (s.key[j] == mu && reach(s, j, mu)) return;
}

// Relax a row reached through a column at distance mu (base = c_ij - v_j - mu):
// key_j = min(key_j, c_j - v_j - base) on unreached columns (a NaN key stays
// NaN); a column whose key drops to mu (a tight edge) is reached at once.
// Returns the smallest key left among unreached columns.
template <typename T>
inline double relax_scalar(const T* c, const double* v, Search& s, int64_t j0, int64_t m,
                           double base, double mu) {
  double mn = kInf;
  for (int64_t j = j0; j < m; ++j) {
    const double h = double(c[j]) - v[j] - base;
    const double k = s.key[j];
    const double nk = h < k ? h : k;
    s.key[j] = nk;
    if (nk == mu) {
      if (reach(s, j, mu)) return mn;
    } else {
      mn = nk < mn ? nk : mn;  // a NaN key never wins
    }
  }
  return mn;
}

// Smallest certificate slack c_j - u - v_j < -tol anywhere in the row?
template <typename T>
inline bool row_violates_scalar(const T* c, const double* v, int64_t m, double u, double tol) {
  for (int64_t j = 0; j < m; ++j)
    if (double(c[j]) - u - v[j] < -tol) return true;  // +inf entries give +inf
  return false;
}

#if defined(LCT_LAP_AVX2)
// ---------------------------------------------------------------------------
// AVX2 forms
// ---------------------------------------------------------------------------
inline __m256d load4(const double* p) { return _mm256_loadu_pd(p); }
inline __m256d load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

inline double hmin(__m256d x) {
  __m128d lo = _mm_min_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_min_sd(lo, _mm_unpackhi_pd(lo, lo)));
}
inline double hmax(__m256d x) {
  __m128d lo = _mm_max_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_max_sd(lo, _mm_unpackhi_pd(lo, lo)));
}

template <typename T>
inline RowStats row_stats(const T* c, int64_t m) {
  const int64_t m4 = m & ~int64_t(3);
  const __m256d inf = _mm256_set1_pd(kInf), ninf = _mm256_set1_pd(-kInf);
  const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
  __m256d mn = inf, amax = _mm256_setzero_pd(), bad_nan = _mm256_setzero_pd(),
          bad_neg = _mm256_setzero_pd();
  for (int64_t j = 0; j < m4; j += 4) {
    const __m256d x = load4(c + j);
    bad_nan = _mm256_or_pd(bad_nan, _mm256_cmp_pd(x, x, _CMP_UNORD_Q));
    bad_neg = _mm256_or_pd(bad_neg, _mm256_cmp_pd(x, ninf, _CMP_EQ_OQ));
    mn = _mm256_min_pd(x, mn);  // a NaN x leaves mn (NaN is reported anyway)
    const __m256d a = _mm256_and_pd(x, absmask);
    amax = _mm256_max_pd(_mm256_and_pd(a, _mm256_cmp_pd(a, inf, _CMP_LT_OQ)), amax);
  }
  RowStats r = row_stats_scalar(c + m4, m - m4);
  const double head_min = hmin(mn);
  r.min = head_min < r.min ? head_min : r.min;
  r.absmax = dmax(r.absmax, hmax(amax));
  r.nan |= _mm256_movemask_pd(bad_nan) != 0;
  r.neginf |= _mm256_movemask_pd(bad_neg) != 0;
  return r;
}

template <typename T>
inline void column_min_update(const T* c, int64_t m, double r, int64_t i, double* cmin,
                              int64_t* carg) {
  const int64_t m4 = m & ~int64_t(3);
  const __m256d vr = _mm256_set1_pd(r);
  const __m256i vi = _mm256_set1_epi64x(i);
  for (int64_t j = 0; j < m4; j += 4) {
    const __m256d rc = _mm256_sub_pd(load4(c + j), vr);
    const __m256d old = _mm256_loadu_pd(cmin + j);
    const __m256d lt = _mm256_cmp_pd(rc, old, _CMP_LT_OQ);
    _mm256_storeu_pd(cmin + j, _mm256_blendv_pd(old, rc, lt));
    __m256i* pa = reinterpret_cast<__m256i*>(carg + j);
    _mm256_storeu_si256(pa, _mm256_blendv_epi8(_mm256_loadu_si256(pa), vi, _mm256_castpd_si256(lt)));
  }
  column_min_update_scalar(c + m4, m - m4, r, i, cmin + m4, carg + m4);
}

template <typename T>
inline Top2 row_top2(const T* c, const double* v, int64_t m) {
  const int64_t m8 = m & ~int64_t(7);
  // Per lane the smallest two: a' = min(a, h), b' = min(b, max(a, h)); two sets.
  __m256d a0 = _mm256_set1_pd(kInf), b0 = a0, a1 = a0, b1 = a0;
  for (int64_t j = 0; j < m8; j += 8) {
    const __m256d h0 = _mm256_sub_pd(load4(c + j), _mm256_loadu_pd(v + j));
    const __m256d h1 = _mm256_sub_pd(load4(c + j + 4), _mm256_loadu_pd(v + j + 4));
    b0 = _mm256_min_pd(b0, _mm256_max_pd(a0, h0));
    a0 = _mm256_min_pd(a0, h0);
    b1 = _mm256_min_pd(b1, _mm256_max_pd(a1, h1));
    a1 = _mm256_min_pd(a1, h1);
  }
  alignas(32) double lanes[16];
  _mm256_store_pd(lanes, a0), _mm256_store_pd(lanes + 4, b0);
  _mm256_store_pd(lanes + 8, a1), _mm256_store_pd(lanes + 12, b1);
  Top2 t = row_top2_scalar(c + m8, v + m8, m - m8);
  for (double x : lanes) top2_push(t, x);  // the smallest two overall are among the lanes' two
  return t;
}

template <typename T>
inline int64_t find_column(const T* c, const double* v, int64_t j0, int64_t m, double target,
                           int64_t skip) {
  const __m256d vt = _mm256_set1_pd(target);
  int64_t j = j0;
  for (; j + 4 <= m; j += 4) {
    const __m256d h = _mm256_sub_pd(load4(c + j), _mm256_loadu_pd(v + j));
    int hit = _mm256_movemask_pd(_mm256_cmp_pd(h, vt, _CMP_EQ_OQ));
    if (skip >= j && skip < j + 4) hit &= ~(1 << (skip - j));
    if (hit) return j + __builtin_ctz(unsigned(hit));
  }
  return find_column_scalar(c, v, j, m, target, skip);
}

template <typename T>
inline double search_init(const T* c, const double* v, double* key, int64_t m) {
  const int64_t m4 = m & ~int64_t(3);
  __m256d mn0 = _mm256_set1_pd(kInf), mn1 = mn0;
  int64_t j = 0;
  for (; j + 8 <= m4; j += 8) {
    const __m256d k0 = _mm256_sub_pd(load4(c + j), _mm256_loadu_pd(v + j));
    const __m256d k1 = _mm256_sub_pd(load4(c + j + 4), _mm256_loadu_pd(v + j + 4));
    _mm256_storeu_pd(key + j, k0), _mm256_storeu_pd(key + j + 4, k1);
    mn0 = _mm256_min_pd(k0, mn0), mn1 = _mm256_min_pd(k1, mn1);
  }
  const double tail = search_init_scalar(c + j, v + j, key + j, m - j);
  const double head = hmin(_mm256_min_pd(mn0, mn1));
  return tail < head ? tail : head;
}

inline void reach_level(Search& s, int64_t m, double mu) {
  const int64_t m4 = m & ~int64_t(3);
  const __m256d vmu = _mm256_set1_pd(mu);
  for (int64_t j = 0; j < m4; j += 4) {
    const int hit = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(s.key + j), vmu, _CMP_EQ_OQ));
    for (int l = 0; l < 4; ++l)
      if ((hit >> l & 1) && reach(s, j + l, mu)) return;
  }
  reach_level_scalar(s, m4, m, mu);
}

// One step of relax on four columns from j; returns true when the search ended.
template <typename T>
inline bool relax4(const T* c, const double* v, Search& s, int64_t j, __m256d vb, __m256d vmu,
                   double mu, __m256d& mn) {
  const __m256d h = _mm256_sub_pd(_mm256_sub_pd(load4(c + j), _mm256_loadu_pd(v + j)), vb);
  const __m256d nk = _mm256_min_pd(h, _mm256_loadu_pd(s.key + j));  // a NaN key stays NaN
  _mm256_storeu_pd(s.key + j, nk);
  const __m256d at_mu = _mm256_cmp_pd(nk, vmu, _CMP_EQ_OQ);
  const int hit = _mm256_movemask_pd(at_mu);
  if (__builtin_expect(hit != 0, 0)) {  // tight edges: reach those columns now
    for (int l = 0; l < 4; ++l)
      if ((hit >> l & 1) && reach(s, j + l, mu)) return true;
    mn = _mm256_min_pd(_mm256_blendv_pd(nk, _mm256_set1_pd(__builtin_nan("")), at_mu), mn);
  } else {
    mn = _mm256_min_pd(nk, mn);  // returns mn where nk is NaN
  }
  return false;
}

template <typename T>
inline double relax(const T* c, const double* v, Search& s, int64_t m, double base, double mu) {
  const __m256d vb = _mm256_set1_pd(base), vmu = _mm256_set1_pd(mu);
  __m256d mn0 = _mm256_set1_pd(kInf), mn1 = mn0;
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    if (relax4(c, v, s, j, vb, vmu, mu, mn0) || relax4(c, v, s, j + 4, vb, vmu, mu, mn1))
      return kInf;
  }
  if (j + 4 <= m) {
    if (relax4(c, v, s, j, vb, vmu, mu, mn0)) return kInf;
    j += 4;
  }
  const double tail = relax_scalar(c, v, s, j, m, base, mu);
  const double head = hmin(_mm256_min_pd(mn0, mn1));
  return tail < head ? tail : head;
}

template <typename T>
inline bool row_violates(const T* c, const double* v, int64_t m, double u, double tol) {
  const int64_t m4 = m & ~int64_t(3);
  const __m256d vu = _mm256_set1_pd(u), vt = _mm256_set1_pd(-tol);
  __m256d bad = _mm256_setzero_pd();
  for (int64_t j = 0; j < m4; j += 4) {
    const __m256d slack = _mm256_sub_pd(_mm256_sub_pd(load4(c + j), vu), _mm256_loadu_pd(v + j));
    bad = _mm256_or_pd(bad, _mm256_cmp_pd(slack, vt, _CMP_LT_OQ));
  }
  return _mm256_movemask_pd(bad) != 0 || row_violates_scalar(c + m4, v + m4, m - m4, u, tol);
}

#else
template <typename T>
inline RowStats row_stats(const T* c, int64_t m) {
  return row_stats_scalar(c, m);
}
template <typename T>
inline void column_min_update(const T* c, int64_t m, double r, int64_t i, double* cmin,
                              int64_t* carg) {
  column_min_update_scalar(c, m, r, i, cmin, carg);
}
template <typename T>
inline Top2 row_top2(const T* c, const double* v, int64_t m) {
  return row_top2_scalar(c, v, m);
}
template <typename T>
inline int64_t find_column(const T* c, const double* v, int64_t j0, int64_t m, double target,
                           int64_t skip) {
  return find_column_scalar(c, v, j0, m, target, skip);
}
template <typename T>
inline double search_init(const T* c, const double* v, double* key, int64_t m) {
  return search_init_scalar(c, v, key, m);
}
inline void reach_level(Search& s, int64_t m, double mu) { reach_level_scalar(s, 0, m, mu); }
template <typename T>
inline double relax(const T* c, const double* v, Search& s, int64_t m, double base, double mu) {
  return relax_scalar(c, v, s, 0, m, base, mu);
}
template <typename T>
inline bool row_violates(const T* c, const double* v, int64_t m, double u, double tol) {
  return row_violates_scalar(c, v, m, u, tol);
}
#endif
