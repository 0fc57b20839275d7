//! The TensorBoard event file of a run, read back by a reader written here from the format's
//! description (its own CRC-32C and protocol-buffer decoding, nothing shared with the writer):
//! every frame's checksums hold, the first event names the file version, and every logged
//! step's scalars equal the run's `metrics.jsonl` (as f32).

mod run_support;

use run_support::SMALL;
use std::collections::BTreeMap;
use std::process::Command;

/// CRC-32C, bit by bit (reflected polynomial 0x82F63B78), masked as TFRecord masks it.
fn masked_crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    let crc = !crc;
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, checksums checked.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(len_crc, masked_crc32c(len_bytes), "length checksum at {at}");
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked_crc32c(data), "data checksum at {at}");
        out.push(data);
        at += 16 + len;
    }
    out
}

/// A protocol-buffer field: (number, value) with varints, fixed64/32 and length-delimited bytes.
#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn varint(data: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = data[*at];
        *at += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    v
}

fn fields(data: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let key = varint(data, &mut at);
        let field = match key & 7 {
            0 => Field::Varint(varint(data, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(data[at - 8..at].try_into().unwrap())
            }
            2 => {
                let n = varint(data, &mut at) as usize;
                at += n;
                Field::Bytes(&data[at - n..at])
            }
            5 => {
                at += 4;
                Field::Fixed32(data[at - 4..at].try_into().unwrap())
            }
            t => panic!("wire type {t}"),
        };
        out.push((key >> 3, field));
    }
    out
}

/// `step -> tag -> value` of every scalar event; asserts the version event comes first.
fn scalars(bytes: &[u8]) -> BTreeMap<u64, BTreeMap<String, f32>> {
    let events = records(bytes);
    let first = fields(events[0]);
    assert!(
        first
            .iter()
            .any(|(n, f)| *n == 3 && matches!(f, Field::Bytes(b) if *b == b"brain.Event:2")),
        "{first:?}"
    );
    let mut out = BTreeMap::new();
    for event in &events[1..] {
        let mut step = None;
        let mut values = BTreeMap::new();
        for (n, f) in fields(event) {
            match (n, f) {
                (1, Field::Fixed64(t)) => assert!(f64::from_le_bytes(t) > 1.6e9),
                (2, Field::Varint(s)) => step = Some(s),
                (5, Field::Bytes(summary)) => {
                    for (_, value) in fields(summary) {
                        let Field::Bytes(value) = value else { panic!() };
                        let (mut tag, mut v) = (String::new(), f32::NAN);
                        for (n, f) in fields(value) {
                            match (n, f) {
                                (1, Field::Bytes(t)) => {
                                    tag = String::from_utf8(t.to_vec()).unwrap()
                                }
                                (2, Field::Fixed32(x)) => v = f32::from_le_bytes(x),
                                other => panic!("unexpected value field {other:?}"),
                            }
                        }
                        values.insert(tag, v);
                    }
                }
                other => panic!("unexpected event field {other:?}"),
            }
        }
        out.insert(step.expect("an event without a step"), values);
    }
    out
}

#[test]
fn a_run_writes_every_metric_as_tensorboard_scalars() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_dinotrain"))
        .args(["train", "--out", run.to_str().unwrap(), "--steps", "3"])
        .args(SMALL)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let files: Vec<_> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let got = scalars(&std::fs::read(&files[0]).unwrap());

    let records = dinotrain::train::metrics::read(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(got.len(), records.len());
    for r in &records {
        let s = &got[&r.step];
        let mut want: Vec<(String, f64)> = Vec::new();
        want.extend(r.losses.iter().map(|(k, v)| (format!("loss/{k}"), *v)));
        want.extend(
            r.grad_norms
                .iter()
                .map(|(k, v)| (format!("grad_norm/{k}"), *v)),
        );
        want.extend([
            ("schedule/lr".into(), r.lr),
            ("schedule/last_layer_lr".into(), r.last_layer_lr),
            ("schedule/weight_decay".into(), r.weight_decay),
            ("schedule/momentum".into(), r.momentum),
            ("schedule/teacher_temp".into(), r.teacher_temp),
            ("throughput/images_per_s".into(), r.images_per_s),
        ]);
        want.extend(r.extra.iter().map(|(k, v)| (format!("metrics/{k}"), *v)));
        for (tag, v) in &want {
            assert_eq!(s.get(tag), Some(&(*v as f32)), "step {}: {tag}", r.step);
        }
        assert!(s.contains_key("loss/total") && s.contains_key("grad_norm/backbone"));
    }
}

#[test]
fn the_reader_checks_what_it_reads() {
    // CRC-32C("123456789") is 0xE3069283: the reader's checksum is the standard one.
    let crc = 0xE306_9283u32;
    assert_eq!(
        masked_crc32c(b"123456789"),
        crc.rotate_right(15).wrapping_add(0xa282_ead8)
    );
}
