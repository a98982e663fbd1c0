// SPDX-License-Identifier: GPL-2.0

//! rvmm kselftests: run in a guest kernel on a VMX CPU (Bochs) after `insmod rvmm.ko`,
//! print KTAP, exit 0 when every test passed (kselftest convention: 1 on failure).
//!
//! Usage: rvmm_test [--modules DIR] [--no-vmx] [--only NAME,...] [--fuzz-seconds N]
//!                  [--fuzz-seed S]
//!   --modules DIR     where rvmm.ko, and irqbypass.ko/kvm.ko/kvm-intel.ko, are
//!                     (default /lib/modules/rvmm)
//!   --no-vmx          the CPU has no VT-x (QEMU TCG): check that rvmm refuses to load
//!   --fuzz-seconds N  budget of fuzz_ioctls_and_guests (default 45)
//!   --fuzz-seed S     its seed (decimal or 0x-hex; default: a fresh one, printed)

mod adversarial;
mod apicv;
mod coherence;
mod cpu_msrs;
mod debug_regs;
mod emulator;
mod fuzz;
mod hypercall;
mod ktap;
mod kvm_guest;
mod linux_tests;
mod sys;
mod vm_tests;

use ktap::{Outcome, Suite};
use rvmm::uapi::{self, ioc, IOC_NONE, IOC_READ, IOC_WRITE};
use rvmm::{Rvmm, Status};
use std::path::{Path, PathBuf};

pub(crate) const DEV: &str = "/dev/rvmm";

pub(crate) struct Ctx {
    pub(crate) modules: PathBuf,
}

impl Ctx {
    fn ko(&self, name: &str) -> PathBuf {
        self.modules.join(name)
    }
    fn load_rvmm(&self) -> Result<(), String> {
        if sys::module_loaded("rvmm") {
            return Ok(());
        }
        sys::insmod(&self.ko("rvmm.ko")).map_err(|e| format!("insmod rvmm.ko: {e}"))
    }
    fn unload_rvmm(&self) -> Result<(), String> {
        if !sys::module_loaded("rvmm") {
            return Ok(());
        }
        sys::rmmod("rvmm").map_err(|e| format!("rmmod rvmm: {e}"))
    }
}

