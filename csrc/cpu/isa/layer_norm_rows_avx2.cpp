// AVX2 + FMA build of isa/layer_norm_rows.h, used only when the CPU has both
// (checked at run time in layer_norm.cpp).  On other architectures this file
// compiles to the baseline code and is never selected.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma")
// the pragma enables the AVX2/FMA intrinsics but does not define __AVX2__/__FMA__
#define LCT_ISA_AVX2 1
#endif
#define LCT_ISA avx2
#include "layer_norm_rows.h"
