// Baseline x86-64 (SSE2) build of isa/radam_span.h.
#define LCT_ISA base
#include "radam_span.h"
