//! Data-parallel training on the CPU: two ranks as threads of one process over the loopback
//! collective, each training on its own B images.
//!
//! * Against one rank accumulating two micro-batches of B (the whole recipe: KoLeo, drop path,
//!   masks drawn from the seed): the same computation split differently, so the losses, weights,
//!   moments and centers agree to float32 reduction order (the gradient is summed over ranks
//!   after the backward instead of accumulated during it).
//! * Against one rank with one batch of 2B: KoLeo off and drop path off (the official code
//!   computes KoLeo per rank, and the subsets follow the batch layout) and masks given with as
//!   many masked patches on each rank (the official iBOT center averages the ranks' means).

mod trainer_support;

use std::sync::Arc;

use dinotrain::dist::{Collective, Loopback};
use dinotrain::ssl::{MaskBatch, Method};
use dinotrain::train::config::Centering;
use dinotrain::train::state::HostState;
use dinotrain::train::trainer::{MicroBatch, StepRecord, TrainPlan, Trainer};
use trainer_support::{crops, images_of, loss_errors, micro_plan, state_errors, step_data};

const STEPS: u64 = 3;

/// What a run leaves after each step: its losses and its state.
type Trace = Vec<(StepRecord, HostState)>;

/// `ranks` trainers of `plan`, each in its own thread joined to one loopback group; rank `r`
/// trains `STEPS` steps on `feed(r, trainer)`'s micro-batches.
fn on_ranks(
    plan: &TrainPlan,
    ranks: usize,
    feed: impl Fn(usize, &mut Trainer) -> StepRecord + Send + Sync + 'static,
) -> Vec<Trace> {
    let feed = Arc::new(feed);
    let handles: Vec<_> = Loopback::group(ranks)
        .into_iter()
        .enumerate()
        .map(|(rank, dist)| {
            let (plan, feed) = (plan.clone(), Arc::clone(&feed));
            std::thread::spawn(move || {
                let mut t = Trainer::new(plan).unwrap();
                t.join(Box::new(dist)).unwrap();
                assert_eq!((t.rank(), t.world_size()), (rank, ranks));
                (0..STEPS)
                    .map(|_| {
                        let record = feed(rank, &mut t);
                        (record, t.snapshot().unwrap())
                    })
                    .collect::<Trace>()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Every rank's trace against the reference's, step by step.
fn compare(what: &str, ranks: &[Trace], reference: &Trace, koleo_too: bool, tol: f64) {
    for (step, (want, _)) in reference.iter().enumerate() {
        // Each rank counts its own masked patches.
        let masked: usize = ranks.iter().map(|t| t[step].0.n_masked).sum();
        assert_eq!(masked, want.n_masked, "step {step}");
    }
    for (r, trace) in ranks.iter().enumerate() {
        for (step, ((rec, state), (want_rec, want))) in trace.iter().zip(reference).enumerate() {
            for (name, a, b, err) in loss_errors(&rec.losses, &want_rec.losses, koleo_too) {
                let err = err as f64;
                println!("{what} rank {r} step {step}: {name} {a} vs {b}: {err:.2e}");
                assert!(err <= tol, "{what} rank {r} step {step}: {name} {a} vs {b}");
            }
            for (name, err) in state_errors(state, want) {
                println!("{what} rank {r} step {step}: {name}: {err:.2e}");
                assert!(err <= tol, "{what} rank {r} step {step}: {name} {err:.2e}");
            }
        }
    }
    // The ranks hold one state: bit for bit.
    for trace in &ranks[1..] {
        for ((_, a), (_, b)) in trace.iter().zip(&ranks[0]) {
            assert_eq!(a.student, b.student);
            assert_eq!(a.teacher, b.teacher);
        }
    }
}

/// Rank `r`'s crops at `step`: the accumulating run's micro-batch `r`.
fn rank_crops(t: &Trainer, rank: usize, step: u64) -> (Vec<f32>, Vec<f32>) {
    crops(t, 1000 * rank as u64 + step)
}

fn two_ranks_follow_two_accumulated_micro_batches(centering: Centering) {
    let mut plan = micro_plan(Method::Dinov2);
    plan.centering = centering;
    assert!(plan.drop_path_rate > 0.0 && plan.losses.koleo_loss_weight > 0.0);
    let ranks = on_ranks(&plan, 2, |rank, t| {
        let (g, l) = rank_crops(t, rank, t.step());
        t.train_micro_batches(&[(&g, &l)]).unwrap()
    });
    let mut acc_plan = plan.clone();
    acc_plan.accumulate = 2;
    let mut acc = Trainer::new(acc_plan).unwrap();
    let reference: Trace = (0..STEPS)
        .map(|step| {
            let (g0, l0) = rank_crops(&acc, 0, step);
            let (g1, l1) = rank_crops(&acc, 1, step);
            let record = acc.train_micro_batches(&[(&g0, &l0), (&g1, &l1)]).unwrap();
            (record, acc.snapshot().unwrap())
        })
        .collect();
    compare(
        &format!("{centering:?} vs accumulate 2"),
        &ranks,
        &reference,
        true,
        1e-6,
    );
}

#[test]
fn two_ranks_follow_two_accumulated_micro_batches_softmax_centering() {
    two_ranks_follow_two_accumulated_micro_batches(Centering::Softmax);
}

#[test]
fn two_ranks_follow_two_accumulated_micro_batches_sinkhorn_knopp() {
    two_ranks_follow_two_accumulated_micro_batches(Centering::SinkhornKnopp);
}

#[test]
fn two_ranks_of_b_follow_one_batch_of_2b() {
    const B: usize = 4;
    let mut plan = micro_plan(Method::Dinov2);
    plan.batch_size = B;
    plan.losses.koleo_loss_weight = 0.0;
    plan.drop_path_rate = 0.0;
    let mut big_plan = plan.clone();
    big_plan.batch_size = 2 * B;
    let n = (plan.global_crop_size / plan.vit.patch_size).pow(2);
    let upperbound = 2 * 2 * B * n;
    let big_data = {
        let p = big_plan.clone();
        move |step| step_data(&p, 2 * B, B, step)
    };
    let nl = plan.n_local_crops;
    let ranks = on_ranks(&plan, 2, move |rank, t| {
        let d = big_data(t.step());
        let range = rank * B..(rank + 1) * B;
        let masks = images_of(&d.masks, 2, 2 * B, range.clone());
        let masks = MaskBatch::from_masks(masks, 2 * B, n, upperbound).unwrap();
        t.train_step_with_masks(&[MicroBatch {
            global: &images_of(&d.global, 2, 2 * B, range.clone()),
            local: &images_of(&d.local, nl, 2 * B, range),
            masks: Some(&masks),
            drop_path: None,
        }])
        .unwrap()
    });
    let mut big = Trainer::new(big_plan.clone()).unwrap();
    let reference: Trace = (0..STEPS)
        .map(|step| {
            let d = step_data(&big_plan, 2 * B, B, step);
            let masks = MaskBatch::from_masks(d.masks.clone(), 4 * B, n, upperbound).unwrap();
            let record = big
                .train_step_with_masks(&[MicroBatch {
                    global: &d.global,
                    local: &d.local,
                    masks: Some(&masks),
                    drop_path: None,
                }])
                .unwrap();
            (record, big.snapshot().unwrap())
        })
        .collect();
    compare(
        "2 ranks vs one batch of 2B",
        &ranks,
        &reference,
        false,
        1e-5,
    );
}

#[test]
fn a_rank_whose_step_fails_stops_the_other_with_an_error() {
    // Rank 1 feeds crops of the wrong size: its step fails before any collective and its
    // trainer (with its handle) is dropped, so rank 0 gets an error instead of waiting forever.
    let plan = micro_plan(Method::Dinov2);
    let results: Vec<_> = Loopback::group(2)
        .into_iter()
        .map(|dist| {
            let plan = plan.clone();
            std::thread::spawn(move || {
                let mut t = Trainer::new(plan).unwrap();
                let rank = dist.rank();
                t.join(Box::new(dist)).unwrap();
                let (g, l) = crops(&t, 0);
                let g = if rank == 1 { &g[1..] } else { &g[..] };
                t.train_micro_batches(&[(g, &l)])
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let results: Vec<_> = results.into_iter().map(|h| h.join().unwrap()).collect();
    let (e0, e1) = (
        results[0].clone().unwrap_err(),
        results[1].clone().unwrap_err(),
    );
    assert!(e1.contains("crops hold"), "{e1}");
    assert!(e0.contains("rank 1") && e0.contains("stopped"), "{e0}");
}
