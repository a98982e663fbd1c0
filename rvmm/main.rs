// SPDX-License-Identifier: GPL-2.0

//! rvmm: a VT-x hypervisor with shadow paging, as a Rust-for-Linux module.
//!
//! This file is the thin top: the module, the `/dev/rvmm` misc device and the ioctl
//! dispatch. VMX itself lives in [`vmx`]; the ABI in the `rvmm_uapi` crate; logic that
//! needs no ring 0 in `rvmm_core`.

use core::sync::atomic::{AtomicU64, Ordering};
use kernel::{
    debugfs,
    fs::File,
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    mm::virt::VmaNew,
    new_mutex,
    prelude::*,
    str::CString,
    sync::{Arc, Mutex},
    uaccess::{UserPtr, UserSlice},
};
use rvmm_uapi as uapi;

/// A kernel log line that a guest or the process driving it can cause (a refused ioctl,
/// a guest the module cannot run): printed at a limited rate over the whole module
/// (the kernel's ratelimit, 10 lines per 5 s), so that nobody can flood the log. The
/// errno says what went wrong; the line says why, when it gets through.
macro_rules! user_pr {
    ($level:ident, $($arg:tt)*) => {
        if $crate::ffi::log_allowed() {
            ::kernel::$level!($($arg)*);
        }
    };
}

/// Allocation flags for everything a VM causes: charged to its creator's memory cgroup
/// (as KVM charges its VMs), and failing with `ENOMEM` where the cgroup's limit or the
/// machine's memory runs out, rather than invoking the OOM killer or dumping a warning
/// into the kernel log (the errno says it).
pub(crate) fn vm_gfp() -> kernel::alloc::Flags {
    GFP_KERNEL_ACCOUNT | __GFP_RETRY_MAYFAIL | __GFP_NOWARN
}

mod apic;
mod ffi;
mod mmu;
mod shadow;
mod vcpu;
mod vm;
mod vmx;

module! {
    type: RvmmModule,
    name: "rvmm",
    authors: ["rvmm developers"],
    description: "rvmm: a VT-x hypervisor with shadow paging",
    license: "GPL",
    params: {
        shadow_pages: u32 {
            default: 1024,
            description: "Shadow page pool pages per VM (4 KiB each, 64-65536); RVMM_SET_SHADOW_LIMITS overrides it per VM",
        },
        spec_force: bool {
            default: false,
            description: "Speculation barriers around every VM entry and exit even where the kernel's mitigations do not ask for them (testing)",
        },
        apicv: bool {
            default: true,
            description: "Virtualize xAPIC accesses with VMX's APIC virtualization where the CPU has it (reads without a VM exit); 0: every access exits to rvmm's APIC model",
        },
        vid: bool {
            default: false,
            description: "With apicv, also VMX's virtual-interrupt delivery where the CPU has it (interrupts and EOIs without VM exits); off by default: Bochs 2.7, the only VT-x machine rvmm is tested on, delivers a virtual interrupt while the guest has IF=0 when a host interrupt arrives, which deadlocks Linux guests",
        },
        shadow_roots: u32 {
            default: 64,
            description: "Roots (address spaces) the CR3 cache keeps per VM (1-64)",
        },
    },
}

#[pin_data]
struct RvmmModule {
    // Dropped first: no file can be opened once VMX goes away.
    #[pin]
    _misc: MiscDeviceRegistration<RvmmFile>,
    _vmx: vmx::VmxOn,
}

impl kernel::InPlaceModule for RvmmModule {
    fn init(_module: &'static ThisModule) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            // Initialised in this order: VMX on every CPU, then the device.
            _vmx: enable_vmx()?,
            _misc <- MiscDeviceRegistration::register(MiscDeviceOptions { name: c"rvmm" }),
        })
    }
}

fn enable_vmx() -> Result<vmx::VmxOn> {
    if let Err(why) = vmx::check_support() {
        pr_err!("not loading: {}\n", why.explain());
        return Err(if why.is_absent() { ENODEV } else { EOPNOTSUPP });
    }
    let on = vmx::VmxOn::enable().inspect_err(|e| {
        pr_err!(
            "not loading: VMX could not be enabled on every CPU ({:?})\n",
            e
        );
    })?;
    // SAFETY: sets the stub's flags before any vCPU exists.
    unsafe { ffi::rvmm_spec_init(module_parameters::spec_force.value()) };
    let caps = vmx::read_caps();
    pr_info!(
        "VMX on (VMCS revision {:#x}, {} bytes), /dev/rvmm ready, API version {}\n",
        caps.vmcs_revision,
        caps.vmcs_size,
        uapi::RVMM_API_VERSION
    );
    Ok(on)
}