fn main() {
    let mut modules = PathBuf::from("/lib/modules/rvmm");
    let mut no_vmx = false;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--modules" => modules = PathBuf::from(args.next().expect("--modules DIR")),
            "--no-vmx" => no_vmx = true,
            "--only" => {
                only = Some(
                    args.next()
                        .expect("--only NAME[,NAME...]")
                        .split(',')
                        .filter(|n| !n.is_empty())
                        .map(String::from)
                        .collect(),
                )
            }
            "--fuzz-seconds" | "--fuzz-seed" => {
                if let Err(e) = fuzz::set_option(&a, args.next()) {
                    eprintln!("{e}");
                    std::process::exit(2);
                }
            }
            _ => {
                eprintln!("usage: rvmm_test [--modules DIR] [--no-vmx] [--only NAME,...] [--fuzz-seconds N] [--fuzz-seed S]");
                std::process::exit(2);
            }
        }
    }
    let ctx = Ctx { modules };
    let mut suite = Suite::<Ctx>::new("rvmm");
    if no_vmx {
        suite.add("load_refused_without_vmx", load_refused_without_vmx);
    } else {
        suite.add("device_opens", device_opens);
        suite.add("api_version_matches", api_version_matches);
        suite.add("unknown_ioctl_enotty", unknown_ioctl_enotty);
        suite.add("bad_user_pointer_efault", bad_user_pointer_efault);
        suite.add("wrong_size_einval", wrong_size_einval);
        suite.add("vmx_caps_sane", vmx_caps_sane);
        suite.add("vmx_on_every_cpu", vmx_on_every_cpu);
        suite.add("concurrent_opens", concurrent_opens);
        suite.add("rmmod_while_open_refused", rmmod_while_open_refused);
        suite.add("io_and_hlt_exits", vm_tests::io_and_hlt_exits);
        suite.add("io_in_round_trip", vm_tests::io_in_round_trip);
        suite.add("mmio_round_trip", vm_tests::mmio_round_trip);
        suite.add("string_io", vm_tests::string_io);
        suite.add(
            "emulator_matches_the_cpu",
            emulator::emulator_matches_the_cpu,
        );
        suite.add(
            "hypercalls_exit_only_when_asked",
            hypercall::hypercalls_exit_only_when_asked,
        );
        suite.add("misc_enable_reads_back", cpu_msrs::misc_enable_reads_back);
        suite.add("rdtscp_and_tsc_adjust", cpu_msrs::rdtscp_and_tsc_adjust);
        suite.add("mca_banks", cpu_msrs::mca_banks);
        suite.add(
            "debug_registers_like_hardware",
            debug_regs::debug_registers_like_hardware,
        );
        suite.add("cpuid_values_as_set", vm_tests::cpuid_values_as_set);
        suite.add("msrs_get_set", vm_tests::msrs_get_set);
        suite.add(
            "interrupt_and_exception_injection",
            vm_tests::interrupt_and_exception_injection,
        );
        suite.add("guest_images_match_kvm", vm_tests::guest_images);
        suite.add(
            "guest_images_differential",
            vm_tests::guest_images_differential,
        );
        suite.add("cr3_cache_warm_switch", vm_tests::cr3_cache_warm_switch);
        suite.add("pool_fork_unsync_resync", vm_tests::pool_fork_unsync_resync);
        suite.add("pool_table_reuse", vm_tests::pool_table_reuse);
        suite.add("smp_shared_page_tables", vm_tests::smp_shared_page_tables);
        suite.add("apic_timer_ipi_eoi_tpr", vm_tests::apic_timer_ipi_eoi_tpr);
        suite.add("irqchip_abi_errors", vm_tests::irqchip_abi_errors);
        suite.add(
            "xapic_reads_without_exits",
            apicv::xapic_reads_without_exits,
        );
        suite.add(
            "multiboot_timer_100_interrupts",
            vm_tests::multiboot_timer_100_interrupts,
        );
        suite.add("smp_acpi_wakeup_mailbox", vm_tests::smp_acpi_wakeup_mailbox);
        suite.add("consistent_cpu", vm_tests::consistent_cpu);
        suite.add(
            "real_mode_vm86_where_exact",
            vm_tests::real_mode_vm86_where_exact,
        );
        suite.add("linux_boot_workload", linux_tests::linux_boot_workload);
        suite.add("linux_console_session", linux_tests::linux_console_session);
        suite.add("init_sipi_real_mode_ap", vm_tests::init_sipi_real_mode_ap);
        suite.add("shadow_limits", vm_tests::shadow_limits);
        suite.add(
            "multiboot_modules_and_cmdline",
            vm_tests::multiboot_modules_and_cmdline,
        );
        suite.add(
            "command_line_reaches_guest",
            vm_tests::command_line_reaches_guest,
        );
        suite.add(
            "triple_fault_is_shutdown",
            vm_tests::triple_fault_is_shutdown,
        );
        suite.add(
            "bad_guest_state_fails_entry",
            vm_tests::bad_guest_state_fails_entry,
        );
        suite.add(
            "signal_interrupts_spinning_guest",
            vm_tests::signal_interrupts_spinning_guest,
        );
        suite.add("two_vms_two_vcpus", vm_tests::two_vms_two_vcpus);
        suite.add(
            "kill_mid_run_frees_everything",
            vm_tests::kill_mid_run_frees_everything,
        );
        suite.add("fuzz_ioctls_and_guests", fuzz::fuzz_default);
        suite.add("no_kmemleak_reports", vm_tests::no_kmemleak_reports);
        suite.add(
            "hlt_at_top_of_address_space",
            adversarial::hlt_at_top_of_address_space,
        );
        suite.add(
            "lsl_far_selector_after_guest",
            adversarial::lsl_far_selector_after_guest,
        );
        suite.add(
            "guest_syscall_before_lstar",
            adversarial::guest_syscall_before_lstar,
        );
        suite.add(
            "memslot_delete_then_munmap",
            adversarial::memslot_delete_then_munmap,
        );
        suite.add(
            "readonly_slot_not_written",
            adversarial::readonly_slot_not_written,
        );
        suite.add(
            "two_vcpus_pool_reset_while_halted",
            adversarial::two_vcpus_pool_reset_while_halted,
        );
        suite.add("stats_while_vcpu_runs", adversarial::stats_while_vcpu_runs);
        suite.add(
            "apic_timer_storm_bounded_section",
            adversarial::apic_timer_storm_bounded_section,
        );
        suite.add("memlock_limit_enomem", adversarial::memlock_limit_enomem);
        suite.add("memcg_limit_enomem", adversarial::memcg_limit_enomem);
        suite.add(
            "unsync_storm_bounded_section",
            adversarial::unsync_storm_bounded_section,
        );
        suite.add(
            "global_flush_reaches_every_pcid",
            coherence::global_flush_reaches_every_pcid,
        );
        suite.add(
            "pt_write_fetches_at_cs_base",
            coherence::pt_write_fetches_at_cs_base,
        );
        suite.add(
            "invpcid_checks_like_hardware",
            coherence::invpcid_checks_like_hardware,
        );
        suite.add(
            "invpcid_noncanonical_operand_gp",
            coherence::invpcid_noncanonical_operand_gp,
        );
        suite.add("gbpages_follow_cpuid", coherence::gbpages_follow_cpuid);
        suite.add(
            "maxphyaddr_follows_cpuid",
            coherence::maxphyaddr_follows_cpuid,
        );
        suite.add(
            "single_step_traps_after_emulated_instructions",
            coherence::single_step_traps_after_emulated_instructions,
        );
        suite.add(
            "mov_cr3_reserved_bits_gp",
            coherence::mov_cr3_reserved_bits_gp,
        );
        suite.add("pae_bad_pdpte_gp", coherence::pae_bad_pdpte_gp);
        suite.add(
            "fan_in_page_tables_bounded_section",
            adversarial::fan_in_page_tables_bounded_section,
        );
        suite.add(
            "speculation_barriers_forced",
            adversarial::speculation_barriers_forced,
        );
        suite.add("cpu_hotplug", cpu_hotplug);
        suite.add("cr4_shadow_stress", cr4_shadow_stress);
        suite.add("load_unload_20_times", load_unload_20_times);
        suite.add("kvm_coexistence", kvm_coexistence);
    }
    if let Some(names) = only {
        // A subset, for a quick loop (scripts/e2e.sh: RVMM_TEST_ONLY).
        suite.retain(|n| names.iter().any(|x| x == n));
    }
    std::process::exit(suite.run(&ctx));
}

