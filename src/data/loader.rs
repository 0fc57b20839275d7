//! The parallel loader: a producer thread turns steps into crop-major batches, ahead of the
//! trainer, in a bounded queue; the images of each batch are decoded and cropped in parallel on
//! a pool of worker threads. At most `prefetch + 1` batches exist, reused via
//! [`Loader::recycle`].
//!
//! Sample `k` of the run (`k = step · B + b`) is image `perm_e[k mod N]` of epoch `e = k / N`,
//! where `perm_e` is a shuffle keyed by (seed, epoch). Its crops are drawn from
//! `keyed(seed, [CROPS, e, image])`. Both depend only on (seed, k), so a run resumed at any
//! step sees exactly the batches of the uninterrupted run.
//!
//! An image that fails to load is reported (a warning naming it, capped, then counted) and
//! replaced by the next loadable image of the epoch's order, so batch shapes never change.

use crate::data::augment::{multi_crop_with, MultiCropConfig, Scratch};
use crate::data::decode::{DecodeError, RgbImage};
pub use crate::data::source::ImageSource;
use crate::error::{Error, Result};
use crate::rng::{keyed, stream};
use rand::Rng as _;
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

/// How the loader runs.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub crops: MultiCropConfig,
    /// Worker threads: the images of a batch are decoded and cropped in parallel on them.
    pub workers: usize,
    /// Finished batches waiting for the trainer, at most.
    pub prefetch: usize,
    /// Bad-file warnings logged before only counting them.
    pub max_warnings: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            crops: MultiCropConfig::default(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: 2,
            max_warnings: 20,
        }
    }
}

/// One training batch, crop-major.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// `[G·B, 3, S, S]`: every image's global crop 1, then every image's global crop 2.
    pub global: Vec<f32>,
    /// `[L·B, 3, s, s]`: local crop 1 of every image, then local crop 2, ...
    pub local: Vec<f32>,
    /// `[B]`: the image each row came from (after replacing unreadable ones).
    pub indices: Vec<usize>,
    pub step: u64,
    /// The epoch of the batch's first sample.
    pub epoch: u64,
}

/// Bad-file bookkeeping shared by the workers.
#[derive(Default)]
struct BadFiles {
    /// Images known to fail: replacements skip them.
    known: HashSet<usize>,
    /// Images already named in a warning (each is named once).
    named: HashSet<usize>,
    /// Warnings logged.
    warned: u64,
    /// Failed loads of a sample's own image, in all epochs.
    total: u64,
    /// The same, per epoch: once an epoch is delivered, the number of its unreadable images.
    per_epoch: BTreeMap<u64, u64>,
}

struct Shared {
    source: Arc<dyn ImageSource>,
    crops: MultiCropConfig,
    batch_size: usize,
    seed: u64,
    max_warnings: u64,
    next_step: AtomicU64,
    stop: AtomicBool,
    bad: Mutex<BadFiles>,
    perms: Mutex<HashMap<u64, Arc<Vec<u32>>>>,
    spare: Mutex<Vec<Batch>>,
}

/// Crop-major batches in step order, built ahead of the trainer.
pub struct Loader {
    shared: Arc<Shared>,
    rx: Option<Receiver<(u64, Result<Batch>)>>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<u64, Result<Batch>>,
    next_step: u64,
    waited: f64,
    epochs_reported: u64,
}

