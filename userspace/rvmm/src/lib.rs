// SPDX-License-Identifier: GPL-2.0

//! `rvmm`: safe wrappers over the `/dev/rvmm` ioctls, with typed errors.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub mod backend;
pub mod guest;

pub use rvmm_uapi as uapi;
pub use rvmm_uapi::{Status, VmxCaps, RVMM_API_VERSION};

/// The device node the module registers.
pub const DEFAULT_DEVICE: &str = "/dev/rvmm";

/// What went wrong, and where.
#[derive(Debug)]
pub enum Error {
    /// The device could not be opened.
    Open {
        /// Device path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An ioctl failed.
    Ioctl {
        /// Name of the ioctl.
        op: &'static str,
        /// The OS error (errno).
        source: io::Error,
    },
    /// The module speaks another ABI version than this library.
    ApiMismatch {
        /// Version the module reported.
        module: u32,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open { path, source } => {
                write!(f, "cannot open {}: {source}", path.display())?;
                if source.kind() == io::ErrorKind::NotFound {
                    write!(f, " (is rvmm.ko loaded? `insmod rvmm.ko`, then see `dmesg` if it refused)")?;
                }
                Ok(())
            }
            Error::Ioctl { op, source } => write!(f, "{op} failed: {source}"),
            Error::ApiMismatch { module } => write!(
                f,
                "rvmm.ko speaks ABI version {module}, this program version {RVMM_API_VERSION}: rebuild one of them"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open { source, .. } | Error::Ioctl { source, .. } => Some(source),
            Error::ApiMismatch { .. } => None,
        }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An open `/dev/rvmm`.
#[derive(Debug)]
pub struct Rvmm {
    file: File,
}

impl Rvmm {
    /// Opens the device at `path` and checks that it speaks this library's ABI.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        let rvmm = Rvmm { file };
        let module = rvmm.api_version()?;
        if module != RVMM_API_VERSION {
            return Err(Error::ApiMismatch { module });
        }
        Ok(rvmm)
    }

    /// The module's ABI version.
    pub fn api_version(&self) -> Result<u32> {
        // SAFETY: RVMM_GET_API_VERSION takes no argument.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                uapi::RVMM_GET_API_VERSION as _,
                0usize,
            )
        };
        if r < 0 {
            return Err(Error::Ioctl {
                op: "RVMM_GET_API_VERSION",
                source: io::Error::last_os_error(),
            });
        }
        Ok(r as u32)
    }

    /// The CPU's VMX capabilities as the module reads them.
    pub fn vmx_caps(&self) -> Result<VmxCaps> {
        self.read_struct("RVMM_GET_VMX_CAPS", uapi::RVMM_GET_VMX_CAPS)
    }

    /// Checks VMX operation on every online CPU.
    pub fn status(&self) -> Result<Status> {
        self.read_struct("RVMM_GET_STATUS", uapi::RVMM_GET_STATUS)
    }

