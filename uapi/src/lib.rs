// SPDX-License-Identifier: GPL-2.0

//! The `/dev/rvmm` ioctl ABI: the one definition that the module (compiled by Kbuild
//! with the kernel's flags) and userspace (through cargo) share.
//!
//! Every structure is `#[repr(C)]`, has no implicit padding and is declared through
//! [`abi_struct!`], which also records its C declaration: `uapi/include/linux/rvmm.h`
//! is generated from these tables, and a host test fails when the committed header, a
//! C compiler's view of it, and this crate disagree.
#![no_std]

/// ioctl "magic" of rvmm (unused in the kernel's ioctl-number registry).
pub const RVMM_IOCTL_TYPE: u32 = 0xB9;

/// Version of this ABI. Bumped on any incompatible change.
pub const RVMM_API_VERSION: u32 = 3;

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
/// Direction bits of an ioctl number (asm-generic encoding, as on x86).
pub const IOC_NONE: u32 = 0;
/// Userspace writes, the kernel reads.
pub const IOC_WRITE: u32 = 1;
/// The kernel writes, userspace reads.
pub const IOC_READ: u32 = 2;

/// Encodes an ioctl number like the kernel's `_IOC`.
pub const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | (RVMM_IOCTL_TYPE << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// The "nr" field of an ioctl number.
pub const fn ioc_nr(cmd: u32) -> u32 {
    (cmd >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)
}

/// The "type" field of an ioctl number.
pub const fn ioc_type(cmd: u32) -> u32 {
    (cmd >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)
}

/// The "size" field of an ioctl number.
pub const fn ioc_size(cmd: u32) -> usize {
    ((cmd >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)) as usize
}

/// The direction field of an ioctl number.
pub const fn ioc_dir(cmd: u32) -> u32 {
    cmd >> IOC_DIRSHIFT
}

/// One field of a C declaration: the C declaration (type and name, e.g.
/// `"__u8 pad[6]"`), and the field's name.
pub type CField = (&'static str, &'static str);

/// A structure of the ABI with its C declaration.
pub trait AbiStruct {
    /// `struct <C_NAME>` in the header.
    const C_NAME: &'static str;
    /// Fields in order, with their C types.
    const C_FIELDS: &'static [CField];
    /// Field offsets as Rust lays them out (same order as `C_FIELDS`).
    fn offsets() -> &'static [usize];
}

/// Declares a `#[repr(C)]` ABI structure and records its C declaration.
macro_rules! abi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident as $cname:literal {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty => $cdecl:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                // SAFETY: ABI structures hold only integers and arrays or structures of
                // them: all-zero bytes are a valid value.
                unsafe { core::mem::zeroed() }
            }
        }

        impl AbiStruct for $name {
            const C_NAME: &'static str = $cname;
            const C_FIELDS: &'static [CField] = &[ $( ($cdecl, stringify!($field)), )* ];
            fn offsets() -> &'static [usize] {
                const OFFSETS: &[usize] = &[ $( core::mem::offset_of!($name, $field), )* ];
                OFFSETS
            }
        }

        // No implicit padding: the sum of the field sizes is the structure size.
        const _: () = assert!(0 $( + core::mem::size_of::<$ty>() )* == core::mem::size_of::<$name>());
    };
}

abi_struct! {
    /// VMX capabilities as the CPU reports them (`RVMM_GET_VMX_CAPS`). Control MSRs are
    /// the "true" ones where IA32_VMX_BASIC[55] says they exist: low 32 bits are the
    /// allowed-0 settings (bits that must be 1), high 32 bits the allowed-1 settings.
    pub struct VmxCaps as "rvmm_vmx_caps" {
        /// IA32_VMX_BASIC.
        pub basic: u64 => "__u64 basic",
        /// (TRUE_)PINBASED_CTLS.
        pub pinbased: u64 => "__u64 pinbased",
        /// (TRUE_)PROCBASED_CTLS.
        pub procbased: u64 => "__u64 procbased",
        /// PROCBASED_CTLS2 (0 when secondary controls are not available).
        pub procbased2: u64 => "__u64 procbased2",
        /// (TRUE_)EXIT_CTLS.
        pub exit: u64 => "__u64 exit",
        /// (TRUE_)ENTRY_CTLS.
        pub entry: u64 => "__u64 entry",
        /// IA32_VMX_MISC.
        pub misc: u64 => "__u64 misc",
        /// IA32_VMX_EPT_VPID_CAP (0 when absent).
        pub ept_vpid_cap: u64 => "__u64 ept_vpid_cap",
        /// IA32_VMX_CR0_FIXED0.
        pub cr0_fixed0: u64 => "__u64 cr0_fixed0",
        /// IA32_VMX_CR0_FIXED1.
        pub cr0_fixed1: u64 => "__u64 cr0_fixed1",
        /// IA32_VMX_CR4_FIXED0.
        pub cr4_fixed0: u64 => "__u64 cr4_fixed0",
        /// IA32_VMX_CR4_FIXED1.
        pub cr4_fixed1: u64 => "__u64 cr4_fixed1",
        /// VMCS revision identifier (IA32_VMX_BASIC[30:0]).
        pub vmcs_revision: u32 => "__u32 vmcs_revision",
        /// VMCS region size in bytes (IA32_VMX_BASIC[44:32]).
        pub vmcs_size: u32 => "__u32 vmcs_size",
    }
}

