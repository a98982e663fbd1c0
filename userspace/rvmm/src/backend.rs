// SPDX-License-Identifier: GPL-2.0

//! Where a guest runs: rvmm (/dev/rvmm) or KVM (/dev/kvm, through kvm-ioctls), behind
//! one small trait, so that the same image can be run and compared on both.

use crate::guest::GuestMem;
use crate::uapi::{Regs, Sregs};
use crate::Exit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// Where a VMM's interrupt controllers send interrupt messages (the VM's local APICs).
pub trait IrqSink: Send + Sync {
    /// An interrupt message in the MSI format.
    fn msi(&self, address: u64, data: u32);
}

pub trait Backend: Send {
    fn name(&self) -> &'static str;
    fn set_regs(&mut self, regs: &Regs) -> Result<(), String>;
    fn regs(&mut self) -> Result<Regs, String>;
    fn set_sregs(&mut self, sregs: &Sregs) -> Result<(), String>;
    /// The control registers and EFER (the rest of `Sregs` left zero by KVM's backend).
    fn sregs(&mut self) -> Result<Sregs, String>;
    /// The guest's time-stamp counter now (IA32_TIME_STAMP_COUNTER as the guest reads it).
    fn guest_tsc(&mut self) -> Result<u64, String>;
    fn run(&mut self) -> Result<Exit, String>;
    /// The value of the IN that caused the last exit.
    fn set_io_in(&mut self, value: u32);
    /// The value of the MMIO read that caused the last exit.
    fn set_mmio_data(&mut self, value: u64);
    /// Exit counters, where the backend has them.
    fn stats(&mut self) -> Option<crate::uapi::VmStats> {
        None
    }
    /// Every counter the backend keeps for this VM, by name (monotonic ones only).
    fn counters(&mut self) -> Result<Vec<(String, u64)>, String>;
    /// The counters one exit to userspace adds (the benchmark marker's own exit).
    fn user_exit_counters(&self) -> &'static [&'static str];
    /// Where the platform's interrupt messages go (the VM's local APICs), for a VM made
    /// with them.
    fn irq_sink(&self) -> Result<Arc<dyn IrqSink>, String>;
    /// Makes an AP runnable (KVM with its local APICs in the kernel keeps APs waiting
    /// for a start-up IPI until told otherwise).
    fn start_ap(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Makes an AP wait for a start-up IPI (KVM's APs do from the start).
    fn wait_for_sipi(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// A duplicate of a VM's file descriptor that sends interrupt messages to its local
/// APICs from any thread: rvmm's `RVMM_SIGNAL_MSI` or KVM's `KVM_SIGNAL_MSI`.
struct MsiFd {
    fd: OwnedFd,
    kvm: bool,
}

impl MsiFd {
    fn new(fd: i32, kvm: bool) -> Result<Self, String> {
        // SAFETY: dup of a descriptor this process owns; the copy is owned by `OwnedFd`.
        let d = unsafe { libc::dup(fd) };
        if d < 0 {
            return Err(format!("dup: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(d) };
        Ok(Self { fd, kvm })
    }
}

impl IrqSink for MsiFd {
    fn msi(&self, address: u64, data: u32) {
        let r = if self.kvm {
            const KVM_SIGNAL_MSI: libc::c_ulong = 0x4020_aea5; // _IOW(KVMIO, 0xa5, kvm_msi)
            let m = kvm_bindings::kvm_msi {
                address_lo: address as u32,
                address_hi: (address >> 32) as u32,
                data,
                ..Default::default()
            };
            // SAFETY: KVM_SIGNAL_MSI reads a `struct kvm_msi`.
            unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_SIGNAL_MSI as _, &m) }
        } else {
            let mut m = crate::uapi::Msi {
                address,
                data,
                flags: 0,
            };
            // SAFETY: RVMM_SIGNAL_MSI reads an `rvmm_msi`.
            unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    crate::uapi::RVMM_SIGNAL_MSI as _,
                    &mut m,
                )
            }
        };
        if r < 0 {
            eprintln!(
                "rvmm-run: interrupt message {address:#x}/{data:#x}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// IA32_TIME_STAMP_COUNTER.
const IA32_TSC: u32 = 0x10;

/// rvmm: one vCPU of a VM; the VM owns the vCPU's run mapping, so every vCPU's backend
/// keeps the VM alive.
pub struct RvmmBackend {
    // Field order matters: the vCPU borrows the VM (see `new`).
    vcpu: crate::Vcpu<'static>,
    _vm: Arc<crate::Vm>,
}

// SAFETY: a vCPU is used by one thread at a time (each backend is moved to the thread
// that runs it); its run page pointer is only touched by that thread.
unsafe impl Send for RvmmBackend {}

impl RvmmBackend {
    /// A VM with `cpus` vCPUs (one backend each, vCPU 0 first); `apic`: with in-kernel
    /// local APICs (`RVMM_CREATE_IRQCHIP`).
    pub fn new(
        device: &str,
        mem: &GuestMem,
        pages: u32,
        roots: u32,
        apic: bool,
        cpus: u32,
    ) -> Result<Vec<Self>, String> {
        let vm = Arc::new(
            crate::Rvmm::open(device)
                .map_err(|e| e.to_string())?
                .create_vm()
                .map_err(|e| e.to_string())?,
        );
        if pages != 0 || roots != 0 {
            vm.set_shadow_limits(pages, roots)
                .map_err(|e| format!("--shadow-pages {pages} --shadow-roots {roots}: {e}"))?;
        }
        // SAFETY: `mem` outlives the backend (main keeps it alive until the end).
        unsafe { vm.set_memory_region(0, 0, mem.size() as u64, mem.host_addr(), false) }
            .map_err(|e| e.to_string())?;
        if apic {
            vm.create_irqchip().map_err(|e| e.to_string())?;
        }
        // SAFETY: the VM is reference-counted and each backend drops its reference after
        // its vCPU (field order), so the reference stays valid for the vCPU's life.
        let vm_ref: &'static crate::Vm = unsafe { &*Arc::as_ptr(&vm) };
        (0..cpus)
            .map(|i| {
                let vcpu = vm_ref.create_vcpu(i).map_err(|e| e.to_string())?;
                Ok(Self {
                    vcpu,
                    _vm: vm.clone(),
                })
            })
            .collect()
    }
}

impl Backend for RvmmBackend {
    fn name(&self) -> &'static str {
        "rvmm"
    }
    fn set_regs(&mut self, regs: &Regs) -> Result<(), String> {
        self.vcpu.set_regs(regs).map_err(|e| e.to_string())
    }
    fn regs(&mut self) -> Result<Regs, String> {
        self.vcpu.regs().map_err(|e| e.to_string())
    }
    fn set_sregs(&mut self, sregs: &Sregs) -> Result<(), String> {
        self.vcpu.set_sregs(sregs).map_err(|e| e.to_string())
    }
    fn run(&mut self) -> Result<Exit, String> {
        self.vcpu.run().map_err(|e| e.to_string())
    }
    fn set_io_in(&mut self, value: u32) {
        self.vcpu.set_io_in(value);
    }
    fn set_mmio_data(&mut self, value: u64) {
        self.vcpu.set_mmio_data(value);
    }
    fn guest_tsc(&mut self) -> Result<u64, String> {
        match self.vcpu.get_msrs(&[IA32_TSC]) {
            Ok(v) if v.len() == 1 => Ok(v[0]),
            Ok(_) => Err("RVMM_GET_MSRS did not read IA32_TIME_STAMP_COUNTER".into()),
            Err(e) => Err(e.to_string()),
        }
    }
    fn sregs(&mut self) -> Result<Sregs, String> {
        self.vcpu.sregs().map_err(|e| e.to_string())
    }
    fn stats(&mut self) -> Option<crate::uapi::VmStats> {
        self._vm.stats().ok()
    }
    fn counters(&mut self) -> Result<Vec<(String, u64)>, String> {
        let s = self
            ._vm
            .stats()
            .map_err(|e| format!("RVMM_GET_STATS: {e}"))?;
        let mut v: Vec<(String, u64)> = s
            .exits
            .iter()
            .enumerate()
            .filter_map(|(i, &n)| {
                rvmm_core::exit::ExitReason::from_basic(i as u16)
                    .map(|r| (format!("exit:{}", r.name().replace(' ', "_")), n))
            })
            .collect();
        v.push(("exits".into(), s.exits.iter().sum()));
        v.extend(
            s.counters()
                .iter()
                .filter(|c| c.monotonic)
                .map(|c| (c.name.to_string(), c.value)),
        );
        Ok(v)
    }
    fn user_exit_counters(&self) -> &'static [&'static str] {
        &["exits", "exit:I/O_instruction", "user_exits"]
    }
    fn irq_sink(&self) -> Result<Arc<dyn IrqSink>, String> {
        Ok(Arc::new(MsiFd::new(self._vm.as_raw_fd(), false)?))
    }
    fn start_ap(&mut self) -> Result<(), String> {
        self._vm
            .set_mp_state(self.vcpu.index(), false)
            .map_err(|e| e.to_string())
    }
    fn wait_for_sipi(&mut self) -> Result<(), String> {
        self._vm
            .set_mp_state(self.vcpu.index(), true)
            .map_err(|e| e.to_string())
    }
}

/// KVM, for running the same images on a host with /dev/kvm.
pub struct KvmBackend {
    vcpu: kvm_ioctls::VcpuFd,
    _vm: Arc<kvm_ioctls::VmFd>,
    vm_stats: std::fs::File,
    vcpu_stats: std::fs::File,
    /// Every vCPU's statistics file (the counters of vCPU 0 add up all of them).
    all_vcpu_stats: Arc<Mutex<Vec<std::fs::File>>>,
}

/// KVM_GET_STATS_FD: the binary statistics file of a VM or vCPU.
fn stats_fd(fd: &impl std::os::fd::AsRawFd) -> Result<std::fs::File, String> {
    use std::os::fd::FromRawFd;
    const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce; // _IO(KVMIO, 0xce)
                                                              // SAFETY: the ioctl takes no argument and returns a new file descriptor.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
    if r < 0 {
        return Err(format!(
            "KVM_GET_STATS_FD: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(r) })
}

/// The cumulative counters of a KVM statistics file (Documentation/virt/kvm/api.rst,
/// KVM_GET_STATS_FD): a header, descriptors with names, then the data.
fn kvm_stats(f: &std::fs::File) -> Result<Vec<(String, u64)>, String> {
    use std::os::unix::fs::FileExt;
    let rd = |off: u64, len: usize| -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off)
            .map_err(|e| format!("KVM stats: {e}"))?;
        Ok(b)
    };
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let h = rd(0, 24)?;
    let (name_size, num_desc) = (u32_at(&h, 4) as usize, u32_at(&h, 8) as usize);
    let (desc_off, data_off) = (u32_at(&h, 16) as u64, u32_at(&h, 20) as u64);
    let desc_len = 16 + name_size;
    let descs = rd(desc_off, desc_len * num_desc)?;
    let mut v = Vec::new();
    for d in descs.chunks_exact(desc_len) {
        const TYPE_MASK: u32 = 0xf;
        const TYPE_CUMULATIVE: u32 = 0;
        let flags = u32_at(d, 0);
        let size = u16::from_le_bytes([d[6], d[7]]);
        if flags & TYPE_MASK != TYPE_CUMULATIVE || size != 1 {
            continue;
        }
        let offset = u32_at(d, 8) as u64;
        let name = &d[16..];
        let name = String::from_utf8_lossy(
            &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())],
        )
        .into_owned();
        let val = u64::from_le_bytes(rd(data_off + offset, 8)?.try_into().unwrap());
        v.push((name, val));
    }
    Ok(v)
}

impl KvmBackend {
    /// A VM with one vCPU; `apic`: with KVM's local APICs in the kernel and the other
    /// interrupt controllers in rvmm-run (KVM_CAP_SPLIT_IRQCHIP), as rvmm has them.
    pub fn new(mem: &GuestMem, apic: bool, cpus: u32) -> Result<Vec<Self>, String> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        if apic {
            let mut cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = 24;
            vm.enable_cap(&cap)
                .map_err(|e| format!("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP): {e}"))?;
        }
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem.size() as u64,
            userspace_addr: mem.host_addr(),
        };
        // SAFETY: `mem` outlives the VM (main keeps it alive until the end).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let vm = Arc::new(vm);
        let mut out = Vec::new();
        let all = Arc::new(Mutex::new(Vec::new()));
        for i in 0..cpus {
            let vcpu = vm
                .create_vcpu(i.into())
                .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
            let mut cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
            // KVM passes leaf 1's EBX through as the host CPU that answered had it: its
            // APIC ID (bits 31:24) would vary with the CPU rvmm-run ran on. Give vCPU i
            // APIC ID i and one logical processor, as rvmm does.
            for e in cpuid.as_mut_slice() {
                if e.function == 1 {
                    e.ebx = (e.ebx & 0xffff) | (1 << 16) | (i << 24);
                }
            }
            vcpu.set_cpuid2(&cpuid)
                .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
            let vm_stats = stats_fd(&*vm)?;
            let vcpu_stats = stats_fd(&vcpu)?;
            all.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(vcpu_stats.try_clone().map_err(|e| e.to_string())?);
            out.push(Self {
                vcpu,
                _vm: vm.clone(),
                vm_stats,
                vcpu_stats,
                all_vcpu_stats: all.clone(),
            });
        }
        Ok(out)
    }
}

fn kvm_seg(s: &crate::uapi::Segment) -> kvm_bindings::kvm_segment {
    kvm_bindings::kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.seg_type,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }
    fn set_regs(&mut self, r: &Regs) -> Result<(), String> {
        let k = kvm_bindings::kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.vcpu
            .set_regs(&k)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))
    }
    fn regs(&mut self) -> Result<Regs, String> {
        let k = self
            .vcpu
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        Ok(Regs {
            rax: k.rax,
            rbx: k.rbx,
            rcx: k.rcx,
            rdx: k.rdx,
            rsi: k.rsi,
            rdi: k.rdi,
            rsp: k.rsp,
            rbp: k.rbp,
            r8: k.r8,
            r9: k.r9,
            r10: k.r10,
            r11: k.r11,
            r12: k.r12,
            r13: k.r13,
            r14: k.r14,
            r15: k.r15,
            rip: k.rip,
            rflags: k.rflags,
        })
    }
    fn set_sregs(&mut self, s: &Sregs) -> Result<(), String> {
        let mut k = self
            .vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        k.cs = kvm_seg(&s.cs);
        k.ds = kvm_seg(&s.ds);
        k.es = kvm_seg(&s.es);
        k.fs = kvm_seg(&s.fs);
        k.gs = kvm_seg(&s.gs);
        k.ss = kvm_seg(&s.ss);
        k.tr = kvm_seg(&s.tr);
        k.ldt = kvm_seg(&s.ldt);
        k.gdt = kvm_bindings::kvm_dtable {
            base: s.gdt.base,
            limit: s.gdt.limit,
            padding: [0; 3],
        };
        k.idt = kvm_bindings::kvm_dtable {
            base: s.idt.base,
            limit: s.idt.limit,
            padding: [0; 3],
        };
        k.cr0 = s.cr0;
        k.cr2 = s.cr2;
        k.cr3 = s.cr3;
        k.cr4 = s.cr4;
        k.cr8 = s.cr8;
        k.efer = s.efer;
        self.vcpu
            .set_sregs(&k)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))
    }
    fn run(&mut self) -> Result<Exit, String> {
        use kvm_ioctls::VcpuExit;
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                Ok(Exit::IoOut {
                    port,
                    size: data.len() as u8,
                    data: u32::from_le_bytes(v),
                })
            }
            Ok(VcpuExit::IoIn(port, data)) => Ok(Exit::IoIn {
                port,
                size: data.len() as u8,
            }),
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut v = [0u8; 8];
                v[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
                Ok(Exit::Mmio {
                    addr,
                    len: data.len() as u32,
                    is_write: true,
                    data: u64::from_le_bytes(v),
                })
            }
            Ok(VcpuExit::MmioRead(addr, data)) => Ok(Exit::Mmio {
                addr,
                len: data.len() as u32,
                is_write: false,
                data: 0,
            }),
            Ok(VcpuExit::Hlt) => Ok(Exit::Hlt),
            Ok(VcpuExit::Shutdown) => Ok(Exit::Shutdown),
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Ok(Exit::FailEntry {
                reason,
                vmfail: false,
                check: 0,
            }),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the run structure's `internal` member is the one valid for a
                // KVM_EXIT_INTERNAL_ERROR exit.
                let i = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (i.ndata as usize).min(4);
                let mut data = [0u64; 4];
                data[..n].copy_from_slice(&i.data[..n]);
                Ok(Exit::Internal {
                    suberror: i.suberror,
                    data,
                })
            }
            Ok(other) => Err(format!("KVM exit not handled by rvmm-run: {other:?}")),
            Err(e) if e.errno() == libc::EINTR => Ok(Exit::Interrupted),
            // An AP that left its wait for INIT/SIPI: KVM wants KVM_RUN again.
            Err(e) if e.errno() == libc::EAGAIN => Ok(Exit::Interrupted),
            Err(e) => Err(format!("KVM_RUN: {e}")),
        }
    }
    fn guest_tsc(&mut self) -> Result<u64, String> {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: IA32_TSC,
            ..Default::default()
        }])
        .map_err(|e| format!("KVM_GET_MSRS: {e:?}"))?;
        match self.vcpu.get_msrs(&mut msrs) {
            Ok(1) => Ok(msrs.as_slice()[0].data),
            Ok(_) => Err("KVM_GET_MSRS did not read IA32_TIME_STAMP_COUNTER".into()),
            Err(e) => Err(format!("KVM_GET_MSRS: {e}")),
        }
    }
    fn sregs(&mut self) -> Result<Sregs, String> {
        let k = self
            .vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        Ok(Sregs {
            cr0: k.cr0,
            cr2: k.cr2,
            cr3: k.cr3,
            cr4: k.cr4,
            cr8: k.cr8,
            efer: k.efer,
            ..Default::default()
        })
    }
    /// KVM's binary statistics of the VM and of its vCPU (cumulative counters only).
    fn counters(&mut self) -> Result<Vec<(String, u64)>, String> {
        // The VM's counters, then every vCPU's added up (by name, in vCPU 0's order).
        let mut v = kvm_stats(&self.vm_stats)?;
        let mut sum = kvm_stats(&self.vcpu_stats)?;
        for f in self
            .all_vcpu_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .skip(1)
        {
            for (name, n) in kvm_stats(f)? {
                if let Some(e) = sum.iter_mut().find(|(k, _)| *k == name) {
                    e.1 += n;
                }
            }
        }
        v.extend(sum);
        v.sort();
        Ok(v)
    }
    fn user_exit_counters(&self) -> &'static [&'static str] {
        &["exits", "io_exits"]
    }
    fn irq_sink(&self) -> Result<Arc<dyn IrqSink>, String> {
        Ok(Arc::new(MsiFd::new(self._vm.as_raw_fd(), true)?))
    }
    fn start_ap(&mut self) -> Result<(), String> {
        self.vcpu
            .set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(|e| format!("KVM_SET_MP_STATE: {e}"))
    }
    fn set_mmio_data(&mut self, value: u64) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO: the mmio member is the active one.
        unsafe {
            let mmio = &mut run.__bindgen_anon_1.mmio;
            let n = (mmio.len as usize).min(8);
            mmio.data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
        }
    }
    fn set_io_in(&mut self, value: u32) {
        // Write straight into the mapped kvm_run: KVM picks the data up on the next run.
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO (IN): the io member is the active one and
        // its data lies inside the mapped run area.
        unsafe {
            let io = run.__bindgen_anon_1.io;
            let p = (run as *mut kvm_bindings::kvm_run as *mut u8).add(io.data_offset as usize);
            std::ptr::copy_nonoverlapping(
                value.to_le_bytes().as_ptr(),
                p,
                usize::from(io.size).min(4),
            );
        }
    }
}
