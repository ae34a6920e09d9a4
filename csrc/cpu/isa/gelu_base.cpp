// Baseline x86-64 (SSE2) build of isa/gelu_rows.h.
#define LCT_ISA base
#include "gelu_rows.h"
