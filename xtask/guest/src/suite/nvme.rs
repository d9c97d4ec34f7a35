//! NVMe through VFIO against QEMU's controller, cross-checked with nvme-cli.

use super::{GuestEnv, GuestTest, Kind};
use crate::reference::ShowRegs;
use crate::setup::NvmeDevice;
use crate::topology::DEFAULT;
use std::path::Path;
use std::time::Duration;

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "vfio_open_map_bar0_dma_map",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: vfio_open_map_bar0_dma_map,
    },
    GuestTest {
        name: "vfio_regs_match_nvme_show_regs",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: vfio_regs_match_nvme_show_regs,
    },
];

fn open_vfio(ctrl: &NvmeDevice) -> Result<nvme::vfio::VfioPci, String> {
    nvme::vfio::VfioPci::open(&ctrl.pci_address)
        .map_err(|e| format!("opening {} through VFIO: {e}", ctrl.pci_address))
}

fn vfio_open_map_bar0_dma_map(env: &GuestEnv) -> Result<(), String> {
    for ctrl in &env.devices.nvme {
        let addr = &ctrl.pci_address;
        let dev = open_vfio(ctrl)?;
        let command = dev
            .pci_command()
            .map_err(|e| format!("{addr}: reading the PCI command register: {e}"))?;
        // Bit 1: memory space enable; bit 2: bus master enable.
        if command & 0b110 != 0b110 {
            return Err(format!(
                "{addr}: PCI command {command:#06x} lacks memory/bus-master enable"
            ));
        }
        let cap = dev.cap();
        if !cap.css_nvm() {
            return Err(format!(
                "{addr}: CAP {:#x} does not offer the NVM command set",
                cap.0
            ));
        }
        if cap.mpsmin() > cap.mpsmax() {
            return Err(format!("{addr}: CAP {:#x} has MPSMIN > MPSMAX", cap.0));
        }
        println!("{addr}: CAP {:#018x} VS {}", cap.0, dev.version());

        // Keep every buffer alive to the end: a dropped one gives its IOVA
        // back, and the next may legitimately reuse it.
        let mut buffers = Vec::new();
        let mut ranges = Vec::new();
        for len in [4096usize, 2 << 20, 4096] {
            let buf = dev
                .dma_alloc(len)
                .map_err(|e| format!("{addr}: DMA-mapping {len} bytes: {e}"))?;
            let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            buf.write_bytes(0, &pattern)
                .map_err(|e| format!("{addr}: writing the DMA buffer: {e}"))?;
            let mut back = vec![0u8; len];
            buf.read_bytes(0, &mut back)
                .map_err(|e| format!("{addr}: reading the DMA buffer: {e}"))?;
            if back != pattern {
                return Err(format!(
                    "{addr}: DMA buffer of {len} bytes did not read back"
                ));
            }
            if buf.iova() % 4096 != 0 {
                return Err(format!(
                    "{addr}: IOVA {:#x} is not page aligned",
                    buf.iova()
                ));
            }
            println!("{addr}: mapped {len} bytes at IOVA {:#x}", buf.iova());
            ranges.push((buf.iova(), len as u64));
            buffers.push(buf);
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            if pair[0].0 + pair[0].1 > pair[1].0 {
                return Err(format!("{addr}: live DMA mappings overlap: {ranges:x?}"));
            }
        }
        let iommu = dev.iova_ranges();
        for (iova, len) in &ranges {
            if !iommu
                .iter()
                .any(|r| r.start() <= *iova && iova + len <= r.end())
            {
                return Err(format!(
                    "{addr}: IOVA {iova:#x}+{len:#x} lies outside the IOMMU's ranges {iommu:x?}"
                ));
            }
        }
        drop(buffers);
    }
    Ok(())
}

fn read_reference(dir: &Path, file: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(file))
        .map_err(|e| format!("reading reference {}: {e}", dir.join(file).display()))
}

fn vfio_regs_match_nvme_show_regs(env: &GuestEnv) -> Result<(), String> {
    for ctrl in &env.devices.nvme {
        let addr = &ctrl.pci_address;
        let reference = ShowRegs::parse(
            &read_reference(&ctrl.reference_dir, "show-regs.txt")?,
            &read_reference(&ctrl.reference_dir, "show-regs-human.txt")?,
        )
        .map_err(|e| format!("{addr}: {e}"))?;
        let dev = open_vfio(ctrl)?;
        let cap = dev.cap();
        let vs = dev.version();
        ensure_eq!(format!("{addr} CAP"), cap.0, reference.cap);
        ensure_eq!(
            format!("{addr} CAP.MQES (entries)"),
            cap.max_queue_entries() as u64,
            reference.mqes_decoded
        );
        ensure_eq!(
            format!("{addr} CAP.DSTRD (bytes)"),
            cap.doorbell_stride() as u64,
            reference.doorbell_stride_bytes
        );
        ensure_eq!(format!("{addr} VS"), vs.0, reference.version);
        ensure_eq!(
            format!("{addr} VS (major.minor)"),
            format!("{}.{}", vs.major(), vs.minor()),
            reference.spec_version
        );
    }
    Ok(())
}
