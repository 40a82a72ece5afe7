// Host entry points of the CUDA kernels (defined in the .cu files), called by the backend class.
// Each checks what it relies on, picks the vectorized or the scalar variant, launches on `stream`
// and checks the launch. None synchronizes or allocates.
#pragma once

#include <cuda_runtime.h>

#include "core/backend.h"
#include "flce/flce.h"

namespace flce::detail::cuda {

Status launch_prepare(const PrepareArgs& args, cudaStream_t stream);       // reduce_kernels.cu
Status launch_finalize(const FinalizeArgs& args, cudaStream_t stream);     // reduce_kernels.cu
Status launch_column_sum(const ColumnSumArgs& args, cudaStream_t stream);  // reduce_kernels.cu
Status launch_scale(void* data, DType type, int64_t count, const float* factor,
                    cudaStream_t stream);                                      // reduce_kernels.cu
Status launch_rows_forward(const RowForwardArgs& args, cudaStream_t stream);   // row_kernels.cu
Status launch_rows_grad(const RowGradArgs& args, cudaStream_t stream);         // row_kernels.cu
Status launch_label_shift(const LabelShiftArgs& args, cudaStream_t stream);    // shifted_terms.cu
Status launch_shifted_rows(const ShiftedRowsArgs& args, cudaStream_t stream);  // shifted_terms.cu
Status launch_cast(const CastArgs& args, cudaStream_t stream);                 // reduce_kernels.cu

}  // namespace flce::detail::cuda
