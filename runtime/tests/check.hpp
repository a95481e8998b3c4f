// The checks the C++ tests share (no framework): CHECK / CHECK_NEAR count and report a
// failure without stopping, and check_summary() prints the tally and gives the exit status.
#pragma once

#include <cmath>
#include <cstdio>

namespace clada_test {

inline int g_failures = 0;
inline int g_checks = 0;

// "N checks, M failures" on stdout; 0 when nothing failed, else 1 (main's return value).
inline int check_summary() {
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace clada_test

#define CHECK(cond)                                                                  \
  do {                                                                               \
    ++clada_test::g_checks;                                                          \
    if (!(cond)) {                                                                   \
      ++clada_test::g_failures;                                                      \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                                \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                         \
  do {                                                                                                \
    ++clada_test::g_checks;                                                                           \
    const double a_ = (a), b_ = (b);                                                                  \
    if (!(std::fabs(a_ - b_) <= (tol))) {                                                             \
      ++clada_test::g_failures;                                                                       \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s=%.17g %s=%.17g\n", __FILE__, __LINE__, #a, a_, \
                   #b, b_);                                                                           \
    }                                                                                                 \
  } while (0)
