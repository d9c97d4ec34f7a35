//! A kernel that refuses io_uring (here: a seccomp filter answering
//! `io_uring_setup` with EPERM, as a container runtime's profile or
//! `kernel.io_uring_disabled` would): the `file:` leaf asked for io_uring
//! gives the typed error saying what to do; by default it falls back to
//! `pread`/`pwrite` and works.
//!
//! Runs without the test harness: the filter lasts for the whole process.

use bdev_stack::{BdevError, BlockDevice, FileDevice, FileEngine, HostBuffer, IoRequest};

/// Answers `io_uring_setup` with EPERM, allows everything else.
fn refuse_io_uring() {
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let nr = libc::SYS_io_uring_setup as u32;
    let filter = [
        // A = seccomp_data.nr
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        },
        // if A == io_uring_setup: next, else skip one
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: nr,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a valid filter program that outlives the call.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog
            ),
            0,
            "installing the filter: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() {
    let path = std::env::temp_dir().join(format!("uring-refused-{}.img", std::process::id()));
    // io_uring works before the filter.
    let device = FileDevice::open_with(&path, 512, Some(1 << 20), FileEngine::Uring)
        .expect("io_uring before the filter");
    assert_eq!(device.engine(), FileEngine::Uring);
    drop(device);

    refuse_io_uring();

    match FileDevice::open_with(&path, 512, Some(1 << 20), FileEngine::Uring) {
        Err(BdevError::IoUringUnavailable { hint, source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EPERM));
            assert!(hint.contains("kernel.io_uring_disabled"), "{hint}");
        }
        Err(other) => panic!("not the typed error: {other}"),
        Ok(_) => panic!("io_uring asked for and refused, yet the leaf opened"),
    }
    // By default: the synchronous engine, and I/O works.
    let device = FileDevice::open(&path, 512, None).expect("fallback");
    assert_eq!(device.engine(), FileEngine::Sync);
    let mut ch = device.open_channel(4).expect("channel");
    let mut buf = HostBuffer::new(4096).expect("buffer");
    buf.as_mut_slice().fill(0x77);
    let slice = bdev_stack::DmaMemory::dma_slice(&mut buf);
    // SAFETY: `buf` outlives the request, polled to completion below.
    unsafe { ch.submit(IoRequest::write(8, 8, slice, 1)) }.expect("write");
    let mut out = [bdev_stack::Completion::EMPTY];
    while ch.poll(&mut out) == 0 {}
    out[0].result.expect("write through the fallback");
    drop(ch);
    drop(device);
    let bytes = std::fs::read(&path).expect("file");
    assert!(bytes[4096..8192].iter().all(|&b| b == 0x77));
    std::fs::remove_file(&path).expect("cleanup");
    println!("uring_refused: typed error with the hint; fallback engine works");
}