abi_struct! {
    /// State of VMX operation on the host (`RVMM_GET_STATUS`). Reading it runs a check
    /// on every online CPU: CR4.VMXE must be set in both the register and the kernel's
    /// CR4 shadow, and a VMCS must load, take a VMWRITE, read back and be cleared, with
    /// the CPU's previous current-VMCS pointer restored afterwards.
    pub struct Status as "rvmm_status" {
        /// CPUs online now.
        pub online_cpus: u32 => "__u32 online_cpus",
        /// CPUs on which rvmm holds a reference on the kernel's VMX enable.
        pub vmx_cpus: u32 => "__u32 vmx_cpus",
        /// CPUs with CR4.VMXE set in the register and in the CR4 shadow.
        pub vmxe_cpus: u32 => "__u32 vmxe_cpus",
        /// CPUs on which the VMCS check passed.
        pub vmcs_ok_cpus: u32 => "__u32 vmcs_ok_cpus",
        /// CPUs on which VMX was already on when rvmm took its reference (KVM had it).
        pub shared_cpus: u32 => "__u32 shared_cpus",
        /// CPUs whose current-VMCS pointer was found changed after the check (must be 0).
        pub vmcs_ptr_clobbered: u32 => "__u32 vmcs_ptr_clobbered",
        /// Sum over the checks of CPUs that had a current VMCS (another user's) loaded.
        pub foreign_vmcs_cpus: u32 => "__u32 foreign_vmcs_cpus",
        /// Reserved, zero.
        pub reserved: u32 => "__u32 reserved",
    }
}

abi_struct! {
    /// A guest memory region backed by userspace memory (`RVMM_SET_MEMORY_REGION`).
    /// A slot is created, moved (same slot, same backing, new `guest_phys_addr`) or
    /// deleted (`memory_size` 0). Addresses and sizes are 4-KiB aligned; regions may not
    /// overlap (EEXIST).
    pub struct MemoryRegion as "rvmm_memory_region" {
        /// Slot number, below [`RVMM_MAX_MEMSLOTS`].
        pub slot: u32 => "__u32 slot",
        /// [`RVMM_MEM_READONLY`] or 0.
        pub flags: u32 => "__u32 flags",
        /// Guest-physical base.
        pub guest_phys_addr: u64 => "__u64 guest_phys_addr",
        /// Bytes; 0 deletes the slot.
        pub memory_size: u64 => "__u64 memory_size",
        /// Start of the backing memory in the calling process.
        pub userspace_addr: u64 => "__u64 userspace_addr",
    }
}

abi_struct! {
    /// General registers.
    pub struct Regs as "rvmm_regs" {
        /// RAX.
        pub rax: u64 => "__u64 rax",
        /// RBX.
        pub rbx: u64 => "__u64 rbx",
        /// RCX.
        pub rcx: u64 => "__u64 rcx",
        /// RDX.
        pub rdx: u64 => "__u64 rdx",
        /// RSI.
        pub rsi: u64 => "__u64 rsi",
        /// RDI.
        pub rdi: u64 => "__u64 rdi",
        /// RSP.
        pub rsp: u64 => "__u64 rsp",
        /// RBP.
        pub rbp: u64 => "__u64 rbp",
        /// R8.
        pub r8: u64 => "__u64 r8",
        /// R9.
        pub r9: u64 => "__u64 r9",
        /// R10.
        pub r10: u64 => "__u64 r10",
        /// R11.
        pub r11: u64 => "__u64 r11",
        /// R12.
        pub r12: u64 => "__u64 r12",
        /// R13.
        pub r13: u64 => "__u64 r13",
        /// R14.
        pub r14: u64 => "__u64 r14",
        /// R15.
        pub r15: u64 => "__u64 r15",
        /// RIP.
        pub rip: u64 => "__u64 rip",
        /// RFLAGS.
        pub rflags: u64 => "__u64 rflags",
    }
}

abi_struct! {
    /// A segment register, unpacked (as KVM's `kvm_segment`).
    pub struct Segment as "rvmm_segment" {
        /// Base address.
        pub base: u64 => "__u64 base",
        /// Limit in bytes (scaled by `g` already).
        pub limit: u32 => "__u32 limit",
        /// Selector.
        pub selector: u16 => "__u16 selector",
        /// Type field of the descriptor.
        pub seg_type: u8 => "__u8 seg_type",
        /// Present.
        pub present: u8 => "__u8 present",
        /// Descriptor privilege level.
        pub dpl: u8 => "__u8 dpl",
        /// Default operation size (D/B).
        pub db: u8 => "__u8 db",
        /// Code/data (1) or system (0) descriptor.
        pub s: u8 => "__u8 s",
        /// 64-bit code segment.
        pub l: u8 => "__u8 l",
        /// Granularity.
        pub g: u8 => "__u8 g",
        /// Available for software.
        pub avl: u8 => "__u8 avl",
        /// Segment unusable (null selector loaded).
        pub unusable: u8 => "__u8 unusable",
        /// Zero.
        pub padding: u8 => "__u8 padding",
    }
}

abi_struct! {
    /// GDTR or IDTR.
    pub struct Dtable as "rvmm_dtable" {
        /// Base address.
        pub base: u64 => "__u64 base",
        /// Limit.
        pub limit: u16 => "__u16 limit",
        /// Zero.
        pub padding: [u16; 3] => "__u16 padding[3]",
    }
}

abi_struct! {
    /// Special registers.
    pub struct Sregs as "rvmm_sregs" {
        /// CS.
        pub cs: Segment => "struct rvmm_segment cs",
        /// DS.
        pub ds: Segment => "struct rvmm_segment ds",
        /// ES.
        pub es: Segment => "struct rvmm_segment es",
        /// FS.
        pub fs: Segment => "struct rvmm_segment fs",
        /// GS.
        pub gs: Segment => "struct rvmm_segment gs",
        /// SS.
        pub ss: Segment => "struct rvmm_segment ss",
        /// TR.
        pub tr: Segment => "struct rvmm_segment tr",
        /// LDTR.
        pub ldt: Segment => "struct rvmm_segment ldt",
        /// GDTR.
        pub gdt: Dtable => "struct rvmm_dtable gdt",
        /// IDTR.
        pub idt: Dtable => "struct rvmm_dtable idt",
        /// CR0 as the guest sees it.
        pub cr0: u64 => "__u64 cr0",
        /// CR2.
        pub cr2: u64 => "__u64 cr2",
        /// CR3 as the guest sees it.
        pub cr3: u64 => "__u64 cr3",
        /// CR4 as the guest sees it.
        pub cr4: u64 => "__u64 cr4",
        /// CR8 (TPR).
        pub cr8: u64 => "__u64 cr8",
        /// IA32_EFER.
        pub efer: u64 => "__u64 efer",
        /// IA32_APIC_BASE.
        pub apic_base: u64 => "__u64 apic_base",
    }
}

