// Host-side helper shared by the CUDA ops: one int64 table (pointers, sizes, chunk starts, ...) built on
// the host and uploaded once per launch.
#pragma once

#include <ATen/ops/from_blob.h>

#include <vector>

namespace calm_fast {

// Uploads `h` to `device`.  From pageable memory the copy has staged `h` when it returns, so `h` may
// die right after; under the emulator the "device" is the CPU and the result is a private copy.
inline at::Tensor upload_table(std::vector<int64_t>& h, const at::Device& device) {
  const at::Tensor host = at::from_blob(h.data(), {static_cast<int64_t>(h.size())}, at::kLong);
  at::Tensor dev = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  if (dev.data_ptr() == host.data_ptr()) dev = host.clone();
  return dev;
}

}  // namespace calm_fast