/// An open `/dev/rvmm`: after `RVMM_CREATE_VM`, a VM.
#[pin_data]
struct RvmmFile {
    #[pin]
    vm: Mutex<Option<Arc<vm::Vm>>>,
    /// The VM's debugfs directory (`rvmm-vm<N>/stats`), removed with the file.
    #[pin]
    debugfs: Mutex<Option<VmDebugfs>>,
}

/// `/sys/kernel/debug/rvmm-vm<N>/stats`: the VM's counters, as `RVMM_GET_STATS`.
struct VmDebugfs {
    _stats: Pin<KBox<debugfs::File<Arc<vm::Vm>>>>,
    _dir: debugfs::Dir,
}

static VM_IDS: AtomicU64 = AtomicU64::new(0);

fn vm_debugfs(vm: &Arc<vm::Vm>) -> Result<VmDebugfs> {
    let id = VM_IDS.fetch_add(1, Ordering::Relaxed);
    let name = CString::try_from_fmt(fmt!("rvmm-vm{}", id))?;
    let dir = debugfs::Dir::new(&name);
    let stats = KBox::pin_init(
        dir.read_callback_file(c"stats", vm.clone(), &print_stats),
        crate::vm_gfp(),
    )?;
    Ok(VmDebugfs {
        _stats: stats,
        _dir: dir,
    })
}

fn print_stats(vm: &Arc<vm::Vm>, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
    let Ok(s) = vm.stats() else {
        return writeln!(f, "out of memory");
    };
    for (reason, &n) in s.exits.iter().enumerate().filter(|(_, &n)| n != 0) {
        let name = rvmm_core::exit::ExitReason::from_basic(reason as u16).map_or("?", |r| r.name());
        writeln!(f, "exit {reason} ({name}): {n}")?;
    }
    for c in s.counters() {
        writeln!(f, "{}: {}", c.name, c.value)?;
    }
    Ok(())
}

/// The ioctls of the ABI, by number: a known number with another size or direction is
/// EINVAL (a caller built against another ABI), an unknown one ENOTTY.
const IOCTLS: &[u32] = &[
    uapi::RVMM_GET_API_VERSION,
    uapi::RVMM_GET_VMX_CAPS,
    uapi::RVMM_GET_STATUS,
    uapi::RVMM_CREATE_VM,
    uapi::RVMM_SET_MEMORY_REGION,
    uapi::RVMM_CREATE_VCPU,
    uapi::RVMM_GET_REGS,
    uapi::RVMM_SET_REGS,
    uapi::RVMM_GET_SREGS,
    uapi::RVMM_SET_SREGS,
    uapi::RVMM_RUN,
    uapi::RVMM_GET_STATS,
    uapi::RVMM_INTERRUPT,
    uapi::RVMM_SET_SHADOW_LIMITS,
    uapi::RVMM_SET_CPUID,
    uapi::RVMM_GET_MSRS,
    uapi::RVMM_SET_MSRS,
    uapi::RVMM_CREATE_IRQCHIP,
    uapi::RVMM_SIGNAL_MSI,
    uapi::RVMM_SET_MP_STATE,
    uapi::RVMM_SET_HYPERCALL_EXITS,
];

#[vtable]
impl MiscDevice for RvmmFile {
    type Ptr = Pin<KBox<Self>>;

