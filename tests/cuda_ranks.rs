//! Data-parallel training on CUDA over NCCL: one process per rank, as a real launch runs it.
//!
//! * Two ranks (this test binary started twice as child processes, each joined to one NCCL
//!   communicator) against one process accumulating the same two micro-batches: losses and
//!   weights agree to float32 reduction order. Runs where two ranks can each have a device:
//!   two or more GPUs, or the emulated device with its NCCL double (`emulated_cuda.rs`); NCCL
//!   refuses two ranks on one GPU, so a one-GPU machine skips it.
//! * One rank over NCCL (world size 1) against no collective at all: the same bits.
//!
//! Skips, saying why, without a GPU or without libnccl.

mod cuda_support;
mod trainer_support;

use std::path::Path;
use std::process::Command;

use dinotrain::backend::cuda::{
    check_nccl, nccl_unique_id, CudaBackend, NcclCollective, ResolvedDevice, NCCL_ID_BYTES,
};
use dinotrain::ssl::Method;
use dinotrain::train::trainer::{TrainPlan, Trainer};
use trainer_support::{crops, micro_plan, rel};

const STEPS: u64 = 2;
const RANK_ENV: &str = "DINOTRAIN_TEST_RANK";
const ID_ENV: &str = "DINOTRAIN_TEST_NCCL_ID";
const OUT_ENV: &str = "DINOTRAIN_TEST_RANK_OUT";

fn plan() -> TrainPlan {
    micro_plan(Method::Dinov2)
}

/// Rank `r`'s crops at `step` (the accumulating run's micro-batch `r`).
fn rank_crops(t: &Trainer, rank: usize, step: u64) -> (Vec<f32>, Vec<f32>) {
    crops(t, 1000 * rank as u64 + step)
}

fn cuda_trainer(plan: TrainPlan, ordinal: usize) -> Trainer {
    let gpu = CudaBackend::new(ordinal).unwrap();
    Trainer::new_on(plan, ResolvedDevice::Cuda(Box::new(gpu))).unwrap()
}

/// The losses of every step, then the student and the teacher, as one vector.
fn trace(t: &mut Trainer, mut step: impl FnMut(&mut Trainer) -> Vec<f32>) -> Vec<f32> {
    let mut values: Vec<f32> = (0..STEPS).flat_map(|_| step(t)).collect();
    let state = t.snapshot().unwrap();
    values.extend(state.student);
    values.extend(state.teacher);
    values
}

/// The logged loss terms of a step.
fn terms(record: dinotrain::train::trainer::StepRecord) -> Vec<f32> {
    record.losses.terms().into_iter().map(|(_, v)| v).collect()
}

fn nccl_ready() -> bool {
    if cuda_support::gpu().is_none() {
        return false;
    }
    if let Err(reason) = check_nccl() {
        eprintln!("skipping: {reason}");
        return false;
    }
    true
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> [u8; NCCL_ID_BYTES] {
    let mut id = [0u8; NCCL_ID_BYTES];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

/// The child side: rank `r` of two trains its micro-batches and writes its trace.
fn run_as_rank(rank: usize) {
    let id = unhex(&std::env::var(ID_ENV).unwrap());
    let out = std::env::var(OUT_ENV).unwrap();
    let devices = cudarc::driver::CudaContext::device_count().unwrap() as usize;
    let ordinal = rank % devices;
    let mut t = cuda_trainer(plan(), ordinal);
    t.join(Box::new(
        NcclCollective::new(ordinal, rank, 2, &id).unwrap(),
    ))
    .unwrap();
    let values = trace(&mut t, |t| {
        let (g, l) = rank_crops(t, rank, t.step());
        terms(t.train_micro_batches(&[(&g, &l)]).unwrap())
    });
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes).unwrap();
}

#[test]
fn two_ranks_over_nccl_follow_two_accumulated_micro_batches() {
    if let Ok(rank) = std::env::var(RANK_ENV) {
        return run_as_rank(rank.parse().unwrap());
    }
    if !nccl_ready() {
        return;
    }
    let gpu = CudaBackend::new(0).unwrap();
    let emulated = CudaBackend::describe(&gpu).is_ok_and(|d| d.contains("emulated"));
    let devices = cudarc::driver::CudaContext::device_count().unwrap();
    drop(gpu);
    if devices < 2 && !emulated {
        // Not a skip of something this machine could run: NCCL refuses two ranks on one GPU.
        eprintln!(
            "not run here: one GPU (NCCL needs a device per rank); the emulated device runs it"
        );
        return;
    }
    let id = hex(&nccl_unique_id().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let out = tmp.path().join(format!("rank{rank}.bin"));
            let child = Command::new(&me)
                .args([
                    "--exact",
                    "two_ranks_over_nccl_follow_two_accumulated_micro_batches",
                    "--nocapture",
                ])
                .env(RANK_ENV, rank.to_string())
                .env(ID_ENV, &id)
                .env(OUT_ENV, &out)
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    let ranks: Vec<Vec<f32>> = children
        .into_iter()
        .map(|(mut child, out)| {
            assert!(child.wait().unwrap().success(), "a rank failed");
            read_f32(&out)
        })
        .collect();
    let mut acc_plan = plan();
    acc_plan.accumulate = 2;
    let mut acc = cuda_trainer(acc_plan, 0);
    let reference = trace(&mut acc, |t| {
        let step = t.step();
        let (g0, l0) = rank_crops(t, 0, step);
        let (g1, l1) = rank_crops(t, 1, step);
        terms(t.train_micro_batches(&[(&g0, &l0), (&g1, &l1)]).unwrap())
    });
    assert_eq!(ranks[0], ranks[1], "the ranks hold one state");
    let err = rel(&ranks[0], &reference);
    eprintln!(
        "two NCCL ranks vs accumulate 2 on CUDA: losses and weights over {STEPS} steps {err:.2e}"
    );
    assert!(err < 1e-5, "two NCCL ranks vs accumulate 2: {err:.2e}");
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn one_rank_over_nccl_is_the_run_without_a_collective() {
    if std::env::var(RANK_ENV).is_ok() || !nccl_ready() {
        return;
    }
    let id = nccl_unique_id().unwrap();
    let mut alone = cuda_trainer(plan(), 0);
    let mut joined = cuda_trainer(plan(), 0);
    joined
        .join(Box::new(NcclCollective::new(0, 0, 1, &id).unwrap()))
        .unwrap();
    assert_eq!((joined.rank(), joined.world_size()), (0, 1));
    let step = |t: &mut Trainer| {
        let (g, l) = rank_crops(t, 0, t.step());
        terms(t.train_micro_batches(&[(&g, &l)]).unwrap())
    };
    assert_eq!(trace(&mut joined, step), trace(&mut alone, step));
}
