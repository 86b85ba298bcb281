//! Resuming rewinds TensorBoard too: the event files of an interrupted run may hold steps
//! beyond the checkpoint a resumed run restarts from, and TensorBoard would then draw those
//! steps twice (17, 18, 11, 12, ...). [`truncate_events`] drops them, as `metrics.jsonl` is
//! truncated, so each step appears once.
//!
//! Record framing and the `Event` message: see `tensorboard.rs`. Only the `step` field
//! (2, varint) of each record is read; a torn last record (a killed writer) is dropped too.

use crate::{Result, TrainError};
use std::path::Path;

/// Rewrites every `events.out.tfevents.*` file in `dir` without the events whose step is
/// greater than `step` and without a torn or corrupt tail. Files that need no change are not
/// touched; a missing `dir` is nothing to do.
pub fn truncate_events(dir: &Path, step: u64) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| TrainError::io(dir, e))?.path();
        let is_events = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("events.out.tfevents."));
        if !is_events || !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
        let kept = kept_records(&bytes, step);
        if kept.len() != bytes.len() {
            let tmp = path.with_extension("truncating");
            std::fs::write(&tmp, &kept).map_err(|e| TrainError::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))?;
        }
    }
    Ok(())
}

/// The bytes of the whole records of `file` whose event step is `<= step`, in order; reading
/// stops at the first incomplete record.
fn kept_records(file: &[u8], step: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(file.len());
    let mut at = 0usize;
    while let Some((data, next)) = record_at(file, at) {
        if event_step(data).is_none_or(|s| s <= step as i64) {
            out.extend_from_slice(&file[at..next]);
        }
        at = next;
    }
    out
}

/// The payload of the record starting at `at` and where the next one starts.
fn record_at(file: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len_bytes: [u8; 8] = file.get(at..at + 8)?.try_into().ok()?;
    let len = usize::try_from(u64::from_le_bytes(len_bytes)).ok()?;
    let start = at.checked_add(12)?;
    let end = start.checked_add(len)?;
    let next = end.checked_add(4)?;
    let data = file.get(start..end)?;
    file.get(end..next)?;
    Some((data, next))
}

/// Field 2 (`int64 step`) of an `Event` message; `None` if absent or malformed.
fn event_step(mut msg: &[u8]) -> Option<i64> {
    while !msg.is_empty() {
        let key = read_varint(&mut msg)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = read_varint(&mut msg)?;
                if field == 2 {
                    return Some(v as i64);
                }
            }
            1 => msg = msg.get(8..)?,
            2 => {
                let n = usize::try_from(read_varint(&mut msg)?).ok()?;
                msg = msg.get(n..)?;
            }
            5 => msg = msg.get(4..)?,
            _ => return None,
        }
    }
    None
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::{encode_event, frame_record, EventBody};

    fn rec(step: i64) -> Vec<u8> {
        frame_record(&encode_event(1.0, step, EventBody::Scalars(&[("a", 1.0)])))
    }

    /// Steps 0 (the header's), 1..=5 and a torn sixth record: truncating at 3 keeps exactly
    /// the header and steps 1, 2, 3, byte for byte.
    #[test]
    fn drops_later_steps_and_a_torn_tail() {
        let header = frame_record(&encode_event(
            1.0,
            0,
            EventBody::FileVersion("brain.Event:2"),
        ));
        let mut file = header.clone();
        for s in 1..=5 {
            file.extend(rec(s));
        }
        let torn = rec(6);
        file.extend_from_slice(&torn[..torn.len() - 3]);
        let mut want = header;
        for s in 1..=3 {
            want.extend(rec(s));
        }
        assert_eq!(kept_records(&file, 3), want);
        assert_eq!(
            event_step(&encode_event(0.0, 300, EventBody::Scalars(&[]))),
            Some(300)
        );
    }

    #[test]
    fn rewrites_files_in_place() {
        let dir = std::env::temp_dir().join(format!("moe-tb-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("events.out.tfevents.1.host");
        let other = dir.join("notes.txt");
        std::fs::write(&f, [rec(10), rec(20), rec(30)].concat()).unwrap();
        std::fs::write(&other, b"x").unwrap();
        truncate_events(&dir, 20).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), [rec(10), rec(20)].concat());
        assert_eq!(std::fs::read(&other).unwrap(), b"x");
        truncate_events(&dir.join("missing"), 1).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