abi_struct! {
    /// `RVMM_GET_REGS` / `RVMM_SET_REGS`: a vCPU's general registers.
    pub struct VcpuRegs as "rvmm_vcpu_regs" {
        /// vCPU index (from `RVMM_CREATE_VCPU`).
        pub vcpu: u32 => "__u32 vcpu",
        /// Zero.
        pub padding: u32 => "__u32 padding",
        /// The registers.
        pub regs: Regs => "struct rvmm_regs regs",
    }
}

abi_struct! {
    /// `RVMM_GET_SREGS` / `RVMM_SET_SREGS`: a vCPU's special registers.
    pub struct VcpuSregs as "rvmm_vcpu_sregs" {
        /// vCPU index.
        pub vcpu: u32 => "__u32 vcpu",
        /// Zero.
        pub padding: u32 => "__u32 padding",
        /// The registers.
        pub sregs: Sregs => "struct rvmm_sregs sregs",
    }
}

abi_struct! {
    /// Port I/O exit data.
    pub struct ExitIo as "rvmm_exit_io" {
        /// [`RVMM_EXIT_IO_IN`] or [`RVMM_EXIT_IO_OUT`].
        pub direction: u8 => "__u8 direction",
        /// Bytes per access: 1, 2 or 4.
        pub size: u8 => "__u8 size",
        /// Port.
        pub port: u16 => "__u16 port",
        /// Accesses (1 unless string I/O).
        pub count: u32 => "__u32 count",
        /// Offset of the data in the run structure.
        pub data_offset: u64 => "__u64 data_offset",
    }
}

abi_struct! {
    /// MMIO exit data.
    pub struct ExitMmio as "rvmm_exit_mmio" {
        /// Guest-physical address.
        pub phys_addr: u64 => "__u64 phys_addr",
        /// Data written, or to be read (filled by userspace before the next run).
        pub data: [u8; 8] => "__u8 data[8]",
        /// Bytes.
        pub len: u32 => "__u32 len",
        /// A write.
        pub is_write: u8 => "__u8 is_write",
        /// Zero.
        pub padding: [u8; 3] => "__u8 padding[3]",
    }
}

abi_struct! {
    /// Hypercall (VMCALL) exit data: RAX is `nr`, RBX, RCX, RDX, RSI, RDI, R8 the args;
    /// `ret` goes to RAX when the vCPU runs again.
    pub struct ExitHypercall as "rvmm_exit_hypercall" {
        /// RAX.
        pub nr: u64 => "__u64 nr",
        /// RBX, RCX, RDX, RSI, RDI, R8.
        pub args: [u64; 6] => "__u64 args[6]",
        /// Result for the guest.
        pub ret: u64 => "__u64 ret",
    }
}

abi_struct! {
    /// Failed VM entry: the hardware's reason.
    pub struct ExitFailEntry as "rvmm_exit_fail_entry" {
        /// Exit reason (with bit 31) or, for VMfail, the VM-instruction error.
        pub hardware_entry_failure_reason: u64 => "__u64 hardware_entry_failure_reason",
        /// Host CPU.
        pub cpu: u32 => "__u32 cpu",
        /// 1 if the VM entry instruction failed (VMfail), 0 for a failed-entry exit.
        pub vmfail: u32 => "__u32 vmfail",
    }
}

abi_struct! {
    /// rvmm could not handle an exit: what it was.
    pub struct ExitInternal as "rvmm_exit_internal" {
        /// One of `RVMM_INTERNAL_*`.
        pub suberror: u32 => "__u32 suberror",
        /// Valid words in `data`.
        pub ndata: u32 => "__u32 ndata",
        /// Exit reason, qualification, guest RIP, ...
        pub data: [u64; 4] => "__u64 data[4]",
    }
}

abi_struct! {
    /// The page shared with userspace for one vCPU (mmap of the VM fd at
    /// `vcpu * RVMM_RUN_MMAP_SIZE`). Exit data is valid for the `exit_reason` it
    /// belongs to.
    pub struct Run as "rvmm_run" {
        /// In: exit as soon as the guest can take an interrupt.
        pub request_interrupt_window: u8 => "__u8 request_interrupt_window",
        /// In: return at once with [`RVMM_EXIT_INTR`] (EINTR), without entering.
        pub immediate_exit: u8 => "__u8 immediate_exit",
        /// Out: an interrupt could be injected now.
        pub ready_for_interrupt_injection: u8 => "__u8 ready_for_interrupt_injection",
        /// Out: guest RFLAGS.IF.
        pub if_flag: u8 => "__u8 if_flag",
        /// Out: `RVMM_EXIT_*`.
        pub exit_reason: u32 => "__u32 exit_reason",
        /// Port I/O.
        pub io: ExitIo => "struct rvmm_exit_io io",
        /// MMIO.
        pub mmio: ExitMmio => "struct rvmm_exit_mmio mmio",
        /// VMCALL.
        pub hypercall: ExitHypercall => "struct rvmm_exit_hypercall hypercall",
        /// Failed VM entry.
        pub fail_entry: ExitFailEntry => "struct rvmm_exit_fail_entry fail_entry",
        /// Unhandled exit.
        pub internal: ExitInternal => "struct rvmm_exit_internal internal",
        /// Port I/O data (`io.data_offset` points here).
        pub io_data: [u64; 32] => "__u64 io_data[32]",
    }
}