    fn open(_file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<Pin<KBox<Self>>> {
        KBox::try_pin_init(
            try_pin_init!(RvmmFile { vm <- new_mutex!(None), debugfs <- new_mutex!(None) }),
            crate::vm_gfp(),
        )
    }

    fn ioctl(me: Pin<&RvmmFile>, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        if uapi::ioc_type(cmd) != uapi::RVMM_IOCTL_TYPE {
            return Err(ENOTTY);
        }
        match IOCTLS
            .iter()
            .find(|&&c| uapi::ioc_nr(c) == uapi::ioc_nr(cmd))
        {
            None => return Err(ENOTTY),
            Some(&c) if c != cmd => return Err(EINVAL),
            Some(_) => {}
        }
        let user = UserSlice::new(UserPtr::from_addr(arg), uapi::ioc_size(cmd));
        // Each command's work is a function of its own (never inlined here), so that
        // the stack frame a vCPU runs its guest under (RVMM_RUN) is not the sum of
        // every command's locals: exits are handled on the same 16-KiB kernel stack.
        match cmd {
            uapi::RVMM_GET_API_VERSION => Ok(uapi::RVMM_API_VERSION as isize),
            uapi::RVMM_GET_VMX_CAPS => get_vmx_caps(user),
            uapi::RVMM_GET_STATUS => get_status(user),
            uapi::RVMM_CREATE_VM => me.create_vm(),
            uapi::RVMM_RUN => me.run(arg),
            _ => me.vm_ioctl(cmd, arg, user),
        }
    }

    fn mmap(me: Pin<&RvmmFile>, _file: &File, vma: &VmaNew) -> Result {
        let vm = me.vm()?;
        // SAFETY: `vma` is a valid VMA being set up for this file.
        let pgoff = unsafe { (*vma.as_ptr()).vm_pgoff };
        if vma.end() - vma.start() != uapi::RVMM_RUN_MMAP_SIZE as usize {
            user_pr!(
                pr_info,
                "mmap: map exactly {} bytes per vCPU run page\n",
                uapi::RVMM_RUN_MMAP_SIZE
            );
            return Err(EINVAL);
        }
        // The run page is shared with the kernel: a private copy would hide the
        // vCPU's exits from userspace and userspace's requests from the vCPU. It holds
        // data, never code.
        if vma.flags() & kernel::mm::virt::flags::SHARED == 0 {
            user_pr!(pr_info, "mmap: map the run page MAP_SHARED\n");
            return Err(EINVAL);
        }
        vma.try_clear_mayexec()?;
        let vcpu = vm.vcpu(pgoff).map_err(|_| EINVAL)?;
        vma.set_dontcopy();
        vma.set_dontexpand();
        vma.set_mixedmap()
            .vm_insert_page(vma.start(), vcpu.run_page())
    }
}

#[inline(never)]
fn get_vmx_caps(user: UserSlice) -> Result<isize> {
    write_struct(user, &vmx::read_caps())
}

#[inline(never)]
fn get_status(user: UserSlice) -> Result<isize> {
    write_struct(user, &vmx::check_all_cpus()?)
}

impl RvmmFile {
    #[inline(never)]
    fn create_vm(&self) -> Result<isize> {
        let mut vm = self.vm.lock();
        if vm.is_some() {
            return Err(EEXIST);
        }
        let new = vm::Vm::new()?;
        // Counters in debugfs are a convenience: a VM works without them.
        *self.debugfs.lock() = vm_debugfs(&new).ok();
        *vm = Some(new);
        Ok(0)
    }

    #[inline(never)]
    fn run(&self, vcpu: usize) -> Result<isize> {
        let vm = self.vm()?;
        let v = vm.vcpu(vcpu)?;
        v.run(&vm)
    }

    fn vm(&self) -> Result<Arc<vm::Vm>> {
        self.vm.lock().clone().ok_or_else(|| {
            user_pr!(
                pr_info,
                "this /dev/rvmm file is not a VM yet: call RVMM_CREATE_VM first\n"
            );
            EINVAL
        })
    }

