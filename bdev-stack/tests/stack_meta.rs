//! Stripes and concats with metadata: created over members, found again
//! from them in any order through `assemble(...)`; a missing member, a
//! stranger and a duplicate are typed errors (no copy to fall back on).

mod common;

use std::sync::Arc;

use bdev_stack::{BdevError, BlockDevice, HostAllocator, Level, MemDevice, stack_meta};
use common::{SyncIo, pattern};

fn mem(blocks: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(blocks * 512, 512, 1 << 20).expect("mem"))
}

#[test]
fn stripes_and_concats_come_back_from_their_members_in_any_order() {
    for (level, sizes) in [
        (Level::Stripe, [2048u64, 2048, 2048]),
        (Level::Concat, [1024, 3000, 2048]),
    ] {
        let members: Vec<Arc<dyn BlockDevice>> = sizes.iter().map(|&b| mem(b)).collect();
        let stack = stack_meta::create(level, members.clone(), 16, Arc::new(HostAllocator))
            .expect("create");
        let blocks = stack.info().block_count;
        let data = pattern(4, (blocks * 512) as usize);
        SyncIo::open(stack.as_ref()).write(0, &data).expect("write");
        drop(stack);
        let mut shuffled = members.clone();
        shuffled.rotate_left(1);
        let (again, report) =
            stack_meta::assemble(shuffled, Arc::new(HostAllocator)).expect("assemble");
        assert_eq!(again.info().block_count, blocks, "{level:?}");
        assert_eq!(report.members.len(), 3);
        assert!(
            SyncIo::open(again.as_ref()).read(0, blocks).expect("read") == data,
            "{level:?}"
        );
        // Without a member there is no stack.
        match stack_meta::assemble(members[1..].to_vec(), Arc::new(HostAllocator)) {
            Err(BdevError::Assembly { reason, .. }) => {
                assert!(reason.contains("missing"), "{reason}")
            }
            other => panic!(
                "{level:?}: assembled without a member: {:?}",
                other.map(|(_, r)| r)
            ),
        }
        assert!(matches!(
            stack_meta::assemble(
                vec![members[0].clone(), members[0].clone()],
                Arc::new(HostAllocator)
            ),
            Err(BdevError::Assembly { .. })
        ));
    }
    let (a, b) = (mem(2048), mem(2048));
    stack_meta::create(
        Level::Stripe,
        vec![a.clone(), b],
        16,
        Arc::new(HostAllocator),
    )
    .expect("stripe");
    let (c, d) = (mem(2048), mem(2048));
    stack_meta::create(
        Level::Concat,
        vec![c.clone(), d],
        1,
        Arc::new(HostAllocator),
    )
    .expect("concat");
    assert!(matches!(
        stack_meta::assemble(vec![a, c], Arc::new(HostAllocator)),
        Err(BdevError::Assembly { .. })
    ));
}