    fn read_struct<T: Default>(&self, op: &'static str, cmd: u32) -> Result<T> {
        let mut value = T::default();
        // SAFETY: `cmd` is an _IOR ioctl whose size is `size_of::<T>()` (uapi), and
        // `value` is a valid, writable `T`.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd as _, &mut value as *mut T) };
        if r < 0 {
            return Err(Error::Ioctl {
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(value)
    }

    /// The raw file descriptor, for tests that issue malformed ioctls on purpose.
    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

impl Rvmm {
    /// Turns this open device into a VM.
    pub fn create_vm(self) -> Result<Vm> {
        // SAFETY: RVMM_CREATE_VM takes no argument.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), uapi::RVMM_CREATE_VM as _, 0usize) };
        if r < 0 {
            return Err(Error::Ioctl {
                op: "RVMM_CREATE_VM",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Vm { file: self.file })
    }
}

/// A VM: an open `/dev/rvmm` after `RVMM_CREATE_VM`.
#[derive(Debug)]
pub struct Vm {
    file: File,
}

fn ioctl_ptr<T>(file: &File, op: &'static str, cmd: u32, arg: *mut T) -> Result<i32> {
    // SAFETY: callers pass the argument type the ioctl number encodes.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), cmd as _, arg) };
    if r < 0 {
        return Err(Error::Ioctl {
            op,
            source: io::Error::last_os_error(),
        });
    }
    Ok(r)
}

impl Vm {
    /// Maps `size` bytes at `uaddr` of this process at guest-physical `gpa` (slot
    /// `slot`); size 0 deletes the slot.
    ///
    /// # Safety
    /// The memory at `uaddr` must stay mapped while the slot exists (the module pins it,
    /// but unmapping it from this process would leave the guest on pages nobody else sees).
    pub unsafe fn set_memory_region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        uaddr: u64,
        readonly: bool,
    ) -> Result<()> {
        let mut r = uapi::MemoryRegion {
            slot,
            flags: if readonly { uapi::RVMM_MEM_READONLY } else { 0 },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: uaddr,
        };
        ioctl_ptr(
            &self.file,
            "RVMM_SET_MEMORY_REGION",
            uapi::RVMM_SET_MEMORY_REGION,
            &mut r,
        )?;
        Ok(())
    }

    /// Creates vCPU `id` and maps its run page.
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu<'_>> {
        // SAFETY: RVMM_CREATE_VCPU takes an integer.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                uapi::RVMM_CREATE_VCPU as _,
                id as usize,
            )
        };
        if r < 0 {
            return Err(Error::Ioctl {
                op: "RVMM_CREATE_VCPU",
                source: io::Error::last_os_error(),
            });
        }
        let index = r as u32;
        // SAFETY: maps the vCPU's run page (one page at offset index * page size).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                uapi::RVMM_RUN_MMAP_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                (u64::from(index) * uapi::RVMM_RUN_MMAP_SIZE) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Ioctl {
                op: "mmap of the run page",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Vcpu {
            vm: self,
            index,
            run: p.cast(),
        })
    }

    /// The VM's shadow page pool: pages and cached roots (0 keeps the module's default).
    /// Only before the first vCPU is created (EBUSY after).
    pub fn set_shadow_limits(&self, pages: u32, roots: u32) -> Result<()> {
        let mut l = uapi::ShadowLimits { pages, roots };
        ioctl_ptr(
            &self.file,
            "RVMM_SET_SHADOW_LIMITS",
            uapi::RVMM_SET_SHADOW_LIMITS,
            &mut l,
        )?;
        Ok(())
    }

    /// Which hypercalls (VMCALL with RAX = n, n below 64) exit to this program as
    /// [`Exit::Hypercall`]: bit n of `mask`. The others return
    /// [`uapi::RVMM_HC_ENOSYS`] to the guest without an exit; none exit until this is set.
    pub fn set_hypercall_exits(&self, mask: u64) -> Result<()> {
        let mut h = uapi::HypercallExits { mask };
        ioctl_ptr(
            &self.file,
            "RVMM_SET_HYPERCALL_EXITS",
            uapi::RVMM_SET_HYPERCALL_EXITS,
            &mut h,
        )?;
        Ok(())
    }

    /// Gives every vCPU created from now on an in-kernel local APIC
    /// (`RVMM_CREATE_IRQCHIP`): xAPIC page, x2APIC MSRs, timer, IPIs; a HLT with
    /// interrupts on then waits in the kernel. Before the first vCPU (EBUSY after).
    pub fn create_irqchip(&self) -> Result<()> {
        ioctl_ptr(
            &self.file,
            "RVMM_CREATE_IRQCHIP",
            uapi::RVMM_CREATE_IRQCHIP,
            std::ptr::null_mut::<u8>(),
        )?;
        Ok(())
    }

    /// Sends an interrupt message (MSI format) to the VM's local APICs; returns how
    /// many took it.
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<u32> {
        let mut m = uapi::Msi {
            address,
            data,
            flags: 0,
        };
        let n = ioctl_ptr(&self.file, "RVMM_SIGNAL_MSI", uapi::RVMM_SIGNAL_MSI, &mut m)?;
        Ok(n as u32)
    }

    /// Whether vCPU `vcpu` runs (`wait_sipi` false) or waits for a start-up IPI.
    pub fn set_mp_state(&self, vcpu: u32, wait_sipi: bool) -> Result<()> {
        let mut m = uapi::MpState {
            vcpu,
            state: if wait_sipi {
                uapi::RVMM_MP_STATE_WAIT_SIPI
            } else {
                uapi::RVMM_MP_STATE_RUNNABLE
            },
        };
        ioctl_ptr(
            &self.file,
            "RVMM_SET_MP_STATE",
            uapi::RVMM_SET_MP_STATE,
            &mut m,
        )?;
        Ok(())
    }

    /// Counters summed over the VM's vCPUs.
    pub fn stats(&self) -> Result<uapi::VmStats> {
        let mut s = uapi::VmStats::default();
        ioctl_ptr(&self.file, "RVMM_GET_STATS", uapi::RVMM_GET_STATS, &mut s)?;
        Ok(s)
    }

    /// The raw file descriptor.
    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// Why `Vcpu::run` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// OUT: the guest wrote `data` (little-endian, `size` bytes) to `port`.
    IoOut { port: u16, size: u8, data: u32 },
    /// IN: call [`Vcpu::set_io_in`] with the value before running again.
    IoIn { port: u16, size: u8 },
    /// MMIO: a write of `len` bytes of `data`, or a read that [`Vcpu::set_mmio_data`]
    /// completes before the next run.
    Mmio {
        addr: u64,
        len: u32,
        is_write: bool,
        data: u64,
    },
    /// HLT.
    Hlt,
    /// The guest can take an interrupt now (asked for with
    /// [`Vcpu::request_interrupt_window`]).
    IrqWindowOpen,
    /// VMCALL: RAX and six arguments; [`Vcpu::set_hypercall_ret`] sets the result.
    Hypercall { nr: u64, args: [u64; 6] },
    /// Triple fault.
    Shutdown,
    /// VM entry failed.
    FailEntry {
        reason: u64,
        vmfail: bool,
        check: u32,
    },
    /// rvmm could not handle an exit.
    Internal { suberror: u32, data: [u64; 4] },
    /// A signal interrupted the run.
    Interrupted,
    /// Any other exit reason.
    Other(u32),
}

/// A vCPU of a [`Vm`], with its mapped run page.
#[derive(Debug)]
pub struct Vcpu<'a> {
    vm: &'a Vm,
    index: u32,
    run: *mut uapi::Run,
}

