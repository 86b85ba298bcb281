#!/usr/bin/env python3
"""Reads TensorBoard event files back with TensorBoard's own reader and checks scalars.

Used by the Rust test trainer/tests/tensorboard_readback.rs to prove that the files our
hand-written writer (trainer/src/tensorboard.rs) produces are what TensorBoard expects.

    read_tensorboard.py LOGDIR [--expect TAG=STEP:VALUE ...] [--expect-count TAG=N ...]
                        [--rtol R] [--list]

Checks, each failing with a message and exit code 1:
  * every record of every event file passes TensorBoard's TFRecord CRC checks (its loader
    silently stops at a bad record, so this is checked separately, strictly);
  * the first record of each file is the `brain.Event:2` file-version event;
  * each --expect: TAG has a scalar at STEP equal to VALUE rounded to float32 (within
    --rtol, default 0: exact, as the writer stores float32);
  * each --expect-count: TAG has exactly N scalar events.
"""

import argparse
import glob
import os
import struct
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def check_records(path: str) -> int:
    """Reads every record with TensorBoard's record reader; returns the record count."""
    reader = pywrap_tensorflow.PyRecordReader_New(path.encode(), 0, None, None)
    count = 0
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            break
        except errors.DataLossError as e:
            raise SystemExit(f"FAIL: {path}: record {count}: {e.message}")
        if count == 0:
            ev = Event()
            ev.ParseFromString(reader.record())
            if ev.file_version != "brain.Event:2":
                raise SystemExit(
                    f"FAIL: {path}: first record has file_version {ev.file_version!r}, "
                    "expected 'brain.Event:2'"
                )
        count += 1
    return count


def parse_kv(spec: str, what: str):
    tag, sep, rest = spec.rpartition("=")
    if not sep or not tag:
        raise SystemExit(f"bad {what} {spec!r}: expected TAG={'STEP:VALUE' if what == '--expect' else 'N'}")
    return tag, rest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logdir")
    ap.add_argument("--expect", action="append", default=[], metavar="TAG=STEP:VALUE")
    ap.add_argument("--expect-count", action="append", default=[], metavar="TAG=N")
    ap.add_argument("--rtol", type=float, default=0.0)
    ap.add_argument("--list", action="store_true", help="print every scalar")
    args = ap.parse_args()

    files = sorted(glob.glob(os.path.join(args.logdir, "*tfevents*")))
    if not files:
        print(f"FAIL: no event files in {args.logdir}")
        return 1
    for path in files:
        n = check_records(path)
        print(f"{os.path.basename(path)}: {n} records, CRCs ok")

    acc = EventAccumulator(args.logdir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}
    if args.list:
        for tag in sorted(scalars):
            print(tag, scalars[tag])

    failures = []
    for spec in args.expect:
        tag, rest = parse_kv(spec, "--expect")
        step_s, _, value_s = rest.partition(":")
        step, want = int(step_s), f32(float(value_s))
        if tag not in scalars:
            failures.append(f"{tag}: no such scalar tag (have {sorted(scalars)[:20]})")
            continue
        got = [v for s, v in scalars[tag] if s == step]
        if not got:
            failures.append(f"{tag}: no value at step {step} (steps {[s for s, _ in scalars[tag]]})")
        elif not any(abs(v - want) <= args.rtol * abs(want) for v in got):
            failures.append(f"{tag} @ {step}: got {got}, expected {want!r}")
    for spec in args.expect_count:
        tag, n_s = parse_kv(spec, "--expect-count")
        have = len(scalars.get(tag, []))
        if have != int(n_s):
            failures.append(f"{tag}: {have} scalar events, expected {n_s}")

    for f in failures:
        print("FAIL:", f)
    if failures:
        return 1
    print(f"OK: {len(tags)} tags, {len(args.expect)} expectations, {len(args.expect_count)} counts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