pub(crate) fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn open() -> Result<Rvmm, String> {
    Rvmm::open(DEV).map_err(|e| e.to_string())
}

/// Issues a raw ioctl and returns the errno it failed with (0 on success).
fn raw_ioctl(fd: i32, cmd: u32, arg: usize) -> i32 {
    // SAFETY: the kernel validates `arg` (these tests pass bad pointers on purpose; the
    // kernel must refuse them without touching our memory other than the target).
    let r = unsafe { libc::ioctl(fd, cmd as _, arg) };
    if r < 0 {
        sys::errno()
    } else {
        0
    }
}

fn expect_errno(what: &str, got: i32, want: i32) -> Result<(), String> {
    check(got == want, || {
        format!(
            "{what}: got errno {got} ({}), want {want} ({})",
            sys::strerror(got),
            sys::strerror(want)
        )
    })
}

pub(crate) fn status_all_ok(s: &Status) -> Result<(), String> {
    let online = sys::online_cpus();
    check(
        s.online_cpus == online
            && s.vmx_cpus == online
            && s.vmxe_cpus == online
            && s.vmcs_ok_cpus == online
            && s.vmcs_ptr_clobbered == 0,
        || format!("VMX not OK on every CPU ({online} online per sysconf): {s:?}"),
    )
}

