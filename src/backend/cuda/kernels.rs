//! The kernels embedded by `build.rs` and their loading: a fatbin when nvcc was present at
//! build time, otherwise the `.cu` source compiled by NVRTC the first time a family is used.

use super::cuda_error;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One `kernels/*.cu` file as `build.rs` embedded it.
#[derive(Debug)]
pub struct EmbeddedKernel {
    pub family: &'static str,
    pub fatbin: Option<&'static [u8]>,
    pub source: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// One kernel family = one `.cu` file = one CUDA module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFamily {
    Attention,
    Elementwise,
    Koleo,
    Layernorm,
    Loss,
    Optimizer,
    Patch,
    Sinkhorn,
}

impl KernelFamily {
    pub const ALL: [KernelFamily; 8] = [
        KernelFamily::Attention,
        KernelFamily::Elementwise,
        KernelFamily::Koleo,
        KernelFamily::Layernorm,
        KernelFamily::Loss,
        KernelFamily::Optimizer,
        KernelFamily::Patch,
        KernelFamily::Sinkhorn,
    ];

    /// The `.cu` file stem.
    pub fn file_stem(self) -> &'static str {
        match self {
            KernelFamily::Attention => "attention",
            KernelFamily::Elementwise => "elementwise",
            KernelFamily::Koleo => "koleo",
            KernelFamily::Layernorm => "layernorm",
            KernelFamily::Loss => "loss",
            KernelFamily::Optimizer => "optimizer",
            KernelFamily::Patch => "patch",
            KernelFamily::Sinkhorn => "sinkhorn",
        }
    }

    /// What this build embedded for the family.
    pub fn embedded(self) -> Option<&'static EmbeddedKernel> {
        EMBEDDED_KERNELS
            .iter()
            .find(|k| k.family == self.file_stem())
    }
}

/// True when nvcc compiled every family at build time (NVRTC is then never needed).
pub fn all_precompiled() -> bool {
    KernelFamily::ALL
        .iter()
        .all(|f| f.embedded().is_some_and(|k| k.fatbin.is_some()))
}

/// Modules loaded on first use, and the functions looked up in them.
pub(super) struct Kernels {
    ctx: Arc<CudaContext>,
    modules: [OnceLock<Arc<CudaModule>>; 8],
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl Kernels {
    pub(super) fn new(ctx: Arc<CudaContext>) -> Result<Self> {
        for family in KernelFamily::ALL {
            if family.embedded().is_none() {
                return Err(Error::Cuda(format!(
                    "kernels/{}.cu was not embedded in this build",
                    family.file_stem()
                )));
            }
        }
        Ok(Kernels {
            ctx,
            modules: Default::default(),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The kernel `name` of `family` (cached after the first lookup).
    pub(super) fn function(
        &self,
        family: KernelFamily,
        name: &'static str,
    ) -> Result<CudaFunction> {
        if let Some(f) = self.lock_functions().get(name) {
            return Ok(f.clone());
        }
        let module = self.module(family)?;
        let function = module
            .load_function(name)
            .map_err(|e| cuda_error(&format!("kernel {name} in {}.cu", family.file_stem()), e))?;
        self.lock_functions().insert(name, function.clone());
        Ok(function)
    }

    fn lock_functions(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, CudaFunction>> {
        // A poisoned lock only means another thread panicked mid-insert; the map stays valid.
        self.functions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn module(&self, family: KernelFamily) -> Result<Arc<CudaModule>> {
        // `ALL` lists the families in declaration order.
        let cell = &self.modules[family as usize];
        if let Some(m) = cell.get() {
            return Ok(m.clone());
        }
        let module = self.load(family)?;
        // A concurrent loader may have won; either module is equivalent.
        Ok(cell.get_or_init(|| module).clone())
    }

    fn load(&self, family: KernelFamily) -> Result<Arc<CudaModule>> {
        let embedded = family.embedded().ok_or_else(|| {
            Error::Cuda(format!("kernels/{}.cu not embedded", family.file_stem()))
        })?;
        let ptx = match embedded.fatbin {
            // Copied into a Vec: the driver wants an aligned image, include_bytes! is not.
            Some(fatbin) => Ptx::from_binary(fatbin.to_vec()),
            None => self.compile_with_nvrtc(embedded)?,
        };
        self.ctx
            .load_module(ptx)
            .map_err(|e| cuda_error(&format!("loading kernels/{}.cu", family.file_stem()), e))
    }

    fn compile_with_nvrtc(&self, embedded: &EmbeddedKernel) -> Result<Ptx> {
        let (major, minor) = self
            .ctx
            .compute_capability()
            .map_err(|e| cuda_error("cuDeviceGetAttribute", e))?;
        compile_source_with_nvrtc(embedded, &format!("compute_{major}{minor}"))
    }
}

/// Compiles one embedded source to PTX for `arch` (e.g. `compute_90`) with NVRTC. Needs only
/// libnvrtc (no driver, no GPU), so CPU machines can check the run-time fallback too.
pub fn compile_source_with_nvrtc(embedded: &EmbeddedKernel, arch: &str) -> Result<Ptx> {
    // SAFETY: only tries to dlopen libnvrtc by its usual names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "NVRTC (libnvrtc.so.13) not found on LD_LIBRARY_PATH".into(),
        ));
    }
    // NVRTC has no include path to the kernels folder: splice the shared header in.
    let source = embedded
        .source
        .replace("#include \"common.cuh\"", COMMON_HEADER);
    let options = CompileOptions {
        options: vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".to_string(),
        ],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| {
        cuda_error(
            &format!("NVRTC compiling kernels/{}.cu", embedded.family),
            e,
        )
    })
}