abi_struct! {
    /// `RVMM_GET_STATS`: counters of a VM, summed over its vCPUs.
    pub struct VmStats as "rvmm_vm_stats" {
        /// VM exits by basic exit reason (SDM Vol. 3D, Appendix C).
        pub exits: [u64; RVMM_NR_EXIT_REASONS] => "__u64 exits[72]",
        /// #PF exits fixed by filling the shadow from the guest's tables.
        pub shadow_faults: u64 => "__u64 shadow_faults",
        /// #PF exits that were the guest's own faults (reflected into it).
        pub guest_page_faults: u64 => "__u64 guest_page_faults",
        /// Whole-pool drops a vCPU saw (the pool full, or unable to give a root).
        pub shadow_resets: u64 => "__u64 shadow_resets",
        /// Exits to userspace.
        pub user_exits: u64 => "__u64 user_exits",
        /// MMIO exits (decoded accesses outside guest RAM).
        pub mmio_exits: u64 => "__u64 mmio_exits",
        /// Shadow page pool (4-level guests): guest writes to write-protected page
        /// tables.
        pub pt_writes: u64 => "__u64 pt_writes",
        /// Pool: shadow pages that went out of sync.
        pub unsyncs: u64 => "__u64 unsyncs",
        /// Pool: shadow pages brought back in sync.
        pub resyncs: u64 => "__u64 resyncs",
        /// Pool: guest tables unshadowed for write flooding.
        pub flood_unshadows: u64 => "__u64 flood_unshadows",
        /// Pool: entries filled ahead of a fault.
        pub prefetched: u64 => "__u64 prefetched",
        /// Pool: pages in use now.
        pub pool_pages_in_use: u64 => "__u64 pool_pages_in_use",
        /// Pool: most pages in use at once.
        pub pool_pages_peak: u64 => "__u64 pool_pages_peak",
        /// Pool: pages reclaimed (least recently used, not a cached root).
        pub pool_reclaimed: u64 => "__u64 pool_reclaimed",
        /// Pool: CR3 loads that found their root in the pool.
        pub root_hits: u64 => "__u64 root_hits",
        /// Pool: CR3 loads that built a new root.
        pub root_misses: u64 => "__u64 root_misses",
        /// Pool: shadow pages zapped (reclaim, flooding, resets).
        pub zaps: u64 => "__u64 zaps",
        /// Pool: whole-pool resets (pool full, memory map changed).
        pub pool_resets: u64 => "__u64 pool_resets",
        /// MMIO exits resolved from a cached MMIO entry, without a guest walk.
        pub mmio_fast: u64 => "__u64 mmio_fast",
        /// Pool: guest writes to upper-level page tables emulated (entries updated in
        /// place, no unsync).
        pub pt_emulated: u64 => "__u64 pt_emulated",
        /// In-kernel local APIC: interrupts injected into guests from the APICs.
        pub apic_injections: u64 => "__u64 apic_injections",
        /// In-kernel local APIC: timer interrupts raised.
        pub apic_timer_irqs: u64 => "__u64 apic_timer_irqs",
        /// In-kernel local APIC: IPIs and MSIs delivered (per destination).
        pub apic_messages: u64 => "__u64 apic_messages",
        /// HLT exits that slept in the host until an interrupt was due.
        pub halt_sleeps: u64 => "__u64 halt_sleeps",
        /// Accesses to the xAPIC page and x2APIC MSRs handled in the kernel.
        pub apic_accesses: u64 => "__u64 apic_accesses",
        /// The longest interrupts-off run section of any vCPU, in nanoseconds: how long
        /// a guest held a host CPU with interrupts off.
        pub longest_section_ns: u64 => "__u64 longest_section_ns",
        /// Instructions the emulator ran for a guest VMX cannot enter: real mode
        /// outside virtual-8086 mode, and the switches between real and protected mode.
        pub real_mode_emulated: u64 => "__u64 real_mode_emulated",
        /// Pool: syncs of out-of-sync shadows asked for by a flushing CR3 load.
        pub sync_cr3: u64 => "__u64 sync_cr3",
        /// Pool: syncs asked for by INVLPG (upper levels under the current root).
        pub sync_invlpg: u64 => "__u64 sync_invlpg",
        /// Pool: syncs of an existing shadow linked into a tree.
        pub sync_link: u64 => "__u64 sync_link",
        /// Pool: syncs of every context (INVPCID all contexts, TLB resets).
        pub sync_flush_all: u64 => "__u64 sync_flush_all",
        /// Pool: out-of-sync shadows those syncs looked at (under the root or not).
        pub sync_scanned: u64 => "__u64 sync_scanned",
        /// Pool: present entries resyncs recomputed.
        pub resync_entries: u64 => "__u64 resync_entries",
        /// Pool: of those, the ones that changed.
        pub resync_changed: u64 => "__u64 resync_changed",
        /// Pool: faults fixed in direct shadows (guest large pages, paging off).
        pub faults_direct: u64 => "__u64 faults_direct",
        /// Remote flushes that made other vCPUs leave guest mode.
        pub remote_flushes: u64 => "__u64 remote_flushes",
        /// IPIs those flushes sent.
        pub flush_ipis: u64 => "__u64 flush_ipis",
        /// Time those flushes waited for the other vCPUs, in nanoseconds.
        pub flush_wait_ns: u64 => "__u64 flush_wait_ns",
        /// IPIs that made a vCPU leave guest mode for an interrupt posted to it.
        pub irq_kicks: u64 => "__u64 irq_kicks",
        /// Pool: upper-level shadows that went out of sync (writes not emulated).
        pub unsyncs_upper: u64 => "__u64 unsyncs_upper",
    }
}

/// A counter of [`VmStats`] by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// The field's name.
    pub name: &'static str,
    /// Its value.
    pub value: u64,
    /// False for a level (pages in use now), which can go down.
    pub monotonic: bool,
}