fn device_opens(_: &Ctx) -> Outcome {
    let meta = std::fs::metadata(DEV).map_err(|e| format!("{DEV}: {e}"))?;
    use std::os::unix::fs::FileTypeExt;
    check(meta.file_type().is_char_device(), || {
        format!("{DEV} is not a character device")
    })?;
    open()?;
    Ok(())
}

fn api_version_matches(_: &Ctx) -> Outcome {
    let v = open()?.api_version().map_err(|e| e.to_string())?;
    check(v == uapi::RVMM_API_VERSION, || {
        format!("module ABI {v}, selftests ABI {}", uapi::RVMM_API_VERSION)
    })
}

fn unknown_ioctl_enotty(_: &Ctx) -> Outcome {
    let dev = open()?;
    let fd = dev.as_raw_fd();
    expect_errno(
        "unknown nr 0x7f",
        raw_ioctl(fd, ioc(IOC_NONE, 0x7f, 0), 0),
        libc::ENOTTY,
    )?;
    expect_errno(
        "unknown nr 0xff (read, 8 bytes)",
        raw_ioctl(fd, ioc(IOC_READ, 0xff, 8), 0),
        libc::ENOTTY,
    )?;
    // KVM_GET_API_VERSION: another driver's ioctl type.
    expect_errno(
        "KVM_GET_API_VERSION",
        raw_ioctl(fd, 0xAE00, 0),
        libc::ENOTTY,
    )?;
    expect_errno(
        "TCGETS",
        raw_ioctl(fd, libc::TCGETS as u32, 0),
        libc::ENOTTY,
    )
}

fn bad_user_pointer_efault(_: &Ctx) -> Outcome {
    let dev = open()?;
    let fd = dev.as_raw_fd();
    for (name, cmd) in [
        ("RVMM_GET_VMX_CAPS", uapi::RVMM_GET_VMX_CAPS),
        ("RVMM_GET_STATUS", uapi::RVMM_GET_STATUS),
    ] {
        expect_errno(
            &format!("{name}(NULL)"),
            raw_ioctl(fd, cmd, 0),
            libc::EFAULT,
        )?;
        expect_errno(
            &format!("{name}(kernel address)"),
            raw_ioctl(fd, cmd, 0xffff_8880_0000_0000),
            libc::EFAULT,
        )?;
        let ro = sys::MappedPage::new(libc::PROT_READ)?;
        expect_errno(
            &format!("{name}(read-only page)"),
            raw_ioctl(fd, cmd, ro.addr()),
            libc::EFAULT,
        )?;
        let none = sys::MappedPage::new(libc::PROT_NONE)?;
        expect_errno(
            &format!("{name}(PROT_NONE page)"),
            raw_ioctl(fd, cmd, none.addr()),
            libc::EFAULT,
        )?;
        // Straddling the end of a writable page into an inaccessible one.
        let rw = sys::MappedPage::new_guarded()?;
        expect_errno(
            &format!("{name}(straddles a guard page)"),
            raw_ioctl(fd, cmd, rw.addr() + 4096 - 8),
            libc::EFAULT,
        )?;
    }
    // The device still works afterwards.
    dev.status().map_err(|e| e.to_string())?;
    Ok(())
}

