//! Input errors are typed, name the device and range, and come before any
//! byte moves.

mod common;

use bdev_stack::spec;
use common::{fill, r, read_all};
use copy_engine::{CopyEngine, CopyError, CopyOptions, copy, copy_in};

#[test]
fn mismatched_lengths_are_refused() {
    let dev = spec::build("stripe(chunk=8, mem:64k, mem:64k)").expect("spec");
    let before = fill(&dev, 1);
    let error = copy(&dev, &[r(0, 10), r(20, 5)], &dev, &[r(100, 16)]).expect_err("lengths");
    assert!(
        matches!(
            error,
            CopyError::LengthMismatch {
                src_blocks: 15,
                dst_blocks: 16,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(read_all(&dev), before);
}

#[test]
fn ranges_past_the_end_are_refused_on_either_side() {
    let dev = spec::build("concat(mem:32k, mem:32k)").expect("spec");
    let before = fill(&dev, 2);
    let error = copy(&dev, &[r(120, 10)], &dev, &[r(0, 10)]).expect_err("source");
    assert!(
        matches!(
            &error,
            CopyError::RangePastEnd { lba: 120, blocks: 10, block_count: 128, device } if device.starts_with("concat")
        ),
        "{error}"
    );
    let error = copy(&dev, &[r(0, 10)], &dev, &[r(u64::MAX - 2, 10)]).expect_err("destination");
    assert!(matches!(error, CopyError::RangePastEnd { .. }), "{error}");
    assert!(matches!(
        copy_in(&dev, &[r(0, 129)]),
        Err(CopyError::RangePastEnd { .. })
    ));
    assert_eq!(read_all(&dev), before);
}

#[test]
fn mismatched_block_sizes_are_refused() {
    let small = spec::build("mem:64k").expect("spec");
    let big = spec::build("mem:64k,bs=4096").expect("spec");
    let before = fill(&big, 3);
    let error = copy(&small, &[r(0, 8)], &big, &[r(0, 1)]).expect_err("block size");
    assert!(
        matches!(
            error,
            CopyError::BlockSizeMismatch {
                src_block_size: 512,
                dst_block_size: 4096,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(read_all(&big), before);
}

#[test]
fn overlapping_destination_ranges_are_refused() {
    let dev = spec::build("mem:64k").expect("spec");
    let before = fill(&dev, 4);
    let error = copy(&dev, &[r(0, 20)], &dev, &[r(50, 10), r(55, 10)]).expect_err("overlap");
    assert!(
        matches!(
            error,
            CopyError::DestinationOverlap {
                first_lba: 50,
                second_lba: 55,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(read_all(&dev), before);
}

#[test]
fn tokens_from_another_copy_length_are_refused() {
    let dev = spec::build("mem:64k").expect("spec");
    let tokens = copy_in(&dev, &[r(0, 8)]).expect("tokens");
    let mut engine = CopyEngine::new(CopyOptions::default()).expect("engine");
    assert!(matches!(
        engine.copy_out(&dev, &[r(8, 9)], &tokens),
        Err(CopyError::LengthMismatch { .. })
    ));
}

#[test]
fn unusable_options_are_refused() {
    let error = CopyEngine::new(CopyOptions {
        bounce_bytes: 4096,
        buffer_bytes: 8192,
        ..CopyOptions::default()
    })
    .expect_err("budget smaller than a buffer");
    assert!(matches!(error, CopyError::InvalidOptions { .. }), "{error}");
}

#[test]
fn empty_copies_are_fine() {
    let dev = spec::build("mem:64k").expect("spec");
    let report = copy(&dev, &[], &dev, &[r(3, 0)]).expect("empty copy");
    assert!(report.is_complete());
    assert_eq!(report.bytes_expected, 0);
}