impl Vcpu<'_> {
    /// The vCPU's index in its VM.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// General registers.
    pub fn regs(&self) -> Result<uapi::Regs> {
        let mut r = uapi::VcpuRegs {
            vcpu: self.index,
            ..Default::default()
        };
        ioctl_ptr(&self.vm.file, "RVMM_GET_REGS", uapi::RVMM_GET_REGS, &mut r)?;
        Ok(r.regs)
    }

    /// Sets the general registers.
    pub fn set_regs(&self, regs: &uapi::Regs) -> Result<()> {
        let mut r = uapi::VcpuRegs {
            vcpu: self.index,
            padding: 0,
            regs: *regs,
        };
        ioctl_ptr(&self.vm.file, "RVMM_SET_REGS", uapi::RVMM_SET_REGS, &mut r)?;
        Ok(())
    }

    /// Special registers.
    pub fn sregs(&self) -> Result<uapi::Sregs> {
        let mut s = uapi::VcpuSregs {
            vcpu: self.index,
            ..Default::default()
        };
        ioctl_ptr(
            &self.vm.file,
            "RVMM_GET_SREGS",
            uapi::RVMM_GET_SREGS,
            &mut s,
        )?;
        Ok(s.sregs)
    }

    /// Sets the special registers.
    pub fn set_sregs(&self, sregs: &uapi::Sregs) -> Result<()> {
        let mut s = uapi::VcpuSregs {
            vcpu: self.index,
            padding: 0,
            sregs: *sregs,
        };
        ioctl_ptr(
            &self.vm.file,
            "RVMM_SET_SREGS",
            uapi::RVMM_SET_SREGS,
            &mut s,
        )?;
        Ok(())
    }

    /// The value an IN returns (call after [`Exit::IoIn`], before running again).
    pub fn set_io_in(&self, value: u32) {
        // SAFETY: the run page is mapped for this vCPU's lifetime.
        unsafe { (*self.run).io_data[0] = u64::from(value) };
    }

    /// Queues external interrupt `vector` (32..255); it is delivered when the guest
    /// can take it.
    pub fn interrupt(&self, vector: u8) -> Result<()> {
        let mut ev = uapi::Interrupt {
            vcpu: self.index,
            kind: uapi::RVMM_EVENT_INTERRUPT,
            vector: vector.into(),
            ..Default::default()
        };
        ioctl_ptr(
            &self.vm.file,
            "RVMM_INTERRUPT",
            uapi::RVMM_INTERRUPT,
            &mut ev,
        )?;
        Ok(())
    }

    /// Queues hardware exception `vector` for the next entry.
    pub fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        let mut ev = uapi::Interrupt {
            vcpu: self.index,
            kind: uapi::RVMM_EVENT_EXCEPTION,
            vector: vector.into(),
            has_error_code: error_code.is_some().into(),
            error_code: error_code.unwrap_or(0),
            padding: 0,
        };
        ioctl_ptr(
            &self.vm.file,
            "RVMM_INTERRUPT",
            uapi::RVMM_INTERRUPT,
            &mut ev,
        )?;
        Ok(())
    }

    /// Asks for an exit as soon as the guest can take an interrupt.
    pub fn request_interrupt_window(&self, on: bool) {
        // SAFETY: the run page is mapped for this vCPU's lifetime.
        unsafe { (*self.run).request_interrupt_window = on.into() };
    }

    /// Whether an interrupt could be injected at the last exit.
    pub fn ready_for_interrupt(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.run).ready_for_interrupt_injection != 0 }
    }

    /// Sets the CPUID leaves the guest sees.
    pub fn set_cpuid(&self, entries: &[uapi::CpuidEntry]) -> Result<()> {
        let mut c = Box::new(uapi::Cpuid {
            vcpu: self.index,
            nent: entries.len() as u32,
            ..Default::default()
        });
        if entries.len() > c.entries.len() {
            return Err(Error::Ioctl {
                op: "RVMM_SET_CPUID",
                source: io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        c.entries[..entries.len()].copy_from_slice(entries);
        ioctl_ptr(
            &self.vm.file,
            "RVMM_SET_CPUID",
            uapi::RVMM_SET_CPUID,
            &mut *c,
        )?;
        Ok(())
    }

    /// Reads MSRs; returns the values of the first ones the module could read.
    pub fn get_msrs(&self, indexes: &[u32]) -> Result<Vec<u64>> {
        let mut m = uapi::Msrs {
            vcpu: self.index,
            nmsrs: indexes.len().min(uapi::RVMM_MAX_MSR_ENTRIES) as u32,
            ..Default::default()
        };
        for (e, &i) in m.entries.iter_mut().zip(indexes) {
            e.index = i;
        }
        let n = ioctl_ptr(&self.vm.file, "RVMM_GET_MSRS", uapi::RVMM_GET_MSRS, &mut m)? as usize;
        Ok(m.entries[..n].iter().map(|e| e.data).collect())
    }

    /// Writes MSRs; returns how many were written (it stops at the first refused one).
    pub fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<usize> {
        let mut m = uapi::Msrs {
            vcpu: self.index,
            nmsrs: msrs.len().min(uapi::RVMM_MAX_MSR_ENTRIES) as u32,
            ..Default::default()
        };
        for (e, &(i, v)) in m.entries.iter_mut().zip(msrs) {
            e.index = i;
            e.data = v;
        }
        Ok(ioctl_ptr(&self.vm.file, "RVMM_SET_MSRS", uapi::RVMM_SET_MSRS, &mut m)? as usize)
    }

    /// The data an MMIO read returns (call after a read [`Exit::Mmio`]).
    pub fn set_mmio_data(&self, value: u64) {
        // SAFETY: the run page is mapped for this vCPU's lifetime.
        unsafe { (*self.run).mmio.data = value.to_le_bytes() };
    }

    /// The result of a hypercall.
    pub fn set_hypercall_ret(&self, value: u64) {
        // SAFETY: as above.
        unsafe { (*self.run).hypercall.ret = value };
    }

    /// Runs the vCPU until an exit that userspace handles.
    pub fn run(&self) -> Result<Exit> {
        // SAFETY: RVMM_RUN takes the vCPU index.
        let r = unsafe {
            libc::ioctl(
                self.vm.file.as_raw_fd(),
                uapi::RVMM_RUN as _,
                self.index as usize,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(Exit::Interrupted);
            }
            return Err(Error::Ioctl {
                op: "RVMM_RUN",
                source: e,
            });
        }
        // SAFETY: the kernel filled the run page before returning.
        let run = unsafe { &*self.run };
        Ok(match run.exit_reason {
            uapi::RVMM_EXIT_IO if run.io.direction == uapi::RVMM_EXIT_IO_OUT => Exit::IoOut {
                port: run.io.port,
                size: run.io.size,
                data: run.io_data[0] as u32,
            },
            uapi::RVMM_EXIT_IO => Exit::IoIn {
                port: run.io.port,
                size: run.io.size,
            },
            uapi::RVMM_EXIT_HLT => Exit::Hlt,
            uapi::RVMM_EXIT_IRQ_WINDOW_OPEN => Exit::IrqWindowOpen,
            uapi::RVMM_EXIT_MMIO => Exit::Mmio {
                addr: run.mmio.phys_addr,
                len: run.mmio.len,
                is_write: run.mmio.is_write != 0,
                data: u64::from_le_bytes(run.mmio.data),
            },
            uapi::RVMM_EXIT_HYPERCALL => Exit::Hypercall {
                nr: run.hypercall.nr,
                args: run.hypercall.args,
            },
            uapi::RVMM_EXIT_SHUTDOWN => Exit::Shutdown,
            uapi::RVMM_EXIT_FAIL_ENTRY => Exit::FailEntry {
                reason: run.fail_entry.hardware_entry_failure_reason,
                vmfail: run.fail_entry.vmfail != 0,
                check: run.internal.suberror,
            },
            uapi::RVMM_EXIT_INTERNAL_ERROR => Exit::Internal {
                suberror: run.internal.suberror,
                data: run.internal.data,
            },
            uapi::RVMM_EXIT_INTR => Exit::Interrupted,
            other => Exit::Other(other),
        })
    }
}

// SAFETY: the run page is plain memory shared with the kernel; the kernel serializes
// runs of one vCPU, and a racy read of an exit field can only misreport that exit.
unsafe impl Send for Vcpu<'_> {}
// SAFETY: as above: every method goes through the kernel or reads/writes plain fields.
unsafe impl Sync for Vcpu<'_> {}

impl Drop for Vcpu<'_> {
    fn drop(&mut self) {
        // SAFETY: unmaps the run page mapped in `create_vcpu`.
        unsafe { libc::munmap(self.run.cast(), uapi::RVMM_RUN_MMAP_SIZE as usize) };
    }
}