fn wrong_size_einval(_: &Ctx) -> Outcome {
    let dev = open()?;
    let fd = dev.as_raw_fd();
    let mut buf = [0u8; 512];
    let p = buf.as_mut_ptr() as usize;
    let caps = core::mem::size_of::<uapi::VmxCaps>();
    let status = core::mem::size_of::<uapi::Status>();
    expect_errno(
        "GET_VMX_CAPS size-8",
        raw_ioctl(fd, ioc(IOC_READ, 0x01, caps - 8), p),
        libc::EINVAL,
    )?;
    expect_errno(
        "GET_VMX_CAPS size+8",
        raw_ioctl(fd, ioc(IOC_READ, 0x01, caps + 8), p),
        libc::EINVAL,
    )?;
    expect_errno(
        "GET_VMX_CAPS as _IOW",
        raw_ioctl(fd, ioc(IOC_WRITE, 0x01, caps), p),
        libc::EINVAL,
    )?;
    expect_errno(
        "GET_STATUS size 0",
        raw_ioctl(fd, ioc(IOC_READ, 0x02, 0), p),
        libc::EINVAL,
    )?;
    expect_errno(
        "GET_STATUS size+4",
        raw_ioctl(fd, ioc(IOC_READ, 0x02, status + 4), p),
        libc::EINVAL,
    )?;
    expect_errno(
        "GET_API_VERSION with a size",
        raw_ioctl(fd, ioc(IOC_READ, 0x00, 4), p),
        libc::EINVAL,
    )?;
    check(buf.iter().all(|&b| b == 0), || {
        "a refused ioctl wrote to the buffer".into()
    })
}

fn vmx_caps_sane(_: &Ctx) -> Outcome {
    let c = open()?.vmx_caps().map_err(|e| e.to_string())?;
    use rvmm_core_caps::*;
    let basic = VmxBasic(c.basic);
    check(
        c.vmcs_revision != 0 && c.vmcs_revision == basic.revision_id(),
        || format!("bad VMCS revision {c:?}"),
    )?;
    check(c.vmcs_size > 0 && c.vmcs_size <= 4096, || {
        format!("bad VMCS size {}", c.vmcs_size)
    })?;
    for (name, msr) in [
        ("pin", c.pinbased),
        ("proc", c.procbased),
        ("exit", c.exit),
        ("entry", c.entry),
        ("proc2", c.procbased2),
    ] {
        let a = AllowedControls(msr);
        check(a.must_be_one() & !a.may_be_one() == 0, || {
            format!("{name}: a must-be-1 control may not be 1: {msr:#x}")
        })?;
    }
    check(AllowedControls(c.procbased).may_be_one() != 0, || {
        "no primary controls reported".into()
    })?;
    check(c.cr0_fixed0 & !c.cr0_fixed1 == 0, || {
        format!(
            "CR0 fixed0 {:#x} not within fixed1 {:#x}",
            c.cr0_fixed0, c.cr0_fixed1
        )
    })?;
    check(c.cr4_fixed0 & (1 << 13) != 0, || {
        format!("CR4 fixed0 {:#x} lacks VMXE", c.cr4_fixed0)
    })?;
    Ok(())
}

fn vmx_on_every_cpu(_: &Ctx) -> Outcome {
    let s = open()?.status().map_err(|e| e.to_string())?;
    ktap::diag(&format!("{s:?}"));
    status_all_ok(&s)
}

fn concurrent_opens(_: &Ctx) -> Outcome {
    let shared = open()?;
    let mut children = Vec::new();
    for i in 0..4 {
        let pid = sys::fork_child(|| {
            let own = open()?;
            for _ in 0..25 {
                let s = if i % 2 == 0 {
                    own.status()
                } else {
                    shared.status()
                }
                .map_err(|e| e.to_string())?;
                status_all_ok(&s)?;
                own.vmx_caps().map_err(|e| e.to_string())?;
                check(
                    own.api_version().ok() == Some(uapi::RVMM_API_VERSION),
                    || "api version".into(),
                )?;
            }
            Ok(())
        })?;
        children.push(pid);
    }
    let mut failed = 0;
    for pid in children {
        if !sys::wait_ok(pid) {
            failed += 1;
        }
    }
    check(failed == 0, || format!("{failed} of 4 processes failed"))
}

