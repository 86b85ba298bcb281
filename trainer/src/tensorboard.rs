//! A TensorBoard event-file writer for scalars, without TensorFlow or a protobuf crate.
//!
//! Format (TensorFlow `core/util/event.proto`, `core/lib/io/record_writer.cc`): a TFRecord
//! file of serialised `Event` messages. Each record is
//! `u64 LE length | u32 LE masked_crc32c(length bytes) | data | u32 LE masked_crc32c(data)`,
//! with `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`. The messages used here:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; }
//! ```
//!
//! The first record carries `file_version = "brain.Event:2"`. `tests/python/read_tensorboard.py`
//! reads the files back with TensorBoard's own `EventAccumulator`.

use crate::{Result, TrainError};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes scalar summaries to `<dir>/events.out.tfevents.<unix secs>.<hostname>`.
#[derive(Debug)]
pub struct TbWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl TbWriter {
    /// Creates `dir` and a new event file in it (never overwriting one: a name already taken
    /// in the same second gets a `.1`, `.2`, ... suffix) and writes the version record.
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let now = wall_time();
        let base = format!("events.out.tfevents.{}.{}", now as u64, hostname());
        let mut n = 0;
        let (file, path) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(TrainError::io(&path, e)),
            }
        };
        let mut w = Self {
            out: BufWriter::new(file),
            path,
        };
        w.write_event(&encode_event(
            now,
            0,
            EventBody::FileVersion("brain.Event:2"),
        ))?;
        w.flush()?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs `value` under `tag` at `step` (buffered until [`TbWriter::flush`]).
    pub fn scalar(&mut self, tag: &str, step: i64, value: f32) -> Result<()> {
        self.scalars(step, &[(tag, value)])
    }

    /// Logs several scalars of one step in a single event (e.g. one layer's expert loads).
    pub fn scalars(&mut self, step: i64, values: &[(&str, f32)]) -> Result<()> {
        self.write_event(&encode_event(wall_time(), step, EventBody::Scalars(values)))
    }

    /// Writes buffered events to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| TrainError::io(&self.path, e))
    }

    fn write_event(&mut self, event: &[u8]) -> Result<()> {
        self.out
            .write_all(&frame_record(event))
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

impl Drop for TbWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the file name (TensorFlow's convention), `localhost` if unknown.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call; gethostname
    // writes at most `len` bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.' || *c == '_')
        .collect();
    if rc != 0 || name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// What an event carries besides time and step.
#[derive(Debug, Clone, Copy)]
pub enum EventBody<'a> {
    /// The header record, `"brain.Event:2"`.
    FileVersion(&'a str),
    /// A summary of `(tag, simple_value)` pairs.
    Scalars(&'a [(&'a str, f32)]),
}

/// Serialises an `Event` message (protobuf wire format).
pub fn encode_event(wall_time: f64, step: i64, body: EventBody<'_>) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    put_key(&mut ev, 1, WIRE_FIXED64);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut ev, 2, WIRE_VARINT);
    // int64 is encoded as its two's-complement u64 (10 bytes when negative).
    put_varint(&mut ev, step as u64);
    match body {
        EventBody::FileVersion(v) => put_bytes(&mut ev, 3, v.as_bytes()),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::with_capacity(tag.len() + 8);
                put_bytes(&mut value, 1, tag.as_bytes());
                put_key(&mut value, 2, WIRE_FIXED32);
                value.extend_from_slice(&v.to_le_bytes());
                put_bytes(&mut summary, 1, &value);
            }
            put_bytes(&mut ev, 5, &summary);
        }
    }
    ev
}

/// Frames `data` as one TFRecord: length, its masked CRC, data, its masked CRC.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut rec = Vec::with_capacity(data.len() + 16);
    rec.extend_from_slice(&len);
    rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    rec.extend_from_slice(data);
    rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    rec
}

/// TFRecord's masked CRC-32C (Castagnoli): masking keeps a CRC of data that itself holds
/// CRCs from being trivially zero.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    // `(crc >> 15) | (crc << 17)` in TensorFlow's crc32c.h.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;

fn put_key(buf: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(buf, (field << 3) | wire);
}

/// Base-128 varint, least significant group first.
fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(buf, field, WIRE_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C check value of "123456789" from the Castagnoli / iSCSI spec (RFC 3720 B.4):
    /// 0xE3069283; its masked value 0xc78ab0e5 is what TensorBoard's own Python
    /// `masked_crc32c` (tensorflow_stub/pywrap_tensorflow.py) returns for the same bytes.
    #[test]
    fn masked_crc_matches_reference() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    }

    /// Varints from the protobuf encoding guide: 1 -> 01, 150 -> 96 01, 300 -> ac 02, and
    /// -1 as int64 -> ten bytes ending in 01.
    #[test]
    fn varints_match_protobuf_guide() {
        let enc = |v: u64| {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            b
        };
        assert_eq!(enc(1), vec![0x01]);
        assert_eq!(enc(150), vec![0x96, 0x01]);
        assert_eq!(enc(300), vec![0xac, 0x02]);
        let minus_one = enc(-1i64 as u64);
        assert_eq!(minus_one.len(), 10);
        assert_eq!(minus_one[9], 0x01);
    }

    /// A scalar event written out byte by byte from the message definitions above.
    #[test]
    fn scalar_event_bytes() {
        let ev = encode_event(0.0, 3, EventBody::Scalars(&[("a", 1.0)]));
        let mut want = vec![
            0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x03, 0x2a, 0x0a, 0x0a, 0x08,
        ];
        want.extend_from_slice(&[0x0a, 0x01, b'a', 0x15, 0x00, 0x00, 0x80, 0x3f]);
        assert_eq!(ev, want);
    }
}
