// Linked instead of csrc/cuda/ when flce is built without CUDA.
#include "backends.h"

namespace flce::detail {

BackendTraits cuda_traits() { return cpu_traits(); }
std::unique_ptr<Backend> make_cuda_backend(void*, bool, void*, size_t) { return nullptr; }
bool cuda_compiled() { return false; }

}  // namespace flce::detail