impl VmStats {
    /// Every field but the exits by reason, by name: the one list debugfs, rvmm-run
    /// and the benchmarks show.
    pub fn counters(&self) -> [Counter; 39] {
        let c = |name, value| Counter {
            name,
            value,
            monotonic: true,
        };
        [
            c("shadow_faults", self.shadow_faults),
            c("guest_page_faults", self.guest_page_faults),
            c("shadow_resets", self.shadow_resets),
            c("user_exits", self.user_exits),
            c("mmio_exits", self.mmio_exits),
            c("pt_writes", self.pt_writes),
            c("unsyncs", self.unsyncs),
            c("resyncs", self.resyncs),
            c("flood_unshadows", self.flood_unshadows),
            c("prefetched", self.prefetched),
            Counter {
                name: "pool_pages_in_use",
                value: self.pool_pages_in_use,
                monotonic: false,
            },
            c("pool_pages_peak", self.pool_pages_peak),
            c("pool_reclaimed", self.pool_reclaimed),
            c("root_hits", self.root_hits),
            c("root_misses", self.root_misses),
            c("zaps", self.zaps),
            c("pool_resets", self.pool_resets),
            c("mmio_fast", self.mmio_fast),
            c("pt_emulated", self.pt_emulated),
            c("apic_injections", self.apic_injections),
            c("apic_timer_irqs", self.apic_timer_irqs),
            c("apic_messages", self.apic_messages),
            c("halt_sleeps", self.halt_sleeps),
            c("apic_accesses", self.apic_accesses),
            c("longest_section_ns", self.longest_section_ns),
            c("real_mode_emulated", self.real_mode_emulated),
            c("sync_cr3", self.sync_cr3),
            c("sync_invlpg", self.sync_invlpg),
            c("sync_link", self.sync_link),
            c("sync_flush_all", self.sync_flush_all),
            c("sync_scanned", self.sync_scanned),
            c("resync_entries", self.resync_entries),
            c("resync_changed", self.resync_changed),
            c("faults_direct", self.faults_direct),
            c("remote_flushes", self.remote_flushes),
            c("flush_ipis", self.flush_ipis),
            c("flush_wait_ns", self.flush_wait_ns),
            c("irq_kicks", self.irq_kicks),
            c("unsyncs_upper", self.unsyncs_upper),
        ]
    }
}

abi_struct! {
    /// `RVMM_SET_SHADOW_LIMITS`: the VM's shadow page pool, before its first vCPU is
    /// created (EBUSY after). Zero keeps the module parameter's value.
    pub struct ShadowLimits as "rvmm_shadow_limits" {
        /// Pool pages (4 KiB each): 64 to 65536.
        pub pages: u32 => "__u32 pages",
        /// Roots the CR3 cache keeps: 1 to 64.
        pub roots: u32 => "__u32 roots",
    }
}

abi_struct! {
    /// `RVMM_SET_HYPERCALL_EXITS`: the hypercalls (VMCALL with RAX = `nr`, at CPL 0)
    /// that exit to userspace ([`RVMM_EXIT_HYPERCALL`]): bit `nr` of `mask`, for `nr`
    /// below 64. Every other VMCALL returns [`RVMM_HC_ENOSYS`] in RAX (at CPL > 0,
    /// [`RVMM_HC_EPERM`]) without leaving the kernel, as KVM does with hypercalls it does
    /// not know. None exit until this is set.
    pub struct HypercallExits as "rvmm_hypercall_exits" {
        /// Bit `nr`: hypercall `nr` exits to userspace.
        pub mask: u64 => "__u64 mask",
    }
}

abi_struct! {
    /// `RVMM_INTERRUPT`: an event for a vCPU's next entry. An external interrupt waits
    /// until the guest is interruptible (RFLAGS.IF, no STI/MOV SS shadow).
    pub struct Interrupt as "rvmm_interrupt" {
        /// vCPU index.
        pub vcpu: u32 => "__u32 vcpu",
        /// [`RVMM_EVENT_INTERRUPT`] or [`RVMM_EVENT_EXCEPTION`].
        pub kind: u32 => "__u32 kind",
        /// Vector: 32..255 for interrupts, 0..31 (not 2) for exceptions.
        pub vector: u32 => "__u32 vector",
        /// 1 if `error_code` is delivered (exactly the exceptions that push one).
        pub has_error_code: u32 => "__u32 has_error_code",
        /// Error code.
        pub error_code: u32 => "__u32 error_code",
        /// Zero.
        pub padding: u32 => "__u32 padding",
    }
}

abi_struct! {
    /// `RVMM_SIGNAL_MSI`: an interrupt message for the VM's local APICs, in the MSI
    /// format (address 0xfeeXXXXX: destination in bits 19:12, logical in bit 2; data:
    /// vector in bits 7:0, delivery mode in 10:8, level-triggered in bit 15). This is
    /// how interrupt controllers in userspace (I/O APIC, PIC) and devices interrupt a
    /// guest whose local APICs are in the kernel.
    pub struct Msi as "rvmm_msi" {
        /// Message address.
        pub address: u64 => "__u64 address",
        /// Message data.
        pub data: u32 => "__u32 data",
        /// Zero.
        pub flags: u32 => "__u32 flags",
    }
}

abi_struct! {
    /// `RVMM_SET_MP_STATE`: whether a vCPU runs or waits for a start-up IPI.
    pub struct MpState as "rvmm_mp_state" {
        /// vCPU index.
        pub vcpu: u32 => "__u32 vcpu",
        /// [`RVMM_MP_STATE_RUNNABLE`] or [`RVMM_MP_STATE_WAIT_SIPI`].
        pub state: u32 => "__u32 state",
    }
}

abi_struct! {
    /// One CPUID leaf as the guest sees it.
    pub struct CpuidEntry as "rvmm_cpuid_entry" {
        /// EAX input.
        pub function: u32 => "__u32 function",
        /// ECX input (with [`RVMM_CPUID_SIGNIFICANT_INDEX`]).
        pub index: u32 => "__u32 index",
        /// [`RVMM_CPUID_SIGNIFICANT_INDEX`] or 0.
        pub flags: u32 => "__u32 flags",
        /// Output EAX.
        pub eax: u32 => "__u32 eax",
        /// Output EBX.
        pub ebx: u32 => "__u32 ebx",
        /// Output ECX.
        pub ecx: u32 => "__u32 ecx",
        /// Output EDX.
        pub edx: u32 => "__u32 edx",
        /// Zero.
        pub padding: u32 => "__u32 padding",
    }
}

