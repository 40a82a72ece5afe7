// The row kernels of the CPU backend: OpenMP over rows, all loss math from core/row_math.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/backend.h"

namespace flce::detail::cpu {

Status prepare(const PrepareArgs& args);
Status rows_forward(const RowForwardArgs& args);
Status rows_grad(const RowGradArgs& args);
Status column_sum(const ColumnSumArgs& args);
Status finalize(const FinalizeArgs& args);
Status scale(void* data, DType type, int64_t count, const float* factor);
// dst[r, c] = src[r, c] * row_factor[r] * factor[0] (CastArgs).
Status cast(const CastArgs& args);

}  // namespace flce::detail::cpu
