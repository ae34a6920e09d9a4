// Baseline x86-64 (SSE2) build of isa/gated_rows.h.
#define LCT_ISA base
#include "gated_rows.h"