abi_struct! {
    /// `RVMM_SET_CPUID`: the CPUID leaves a vCPU's guest sees instead of the host-derived
    /// defaults (VMX is hidden whatever they say).
    pub struct Cpuid as "rvmm_cpuid" {
        /// vCPU index.
        pub vcpu: u32 => "__u32 vcpu",
        /// Valid entries.
        pub nent: u32 => "__u32 nent",
        /// Entries.
        pub entries: [CpuidEntry; RVMM_MAX_CPUID_ENTRIES] => "struct rvmm_cpuid_entry entries[64]",
    }
}

abi_struct! {
    /// One MSR.
    pub struct MsrEntry as "rvmm_msr_entry" {
        /// MSR number.
        pub index: u32 => "__u32 index",
        /// Zero.
        pub reserved: u32 => "__u32 reserved",
        /// Value.
        pub data: u64 => "__u64 data",
    }
}

abi_struct! {
    /// `RVMM_GET_MSRS` / `RVMM_SET_MSRS`: MSRs a guest owns (EFER, STAR, LSTAR, CSTAR,
    /// SFMASK, FS/GS/KernelGS base, SYSENTER_CS/ESP/EIP, PAT, TSC). The ioctl returns how
    /// many entries it processed.
    pub struct Msrs as "rvmm_msrs" {
        /// vCPU index.
        pub vcpu: u32 => "__u32 vcpu",
        /// Valid entries.
        pub nmsrs: u32 => "__u32 nmsrs",
        /// Entries.
        pub entries: [MsrEntry; RVMM_MAX_MSR_ENTRIES] => "struct rvmm_msr_entry entries[16]",
    }
}

/// `Interrupt::kind`: an external interrupt.
pub const RVMM_EVENT_INTERRUPT: u32 = 0;
/// `Interrupt::kind`: a hardware exception.
pub const RVMM_EVENT_EXCEPTION: u32 = 1;
/// `CpuidEntry::flags`: the entry applies to one ECX `index` only.
pub const RVMM_CPUID_SIGNIFICANT_INDEX: u32 = 1;
/// Entries of [`Cpuid`].
pub const RVMM_MAX_CPUID_ENTRIES: usize = 64;
/// Entries of [`Msrs`].
pub const RVMM_MAX_MSR_ENTRIES: usize = 16;

/// Entries of [`VmStats::exits`].
pub const RVMM_NR_EXIT_REASONS: usize = 72;

/// Slots per VM.
pub const RVMM_MAX_MEMSLOTS: u32 = 32;
/// vCPUs per VM.
pub const RVMM_MAX_VCPUS: u32 = 8;
/// Read-only memory region: guest writes exit as MMIO.
pub const RVMM_MEM_READONLY: u32 = 1;
/// Size of the per-vCPU mapping of [`Run`].
pub const RVMM_RUN_MMAP_SIZE: u64 = 4096;

/// Exit reasons (numbered as KVM's where they match).
pub const RVMM_EXIT_UNKNOWN: u32 = 0;
/// Port I/O.
pub const RVMM_EXIT_IO: u32 = 2;
/// VMCALL.
pub const RVMM_EXIT_HYPERCALL: u32 = 3;
/// HLT.
pub const RVMM_EXIT_HLT: u32 = 5;
/// MMIO.
pub const RVMM_EXIT_MMIO: u32 = 6;
/// Interrupt window open.
pub const RVMM_EXIT_IRQ_WINDOW_OPEN: u32 = 7;
/// Triple fault.
pub const RVMM_EXIT_SHUTDOWN: u32 = 8;
/// VM entry failed.
pub const RVMM_EXIT_FAIL_ENTRY: u32 = 9;
/// A signal is pending (the run ioctl returned EINTR).
pub const RVMM_EXIT_INTR: u32 = 10;
/// rvmm could not handle an exit.
pub const RVMM_EXIT_INTERNAL_ERROR: u32 = 17;
/// `ExitIo::direction`: IN.
pub const RVMM_EXIT_IO_IN: u8 = 0;
/// `ExitIo::direction`: OUT.
pub const RVMM_EXIT_IO_OUT: u8 = 1;
/// `ExitInternal::suberror`: an exit reason rvmm does not handle.
pub const RVMM_INTERNAL_UNHANDLED_EXIT: u32 = 1;
/// `ExitInternal::suberror`: an instruction rvmm would have to emulate and cannot yet.
pub const RVMM_INTERNAL_EMULATION: u32 = 2;
/// `ExitInternal::suberror`: the shadow page pool cannot map the access.
pub const RVMM_INTERNAL_NO_SHADOW: u32 = 3;

