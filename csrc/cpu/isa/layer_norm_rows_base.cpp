// Baseline x86-64 (SSE2) build of isa/layer_norm_rows.h.
#define LCT_ISA base
#include "layer_norm_rows.h"
