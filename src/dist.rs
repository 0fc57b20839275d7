//! Data-parallel training: the collective operations a step needs, behind one small trait.
//!
//! A step on R ranks has the official cross-rank semantics (spec: the all-reduced teacher
//! center and Sinkhorn-Knopp sums, iBOT's center as the mean of the ranks' means, KoLeo per
//! rank, the gradient the mean of the ranks'). dinotrain gets them by exchanging the teacher's
//! logits (every rank then computes the targets of the whole global batch, exactly as one rank
//! does for accumulated micro-batches) and summing the gradients and the logged losses.
//!
//! [`Loopback`] runs the ranks as threads of one process (tests, and CPU data parallelism);
//! the values pass through host memory, and every rank sums in rank order, so all ranks end
//! with bit-identical results.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The collective operations of one rank of a group.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `mine`, in rank order (the lengths may differ between ranks).
    fn all_gather(&mut self, mine: &[f32]) -> Result<Vec<Vec<f32>>>;

    /// `data` becomes the element-wise sum over the ranks (summed in rank order: every rank
    /// gets the same bits).
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let all = self.all_gather(data)?;
        for (r, theirs) in all.iter().enumerate() {
            if theirs.len() != data.len() {
                return Err(Error::shape(
                    "all-reduce",
                    format!(
                        "rank {r} gave {} values, rank {} {}",
                        theirs.len(),
                        self.rank(),
                        data.len()
                    ),
                ));
            }
        }
        for (i, v) in data.iter_mut().enumerate() {
            *v = all.iter().fold(0.0, |acc, theirs| acc + theirs[i]);
        }
        Ok(())
    }

    /// `data` becomes rank `root`'s.
    fn broadcast(&mut self, data: &mut Vec<f32>, root: usize) -> Result<()> {
        let mine: &[f32] = if self.rank() == root { data } else { &[] };
        let mut all = self.all_gather(mine)?;
        let theirs = all.get_mut(root).ok_or_else(|| {
            Error::Config(format!(
                "broadcast from rank {root} in a group of {}",
                self.world_size()
            ))
        })?;
        *data = std::mem::take(theirs);
        Ok(())
    }
}

/// How long a rank waits for the others at a collective before it gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The ranks of one process, as threads: [`Loopback::group`] makes one handle per rank.
pub struct Loopback {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
}

struct Shared {
    world: usize,
    state: Mutex<Round>,
    changed: Condvar,
}

/// One collective call at a time: every rank deposits its values, the last one to arrive
/// completes the round, every rank takes a copy, and the last to take clears it.
#[derive(Default)]
struct Round {
    /// Completed rounds; a rank waits for this to move past the round it joined.
    generation: u64,
    deposited: Vec<Option<Vec<f32>>>,
    /// The completed round's values, until every rank has taken them.
    result: Option<Arc<Vec<Vec<f32>>>>,
    taken: usize,
    /// Set when a rank's handle is dropped (its thread ended or failed): the others stop.
    departed: Option<usize>,
}