impl Loader {
    /// Starts the workers at `start_step`. Fails before any work when the recipe is invalid or
    /// when no image of the source can be read.
    pub fn new(
        source: Arc<dyn ImageSource>,
        cfg: LoaderConfig,
        batch_size: usize,
        seed: u64,
        start_step: u64,
    ) -> Result<Self> {
        cfg.crops.validate()?;
        if batch_size == 0 {
            return Err(Error::Config("batch size must be positive".into()));
        }
        if source.is_empty() {
            return Err(Error::Data("the image source is empty".into()));
        }
        let shared = Arc::new(Shared {
            source,
            crops: cfg.crops,
            batch_size,
            seed,
            max_warnings: cfg.max_warnings,
            next_step: AtomicU64::new(start_step),
            stop: AtomicBool::new(false),
            bad: Mutex::new(BadFiles::default()),
            perms: Mutex::new(HashMap::new()),
            spare: Mutex::new(Vec::new()),
        });
        first_readable(&shared)?;
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers.max(1))
            .thread_name(|i| format!("dinotrain-loader-{i}"))
            .build()
            .map_err(|e| Error::Data(format!("cannot start loader threads: {e}")))?;
        let producer_shared = Arc::clone(&shared);
        let workers = vec![std::thread::Builder::new()
            .name("dinotrain-loader".into())
            .spawn(move || producer(&producer_shared, &pool, &tx))
            .map_err(|e| Error::Data(format!("cannot start loader thread: {e}")))?];
        let n = shared.source.len() as u64;
        Ok(Loader {
            shared,
            rx: Some(rx),
            workers,
            pending: BTreeMap::new(),
            next_step: start_step,
            waited: 0.0,
            epochs_reported: start_step * batch_size as u64 / n,
        })
    }

    /// The next batch in step order (blocks until it is ready).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let step = self.next_step;
        let start = Instant::now();
        let result = loop {
            if let Some(r) = self.pending.remove(&step) {
                break r;
            }
            let Some(rx) = &self.rx else {
                return Err(Error::Data("loader is shut down".into()));
            };
            match rx.recv() {
                Ok((s, r)) => {
                    self.pending.insert(s, r);
                }
                Err(_) => return Err(Error::Data("all loader threads stopped".into())),
            }
        };
        self.waited += start.elapsed().as_secs_f64();
        self.next_step += 1;
        let batch = result?;
        self.report_finished_epochs(step);
        Ok(batch)
    }

    /// Gives a batch's buffers back for reuse.
    pub fn recycle(&self, batch: Batch) {
        lock(&self.shared.spare).push(batch);
    }

    /// Seconds the caller has spent waiting in [`Loader::next_batch`].
    pub fn wait_seconds(&self) -> f64 {
        self.waited
    }

    /// Samples whose image was unreadable and replaced, so far (workers run ahead of the
    /// trainer, so this may include batches not yet delivered).
    pub fn bad_images(&self) -> u64 {
        lock(&self.shared.bad).total
    }

    /// Unreadable images in `epoch` (final once the epoch's last batch was delivered).
    pub fn bad_in_epoch(&self, epoch: u64) -> u64 {
        lock(&self.shared.bad)
            .per_epoch
            .get(&epoch)
            .copied()
            .unwrap_or(0)
    }

    /// Logs one warning per epoch that ended with `step`'s batch and had unreadable images.
    fn report_finished_epochs(&mut self, step: u64) {
        let n = self.shared.source.len() as u64;
        let done = (step + 1) * self.shared.batch_size as u64 / n; // epochs fully delivered
        while self.epochs_reported < done {
            let e = self.epochs_reported;
            let bad = lock(&self.shared.bad);
            if let Some(&count) = bad.per_epoch.get(&e) {
                log::warn!(
                    "epoch {e}: {count} unreadable images skipped and replaced ({} distinct files so far)",
                    bad.known.len()
                );
            }
            self.epochs_reported += 1;
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Dropping the receiver wakes workers blocked on a full queue.
        self.rx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A poisoned lock only means another worker panicked; the data is still consistent counters.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn first_readable(shared: &Shared) -> Result<()> {
    let n = shared.source.len();
    let mut first_error = None;
    for i in 0..n {
        match shared.source.load(i) {
            Ok(_) => {
                if i > 0 {
                    log::warn!("the first {i} images are unreadable");
                }
                return Ok(());
            }
            Err(e) => {
                if first_error.is_none() {
                    first_error = Some(format!("{}: {e}", shared.source.name(i)));
                }
            }
        }
    }
    Err(Error::Data(format!(
        "none of the {n} images can be read (first: {})",
        first_error.unwrap_or_default()
    )))
}

/// The shuffled order of epoch `epoch` (cached: workers share the current epochs).
fn epoch_order(shared: &Shared, epoch: u64) -> Arc<Vec<u32>> {
    let mut perms = lock(&shared.perms);
    if let Some(p) = perms.get(&epoch) {
        return Arc::clone(p);
    }
    let n = shared.source.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = keyed(shared.seed, &[stream::SHUFFLE, epoch]);
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let order = Arc::new(order);
    // Keep the orders of a few recent epochs only.
    if perms.len() >= 4 {
        if let Some(&oldest) = perms.keys().min() {
            perms.remove(&oldest);
        }
    }
    perms.insert(epoch, Arc::clone(&order));
    order
}

/// The producer: builds batches in step order, the images of each batch in parallel on the
/// pool, so that only `prefetch + 1` batches ever exist.
fn producer(shared: &Shared, pool: &rayon::ThreadPool, tx: &SyncSender<(u64, Result<Batch>)>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let step = shared.next_step.fetch_add(1, Ordering::SeqCst);
        let batch = pool.install(|| build_batch(shared, step));
        let failed = batch.is_err();
        if tx.send((step, batch)).is_err() || failed {
            return;
        }
    }
}

thread_local! {
    /// Crop buffers of one pool thread, reused from image to image.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The global and local output rows of one image.
type ImageRows<'a> = (Vec<&'a mut [f32]>, Vec<&'a mut [f32]>);

fn build_batch(shared: &Shared, step: u64) -> Result<Batch> {
    let cfg = &shared.crops;
    let b_size = shared.batch_size;
    let (gl, ll) = (cfg.global_len(), cfg.local_len());
    let mut batch = lock(&shared.spare).pop().unwrap_or_default();
    batch.global.resize(cfg.n_global * b_size * gl, 0.0);
    batch.local.resize(cfg.n_local * b_size * ll, 0.0);
    batch.step = step;
    let n = shared.source.len() as u64;
    let first = step * b_size as u64;
    batch.epoch = first / n;

    // Crop c of image b sits at row c·B + b: hand every image its own rows.
    let mut globals: Vec<Option<&mut [f32]>> =
        batch.global.chunks_exact_mut(gl).map(Some).collect();
    let mut locals: Vec<Option<&mut [f32]>> = if ll == 0 {
        Vec::new()
    } else {
        batch.local.chunks_exact_mut(ll).map(Some).collect()
    };
    let rows: Vec<ImageRows> = (0..b_size)
        .map(|b| {
            let g = (0..cfg.n_global)
                .filter_map(|c| globals[c * b_size + b].take())
                .collect();
            let l = (0..cfg.n_local)
                .filter_map(|c| locals.get_mut(c * b_size + b).and_then(Option::take))
                .collect();
            (g, l)
        })
        .collect();
    let indices = rows
        .into_par_iter()
        .enumerate()
        .map(|(b, (mut g, mut l))| -> Result<usize> {
            let k = first + b as u64;
            let (epoch, pos) = (k / n, (k % n) as usize);
            let order = epoch_order(shared, epoch);
            let slot = order[pos] as usize;
            let (index, img) = load_or_replace(shared, &order, pos, epoch)?;
            // Each slot has its own stream, so a replacement image drawn twice gets other crops.
            let mut rng = keyed(shared.seed, &[stream::CROPS, epoch, slot as u64]);
            SCRATCH.with_borrow_mut(|scratch| {
                multi_crop_with(scratch, &img, cfg, &mut rng, &mut g, &mut l)
            })?;
            Ok(index)
        })
        .collect::<Result<Vec<usize>>>()?;
    batch.indices = indices;
    Ok(batch)
}

/// Loads the image at `pos` of the epoch order, or the next loadable one after it.
fn load_or_replace(
    shared: &Shared,
    order: &[u32],
    pos: usize,
    epoch: u64,
) -> Result<(usize, RgbImage)> {
    let n = order.len();
    for t in 0..n {
        let index = order[(pos + t) % n] as usize;
        if t > 0 && lock(&shared.bad).known.contains(&index) {
            continue;
        }
        match shared.source.load(index) {
            Ok(img) => return Ok((index, img)),
            // Only the slot's own image counts: which replacements were tried depends on
            // what other workers learned first, and the counts must not.
            Err(e) => note_bad(shared, index, (t == 0).then_some(epoch), &e),
        }
    }
    Err(Error::Data(
        "no image of the source can be read any more".into(),
    ))
}

fn note_bad(shared: &Shared, index: usize, epoch: Option<u64>, e: &DecodeError) {
    let mut bad = lock(&shared.bad);
    bad.known.insert(index);
    if let Some(epoch) = epoch {
        bad.total += 1;
        *bad.per_epoch.entry(epoch).or_insert(0) += 1;
    }
    if bad.named.insert(index) {
        if bad.warned < shared.max_warnings {
            log::warn!("skipping {}: {e}", shared.source.name(index));
        } else if bad.warned == shared.max_warnings {
            log::warn!("more unreadable images: only counted from now on");
        }
        bad.warned += 1;
    }
}