fn rmmod_while_open_refused(ctx: &Ctx) -> Outcome {
    ctx.load_rvmm()?;
    let dev = open()?;
    match sys::rmmod("rvmm") {
        Ok(()) => return Err("rmmod rvmm succeeded while /dev/rvmm was open".into()),
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0);
            check(errno == libc::EBUSY || errno == libc::EWOULDBLOCK, || {
                format!("rmmod while open: {e}, want EBUSY/EWOULDBLOCK")
            })?;
        }
    }
    check(sys::module_loaded("rvmm"), || {
        "module gone after a refused rmmod".into()
    })?;
    status_all_ok(&dev.status().map_err(|e| e.to_string())?)?;
    drop(dev);
    ctx.unload_rvmm()?;
    check(!Path::new(DEV).exists(), || {
        format!("{DEV} still exists after rmmod")
    })?;
    ctx.load_rvmm()?;
    status_all_ok(&open()?.status().map_err(|e| e.to_string())?)
}

fn cpu_hotplug(ctx: &Ctx) -> Outcome {
    ctx.load_rvmm()?;
    let last = sys::online_cpus().saturating_sub(1);
    if last == 0 {
        return Err(format!("{}needs two CPUs", ktap::SKIP));
    }
    let dev = open()?;
    let ctl = format!("/sys/devices/system/cpu/cpu{last}/online");
    for round in 0..3 {
        std::fs::write(&ctl, "0").map_err(|e| format!("offline cpu{last}: {e}"))?;
        let s = dev.status().map_err(|e| e.to_string())?;
        check(s.online_cpus == last && s.vmx_cpus == last, || {
            format!("round {round}, cpu{last} offline: {s:?}")
        })?;
        status_all_ok(&s)?;
        std::fs::write(&ctl, "1").map_err(|e| format!("online cpu{last}: {e}"))?;
        // The CPU that came back got VMX from rvmm's hotplug callback.
        status_all_ok(&dev.status().map_err(|e| e.to_string())?)
            .map_err(|e| format!("round {round}, cpu{last} back: {e}"))?;
    }
    Ok(())
}

fn cr4_shadow_stress(ctx: &Ctx) -> Outcome {
    ctx.load_rvmm()?;
    let dev = open()?;
    let cpus = sys::online_cpus();
    let mut children = Vec::new();
    // Per CPU, a task with CR4.TSD set (PR_TSC_SIGSEGV) and one without, switching
    // back and forth: every switch rewrites CR4 from the kernel's shadow.
    for cpu in 0..cpus {
        for tsd in [true, false] {
            children.push(sys::fork_child(move || {
                sys::pin_to_cpu(cpu)?;
                if tsd {
                    sys::set_tsc_sigsegv()?;
                }
                for _ in 0..20_000 {
                    sys::sched_yield();
                }
                Ok(())
            })?);
        }
    }
    // Meanwhile: module loads and unloads change kernel page permissions and free
    // vmalloc space, which flush the TLB globally (through CR4.PGE when the CPU has no
    // INVPCID; the e2e runner boots with clearcpuid=invpcid for that).
    let churn = ctx.ko("irqbypass.ko");
    let mut churned = 0;
    if churn.exists() && !sys::module_loaded("irqbypass") {
        for _ in 0..10 {
            sys::insmod(&churn).map_err(|e| format!("insmod irqbypass.ko: {e}"))?;
            sys::rmmod("irqbypass").map_err(|e| format!("rmmod irqbypass: {e}"))?;
            churned += 1;
            status_all_ok(&dev.status().map_err(|e| e.to_string())?)?;
        }
    }
    let mut failed = 0;
    for pid in children {
        if !sys::wait_ok(pid) {
            failed += 1;
        }
    }
    check(failed == 0, || format!("{failed} stress tasks failed"))?;
    ktap::diag(&format!("{cpus} CPU(s), 2 tasks each (one with CR4.TSD) x 20000 yields, {churned} module load/unload cycles"));
    status_all_ok(&dev.status().map_err(|e| e.to_string())?)
}

fn load_unload_20_times(ctx: &Ctx) -> Outcome {
    check(!sys::module_loaded("kvm_intel"), || {
        "kvm_intel is loaded: this test needs VMX free of other users".into()
    })?;
    for i in 0..20 {
        ctx.unload_rvmm()?;
        ctx.load_rvmm().map_err(|e| format!("iteration {i}: {e}"))?;
        let s = open()?.status().map_err(|e| e.to_string())?;
        status_all_ok(&s).map_err(|e| format!("iteration {i}: {e}"))?;
        // Nobody else uses VMX: had an earlier load leaked its reference, VMX would
        // have been on already when this load took its own.
        check(s.shared_cpus == 0, || {
            format!("iteration {i}: VMX was already on at load (leaked reference?): {s:?}")
        })?;
    }
    ctx.unload_rvmm()
}