/// Constants the C header defines, in order.
pub const CONSTANTS: &[(&str, u64)] = &[
    ("RVMM_NR_EXIT_REASONS", RVMM_NR_EXIT_REASONS as u64),
    ("RVMM_EVENT_INTERRUPT", RVMM_EVENT_INTERRUPT as u64),
    ("RVMM_EVENT_EXCEPTION", RVMM_EVENT_EXCEPTION as u64),
    (
        "RVMM_CPUID_SIGNIFICANT_INDEX",
        RVMM_CPUID_SIGNIFICANT_INDEX as u64,
    ),
    ("RVMM_MAX_CPUID_ENTRIES", RVMM_MAX_CPUID_ENTRIES as u64),
    ("RVMM_MAX_MSR_ENTRIES", RVMM_MAX_MSR_ENTRIES as u64),
    ("RVMM_MAX_MEMSLOTS", RVMM_MAX_MEMSLOTS as u64),
    ("RVMM_MAX_VCPUS", RVMM_MAX_VCPUS as u64),
    ("RVMM_MEM_READONLY", RVMM_MEM_READONLY as u64),
    ("RVMM_RUN_MMAP_SIZE", RVMM_RUN_MMAP_SIZE),
    ("RVMM_EXIT_UNKNOWN", RVMM_EXIT_UNKNOWN as u64),
    ("RVMM_EXIT_IO", RVMM_EXIT_IO as u64),
    ("RVMM_EXIT_HYPERCALL", RVMM_EXIT_HYPERCALL as u64),
    ("RVMM_EXIT_HLT", RVMM_EXIT_HLT as u64),
    ("RVMM_EXIT_MMIO", RVMM_EXIT_MMIO as u64),
    (
        "RVMM_EXIT_IRQ_WINDOW_OPEN",
        RVMM_EXIT_IRQ_WINDOW_OPEN as u64,
    ),
    ("RVMM_EXIT_SHUTDOWN", RVMM_EXIT_SHUTDOWN as u64),
    ("RVMM_EXIT_FAIL_ENTRY", RVMM_EXIT_FAIL_ENTRY as u64),
    ("RVMM_EXIT_INTR", RVMM_EXIT_INTR as u64),
    ("RVMM_EXIT_INTERNAL_ERROR", RVMM_EXIT_INTERNAL_ERROR as u64),
    ("RVMM_EXIT_IO_IN", RVMM_EXIT_IO_IN as u64),
    ("RVMM_EXIT_IO_OUT", RVMM_EXIT_IO_OUT as u64),
    (
        "RVMM_INTERNAL_UNHANDLED_EXIT",
        RVMM_INTERNAL_UNHANDLED_EXIT as u64,
    ),
    ("RVMM_INTERNAL_EMULATION", RVMM_INTERNAL_EMULATION as u64),
    ("RVMM_INTERNAL_NO_SHADOW", RVMM_INTERNAL_NO_SHADOW as u64),
    ("RVMM_MP_STATE_RUNNABLE", RVMM_MP_STATE_RUNNABLE as u64),
    ("RVMM_MP_STATE_WAIT_SIPI", RVMM_MP_STATE_WAIT_SIPI as u64),
    ("RVMM_HC_ENOSYS", RVMM_HC_ENOSYS),
    ("RVMM_HC_EPERM", RVMM_HC_EPERM),
];

/// `RVMM_GET_API_VERSION`: returns [`RVMM_API_VERSION`] as the ioctl's value.
pub const RVMM_GET_API_VERSION: u32 = ioc(IOC_NONE, 0x00, 0);
/// `RVMM_GET_VMX_CAPS`: fills a [`VmxCaps`].
pub const RVMM_GET_VMX_CAPS: u32 = ioc(IOC_READ, 0x01, core::mem::size_of::<VmxCaps>());
/// `RVMM_GET_STATUS`: checks VMX on every CPU and fills a [`Status`].
pub const RVMM_GET_STATUS: u32 = ioc(IOC_READ, 0x02, core::mem::size_of::<Status>());

/// `RVMM_CREATE_VM`: makes this open file a VM (EEXIST if it is one already).
pub const RVMM_CREATE_VM: u32 = ioc(IOC_NONE, 0x10, 0);
/// `RVMM_SET_MEMORY_REGION`: creates, moves or deletes a [`MemoryRegion`].
pub const RVMM_SET_MEMORY_REGION: u32 = ioc(IOC_WRITE, 0x11, core::mem::size_of::<MemoryRegion>());
/// `RVMM_CREATE_VCPU`: argument = vCPU id (below [`RVMM_MAX_VCPUS`]); returns its index.
pub const RVMM_CREATE_VCPU: u32 = ioc(IOC_NONE, 0x12, 0);
/// `RVMM_GET_REGS`.
pub const RVMM_GET_REGS: u32 = ioc(IOC_READ | IOC_WRITE, 0x13, core::mem::size_of::<VcpuRegs>());
/// `RVMM_SET_REGS`.
pub const RVMM_SET_REGS: u32 = ioc(IOC_WRITE, 0x14, core::mem::size_of::<VcpuRegs>());
/// `RVMM_GET_SREGS`.
pub const RVMM_GET_SREGS: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0x15,
    core::mem::size_of::<VcpuSregs>(),
);
/// `RVMM_SET_SREGS`.
pub const RVMM_SET_SREGS: u32 = ioc(IOC_WRITE, 0x16, core::mem::size_of::<VcpuSregs>());
/// `RVMM_RUN`: argument = vCPU index. Returns 0 with `Run::exit_reason` set, or EINTR.
pub const RVMM_RUN: u32 = ioc(IOC_NONE, 0x17, 0);

/// `RVMM_GET_STATS`: fills a [`VmStats`].
pub const RVMM_GET_STATS: u32 = ioc(IOC_READ, 0x18, core::mem::size_of::<VmStats>());

/// `RVMM_INTERRUPT`: queues an [`Interrupt`].
pub const RVMM_INTERRUPT: u32 = ioc(IOC_WRITE, 0x19, core::mem::size_of::<Interrupt>());
/// `RVMM_SET_CPUID`: sets a vCPU's [`Cpuid`].
pub const RVMM_SET_CPUID: u32 = ioc(IOC_WRITE, 0x1a, core::mem::size_of::<Cpuid>());
/// `RVMM_GET_MSRS`: reads [`Msrs`]; returns the number of entries read.
pub const RVMM_GET_MSRS: u32 = ioc(IOC_READ | IOC_WRITE, 0x1b, core::mem::size_of::<Msrs>());
/// `RVMM_SET_MSRS`: writes [`Msrs`]; returns the number of entries written.
pub const RVMM_SET_MSRS: u32 = ioc(IOC_WRITE, 0x1c, core::mem::size_of::<Msrs>());
/// `RVMM_SET_SHADOW_LIMITS`: sets [`ShadowLimits`].
pub const RVMM_SET_SHADOW_LIMITS: u32 = ioc(IOC_WRITE, 0x1d, core::mem::size_of::<ShadowLimits>());

/// `RVMM_CREATE_IRQCHIP`: gives every vCPU created afterwards an in-kernel local APIC
/// (xAPIC page and x2APIC MSRs, timer, IPIs); a HLT with interrupts enabled then waits
/// in the kernel for an interrupt. Before the first vCPU (EBUSY after), once (EEXIST).
pub const RVMM_CREATE_IRQCHIP: u32 = ioc(IOC_NONE, 0x1e, 0);
/// `RVMM_SIGNAL_MSI`: delivers an [`Msi`]. Returns the number of APICs that took it
/// (0: none matched or all were disabled); ENXIO without an irqchip; EINVAL for an
/// address outside 0xfee00000-0xfeefffff or a non-zero `flags`.
pub const RVMM_SIGNAL_MSI: u32 = ioc(IOC_WRITE, 0x1f, core::mem::size_of::<Msi>());