impl Loopback {
    /// Handles for the ranks `0..world` of a new group.
    pub fn group(world: usize) -> Vec<Loopback> {
        Self::group_with_timeout(world, DEFAULT_TIMEOUT)
    }

    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<Loopback> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(Round {
                deposited: vec![None; world],
                ..Round::default()
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| Loopback {
                rank,
                shared: Arc::clone(&shared),
                timeout,
            })
            .collect()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Round>> {
        self.shared
            .state
            .lock()
            .map_err(|_| Error::Config("loopback group: a rank panicked".into()))
    }
}

impl Collective for Loopback {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather(&mut self, mine: &[f32]) -> Result<Vec<Vec<f32>>> {
        let world = self.shared.world;
        let deadline = Instant::now() + self.timeout;
        let mut round = self.lock()?;
        // A rank fast enough to start the next call waits until the last round is cleared.
        while round.result.is_some() || round.deposited[self.rank].is_some() {
            round = self.wait(round, deadline)?;
        }
        let joined = round.generation;
        round.deposited[self.rank] = Some(mine.to_vec());
        if round.deposited.iter().all(Option::is_some) {
            let values = round.deposited.iter_mut().map(|v| v.take().unwrap());
            round.result = Some(Arc::new(values.collect()));
            round.generation += 1;
            self.shared.changed.notify_all();
        }
        while round.generation == joined {
            round = self.wait(round, deadline)?;
        }
        let result = round
            .result
            .clone()
            .ok_or_else(|| Error::Config("loopback group: a round lost its values".into()))?;
        round.taken += 1;
        if round.taken == world {
            round.result = None;
            round.taken = 0;
            self.shared.changed.notify_all();
        }
        drop(round);
        Ok(result.as_ref().clone())
    }
}

impl Loopback {
    /// Waits for a change of the round, failing when a rank left or the deadline passed.
    fn wait<'a>(
        &'a self,
        round: std::sync::MutexGuard<'a, Round>,
        deadline: Instant,
    ) -> Result<std::sync::MutexGuard<'a, Round>> {
        if let Some(r) = round.departed {
            return Err(Error::Config(format!(
                "rank {r} of the loopback group stopped; rank {} cannot go on",
                self.rank
            )));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let missing: Vec<usize> = (round.deposited.iter().enumerate())
                .filter(|(_, v)| v.is_none())
                .map(|(r, _)| r)
                .collect();
            return Err(Error::Config(format!(
                "rank {}: ranks {missing:?} did not reach the collective within {:?}",
                self.rank, self.timeout
            )));
        }
        let (round, _) = self
            .shared
            .changed
            .wait_timeout(round, left)
            .map_err(|_| Error::Config("loopback group: a rank panicked".into()))?;
        Ok(round)
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        if let Ok(mut round) = self.shared.state.lock() {
            round.departed.get_or_insert(self.rank);
            self.shared.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(Loopback) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = Loopback::group(world)
            .into_iter()
            .map(|c| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_gather_all_reduce_and_broadcast_agree_on_every_rank() {
        let out = on_ranks(3, |mut c| {
            let r = c.rank() as f32;
            let mut results = Vec::new();
            // Many rounds back to back: a fast rank must not overtake a slow one.
            for round in 0..50 {
                let gathered = c.all_gather(&vec![r; c.rank() + 1]).unwrap();
                let mut sum = vec![r + round as f32, 1.0];
                c.all_reduce_sum(&mut sum).unwrap();
                let mut b = if c.rank() == 1 {
                    vec![7.0, 8.0]
                } else {
                    vec![]
                };
                c.broadcast(&mut b, 1).unwrap();
                results.push((gathered, sum, b));
            }
            results
        });
        for rank in &out {
            for (round, (gathered, sum, b)) in rank.iter().enumerate() {
                assert_eq!(gathered, &[vec![0.0], vec![1.0, 1.0], vec![2.0, 2.0, 2.0]]);
                assert_eq!(sum, &[3.0 + 3.0 * round as f32, 3.0]);
                assert_eq!(b, &[7.0, 8.0]);
            }
        }
    }

    #[test]
    fn a_rank_that_stops_stops_the_others_with_an_error() {
        let out = on_ranks(2, |mut c| {
            if c.rank() == 1 {
                return None; // leaves without joining: its handle is dropped
            }
            Some(c.all_gather(&[1.0]).unwrap_err().to_string())
        });
        let msg = out[0].clone().unwrap();
        assert!(msg.contains("rank 1") && msg.contains("stopped"), "{msg}");
    }

    #[test]
    fn a_rank_that_never_arrives_times_out_naming_it() {
        let mut group = Loopback::group_with_timeout(2, Duration::from_millis(50));
        let _late = group.pop().unwrap();
        let msg = group[0].all_gather(&[1.0]).unwrap_err().to_string();
        assert!(
            msg.contains("[1]") && msg.contains("did not reach"),
            "{msg}"
        );
    }

    #[test]
    fn all_reduce_of_different_lengths_is_an_error() {
        let out = on_ranks(2, |mut c| {
            let mut v = vec![1.0; c.rank() + 1];
            c.all_reduce_sum(&mut v).is_err()
        });
        assert_eq!(out, [true, true]);
    }
}