fn kvm_coexistence(ctx: &Ctx) -> Outcome {
    ctx.unload_rvmm()?;
    // kvm-intel loads after rvmm is gone, and takes VMX itself at load.
    for (ko, name) in [
        ("irqbypass.ko", "irqbypass"),
        ("kvm.ko", "kvm"),
        ("kvm-intel.ko", "kvm_intel"),
    ] {
        if !sys::module_loaded(name) {
            sys::insmod(&ctx.ko(ko)).map_err(|e| format!("insmod {ko}: {e}"))?;
        }
    }
    let mut guest = kvm_guest::HltGuest::new()?;
    guest
        .run_once()
        .map_err(|e| format!("KVM guest before rvmm: {e}"))?;
    ctx.load_rvmm()?;
    let dev = open()?;
    let mut foreign = 0;
    for i in 0..20 {
        // Loading the vCPU makes KVM's VMCS current on this CPU and leaves it there.
        guest.touch_vcpu()?;
        let s = dev.status().map_err(|e| e.to_string())?;
        status_all_ok(&s).map_err(|e| format!("round {i}: {e}"))?;
        check(s.shared_cpus == s.online_cpus, || {
            format!("round {i}: KVM holds VMX but rvmm saw it off: {s:?}")
        })?;
        foreign += s.foreign_vmcs_cpus;
        // KVM must find its own VMCS current: a VMCS of rvmm left there would make this
        // VM entry fail or run the wrong guest.
        guest
            .run_once()
            .map_err(|e| format!("round {i}: KVM guest after rvmm's VMCS check: {e}"))?;
    }
    check(foreign > 0, || {
        "KVM's VMCS was never current during rvmm's checks: the test proved nothing".into()
    })?;
    ktap::diag(&format!(
        "rvmm found KVM's VMCS current {foreign} times and restored it each time"
    ));
    drop(dev);
    ctx.unload_rvmm()?;
    guest
        .run_once()
        .map_err(|e| format!("KVM guest after rmmod rvmm: {e}"))?;
    drop(guest);
    for name in ["kvm_intel", "kvm", "irqbypass"] {
        sys::rmmod(name).map_err(|e| format!("rmmod {name}: {e}"))?;
    }
    // And rvmm loads again once KVM is gone, with VMX all its own.
    ctx.load_rvmm()?;
    let s = open()?.status().map_err(|e| e.to_string())?;
    status_all_ok(&s)?;
    check(s.shared_cpus == 0, || {
        format!("VMX still on after KVM unloaded: {s:?}")
    })
}

fn load_refused_without_vmx(ctx: &Ctx) -> Outcome {
    let mut kmsg = sys::Kmsg::open()?;
    kmsg.drain();
    match sys::insmod(&ctx.ko("rvmm.ko")) {
        Ok(()) => return Err("rvmm.ko loaded on a CPU without VT-x".into()),
        Err(e) => expect_errno(
            "insmod rvmm.ko",
            e.raw_os_error().unwrap_or(0),
            libc::ENODEV,
        )?,
    }
    check(!Path::new(DEV).exists(), || format!("{DEV} exists"))?;
    let log = kmsg.drain();
    let line = log.iter().find(|l| l.contains("rvmm: not loading"));
    check(line.is_some_and(|l| l.contains("no VT-x")), || {
        format!("no clear kernel log line; kernel said: {log:?}")
    })?;
    ktap::diag(&format!("kernel: {}", line.unwrap()));
    Ok(())
}

/// The capability decoding the module uses, from the same source.
mod rvmm_core_caps {
    pub use rvmm_core::caps::{AllowedControls, VmxBasic};
}
