//! TensorBoard event files beside `metrics.jsonl` (`<run>/tensorboard/`), where PyTorch and
//! LightlyTrain users look: every logged step's losses, schedules, gradient norms, throughput
//! and extras as scalars.
//!
//! The format, written by hand (it is small): a file of TFRecords, each `u64 length`,
//! `u32 masked CRC-32C of the length`, the bytes, `u32 masked CRC-32C of the bytes`; every
//! record an `Event` protocol buffer (`wall_time` 1: double, `step` 2: int64, `file_version` 3:
//! string, `summary` 5: `Summary { repeated Value value = 1 }`, `Value { tag 1: string,
//! simple_value 2: float }`). The first event carries `file_version = "brain.Event:2"`. Each
//! start (and resume) writes a new file; TensorBoard drops the steps a resumed run repeats.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::metrics::StepMetrics;
use crate::error::{Error, Result};

/// The folder inside the run folder.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// Appends events to one event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix seconds>.<host>` and writes the version event.
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = wall_time();
        // The host part of the name TensorBoard's own writers use; never a path separator.
        let host = super::lock::hostname().replace('/', "_");
        let mut path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        // Two starts within a second (a quick retry) must not share a file.
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{}.{host}.{n}", now as u64));
            n += 1;
        }
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = EventWriter { path, file };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        Ok(writer)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event with a scalar per metric of the record, flushed.
    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        let mut summary = Vec::new();
        let mut scalar = |tag: &str, v: f64| {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            value.push(2 << 3 | 5); // simple_value, fixed32
            value.extend_from_slice(&(v as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        };
        for (name, v) in &m.losses {
            scalar(&format!("loss/{name}"), *v);
        }
        for (name, v) in [
            ("lr", m.lr),
            ("last_layer_lr", m.last_layer_lr),
            ("weight_decay", m.weight_decay),
            ("momentum", m.momentum),
            ("teacher_temp", m.teacher_temp),
        ] {
            scalar(&format!("schedule/{name}"), v);
        }
        for (name, v) in &m.grad_norms {
            scalar(&format!("grad_norm/{name}"), *v);
        }
        scalar("throughput/images_per_s", m.images_per_s);
        scalar("throughput/data_wait_share", m.data_wait_share);
        for (name, v) in &m.extra {
            scalar(&format!("metrics/{name}"), *v);
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint(&mut event, 2 << 3);
        put_varint(&mut event, m.step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&len);
        framed.extend_from_slice(&masked_crc(&len).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&framed)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of CRCs is not trivial.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_varint(out, field << 3 | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_the_masked_crc_match_known_values() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        // CRC-32C("123456789") = 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }
}