/// `RVMM_SET_MP_STATE`: sets an [`MpState`]. A vCPU waiting for a SIPI sleeps in
/// `RVMM_RUN` until one arrives (from another vCPU's APIC), then starts in real mode at
/// the SIPI vector's page; an INIT IPI puts a vCPU back into that state.
pub const RVMM_SET_MP_STATE: u32 = ioc(IOC_WRITE, 0x20, core::mem::size_of::<MpState>());
/// [`MpState::state`]: runs.
pub const RVMM_MP_STATE_RUNNABLE: u32 = 0;
/// [`MpState::state`]: waits for a start-up IPI.
pub const RVMM_MP_STATE_WAIT_SIPI: u32 = 1;

/// `RVMM_SET_HYPERCALL_EXITS`: sets the VM's [`HypercallExits`] (every vCPU, at its
/// next VMCALL).
pub const RVMM_SET_HYPERCALL_EXITS: u32 =
    ioc(IOC_WRITE, 0x21, core::mem::size_of::<HypercallExits>());
/// RAX after a VMCALL rvmm does not pass to userspace: -1000, KVM's -KVM_ENOSYS.
pub const RVMM_HC_ENOSYS: u64 = -1000i64 as u64;
/// RAX after a VMCALL at CPL > 0: -1, KVM's -KVM_EPERM.
pub const RVMM_HC_EPERM: u64 = -1i64 as u64;

/// Every ioctl of the ABI: C name, number. The header lists them in this order.
pub const IOCTLS: &[(&str, u32, &str)] = &[
    (
        "RVMM_GET_API_VERSION",
        RVMM_GET_API_VERSION,
        "_IO(RVMM_IOCTL_TYPE, 0x00)",
    ),
    (
        "RVMM_GET_VMX_CAPS",
        RVMM_GET_VMX_CAPS,
        "_IOR(RVMM_IOCTL_TYPE, 0x01, struct rvmm_vmx_caps)",
    ),
    (
        "RVMM_GET_STATUS",
        RVMM_GET_STATUS,
        "_IOR(RVMM_IOCTL_TYPE, 0x02, struct rvmm_status)",
    ),
    (
        "RVMM_CREATE_VM",
        RVMM_CREATE_VM,
        "_IO(RVMM_IOCTL_TYPE, 0x10)",
    ),
    (
        "RVMM_SET_MEMORY_REGION",
        RVMM_SET_MEMORY_REGION,
        "_IOW(RVMM_IOCTL_TYPE, 0x11, struct rvmm_memory_region)",
    ),
    (
        "RVMM_CREATE_VCPU",
        RVMM_CREATE_VCPU,
        "_IO(RVMM_IOCTL_TYPE, 0x12)",
    ),
    (
        "RVMM_GET_REGS",
        RVMM_GET_REGS,
        "_IOWR(RVMM_IOCTL_TYPE, 0x13, struct rvmm_vcpu_regs)",
    ),
    (
        "RVMM_SET_REGS",
        RVMM_SET_REGS,
        "_IOW(RVMM_IOCTL_TYPE, 0x14, struct rvmm_vcpu_regs)",
    ),
    (
        "RVMM_GET_SREGS",
        RVMM_GET_SREGS,
        "_IOWR(RVMM_IOCTL_TYPE, 0x15, struct rvmm_vcpu_sregs)",
    ),
    (
        "RVMM_SET_SREGS",
        RVMM_SET_SREGS,
        "_IOW(RVMM_IOCTL_TYPE, 0x16, struct rvmm_vcpu_sregs)",
    ),
    ("RVMM_RUN", RVMM_RUN, "_IO(RVMM_IOCTL_TYPE, 0x17)"),
    (
        "RVMM_GET_STATS",
        RVMM_GET_STATS,
        "_IOR(RVMM_IOCTL_TYPE, 0x18, struct rvmm_vm_stats)",
    ),
    (
        "RVMM_INTERRUPT",
        RVMM_INTERRUPT,
        "_IOW(RVMM_IOCTL_TYPE, 0x19, struct rvmm_interrupt)",
    ),
    (
        "RVMM_SET_CPUID",
        RVMM_SET_CPUID,
        "_IOW(RVMM_IOCTL_TYPE, 0x1a, struct rvmm_cpuid)",
    ),
    (
        "RVMM_GET_MSRS",
        RVMM_GET_MSRS,
        "_IOWR(RVMM_IOCTL_TYPE, 0x1b, struct rvmm_msrs)",
    ),
    (
        "RVMM_SET_MSRS",
        RVMM_SET_MSRS,
        "_IOW(RVMM_IOCTL_TYPE, 0x1c, struct rvmm_msrs)",
    ),
    (
        "RVMM_SET_SHADOW_LIMITS",
        RVMM_SET_SHADOW_LIMITS,
        "_IOW(RVMM_IOCTL_TYPE, 0x1d, struct rvmm_shadow_limits)",
    ),
    (
        "RVMM_CREATE_IRQCHIP",
        RVMM_CREATE_IRQCHIP,
        "_IO(RVMM_IOCTL_TYPE, 0x1e)",
    ),
    (
        "RVMM_SIGNAL_MSI",
        RVMM_SIGNAL_MSI,
        "_IOW(RVMM_IOCTL_TYPE, 0x1f, struct rvmm_msi)",
    ),
    (
        "RVMM_SET_MP_STATE",
        RVMM_SET_MP_STATE,
        "_IOW(RVMM_IOCTL_TYPE, 0x20, struct rvmm_mp_state)",
    ),
    (
        "RVMM_SET_HYPERCALL_EXITS",
        RVMM_SET_HYPERCALL_EXITS,
        "_IOW(RVMM_IOCTL_TYPE, 0x21, struct rvmm_hypercall_exits)",
    ),
];
