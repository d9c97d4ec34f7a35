//! Turns a [`Topology`] into a QEMU command line and runs the VM with a
//! hard deadline, streaming its console to a judge and a log file.

use crate::console::{ConsoleJudge, RunReport, VmExit};
use crate::{Error, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use ustor_guest::protocol::{Event, Outcome};
use ustor_guest::supervise::{Ended, supervise};
use ustor_guest::topology::{NvmeBacking, Topology};

/// Kernel command line: serial console, the vIOMMU VFIO needs, a panic
/// that ends the VM (with `-no-reboot`) instead of hanging it.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 intel_iommu=on iommu=pt iomem=relaxed panic=-1 oops=panic quiet loglevel=3 nvme.poll_queues=1";

/// Files backing the topology's devices, created fresh for each boot.
fn create_image(path: &Path, size_mib: u64) -> Result<()> {
    let file = fs::File::create(path)?;
    file.set_len(size_mib << 20)?;
    Ok(())
}

/// QEMU arguments for `topology`; backing images go under `dir`.
pub fn qemu_args(
    topology: &Topology,
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
) -> Result<Vec<String>> {
    fs::create_dir_all(dir)?;
    let mut a: Vec<String> = [
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-net",
        "none",
        "-machine",
        "q35,kernel-irqchip=split",
        // The IOMMU must come before the devices it translates for.
        "-device",
        "intel-iommu,intremap=on,caching-mode=on,aw-bits=48",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The human monitor on a socket of the boot's own, for the requests a
    // guest test makes of the host (unplugging a device).
    a.extend([
        "-monitor".into(),
        format!("unix:{},server=on,wait=off", monitor_socket(dir).display()),
    ]);
    a.extend(["-m".into(), topology.memory_mib.to_string()]);
    a.extend(["-kernel".into(), kernel.display().to_string()]);
    a.extend(["-initrd".into(), initrd.display().to_string()]);
    let mut cmdline = KERNEL_CMDLINE.to_string();
    for arg in &topology.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    a.extend(["-append".into(), cmdline]);

    for (c, ctrl) in topology.nvme.iter().enumerate() {
        let placement = if ctrl.hotplug {
            // A PCIe root port with hot-plug, the controller behind it.
            a.extend([
                "-device".into(),
                format!(
                    "pcie-root-port,id=rp{c},bus=pcie.0,chassis={},slot={},addr={:#x},hotplug=on",
                    c + 1,
                    c + 1,
                    ctrl.pci_slot
                ),
            ]);
            format!("bus=rp{c}")
        } else {
            format!("addr={:#x}", ctrl.pci_slot)
        };
        a.extend([
            "-device".into(),
            format!("nvme,serial={},id=nvme{c},{placement}", ctrl.serial),
        ]);
        for (n, ns) in ctrl.namespaces.iter().enumerate() {
            let nsid = n + 1;
            let id = format!("nvme{c}n{nsid}");
            let drive = match ns.backing {
                NvmeBacking::Null => {
                    if !ns.faults.is_empty() {
                        return Err(Error::msg(format!(
                            "{id}: blkdebug rules need an image backing"
                        )));
                    }
                    format!(
                        "driver=null-co,size={}M,read-zeroes=on,if=none,id={id}",
                        ns.size_mib
                    )
                }
                NvmeBacking::Image => {
                    let image = dir.join(format!("{id}.img"));
                    create_image(&image, ns.size_mib)?;
                    let file = if ns.faults.is_empty() {
                        image.display().to_string()
                    } else {
                        let rules = dir.join(format!("{id}.blkdebug"));
                        fs::write(&rules, blkdebug_rules(&ns.faults))?;
                        format!("blkdebug:{}:{}", rules.display(), image.display())
                    };
                    format!("file={file},if=none,id={id},format=raw,cache=unsafe")
                }
            };
            a.extend([
                "-drive".into(),
                drive,
                "-device".into(),
                format!(
                    "nvme-ns,drive={id},bus=nvme{c},nsid={nsid},logical_block_size={bs},\
                     physical_block_size={bs},mssrl={},mcl={},msrc={}",
                    ns.mssrl,
                    ns.mcl,
                    ns.msrc,
                    bs = ns.block_size
                ),
            ]);
        }
    }
    if !topology.virtio_disks.is_empty() {
        a.extend(["-device".into(), "virtio-scsi-pci,id=vs0,addr=0x10".into()]);
        for (i, disk) in topology.virtio_disks.iter().enumerate() {
            let image = dir.join(format!("virtio{i}.img"));
            create_image(&image, disk.size_mib)?;
            a.extend([
                "-drive".into(),
                format!(
                    "file={},if=none,id=vd{i},format=raw,cache=unsafe,werror=report,rerror=report",
                    image.display()
                ),
                "-device".into(),
                format!("scsi-hd,bus=vs0.0,drive=vd{i},scsi-id={i},lun=0"),
            ]);
        }
    }
    Ok(a)
}

/// blkdebug configuration for a namespace's fault rules.
pub fn blkdebug_rules(rules: &[ustor_guest::topology::BlkdebugRule]) -> String {
    let mut out = String::new();
    for r in rules {
        out.push_str("[inject-error]\n");
        out.push_str(&format!("event = \"{}\"\n", r.event));
        out.push_str(&format!("errno = \"{}\"\n", r.errno));
        if let Some(sector) = r.sector {
            out.push_str(&format!("sector = \"{sector}\"\n"));
        }
        if r.once {
            out.push_str("once = \"on\"\n");
        }
        out.push('\n');
    }
    out
}

/// The monitor socket of the boot whose files are under `dir`.
pub fn monitor_socket(dir: &Path) -> PathBuf {
    dir.join("monitor.sock")
}

/// Carries out a request a guest test printed (see
/// [`ustor_guest::protocol::HOST_REQUEST`]) on the boot's monitor. Only
/// `device_del ID` of an NVMe controller is honoured.
fn host_request(monitor: &Path, request: &str) -> std::result::Result<(), String> {
    let Some(id) = request.strip_prefix("device_del ") else {
        return Err(format!("unknown host request {request:?}"));
    };
    if !id.starts_with("nvme") || !id[4..].bytes().all(|b| b.is_ascii_digit()) || id.len() == 4 {
        return Err(format!(
            "device_del of {id:?}: only NVMe controllers (nvmeN) may be unplugged"
        ));
    }
    let mut stream = std::os::unix::net::UnixStream::connect(monitor)
        .map_err(|e| format!("connecting to the monitor {}: {e}", monitor.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| format!("monitor socket: {e}"))?;
    // The monitor takes commands once it has shown its prompt, and carries
    // one out before the next prompt: wait for each, or the command may be
    // dropped with the connection.
    read_to_prompt(&mut stream)?;
    writeln!(stream, "device_del {id}").map_err(|e| format!("writing to the monitor: {e}"))?;
    let answer = read_to_prompt(&mut stream)?;
    // Anything but the echo and the prompt is QEMU's complaint.
    let said: String = answer
        .lines()
        .filter(|l| !l.contains("device_del") && !l.trim().is_empty() && !l.contains("(qemu)"))
        .collect::<Vec<_>>()
        .join("; ");
    if said.is_empty() {
        Ok(())
    } else {
        Err(format!("QEMU: {said}"))
    }
}

/// Reads the monitor's output up to its next `(qemu)` prompt.
fn read_to_prompt(
    stream: &mut std::os::unix::net::UnixStream,
) -> std::result::Result<String, String> {
    use std::io::Read;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("(qemu)") {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("reading the monitor: {e}"))?;
        if n == 0 {
            return Err("the monitor closed the connection".into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&seen).into_owned())
}

/// One boot: what to run, and where.
pub struct Boot {
    /// The tests to run, in order.
    pub tests: Vec<String>,
    /// Hard deadline for the whole boot.
    pub deadline: Duration,
    /// Where the console log goes.
    pub console_log: PathBuf,
    /// The boot's monitor socket ([`monitor_socket`]).
    pub monitor: PathBuf,
    /// Print every line the guest entries print, as it comes (benchmarks).
    pub show_output: bool,
}

/// Boots QEMU with `args`, printing each test's result as it arrives, and
/// kills the VM at the boot's deadline. No path through here can hang.
pub fn run_vm(boot: &Boot, args: &[String]) -> Result<RunReport> {
    let mut log = fs::File::create(&boot.console_log)?;
    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::msg(format!("starting qemu-system-x86_64: {e}")))?;
    let mut judge = ConsoleJudge::new(boot.tests.clone());
    let mut log_error = None;
    let ended = supervise(child, boot.deadline, |line| {
        if let Err(e) = writeln!(log, "{line}") {
            log_error.get_or_insert(e);
        }
        if let Some(event) = judge.feed(&line) {
            if let Event::Output { name, line } = &event
                && let Some(request) = line.strip_prefix(ustor_guest::protocol::HOST_REQUEST)
            {
                match host_request(&boot.monitor, request.trim()) {
                    Ok(()) => println!("[host] {name}: {}", request.trim()),
                    Err(e) => println!("[host] {name}: request refused: {e}"),
                }
            }
            show_progress(&event, started, boot.show_output);
        }
    })?;
    if let Some(e) = log_error {
        return Err(Error::msg(format!(
            "writing {}: {e}",
            boot.console_log.display()
        )));
    }
    let exit = match ended {
        Ended::Exited(status) => VmExit::Exited(status.code()),
        Ended::Killed => VmExit::KilledAtDeadline {
            after_secs: boot.deadline.as_secs(),
        },
    };
    log.flush()?;
    Ok(judge.finish(exit))
}

fn show_progress(event: &Event, started: Instant, show_output: bool) {
    let t = started.elapsed().as_secs_f64();
    match event {
        Event::Output { line, .. } if show_output => println!("{line}"),
        Event::SuiteStart { count } => {
            println!("[{t:6.1}s] guest ready, running {count} tests");
        }
        Event::TestEnd {
            name,
            outcome,
            millis,
        } => {
            let verdict = match outcome {
                Outcome::Pass => "ok".to_string(),
                Outcome::Fail(_) => "FAILED".to_string(),
                Outcome::Timeout => "TIMED OUT".to_string(),
            };
            println!(
                "[{t:6.1}s] test {name} ... {verdict} ({:.1} s)",
                *millis as f64 / 1000.0
            );
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ustor_guest::topology::FAULT_SECTOR;

    fn args_for(topology: &Topology) -> (Vec<String>, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "ustor-qemu-args-{}-{}",
            topology.name,
            std::process::id()
        ));
        let args = qemu_args(topology, &dir, Path::new("/k"), Path::new("/i")).unwrap();
        (args, dir)
    }

    #[test]
    fn default_topology_declares_every_device() {
        let topo = Topology::default_rig();
        let (args, dir) = args_for(&topo);
        let joined = args.join(" ");
        // The IOMMU precedes every PCI device it must translate for.
        let iommu = joined.find("intel-iommu").unwrap();
        assert!(iommu < joined.find("-device nvme,").unwrap());
        assert_eq!(joined.matches("-device nvme,").count(), 2);
        assert_eq!(joined.matches("-device nvme-ns,").count(), 3);
        assert!(joined.contains("addr=0x4") && joined.contains("addr=0x5"));
        assert!(joined.contains("logical_block_size=4096"));
        assert!(joined.contains("mssrl=128,mcl=256,msrc=15"));
        assert_eq!(joined.matches("scsi-hd,").count(), 1);
        assert!(!joined.contains("blkdebug"));
        let image = dir.join("nvme1n1.img");
        assert_eq!(fs::metadata(&image).unwrap().len(), 64 << 20);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bench_namespace_is_null_backed_and_trusts_the_tsc() {
        let topo = Topology::nvme_bench();
        let (args, dir) = args_for(&topo);
        let drive = args.iter().find(|a| a.contains("id=nvme0n1")).unwrap();
        assert!(
            drive.starts_with("driver=null-co,size=1024M,read-zeroes=on"),
            "{drive}"
        );
        assert!(!dir.join("nvme0n1.img").exists());
        let cmdline = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(cmdline.ends_with(" tsc=reliable"), "{cmdline}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fault_rules_go_through_blkdebug() {
        let topo = Topology::faults();
        let (args, dir) = args_for(&topo);
        let drive = args.iter().find(|a| a.contains("id=nvme0n1")).unwrap();
        assert!(drive.starts_with("file=blkdebug:"), "{drive}");
        let rules = fs::read_to_string(dir.join("nvme0n1.blkdebug")).unwrap();
        assert!(rules.contains("[inject-error]"));
        assert!(rules.contains("event = \"read_aio\""));
        assert!(rules.contains(&format!("sector = \"{FAULT_SECTOR}\"")));
        assert!(!rules.contains("once"));
        fs::remove_dir_all(dir).unwrap();
    }
}
