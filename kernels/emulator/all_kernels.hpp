// Every kernel family in one translation unit for the host emulation, each `.cu` file in a
// namespace of its own (they share helper names). The include order is the emulator's:
// simt.hpp, ../common.cuh, ptx_host.hpp, then the kernel files.
#pragma once
#include "simt.hpp"
#include "../common.cuh"
#include "ptx_host.hpp"

namespace fam_attention {
#include "../attention.cu"
}
namespace fam_elementwise {
#include "../elementwise.cu"
}
namespace fam_koleo {
#include "../koleo.cu"
}
namespace fam_layernorm {
#include "../layernorm.cu"
}
namespace fam_loss {
#include "../loss.cu"
}
namespace fam_optimizer {
#include "../optimizer.cu"
}
namespace fam_patch {
#include "../patch.cu"
}
namespace fam_sinkhorn {
#include "../sinkhorn.cu"
}