    #[inline(never)]
    fn vm_ioctl(&self, cmd: u32, arg: usize, user: UserSlice) -> Result<isize> {
        let vm = self.vm()?;
        match cmd {
            uapi::RVMM_SET_MEMORY_REGION => {
                let r: uapi::MemoryRegion = read_struct(user)?;
                vm.set_memory_region(&r)?;
                Ok(0)
            }
            uapi::RVMM_CREATE_VCPU => vm.create_vcpu(arg),
            uapi::RVMM_SET_SHADOW_LIMITS => {
                let l: uapi::ShadowLimits = read_struct(user)?;
                vm.shadow.set_limits(&l).map(|_| 0)
            }
            uapi::RVMM_GET_REGS => {
                let (reader, writer) = user.reader_writer();
                let mut r: uapi::VcpuRegs = read_from(reader)?;
                r.regs = vm.vcpu(r.vcpu as usize)?.get_regs()?;
                write_to(writer, &r)
            }
            uapi::RVMM_SET_REGS => {
                let r: uapi::VcpuRegs = read_struct(user)?;
                vm.vcpu(r.vcpu as usize)?.set_regs(&r.regs)?;
                Ok(0)
            }
            uapi::RVMM_GET_SREGS => {
                let (reader, writer) = user.reader_writer();
                let mut s: uapi::VcpuSregs = read_from(reader)?;
                s.sregs = vm.vcpu(s.vcpu as usize)?.get_sregs()?;
                write_to(writer, &s)
            }
            uapi::RVMM_SET_SREGS => {
                let s: uapi::VcpuSregs = read_struct(user)?;
                vm.vcpu(s.vcpu as usize)?.set_sregs(&s.sregs)?;
                Ok(0)
            }
            uapi::RVMM_CREATE_IRQCHIP => vm.create_irqchip(),
            uapi::RVMM_SET_HYPERCALL_EXITS => vm.set_hypercall_exits(&read_struct(user)?),
            uapi::RVMM_SIGNAL_MSI => vm.signal_msi(&read_struct(user)?),
            uapi::RVMM_SET_MP_STATE => {
                let m: uapi::MpState = read_struct(user)?;
                vm.vcpu(m.vcpu as usize)?.set_mp_state(m.state)?;
                Ok(0)
            }
            uapi::RVMM_GET_STATS => write_struct(user, &vm.stats()?),
            uapi::RVMM_INTERRUPT => {
                let ev: uapi::Interrupt = read_struct(user)?;
                vm.vcpu(ev.vcpu as usize)?.queue_event(&ev)?;
                Ok(0)
            }
            uapi::RVMM_SET_CPUID => {
                let c: KBox<uapi::Cpuid> = read_boxed(user)?;
                if c.nent as usize > c.entries.len() {
                    user_pr!(
                        pr_info,
                        "set cpuid: {} entries, at most {}\n",
                        c.nent,
                        c.entries.len()
                    );
                    return Err(EINVAL);
                }
                vm.vcpu(c.vcpu as usize)?
                    .set_cpuid(&c.entries[..c.nent as usize])?;
                Ok(0)
            }
            uapi::RVMM_GET_MSRS | uapi::RVMM_SET_MSRS => {
                let set = cmd == uapi::RVMM_SET_MSRS;
                let (reader, writer) = user.reader_writer();
                let mut m: uapi::Msrs = read_from(reader)?;
                if m.nmsrs as usize > m.entries.len() {
                    return Err(EINVAL);
                }
                let done = vm.vcpu(m.vcpu as usize)?.msrs(&mut m, set)?;
                if !set {
                    write_to(writer, &m)?;
                }
                Ok(done as isize)
            }
            _ => Err(ENOTTY),
        }
    }
}

/// Reads an ABI structure from userspace (EFAULT on a bad pointer).
fn read_struct<T: uapi::AbiStruct + Default>(user: UserSlice) -> Result<T> {
    read_from(user.reader())
}

/// Reads a large ABI structure into a heap allocation (kernel stacks are small).
fn read_boxed<T: uapi::AbiStruct + Default>(user: UserSlice) -> Result<KBox<T>> {
    let mut b = KBox::new(T::default(), GFP_KERNEL)?;
    let bytes = core::mem::size_of::<T>();
    // SAFETY: plain old data without padding, as in `read_from`; the slice covers `*b`.
    let slice = unsafe {
        core::slice::from_raw_parts_mut(core::ptr::from_mut(&mut *b).cast::<u8>(), bytes)
    };
    user.reader().read_slice(slice)?;
    Ok(b)
}

fn read_from<T: uapi::AbiStruct + Default>(
    mut reader: kernel::uaccess::UserSliceReader,
) -> Result<T> {
    let mut value = T::default();
    // SAFETY: every ABI structure is plain old data without padding: any bytes are a
    // valid value, and the slice covers exactly `value`.
    let bytes = unsafe {
        core::slice::from_raw_parts_mut(
            core::ptr::from_mut(&mut value).cast::<u8>(),
            core::mem::size_of::<T>(),
        )
    };
    reader.read_slice(bytes)?;
    Ok(value)
}

fn write_to<T: uapi::AbiStruct>(
    mut writer: kernel::uaccess::UserSliceWriter,
    value: &T,
) -> Result<isize> {
    // SAFETY: as in `write_struct`.
    let slice = unsafe {
        core::slice::from_raw_parts(
            core::ptr::from_ref(value).cast::<u8>(),
            core::mem::size_of::<T>(),
        )
    };
    writer.write_slice(slice)?;
    Ok(0)
}

/// Copies an ABI structure out to userspace (EFAULT on a bad pointer).
fn write_struct<T: uapi::AbiStruct>(user: UserSlice, value: &T) -> Result<isize> {
    let (ptr, bytes) = (
        core::ptr::from_ref(value).cast::<u8>(),
        core::mem::size_of::<T>(),
    );
    // SAFETY: every ABI structure is `#[repr(C)]` without padding (checked at compile
    // time by `abi_struct!`), so all of its `bytes` bytes are initialised.
    let slice = unsafe { core::slice::from_raw_parts(ptr, bytes) };
    user.writer().write_slice(slice)?;
    Ok(0)
}
