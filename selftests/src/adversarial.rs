// SPDX-License-Identifier: GPL-2.0

//! Adversarial tests: guests and host-side sequences built to hit the corners where a
//! hypervisor bug corrupts or crashes the host, or hands a guest the host's state. Each
//! test asserts the architectural behaviour (SDM) or the ABI's documented one, so that
//! it fails on a module with the bug and passes on a correct one:
//! - RIP wrapping past the top of the address space on an instruction exit;
//! - the host's GDTR limit after VM exits (VM exit sets it to 0xFFFF);
//! - the SYSCALL MSRs of a new vCPU;
//! - memory slots deleted, moved and unmapped under a vCPU's caches;
//! - read-only slots written by MOV, INS and the page walker's accessed/dirty bits;
//! - a stopped vCPU's shadow tables freed by another vCPU's pool resets.

use crate::ktap::{self, Outcome};
use crate::{check, sys, Ctx};
use rvmm::guest::{setup, EntryMode, GuestMem};
use rvmm::uapi::{Regs, Sregs};
use rvmm::{Exit, Rvmm, Vcpu, Vm};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

/// Where the guests' code starts (free in both of `setup`'s layouts).
pub(crate) const CODE: u64 = 0x1_0000;
/// The guest's RAM (slot 0) in most tests.
const RAM: usize = 2 << 20;
/// Present and writable (a page-table entry's low bits).
pub(crate) const PW: u64 = 0x3;
/// Present, writable, 2-MiB page.
const PW_LARGE: u64 = 0x83;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_FMASK: u32 = 0xc000_0084;

/// `mov al, 0x42; out 0x77, al; hlt`: what a guest runs at address 0.
const AT_ZERO: [u8; 5] = [0xb0, 0x42, 0xe6, 0x77, 0xf4];

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Anonymous private memory of this process (the test kernel has no shmem), for slots
/// other than slot 0 and for canaries; unmapped on drop.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by this struct; the tests read it from the thread that
// coordinates a vCPU while that vCPU is stopped.
unsafe impl Send for Anon {}
// SAFETY: as above; writes need `&mut self`.
unsafe impl Sync for Anon {}

impl Anon {
    fn new(len: usize) -> Result<Self, String> {
        // SAFETY: a fresh anonymous mapping owned by the new struct.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Self { ptr: p.cast(), len })
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn write(&mut self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len, "write outside the mapping");
        // SAFETY: bounds checked; the mapping is ours and writable until `read_only`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }

    fn put_u64(&mut self, off: usize, v: u64) {
        self.write(off, &v.to_le_bytes());
    }

    /// The whole mapping's bytes now (volatile: a guest may have written them).
    fn bytes(&self) -> Vec<u8> {
        (0..self.len)
            // SAFETY: `i` stays inside our mapping.
            .map(|i| unsafe { self.ptr.add(i).read_volatile() })
            .collect()
    }

    /// mprotect(PROT_READ): from now on nothing in this process can write it.
    fn read_only(&self) -> Result<(), String> {
        // SAFETY: exactly our mapping.
        if unsafe { libc::mprotect(self.ptr.cast(), self.len, libc::PROT_READ) } != 0 {
            return Err(format!("mprotect: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM with `size` bytes of RAM at guest-physical 0 (slot 0) and the GDT (and, for
/// long mode, 4 GiB of identity page tables) of `rvmm::guest::setup`; vCPUs start at
/// [`CODE`].
pub(crate) struct Machine {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMem,
    pub(crate) regs: Regs,
    pub(crate) sregs: Sregs,
}

impl Machine {
    pub(crate) fn new(mode: EntryMode, size: usize) -> Result<Self, String> {
        let mut mem = GuestMem::new(size).map_err(err)?;
        let (regs, sregs) = setup(&mut mem, mode, CODE, size as u64 - 16)?;
        let vm = Rvmm::open(crate::DEV)
            .and_then(Rvmm::create_vm)
            .map_err(err)?;
        // SAFETY: `mem` lives as long as the VM (both in this struct; the VM drops first).
        unsafe { vm.set_memory_region(0, 0, size as u64, mem.host_addr(), false) }.map_err(err)?;
        Ok(Self {
            vm,
            mem,
            regs,
            sregs,
        })
    }

    /// Maps `mem` at `gpa` as slot `slot`.
    ///
    /// # Safety
    /// `mem` must stay mapped until the slot is deleted or the VM is gone.
    unsafe fn map(&self, slot: u32, gpa: u64, mem: &Anon, readonly: bool) -> Result<(), String> {
        // SAFETY: the caller keeps `mem` mapped for the slot's lifetime.
        unsafe {
            self.vm
                .set_memory_region(slot, gpa, mem.len as u64, mem.addr(), readonly)
        }
        .map_err(|e| format!("slot {slot} at {gpa:#x}: {e}"))
    }

    fn delete(&self, slot: u32) -> Result<(), String> {
        // SAFETY: size 0 deletes the slot; nothing is mapped.
        unsafe { self.vm.set_memory_region(slot, 0, 0, 0, false) }
            .map_err(|e| format!("deleting slot {slot}: {e}"))
    }
}

/// Creates vCPU `id` of `vm` with these registers (a free function, so that the vCPU
/// borrows only the VM and the test can still write the machine's memory).
pub(crate) fn new_vcpu<'a>(
    vm: &'a Vm,
    id: u32,
    regs: &Regs,
    sregs: &Sregs,
) -> Result<Vcpu<'a>, String> {
    let v = vm.create_vcpu(id).map_err(err)?;
    v.set_sregs(sregs).map_err(err)?;
    v.set_regs(regs).map_err(err)?;
    Ok(v)
}

pub(crate) fn run(v: &Vcpu) -> Result<Exit, String> {
    v.run().map_err(err)
}

fn expect(v: &Vcpu, want: Exit, what: &str) -> Outcome {
    let e = run(v)?;
    check(e == want, || format!("{what}: exit {e:?}, want {want:?}"))
}

fn out1(port: u16, data: u32) -> Exit {
    Exit::IoOut {
        port,
        size: 1,
        data,
    }
}

fn out4(port: u16, data: u32) -> Exit {
    Exit::IoOut {
        port,
        size: 4,
        data,
    }
}

/// Runs until a 4-byte MMIO read at `addr` and answers it with `answer`.
fn expect_mmio_read(v: &Vcpu, addr: u64, answer: u32, what: &str) -> Outcome {
    let e = run(v)?;
    check(
        matches!(e, Exit::Mmio { addr: a, len: 4, is_write: false, .. } if a == addr),
        || format!("{what}: exit {e:?}, want a 4-byte MMIO read at {addr:#x}"),
    )?;
    v.set_mmio_data(answer.into());
    Ok(())
}

// ---------------------------------------------------------------------------------
// 1. RIP wrapping at the top of the address space.
// ---------------------------------------------------------------------------------

/// An instruction that ends exactly at the top of the address space (HLT at
/// 0xffff_ffff_ffff_ffff in 64-bit mode, at 0xffff_ffff with 32-bit code), and a 2-byte
/// OUT ending there: the next RIP wraps to 0 (64-bit wrap; in 32-bit code EIP wraps at
/// 32 bits, RIP's upper half stays 0). Catches a RIP advance that overflows (a BUG() in
/// the host with overflow checks) or that leaves bit 32 set in a 32-bit guest (a failed
/// VM entry); the guest then runs on at 0.
pub fn hlt_at_top_of_address_space(_: &Ctx) -> Outcome {
    top_of_address_space(EntryMode::Protected).map_err(|e| format!("32-bit guest: {e}"))?;
    top_of_address_space(EntryMode::Long).map_err(|e| format!("64-bit guest: {e}"))
}

fn top_of_address_space(mode: EntryMode) -> Outcome {
    // The top page of the address space: its own slot (declared first: it outlives the VM).
    let mut top = Anon::new(4096)?;
    let mut m = Machine::new(mode, RAM)?;
    m.mem.write(0, &AT_ZERO)?;
    let (top_gpa, top_rip) = match mode {
        // Paging off: linear = physical; the page is at 0xffff_f000.
        EntryMode::Protected => (0xffff_f000, 0xffff_ffffu64),
        // PML4[511] -> PDPT[511] -> PD[511] -> PT[511] -> the page, at linear
        // 0xffff_ffff_ffff_f000; the tables sit above setup's (0x1000..0x7000).
        EntryMode::Long => {
            let (pdpt, pd, pt, page) = (0x8000, 0x9000, 0xa000, 0x40_0000);
            m.mem.write_u64(rvmm::guest::PML4 + 511 * 8, pdpt | PW)?;
            m.mem.write_u64(pdpt + 511 * 8, pd | PW)?;
            m.mem.write_u64(pd + 511 * 8, pt | PW)?;
            m.mem.write_u64(pt + 511 * 8, page | PW)?;
            (page, u64::MAX)
        }
    };
    // SAFETY: `top` outlives the VM (declared before it).
    unsafe { m.map(1, top_gpa, &top, false) }?;
    top.write(0xfff, &[0xf4]); // hlt
    let mut regs = m.regs;
    regs.rip = top_rip;
    let v = new_vcpu(&m.vm, 0, &regs, &m.sregs)?;
    expect(&v, Exit::Hlt, "HLT at the top")?;
    let rip = v.regs().map_err(err)?.rip;
    check(rip == 0, || {
        format!("RIP {rip:#x} after the HLT at {top_rip:#x}, want 0 (wrapped)")
    })?;
    // The guest runs on from 0.
    expect(&v, out1(0x77, 0x42), "the code at 0 after the wrap")?;
    expect(&v, Exit::Hlt, "the HLT at 4")?;
    // A 2-byte OUT ending at the top: completed by the next run, RIP wraps to 0 again.
    top.write(0xffe, &[0xe6, 0x78]); // out 0x78, al
    let mut regs = v.regs().map_err(err)?;
    regs.rip = top_rip - 1;
    regs.rax = 0x99;
    v.set_regs(&regs).map_err(err)?;
    expect(&v, out1(0x78, 0x99), "OUT at the top")?;
    let e = run(&v)?;
    check(e == out1(0x77, 0x42), || {
        format!("after the OUT at the top: exit {e:?}, want the OUT of the code at 0")
    })?;
    expect(&v, Exit::Hlt, "the HLT at 4, second time")?;
    let rip = v.regs().map_err(err)?.rip;
    check(rip == AT_ZERO.len() as u64, || {
        format!("RIP {rip:#x} at the end")
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// 2. The host's GDTR limit after guests ran.
// ---------------------------------------------------------------------------------

/// LSL from user mode: the segment limit of `sel`, or `None` when the CPU refuses the
/// selector (ZF = 0: beyond the GDT's limit, null, wrong type or privilege).
fn lsl(sel: u16) -> Option<u32> {
    let ok: u8;
    let limit: u32;
    // SAFETY: LSL and SETZ only write the named registers and the flags; `out` (not
    // `lateout`) keeps `limit` out of `sel`'s register.
    unsafe {
        core::arch::asm!(
            "xor {lim:e}, {lim:e}",
            "lsl {lim:e}, {sel:e}",
            "setz {ok}",
            sel = in(reg) u32::from(sel),
            lim = out(reg) limit,
            ok = out(reg_byte) ok,
            options(nomem, nostack),
        );
    }
    (ok != 0).then_some(limit)
}

/// SGDT from user mode: the GDTR limit (callers check that UMIP is off).
fn sgdt_limit() -> u16 {
    let mut d = [0u8; 10];
    // SAFETY: SGDT stores 10 bytes at the pointer, our buffer.
    unsafe { core::arch::asm!("sgdt [{}]", in(reg) d.as_mut_ptr(), options(nostack)) };
    u16::from_le_bytes([d[0], d[1]])
}

fn user_cs() -> u16 {
    let cs: u16;
    // SAFETY: reads CS.
    unsafe { core::arch::asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack)) };
    cs
}

/// Whether the kernel turned UMIP on (then SGDT in user mode faults or is emulated).
fn umip_on() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == "umip"))
    })
}

/// A VM exit sets the host's GDTR limit to 0xFFFF (SDM 28.5.2); the hypervisor must put
/// the real one back before the CPU returns to user mode. Otherwise LSL (or any
/// selector load) of a selector beyond Linux's one-page GDT reads past the GDT: the
/// host oopses on an unmapped page, or user mode sees a descriptor that is not there.
/// Per online CPU (a child process pinned there): a guest's exits, then LSL of far
/// selectors must fail (ZF = 0) while LSL of our own CS works, and SGDT (when UMIP is
/// off) gives the limit it gave before the guest ran, inside one page.
pub fn lsl_far_selector_after_guest(_: &Ctx) -> Outcome {
    let umip = umip_on();
    if umip {
        ktap::diag("UMIP is on: SGDT not checked, LSL only");
    }
    let cpus = sys::online_cpus();
    let mut failed = Vec::new();
    for cpu in 0..cpus {
        let pid = sys::fork_child(move || lsl_on_cpu(cpu, umip))?;
        if !sys::wait_ok(pid) {
            failed.push(cpu);
        }
    }
    check(failed.is_empty(), || {
        format!("failed on CPU(s) {failed:?} (the child's reason is above)")
    })?;
    ktap::diag(&format!("{cpus} CPU(s): LSL and SGDT as before the guests"));
    Ok(())
}

fn lsl_on_cpu(cpu: u32, umip: bool) -> Outcome {
    sys::pin_to_cpu(cpu)?;
    let before = (!umip).then(sgdt_limit);
    let cs = user_cs();
    check(lsl(cs).is_some(), || {
        format!("cpu {cpu}: LSL of our own CS {cs:#x} failed before any guest")
    })?;
    // Selectors past any one-page GDT (Linux's GDT is one page), RPL 3.
    let mut far: Vec<u16> = vec![
        0x1003, 0x2ffb, 0x4003, 0x7003, 0x7ffb, 0x8003, 0xc003, 0xfff3, 0xfffb,
    ];
    if let Some(limit) = before {
        check(limit < 0x1000, || {
            format!(
                "cpu {cpu}: GDTR limit {limit:#x} before this test's guest: \
                 more than Linux's one-page GDT (left by an earlier guest?)"
            )
        })?;
        // The first selector whose descriptor does not fit under the limit.
        far.push((((u32::from(limit) + 8) / 8 * 8) | 3) as u16);
    }
    for sel in &far {
        check(lsl(*sel).is_none(), || {
            format!("cpu {cpu}: LSL of {sel:#x} succeeded before any guest")
        })?;
    }
    let mut m = Machine::new(EntryMode::Protected, RAM)?;
    // out 0xf4, al; hlt; jmp back to the OUT
    m.mem.write(CODE, &[0xe6, 0xf4, 0xf4, 0xeb, 0xfb])?;
    let v = new_vcpu(&m.vm, 0, &m.regs, &m.sregs)?;
    for round in 0..3 {
        let mut r = v.regs().map_err(err)?;
        r.rip = CODE;
        r.rax = round;
        v.set_regs(&r).map_err(err)?;
        expect(&v, out1(0xf4, round as u32), "OUT")?;
        expect(&v, Exit::Hlt, "HLT")?;
        // SAFETY: no preconditions.
        let now = unsafe { libc::sched_getcpu() };
        check(now == cpu as i32, || {
            format!("pinned to cpu {cpu} but running on {now}")
        })?;
        for sel in &far {
            if let Some(l) = lsl(*sel) {
                return Err(format!(
                    "cpu {cpu}, round {round}: LSL of {sel:#x} after the guest's exits \
                     succeeded (limit {l:#x}): the GDTR limit was not restored"
                ));
            }
        }
        check(lsl(cs).is_some(), || {
            format!("cpu {cpu}: LSL of our own CS {cs:#x} failed after the guest")
        })?;
        if let Some(b) = before {
            let after = sgdt_limit();
            check(after == b, || {
                format!(
                    "cpu {cpu}, round {round}: GDTR limit {after:#x} after the guest's \
                     exits, {b:#x} before"
                )
            })?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// 3. SYSCALL before the guest wrote LSTAR.
// ---------------------------------------------------------------------------------

/// A new vCPU's STAR, LSTAR, CSTAR and FMASK are 0 (as after a CPU reset, and as KVM
/// gives a new vCPU), never the host's (a kernel address that would leak the host's
/// layout and send the guest into a page it does not have). A 64-bit guest with
/// EFER.SCE that executes SYSCALL without writing LSTAR lands at 0 with RCX = the next
/// instruction's address and R11 = RFLAGS, CS = STAR[47:32] & ~3 = 0 and SS = 8. Also:
/// another VM's vCPU with its own LSTAR, run on the same thread, does not leak it into
/// a new vCPU, and keeps its own.
pub fn guest_syscall_before_lstar(_: &Ctx) -> Outcome {
    let syscall_msrs = [MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK];
    let zero_msrs = |v: &Vcpu, what: &str| -> Outcome {
        let got = v.get_msrs(&syscall_msrs).map_err(err)?;
        check(got.len() == 4, || {
            format!(
                "{what}: only {} of STAR/LSTAR/CSTAR/FMASK readable",
                got.len()
            )
        })?;
        check(got.iter().all(|&x| x == 0), || {
            format!("{what}: STAR/LSTAR/CSTAR/FMASK are {got:#x?}, want all 0")
        })
    };
    let machine = |at_zero: u8| -> Result<Machine, String> {
        let mut m = Machine::new(EntryMode::Long, RAM)?;
        m.sregs.efer |= 1; // SCE
        m.mem.write(CODE, &[0x0f, 0x05, 0xf4])?; // syscall; hlt
        m.mem.write(0, &[0xb0, at_zero, 0xe6, 0x77, 0xf4])?; // mov al, N; out 0x77, al; hlt
        m.mem.write(0x8000, &[0xb0, 0x33, 0xe6, 0x77, 0xf4])?; // mov al, 0x33; ...
        Ok(m)
    };
    let a = machine(0x5a)?;
    let v0 = new_vcpu(&a.vm, 0, &a.regs, &a.sregs)?;
    zero_msrs(&v0, "fresh vCPU")?;
    let e = run(&v0)?;
    check(e == out1(0x77, 0x5a), || {
        format!("SYSCALL with LSTAR never written: exit {e:?}, want the OUT of the code at 0")
    })?;
    let r = v0.regs().map_err(err)?;
    check(r.rcx == CODE + 2 && r.r11 == a.regs.rflags, || {
        format!(
            "after SYSCALL: RCX {:#x} (want {:#x}), R11 {:#x} (want {:#x})",
            r.rcx,
            CODE + 2,
            r.r11,
            a.regs.rflags
        )
    })?;
    let s = v0.sregs().map_err(err)?;
    check(
        s.cs.selector == 0 && s.ss.selector == 8 && s.cs.l == 1,
        || {
            format!(
                "after SYSCALL with STAR 0: CS {:#x} (L {}), SS {:#x}; want 0 (64-bit) and 8",
                s.cs.selector, s.cs.l, s.ss.selector
            )
        },
    )?;
    zero_msrs(&v0, "vCPU after its SYSCALL")?;
    // Another VM, same thread: its vCPU's LSTAR points at 0x8000.
    let b = machine(0x5b)?;
    let w0 = new_vcpu(&b.vm, 0, &b.regs, &b.sregs)?;
    check(
        w0.set_msrs(&[(MSR_LSTAR, 0x8000)]).map_err(err)? == 1,
        || "LSTAR not written".into(),
    )?;
    expect(&w0, out1(0x77, 0x33), "SYSCALL with LSTAR 0x8000")?;
    // A vCPU created after that, in the first VM: still 0, and SYSCALL goes to 0.
    let v1 = new_vcpu(&a.vm, 1, &a.regs, &a.sregs)?;
    zero_msrs(&v1, "vCPU created after another VM's LSTAR was loaded")?;
    expect(&v1, out1(0x77, 0x5a), "second vCPU's SYSCALL")?;
    // And the other VM's vCPU kept its own.
    let got = w0.get_msrs(&[MSR_LSTAR]).map_err(err)?;
    check(got == vec![0x8000], || {
        format!("the other vCPU's LSTAR {got:#x?}")
    })
}

// ---------------------------------------------------------------------------------
// 4. Memory slots deleted, moved and unmapped.
// ---------------------------------------------------------------------------------

/// `loop: mov eax, [rbx]; out 0x10, eax; mov eax, [rsi]; out 0x11, eax; jmp loop`
/// (the same bytes in 32-bit code, with EBX and ESI).
const READ_LOOP: [u8; 10] = [0x8b, 0x03, 0xe7, 0x10, 0x8b, 0x06, 0xe7, 0x11, 0xeb, 0xf6];

/// A guest reads two addresses, X (slot 1) and Y (nothing), in a loop and writes what
/// it read to ports 0x10 and 0x11. Slot 1 is deleted and its memory unmapped: the next
/// read of X must be an MMIO exit (never the old value, nor the freed page's); slot 1
/// recreated at Y with new memory: Y reads the new value, X is MMIO; slot 1 moved back
/// to X (same memory): X reads it, Y is MMIO. Catches shadow entries, cached MMIO
/// entries or a direct-map pointer that survive a memory-map change (and a use of the
/// unpinned page after munmap). With paging off and with 4-level paging.
pub fn memslot_delete_then_munmap(_: &Ctx) -> Outcome {
    memslot_case(EntryMode::Protected).map_err(|e| format!("paging off: {e}"))?;
    memslot_case(EntryMode::Long).map_err(|e| format!("4-level paging: {e}"))
}

fn memslot_case(mode: EntryMode) -> Outcome {
    const X: u64 = 0x40_0000;
    const Y: u64 = 0x60_0000;
    let (v1, v2) = (0x1111_a001u32, 0x2222_b002u32);
    // The backing of slot 1, first and second; declared before the VM, which they outlive
    // unless unmapped on purpose below.
    let mut page1 = Anon::new(4096)?;
    let mut page2 = Anon::new(4096)?;
    page1.write(0, &v1.to_le_bytes());
    page2.write(0, &v2.to_le_bytes());
    let mut m = Machine::new(mode, RAM)?;
    m.mem.write(CODE, &READ_LOOP)?;
    m.regs.rbx = X;
    m.regs.rsi = Y;
    // SAFETY: slot 1 is deleted below before `page1` is unmapped.
    unsafe { m.map(1, X, &page1, false) }?;
    let v = new_vcpu(&m.vm, 0, &m.regs, &m.sregs)?;
    // Warm up: X from slot 1, Y an MMIO read (cached by the module, maybe).
    for i in 0..3 {
        expect(&v, out4(0x10, v1), "X in slot 1")?;
        expect_mmio_read(&v, Y, 0x5100 + i, "Y, unmapped")?;
        expect(&v, out4(0x11, 0x5100 + i), "Y's MMIO value")?;
    }
    // Delete slot 1, then unmap its memory.
    m.delete(1)?;
    drop(page1);
    for i in 0..2u32 {
        let e = run(&v)?;
        check(
            matches!(
                e,
                Exit::Mmio {
                    addr: X,
                    len: 4,
                    is_write: false,
                    ..
                }
            ),
            || {
                format!(
                    "read of X after slot 1 was deleted and unmapped: exit {e:?}, \
                     want an MMIO read at {X:#x}"
                )
            },
        )?;
        v.set_mmio_data((0x6100 + i).into());
        expect(&v, out4(0x10, 0x6100 + i), "X's MMIO value")?;
        expect_mmio_read(&v, Y, 0x6200 + i, "Y, unmapped")?;
        expect(&v, out4(0x11, 0x6200 + i), "Y's MMIO value")?;
    }
    // Slot 1 again, at Y, with new memory.
    // SAFETY: slot 1 is deleted below before `page2` is unmapped.
    unsafe { m.map(1, Y, &page2, false) }?;
    for i in 0..2 {
        expect_mmio_read(&v, X, 0x7100 + i, "X after slot 1 moved to Y")?;
        expect(&v, out4(0x10, 0x7100 + i), "X's MMIO value")?;
        expect(&v, out4(0x11, v2), "Y, now slot 1 with new memory")?;
    }
    // Moved back to X, same memory.
    // SAFETY: as above.
    unsafe { m.map(1, X, &page2, false) }?;
    for i in 0..2 {
        expect(&v, out4(0x10, v2), "X, slot 1 moved back")?;
        expect_mmio_read(&v, Y, 0x8100 + i, "Y after slot 1 moved away")?;
        expect(&v, out4(0x11, 0x8100 + i), "Y's MMIO value")?;
    }
    m.delete(1)?;
    drop(page2);
    expect_mmio_read(&v, X, 0x9100, "X after the last delete and munmap")?;
    expect(&v, out4(0x10, 0x9100), "X's MMIO value")?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// 5. Read-only slots stay unwritten.
// ---------------------------------------------------------------------------------

/// A read-only slot (`RVMM_MEM_READONLY`, backed by memory this process made PROT_READ
/// after filling it) is never written: (a) a MOV to it is an MMIO write exit carrying
/// the data; (b) INSB and REP INSB into it leave it unchanged (the port reads happen,
/// the stores are MMIO writes); (c) a 4-level guest whose page tables live in it
/// runs, and the walker's accessed/dirty bits and a guest store to a page-table entry
/// do not write it. Catches shadow entries that map it writable, the string-I/O path
/// and the page walker writing through the kernel's mapping of the pinned pages.
pub fn readonly_slot_not_written(_: &Ctx) -> Outcome {
    readonly_mov_and_ins().map_err(|e| format!("MOV/INS: {e}"))?;
    readonly_page_tables().map_err(|e| format!("page tables in the slot: {e}"))
}

fn readonly_mov_and_ins() -> Outcome {
    const R: u64 = 0x20_0000;
    let code = [
        0xbb, 0x00, 0x00, 0x20, 0x00, // mov ebx, 0x200000
        0xc7, 0x03, 0x44, 0x33, 0x22, 0x11, // mov dword [ebx], 0x11223344
        0x8b, 0x03, // mov eax, [ebx]
        0xe7, 0x10, // out 0x10, eax
        0x8d, 0x7b, 0x08, // lea edi, [ebx+8]
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x6c, // insb
        0xb9, 0x04, 0x00, 0x00, 0x00, // mov ecx, 4
        0xf3, 0x6c, // rep insb
        0x8b, 0x43, 0x08, // mov eax, [ebx+8]
        0xe7, 0x11, // out 0x11, eax
        0x8b, 0x43, 0x0c, // mov eax, [ebx+12]
        0xe7, 0x12, // out 0x12, eax
        0xf4, // hlt
    ];
    let mut rom = Anon::new(4096)?;
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    rom.write(0, &pattern);
    rom.read_only()?;
    let mut m = Machine::new(EntryMode::Protected, RAM)?;
    m.mem.write(CODE, &code)?;
    // SAFETY: `rom` outlives the VM (declared before it).
    unsafe { m.map(1, R, &rom, true) }?;
    let dw = |off: usize| u32::from_le_bytes(pattern[off..off + 4].try_into().unwrap());
    let v = new_vcpu(&m.vm, 0, &m.regs, &m.sregs)?;
    let (mut store, mut outs, mut ins, mut ins_stores) = (None, Vec::new(), 0u32, Vec::new());
    for _ in 0..32 {
        match run(&v)? {
            Exit::Mmio {
                addr: R,
                len: 4,
                is_write: true,
                data,
            } if store.is_none() => store = Some(data),
            Exit::IoOut {
                port,
                size: 4,
                data,
            } => outs.push((port, data)),
            Exit::IoIn {
                port: 0x3f8,
                size: 1,
            } => {
                ins += 1;
                v.set_io_in(0xa0 + ins);
            }
            // The store of an INSB, as an MMIO write.
            Exit::Mmio {
                addr,
                len: 1,
                is_write: true,
                data,
            } if (R + 8..R + 13).contains(&addr) => ins_stores.push((addr, data)),
            Exit::Hlt => break,
            e => {
                return Err(format!(
                    "unexpected exit {e:?} (after {outs:x?}, {ins} INs)"
                ))
            }
        }
    }
    let now = rom.bytes();
    check(now == pattern, || {
        let first = now
            .iter()
            .zip(&pattern)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        format!(
            "the read-only slot changed: byte {first:#x} is {:#x}, was {:#x}",
            now[first], pattern[first]
        )
    })?;
    check(store == Some(0x1122_3344), || {
        format!("the MOV to the read-only slot gave {store:x?}, want an MMIO write of 0x11223344")
    })?;
    check(outs.first() == Some(&(0x10, dw(0))), || {
        format!(
            "the guest read {outs:x?} back after its store, want {:#x} (unchanged)",
            dw(0)
        )
    })?;
    for (i, &(addr, data)) in ins_stores.iter().enumerate() {
        check(addr == R + 8 + i as u64 && data == 0xa1 + i as u64, || {
            format!("INSB stores as MMIO writes: {ins_stores:x?}")
        })?;
    }
    check(ins == 5, || {
        format!("{ins} port reads for INSB + REP INSB x4")
    })?;
    check(
        outs == vec![(0x10, dw(0)), (0x11, dw(8)), (0x12, dw(12))],
        || {
            format!(
                "the guest read back {outs:x?}, want {:x?} (unchanged)",
                [(0x10, dw(0)), (0x11, dw(8)), (0x12, dw(12))]
            )
        },
    )?;
    let r = v.regs().map_err(err)?;
    check(r.rdi == R + 13 && r.rcx == 0, || {
        format!("after the INS: RDI {:#x} RCX {:#x}", r.rdi, r.rcx)
    })
}

fn readonly_page_tables() -> Outcome {
    // The tables: PML4 at R, PDPT at R + 0x1000, PD at R + 0x2000, a page table at
    // R + 0x3000 mapping the first 2 MiB with 4-KiB pages; PD[1] maps R's 2 MiB (to read
    // the tables). No accessed or dirty bit set: a walker would set them.
    const R: u64 = 0x20_0000;
    let code = [
        0xbb, 0x00, 0x00, 0x08, 0x00, // mov ebx, 0x80000
        0xc7, 0x03, 0x78, 0x56, 0x34, 0x12, // mov dword [rbx], 0x12345678 (dirty bit)
        0xbb, 0x00, 0x00, 0x09, 0x00, // mov ebx, 0x90000
        0x8b, 0x03, // mov eax, [rbx] (accessed bit)
        0xbb, 0x00, 0x00, 0x20, 0x00, // mov ebx, 0x200000
        0x8b, 0x03, // mov eax, [rbx] (PML4[0])
        0xe7, 0x10, // out 0x10, eax
        0xbb, 0xf8, 0x3f, 0x20, 0x00, // mov ebx, 0x203ff8
        0xc7, 0x03, 0x0d, 0xf0, 0xad, 0x0b, // mov dword [rbx], 0xbadf00d (PT[511])
        0xf4, // hlt
    ];
    let mut tables = Anon::new(0x4000)?;
    tables.put_u64(0, (R + 0x1000) | PW);
    tables.put_u64(0x1000, (R + 0x2000) | PW);
    tables.put_u64(0x2000, (R + 0x3000) | PW);
    tables.put_u64(0x2008, R | PW_LARGE);
    for i in 0..512u64 {
        tables.put_u64(0x3000 + 8 * i as usize, (i << 12) | PW);
    }
    let copy = tables.bytes();
    tables.read_only()?;
    let mut m = Machine::new(EntryMode::Long, RAM)?;
    m.mem.write(CODE, &code)?;
    // SAFETY: `tables` outlives the VM (declared before it).
    unsafe { m.map(1, R, &tables, true) }?;
    m.sregs.cr3 = R;
    let v = new_vcpu(&m.vm, 0, &m.regs, &m.sregs)?;
    let pml4e = u32::from_le_bytes(copy[0..4].try_into().unwrap());
    let e = run(&v)?;
    check(e == out4(0x10, pml4e), || {
        format!("exit {e:?}, want the guest's read of PML4[0] ({pml4e:#x}, no accessed bit)")
    })?;
    let e = run(&v)?;
    check(
        e == Exit::Mmio {
            addr: R + 0x3ff8,
            len: 4,
            is_write: true,
            data: 0x0bad_f00d,
        },
        || {
            format!(
                "the store to a page-table entry in the read-only slot: exit {e:?}, \
                 want an MMIO write"
            )
        },
    )?;
    expect(&v, Exit::Hlt, "HLT")?;
    let mut d = [0u8; 4];
    m.mem.read(0x8_0000, &mut d)?;
    check(u32::from_le_bytes(d) == 0x1234_5678, || {
        format!("the guest's store to RAM gave {d:x?}")
    })?;
    let now = tables.bytes();
    check(now == copy, || {
        let first = now.iter().zip(&copy).position(|(a, b)| a != b).unwrap_or(0) & !7;
        let q = |b: &[u8]| u64::from_le_bytes(b[first..first + 8].try_into().unwrap());
        format!(
            "the read-only page tables changed: entry at +{first:#x} is {:#x}, was {:#x}",
            q(&now),
            q(&copy)
        )
    })
}

// ---------------------------------------------------------------------------------
// 6. Pool resets while another vCPU is stopped.
// ---------------------------------------------------------------------------------

extern "C" fn on_sigusr1(_: i32) {}

/// B: `init: xor ecx,ecx; w: lea rax,[rsi+rcx]; mov [rbx+rcx*8],rax; inc ecx;
/// cmp ecx,512; jne w; out 0x20,al; xor ecx,ecx; c: lea rax,[rsi+rcx];
/// cmp [rbx+rcx*8],rax; jne bad; inc ecx; cmp ecx,512; jne c; add rsi,0x1000;
/// jmp init; bad: mov eax,ecx; out 0x21,eax; hlt`: writes key + i to its page's qwords,
/// exits (port 0x20), checks them, and again with the next key.
const B_CODE: [u8; 58] = [
    0x31, 0xc9, 0x48, 0x8d, 0x04, 0x0e, 0x48, 0x89, 0x04, 0xcb, 0xff, 0xc1, 0x81, 0xf9, 0x00, 0x02,
    0x00, 0x00, 0x75, 0xee, 0xe6, 0x20, 0x31, 0xc9, 0x48, 0x8d, 0x04, 0x0e, 0x48, 0x39, 0x04, 0xcb,
    0x75, 0x13, 0xff, 0xc1, 0x81, 0xf9, 0x00, 0x02, 0x00, 0x00, 0x75, 0xec, 0x48, 0x81, 0xc6, 0x00,
    0x10, 0x00, 0x00, 0xeb, 0xcb, 0x89, 0xc8, 0xe7, 0x21, 0xf4,
];

/// A: `start: mov edi,0x40000000; mov ecx,256; l: mov [rdi],ecx; add rdi,0x201000;
/// dec ecx; jnz l; out 0x30,al; jmp start`: one store through each of 256 page tables,
/// then an exit (port 0x30).
const A_CODE: [u8; 27] = [
    0xbf, 0x00, 0x00, 0x00, 0x40, 0xb9, 0x00, 0x01, 0x00, 0x00, 0x89, 0x0f, 0x48, 0x81, 0xc7, 0x00,
    0x10, 0x20, 0x00, 0xff, 0xc9, 0x75, 0xf3, 0xe6, 0x30, 0xeb, 0xe5,
];

// Layout of the pool test (8 MiB of RAM): A's code at CODE, B's code 0x20000, B's data
// 0x30000; B's tables 0x100000..0x104000, A's 0x110000..0x114000; A's 256 page tables
// 0x200000..0x300000; A's data pages 0x400000..0x500000.
const B_DATA: u64 = 0x3_0000;
const B_TABLES: u64 = 0x10_0000;
const A_TABLES: u64 = 0x11_0000;
const A_PTS: u64 = 0x20_0000;
const A_DATA: u64 = 0x40_0000;
/// Page tables A stores through per sweep.
const SWEEP: u64 = 256;
/// B's first key.
const KEY0: u64 = 0x5eed_0000_0000_0000;

/// Runs `v` until `n` OUTs to `port`, calling `beat` (the vCPU stopped) after each.
fn run_beats(v: &Vcpu, port: u16, n: u32, mut beat: impl FnMut() -> Outcome) -> Outcome {
    let mut got = 0;
    while got < n {
        match run(v)? {
            Exit::IoOut { port: p, .. } if p == port => {
                got += 1;
                beat()?;
            }
            Exit::IoOut {
                port: 0x21, data, ..
            } => return Err(format!("the guest read back a wrong qword at index {data}")),
            Exit::Interrupted => return Err("interrupted (watchdog: no progress)".into()),
            e => return Err(format!("unexpected exit {e:?}")),
        }
    }
    Ok(())
}

/// Two vCPUs of a VM with the smallest shadow pool (64 pages, 2 roots). B keeps a
/// pattern in its own page through its own 4-level tables and checks it, stopping in
/// userspace (an OUT) between writing and checking; A stores through 256 page tables per
/// sweep, which forces pool reclaims and resets. Rounds: B stopped while A sweeps, then
/// both at once. B must always read back what it wrote (it reports a mismatch on port
/// 0x21), the host must see B's and A's stores in the right guest pages, and a canary
/// buffer of this process must be unchanged. Catches a stopped vCPU re-entering with
/// a root or tables the reset freed (the guest then reads or writes freed pages: other
/// guests' or the host's memory).
pub fn two_vcpus_pool_reset_while_halted(_: &Ctx) -> Outcome {
    let canary_pattern = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut canary = Anon::new(1 << 20)?;
    for i in 0..(1 << 17) {
        canary.put_u64(8 * i, canary_pattern(i));
    }

    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    m.vm.set_shadow_limits(64, 2).map_err(err)?;
    m.mem.write(CODE, &A_CODE)?;
    m.mem.write(0x2_0000, &B_CODE)?;
    // B: PML4 -> PDPT -> PD -> a page table identity-mapping 0..2 MiB with 4-KiB pages.
    let mem = &mut m.mem;
    mem.write_u64(B_TABLES, (B_TABLES + 0x1000) | PW)?;
    mem.write_u64(B_TABLES + 0x1000, (B_TABLES + 0x2000) | PW)?;
    mem.write_u64(B_TABLES + 0x2000, (B_TABLES + 0x3000) | PW)?;
    for i in 0..512 {
        mem.write_u64(B_TABLES + 0x3000 + 8 * i, (i << 12) | PW)?;
    }
    // A: PML4 -> PDPT; PDPT[0] -> PD (2-MiB page at 0 for the code), PDPT[1] -> PD
    // whose entry k points at page table k, whose entry k maps data page k: linear
    // 0x40000000 + k * 0x201000 -> A_DATA + k * 0x1000.
    mem.write_u64(A_TABLES, (A_TABLES + 0x1000) | PW)?;
    mem.write_u64(A_TABLES + 0x1000, (A_TABLES + 0x2000) | PW)?;
    mem.write_u64(A_TABLES + 0x1008, (A_TABLES + 0x3000) | PW)?;
    mem.write_u64(A_TABLES + 0x2000, PW_LARGE)?;
    for k in 0..SWEEP {
        let pt = A_PTS + 0x1000 * k;
        mem.write_u64(A_TABLES + 0x3000 + 8 * k, pt | PW)?;
        mem.write_u64(pt + 8 * k, (A_DATA + 0x1000 * k) | PW)?;
    }
    let host = m.mem.host_addr();
    let (mut ra, mut sa) = (m.regs, m.sregs);
    sa.cr3 = A_TABLES;
    ra.rip = CODE;
    let (mut rb, mut sb) = (m.regs, m.sregs);
    sb.cr3 = B_TABLES;
    rb.rip = 0x2_0000;
    rb.rbx = B_DATA;
    rb.rsi = KEY0;
    let a = new_vcpu(&m.vm, 0, &ra, &sa)?;
    let b = new_vcpu(&m.vm, 1, &rb, &sb)?;

    // SAFETY: a no-op handler without SA_RESTART: a signal makes RVMM_RUN return EINTR.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut());
    }
    let threads = Mutex::new(Vec::<usize>::new());
    let rounds = std::thread::scope(|s| -> Outcome {
        let threads = &threads;
        let (a_go, a_rx) = mpsc::channel::<u32>();
        let (b_go, b_rx) = mpsc::channel::<u32>();
        let (a_tx, a_done) = mpsc::channel::<Outcome>();
        let (b_tx, b_done) = mpsc::channel::<Outcome>();
        let (a, b) = (&a, &b);
        s.spawn(move || {
            // SAFETY: no preconditions.
            let me = unsafe { libc::pthread_self() } as usize;
            threads.lock().unwrap().push(me);
            for n in a_rx {
                let r = run_beats(a, 0x30, n, || check_a_pages(host))
                    .map_err(|e| format!("vCPU A: {e}"));
                let stop = r.is_err();
                let _ = a_tx.send(r);
                if stop {
                    break;
                }
            }
        });
        s.spawn(move || {
            // SAFETY: no preconditions.
            let me = unsafe { libc::pthread_self() } as usize;
            threads.lock().unwrap().push(me);
            let mut key = KEY0;
            for n in b_rx {
                let r = run_beats(b, 0x20, n, || check_b_page(b, host, &mut key))
                    .map_err(|e| format!("vCPU B: {e}"));
                let stop = r.is_err();
                let _ = b_tx.send(r);
                if stop {
                    break;
                }
            }
        });
        let (done_tx, done_rx) = mpsc::channel::<()>();
        s.spawn(move || {
            if done_rx.recv_timeout(Duration::from_secs(300)).is_err() {
                signal_all(threads);
            }
        });
        let wait = |rx: &mpsc::Receiver<Outcome>| -> Outcome {
            rx.recv().map_err(|_| "a vCPU thread died".to_string())?
        };
        let result = (|| -> Outcome {
            for round in 0..8 {
                if round < 4 {
                    // B writes its pattern and stops; A sweeps twice; B checks next.
                    b_go.send(1).map_err(err)?;
                    wait(&b_done)?;
                    a_go.send(2).map_err(err)?;
                    wait(&a_done)?;
                } else {
                    // Both at once.
                    b_go.send(2).map_err(err)?;
                    a_go.send(2).map_err(err)?;
                    let (rb, ra) = (wait(&b_done), wait(&a_done));
                    rb?;
                    ra?;
                }
            }
            // B checks its last pattern after A's last sweeps.
            b_go.send(1).map_err(err)?;
            wait(&b_done)
        })();
        if result.is_err() {
            // A vCPU still in its guest gets out (EINTR).
            signal_all(threads);
        }
        let _ = done_tx.send(());
        result
    });
    let stats = m.vm.stats().map_err(err)?;
    ktap::diag(&format!(
        "pool: resets {}, reclaimed {}, zaps {}, peak {} pages; whole-shadow drops {}, \
         shadow faults {}",
        stats.pool_resets,
        stats.pool_reclaimed,
        stats.zaps,
        stats.pool_pages_peak,
        stats.shadow_resets,
        stats.shadow_faults
    ));
    rounds?;
    check(stats.pool_resets + stats.pool_reclaimed > 0, || {
        "no pool reset or reclaim: the test put no pressure on the pool".into()
    })?;
    let now = canary.bytes();
    for (i, q) in now.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(q.try_into().unwrap());
        check(got == canary_pattern(i), || {
            format!("the canary buffer changed at qword {i}: {got:#x}")
        })?;
    }
    Ok(())
}

/// Sends SIGUSR1 to the registered vCPU threads (their RVMM_RUN returns EINTR).
fn signal_all(threads: &Mutex<Vec<usize>>) {
    for &t in threads.lock().unwrap().iter() {
        // SAFETY: the vCPU threads are not joined before their scope ends, after this.
        unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
    }
}

/// The host's view of slot 0's memory at `off` (`host`: its address in this process).
fn guest_u64(host: u64, off: u64) -> u64 {
    // SAFETY: callers pass offsets inside slot 0's memory, mapped for the whole test;
    // the vCPU that writes there is stopped.
    unsafe { ((host + off) as *const u64).read_volatile() }
}

/// At B's stop (port 0x20): B's page holds `key + i` in qword `i`, B's key is the one
/// after the last stop's (B checked its previous pattern before moving on).
fn check_b_page(b: &Vcpu, host: u64, next_key: &mut u64) -> Outcome {
    let key = b.regs().map_err(err)?.rsi;
    check(key == *next_key, || {
        format!("B stopped with key {key:#x}, want {next_key:#x}")
    })?;
    for i in 0..512 {
        let got = guest_u64(host, B_DATA + 8 * i);
        check(got == key + i, || {
            format!(
                "B's page, qword {i}: the host sees {got:#x}, B wrote {:#x}",
                key + i
            )
        })?;
    }
    *next_key += 0x1000;
    Ok(())
}

/// At A's stop (port 0x30): A's data page k holds what A stored through page table k.
fn check_a_pages(host: u64) -> Outcome {
    for k in 0..SWEEP {
        let got = guest_u64(host, A_DATA + 0x1000 * k) as u32;
        check(got == (SWEEP - k) as u32, || {
            format!(
                "A's data page {k}: the host sees {got:#x}, A stored {:#x}",
                SWEEP - k
            )
        })?;
    }
    Ok(())
}

/// Runs `v` on a thread of its own until `stop` returns, then interrupts it with
/// SIGUSR1 (RVMM_RUN returns EINTR); returns `stop`'s result and the run's.
fn run_until<T>(v: &Vcpu, stop: impl FnOnce() -> T) -> Result<(T, Result<Exit, String>), String> {
    // SAFETY: a no-op handler without SA_RESTART: a signal makes RVMM_RUN return EINTR.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut());
    }
    std::thread::scope(|s| {
        let (tid_tx, tid_rx) = mpsc::channel::<usize>();
        let h = s.spawn(move || {
            // SAFETY: no preconditions.
            let _ = tid_tx.send(unsafe { libc::pthread_self() } as usize);
            run(v)
        });
        let tid = tid_rx.recv().map_err(err)?;
        let t = stop();
        // The run may have ended on its own; signal until the thread is done.
        while !h.is_finished() {
            // SAFETY: `tid` is the scoped thread, alive until joined below.
            unsafe { libc::pthread_kill(tid as libc::pthread_t, libc::SIGUSR1) };
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = h.join().map_err(|_| "vCPU thread panicked".to_string())?;
        Ok((t, r))
    })
}

/// RVMM_GET_STATS while a vCPU runs a guest that never exits to userspace (`jmp $`):
/// the counters must come back at once, not when the vCPU returns (the vCPU holds its
/// own lock while it runs).
pub fn stats_while_vcpu_runs(_: &Ctx) -> Outcome {
    let mut m = Machine::new(EntryMode::Protected, RAM)?;
    m.mem.write(CODE, &[0xeb, 0xfe])?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    let (took, r) = run_until(&v, || {
        std::thread::sleep(Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        let s = m.vm.stats();
        (t0.elapsed(), s.map(|s| s.exits.iter().sum::<u64>()))
    })?;
    check(r == Ok(Exit::Interrupted), || {
        format!("the spinning guest's run: {r:?}, want EINTR")
    })?;
    let (elapsed, exits) = took;
    exits.map_err(|e| format!("RVMM_GET_STATS: {e}"))?;
    ktap::diag(&format!(
        "RVMM_GET_STATS took {elapsed:?} while the vCPU ran"
    ));
    check(elapsed < Duration::from_millis(500), || {
        format!("RVMM_GET_STATS waited {elapsed:?} for the running vCPU")
    })
}

/// A guest that arms its local APIC timer as fast as the architecture allows (periodic,
/// divide by 1, count 1) and then spins with interrupts off (`cli; jmp $`): every
/// expiry is a VM exit. Whatever the guest does, one interrupts-off run section of the
/// host must stay short: the longest, as RVMM_GET_STATS reports it, below 1 ms.
pub fn apic_timer_storm_bounded_section(_: &Ctx) -> Outcome {
    let mut m = Machine::new(EntryMode::Protected, RAM)?;
    m.vm.create_irqchip().map_err(err)?;
    #[rustfmt::skip]
    let code = [
        0xc7, 0x05, 0xf0, 0x00, 0xe0, 0xfe, 0xff, 0x01, 0x00, 0x00, // mov dword [SVR], 0x1ff
        0xc7, 0x05, 0xe0, 0x03, 0xe0, 0xfe, 0x0b, 0x00, 0x00, 0x00, // mov dword [TDCR], 0xb (/1)
        0xc7, 0x05, 0x20, 0x03, 0xe0, 0xfe, 0x20, 0x00, 0x02, 0x00, // mov dword [LVTT], periodic, 0x20
        0xc7, 0x05, 0x80, 0x03, 0xe0, 0xfe, 0x01, 0x00, 0x00, 0x00, // mov dword [TMICT], 1
        0xfa,                                                       // cli
        0xeb, 0xfe,                                                 // jmp $
    ];
    m.mem.write(CODE, &code)?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    let ((), r) = run_until(&v, || std::thread::sleep(Duration::from_millis(1500)))?;
    check(r == Ok(Exit::Interrupted), || {
        format!("the guest's run: {r:?}, want EINTR after the signal")
    })?;
    let s = m.vm.stats().map_err(err)?;
    ktap::diag(&format!(
        "timer interrupts {}, exits {}, longest interrupts-off section {} us",
        s.apic_timer_irqs,
        s.exits.iter().sum::<u64>(),
        s.longest_section_ns / 1000
    ));
    check(s.apic_timer_irqs > 10, || {
        format!("the APIC timer fired {} times: no storm", s.apic_timer_irqs)
    })?;
    check(
        s.longest_section_ns > 0 && s.longest_section_ns < 1_000_000,
        || {
            format!(
                "longest interrupts-off section {} ns (must be below 1 ms)",
                s.longest_section_ns
            )
        },
    )
}

/// Pinned guest memory counts against RLIMIT_MEMLOCK for a process without
/// CAP_IPC_LOCK: a region over the limit is refused with ENOMEM, one within it works,
/// and a forked process of the same user shares the count. (In a child that gives up
/// root after opening /dev/rvmm.)
pub fn memlock_limit_enomem(_: &Ctx) -> Outcome {
    let vm = Rvmm::open(crate::DEV)
        .and_then(Rvmm::create_vm)
        .map_err(err)?;
    let big = Anon::new(1 << 20)?;
    let small = Anon::new(32 << 10)?;
    // SAFETY: fork in a test process; the child only makes syscalls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid == 0 {
        let code = (|| -> i32 {
            let lim = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: 64 << 10,
            };
            // SAFETY: plain syscalls on this process.
            unsafe {
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0
                    || libc::setresgid(65534, 65534, 65534) != 0
                    || libc::setresuid(65534, 65534, 65534) != 0
                {
                    return 10;
                }
            }
            // SAFETY: `big` stays mapped; the region is refused or deleted below.
            match unsafe { vm.set_memory_region(1, 0x100_0000, big.len as u64, big.addr(), false) }
            {
                Err(rvmm::Error::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::ENOMEM) => {}
                Err(_) => return 11,
                Ok(()) => return 12,
            }
            // SAFETY: as above, for `small`.
            if unsafe { vm.set_memory_region(2, 0x200_0000, small.len as u64, small.addr(), false) }
                .is_err()
            {
                return 13;
            }
            // A forked process (whose mm's count starts at 0) of the same user: the
            // 32 KiB pinned above count too, so another 48 KiB go over the limit.
            // SAFETY: fork in the child; the grandchild only makes syscalls and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: as above; the first 48 KiB of `big`.
                let r = unsafe { vm.set_memory_region(3, 0x300_0000, 48 << 10, big.addr(), false) };
                let code = match r {
                    Err(rvmm::Error::Ioctl { source, .. })
                        if source.raw_os_error() == Some(libc::ENOMEM) =>
                    {
                        0
                    }
                    Err(_) => 1,
                    Ok(()) => 2,
                };
                // SAFETY: the grandchild ends here.
                unsafe { libc::_exit(code) };
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            if pid < 0 || unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
                return 14;
            }
            match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
                (true, 0) => {}
                (true, 2) => return 15,
                _ => return 16,
            }
            0
        })();
        // SAFETY: the child ends here, without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    check(code == 0, || {
        format!(
            "child (RLIMIT_MEMLOCK 64 KiB, no CAP_IPC_LOCK): {}",
            match code {
                10 => "could not drop root",
                11 => "a 1-MiB region failed with another errno than ENOMEM",
                12 => "a 1-MiB region was pinned over the limit",
                13 => "a 32-KiB region within the limit was refused",
                14 => "fork failed",
                15 => "a forked process pinned 48 KiB more (the limit is per mm, not per user)",
                16 => "the forked process's 48-KiB region failed with another errno than ENOMEM",
                _ => "died",
            }
        )
    })
}

/// Sixteen full page tables out of sync under the root at once: the guest maps 32 MiB
/// through 16 page tables (every entry accessed, so faults prefetch whole tables),
/// touches all of it, writes one entry of each table (all 16 go out of sync) and loads
/// CR3 again: a flush whose sync covers 8192 shadow entries. Done in one exit, that
/// sync alone held the CPU for about 9 ms of guest time in Bochs; in steps (the guest
/// runs MOV CR3 again until it is done) the longest interrupts-off section stays below
/// 1 ms, and the guest sees every table in sync.
pub fn unsync_storm_bounded_section(_: &Ctx) -> Outcome {
    const UPDPT: u64 = 0x10_0000;
    const UPD: u64 = 0x10_1000;
    const UPT: u64 = 0x10_2000;
    const TABLES: u64 = 16;
    const DATA: u64 = 0x20_0000;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    let mem = &mut m.mem;
    mem.write_u64(rvmm::guest::PML4 + 8, UPDPT | PW)?;
    mem.write_u64(UPDPT, UPD | PW)?;
    for t in 0..TABLES {
        mem.write_u64(UPD + 8 * t, (UPT + 0x1000 * t) | PW)?;
        for i in 0..512u64 {
            // Accessed (0x20): the pool prefetches it with its neighbours.
            mem.write_u64(
                UPT + 0x1000 * t + 8 * i,
                (DATA + 0x1000 * (i % 64)) | PW | 0x20,
            )?;
        }
    }
    #[rustfmt::skip]
    let code = [
        0x41, 0xbc, 0x02, 0x00, 0x00, 0x00,       // mov r12d, 2
        0x48, 0xbe, 0, 0, 0, 0, 0x80, 0, 0, 0,    // round: mov rsi, 1 << 39
        0xb9, 0x00, 0x04, 0x00, 0x00,             // mov ecx, 1024
        0x48, 0x8b, 0x06,                         // l: mov rax, [rsi]
        0x48, 0x81, 0xc6, 0x00, 0x80, 0x00, 0x00, // add rsi, 0x8000
        0xff, 0xc9,                               // dec ecx
        0x75, 0xf2,                               // jnz l
        0x48, 0xc7, 0xc7, 0x00, 0x20, 0x10, 0x00, // mov rdi, UPT
        0xb9, 0x10, 0x00, 0x00, 0x00,             // mov ecx, 16
        0x48, 0x8b, 0x07,                         // w: mov rax, [rdi]
        0x48, 0x89, 0x07,                         // mov [rdi], rax (the table unsyncs)
        0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
        0xff, 0xc9,                               // dec ecx
        0x75, 0xef,                               // jnz w
        0x0f, 0x20, 0xd8,                         // mov rax, cr3
        0x0f, 0x22, 0xd8,                         // mov cr3, rax (a flush: sync all 16)
        0x41, 0xff, 0xcc,                         // dec r12d
        0x75, 0xbb,                               // jnz round
        0xe6, 0x10,                               // out 0x10, al
        0xf4,                                     // hlt
    ];
    m.mem.write(CODE, &code)?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    let e = run(&v)?;
    check(matches!(e, Exit::IoOut { port: 0x10, .. }), || {
        format!("the unsync-storm guest ended with {e:?}, want its OUT to port 0x10")
    })?;
    let s = m.vm.stats().map_err(err)?;
    ktap::diag(&format!(
        "unsync storm: unsyncs {}, resyncs {}, prefetched {}, longest interrupts-off section {} us; \
         CR3 syncs {}, shadows looked at {}, entries resynced {} ({} changed)",
        s.unsyncs,
        s.resyncs,
        s.prefetched,
        s.longest_section_ns / 1000,
        s.sync_cr3,
        s.sync_scanned,
        s.resync_entries,
        s.resync_changed
    ));
    check(s.resyncs >= TABLES, || {
        format!(
            "{} resyncs: the {TABLES} tables were not all out of sync at the CR3 load",
            s.resyncs
        )
    })?;
    // The sync counters: two rounds of CR3 loads, each sync (in steps) looking at the
    // tables out of sync; every resynced table had present entries (the reads faulted
    // them in), and the guest wrote back what it read: few of them change.
    check(
        s.sync_cr3 >= 2
            && s.sync_scanned >= 2 * TABLES
            && s.resync_entries >= 64 * s.resyncs
            && s.resync_changed * 2 < s.resync_entries
            && s.sync_invlpg == 0,
        || {
            format!(
                "sync counters: CR3 syncs {} (want >= 2), shadows looked at {} (want >= {}), \
                 entries resynced {} (want >= 64 per resync, {}), changed {} (want under half), \
                 INVLPG syncs {} (want 0)",
                s.sync_cr3,
                s.sync_scanned,
                2 * TABLES,
                s.resync_entries,
                s.resyncs,
                s.resync_changed,
                s.sync_invlpg
            )
        },
    )?;
    check(s.longest_section_ns < 1_000_000, || {
        format!(
            "longest interrupts-off section {} ns (must be below 1 ms)",
            s.longest_section_ns
        )
    })
}

/// The memory cgroup the memcg test creates (cgroup v2, mounted by the test if needed).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_TEST: &str = "/sys/fs/cgroup/rvmm-memcg-test";
/// The test cgroup's memory.max: room for a few VMs (each one's pool metadata and first
/// pool pages alone take over 1 MiB).
const MEMCG_LIMIT: u64 = 16 << 20;
/// VMs the child tries at most: charged nowhere, they would take about 90 MiB of
/// Bochs's 256, over five times the limit.
const MEMCG_MAX_VMS: usize = 48;

fn cgroup_file(name: &str) -> Result<String, String> {
    let p = format!("{CGROUP_TEST}/{name}");
    std::fs::read_to_string(&p).map_err(|e| format!("read {p}: {e}"))
}

fn cgroup_write(path: &str, v: &str) -> Result<(), String> {
    std::fs::write(path, v).map_err(|e| format!("write '{v}' to {path}: {e}"))
}

fn cgroup_u64(name: &str) -> Result<u64, String> {
    let v = cgroup_file(name)?;
    v.trim()
        .parse()
        .map_err(|_| format!("{CGROUP_TEST}/{name}: '{}'", v.trim()))
}

/// A counter of memory.events ("oom_kill", "max", ...).
fn memcg_event(name: &str) -> Result<u64, String> {
    cgroup_file("memory.events")?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .ok_or_else(|| format!("no '{name}' in memory.events"))
}

/// The cgroup v2 hierarchy with the memory controller enabled for children.
fn memcg_setup() -> Result<(), String> {
    let controllers = format!("{CGROUP_ROOT}/cgroup.controllers");
    if !std::path::Path::new(&controllers).exists() {
        // SAFETY: mounts the cgroup2 filesystem on its usual directory of sysfs.
        let r = unsafe {
            libc::mount(
                c"cgroup2".as_ptr(),
                c"/sys/fs/cgroup".as_ptr(),
                c"cgroup2".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        check(r == 0, || {
            format!(
                "mount cgroup2 on {CGROUP_ROOT}: {}",
                sys::strerror(sys::errno())
            )
        })?;
    }
    let have = std::fs::read_to_string(&controllers).map_err(|e| format!("{controllers}: {e}"))?;
    check(have.split_whitespace().any(|c| c == "memory"), || {
        format!(
            "no memory controller in {controllers} ('{}'): a kernel without CONFIG_MEMCG",
            have.trim()
        )
    })?;
    cgroup_write(&format!("{CGROUP_ROOT}/cgroup.subtree_control"), "+memory")?;
    let _ = std::fs::remove_dir(CGROUP_TEST);
    std::fs::create_dir(CGROUP_TEST).map_err(|e| format!("mkdir {CGROUP_TEST}: {e}"))?;
    cgroup_write(
        &format!("{CGROUP_TEST}/memory.max"),
        &MEMCG_LIMIT.to_string(),
    )
}

/// Every allocation a VM causes is charged to its creator's memory cgroup, and reaching
/// the cgroup's limit is an ENOMEM for the creator, never an OOM kill: a child in a
/// cgroup with memory.max = 16 MiB creates VMs with one vCPU each until an ioctl fails.
/// It must fail with ENOMEM before MEMCG_MAX_VMS, the cgroup's usage must have grown by
/// at least the pool's first pages per VM, nothing in the cgroup may have been
/// OOM-killed, and closing the VMs must give the charge back.
pub fn memcg_limit_enomem(_: &Ctx) -> Outcome {
    memcg_setup()?;
    let r = memcg_run();
    let _ = std::fs::remove_dir(CGROUP_TEST);
    r
}

fn memcg_run() -> Outcome {
    let mut fds = [0i32; 2];
    // SAFETY: a pipe for the child's report.
    check(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, || {
        "pipe failed".into()
    })?;
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: fork in a test process; the child only makes syscalls, writes its report
    // and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err("fork failed".into());
    }
    if pid == 0 {
        // SAFETY: the child's end of the pipe.
        unsafe { libc::close(rd) };
        let report = memcg_child();
        let line = match report {
            Ok(s) => format!("ok {s}"),
            Err(e) => format!("err {e}"),
        };
        // SAFETY: writes the report to the pipe and leaves without running the
        // parent's destructors (the VMs close with the process).
        unsafe {
            libc::write(wr, line.as_ptr().cast(), line.len());
            libc::_exit(0);
        }
    }
    // SAFETY: the parent's end.
    unsafe { libc::close(wr) };
    let mut report = Vec::new();
    {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        // SAFETY: `rd` is ours and read to EOF once.
        let mut f = unsafe { std::fs::File::from_raw_fd(rd) };
        let _ = f.read_to_end(&mut report);
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let report = String::from_utf8_lossy(&report).into_owned();
    ktap::diag(&format!(
        "child in {CGROUP_TEST} (memory.max {MEMCG_LIMIT}): {report}"
    ));
    check(libc::WIFEXITED(status), || {
        format!(
            "the child was killed by signal {} (oom_kill events: {})",
            libc::WTERMSIG(status),
            memcg_event("oom_kill").unwrap_or(u64::MAX)
        )
    })?;
    let kills = memcg_event("oom_kill")?;
    check(kills == 0, || format!("{kills} OOM kills in the cgroup"))?;
    let Some(rest) = report.strip_prefix("ok ") else {
        return Err(report.strip_prefix("err ").unwrap_or(&report).to_string());
    };
    // The charge goes with the VMs (some slab pages may stay with the cgroup).
    let left = cgroup_u64("memory.current")?;
    ktap::diag(&format!("after the child exited: memory.current {left}"));
    check(left < MEMCG_LIMIT / 4, || {
        format!("{left} bytes still charged after every VM closed ({rest})")
    })
}

/// The child: moves itself into the test cgroup and creates VMs until an ioctl fails.
fn memcg_child() -> Result<String, String> {
    cgroup_write(
        &format!("{CGROUP_TEST}/cgroup.procs"),
        &std::process::id().to_string(),
    )?;
    let base = cgroup_u64("memory.current")?;
    let mut vms = 0usize;
    let failure = loop {
        if vms == MEMCG_MAX_VMS {
            break None;
        }
        let vm = match Rvmm::open(crate::DEV).and_then(Rvmm::create_vm) {
            Ok(vm) => Box::leak(Box::new(vm)),
            Err(e) => break Some(e),
        };
        match vm.create_vcpu(0) {
            Ok(v) => std::mem::forget(v),
            Err(e) => break Some(e),
        }
        vms += 1;
    };
    let peak = cgroup_u64("memory.peak").or_else(|_| cgroup_u64("memory.current"))?;
    let charged = peak.saturating_sub(base);
    let summary = format!("{vms} VMs, {charged} bytes charged");
    let Some(e) = failure else {
        return Err(format!(
            "{summary}: no ENOMEM under a {MEMCG_LIMIT}-byte limit (VMs not charged to the cgroup)"
        ));
    };
    let enomem = matches!(&e, rvmm::Error::Ioctl { source, .. } if source.raw_os_error() == Some(libc::ENOMEM));
    check(enomem, || format!("{summary}, then {e} (want ENOMEM)"))?;
    check(vms >= 1, || {
        format!("not even one VM within {MEMCG_LIMIT} bytes: {e}")
    })?;
    // Each VM holds its pool's first 64 pages at least.
    let want = vms as u64 * (64 << 12);
    check(charged >= want, || {
        format!("{summary}: under {want}, so the VMs' memory was not charged")
    })?;
    Ok(format!("{summary}, then {e}"))
}

/// The speculation barriers around VM entry and exit (VERW before entry, the return
/// stack buffer filled after exit) where the kernel's mitigations do not ask for them
/// (this host's kernel has none): forced on with the module parameter `spec_force`,
/// a guest making 1000 CPUID exits and an I/O exit must still run as without them.
pub fn speculation_barriers_forced(ctx: &Ctx) -> Outcome {
    ctx.unload_rvmm()?;
    sys::insmod_with(&ctx.ko("rvmm.ko"), c"spec_force=1")
        .map_err(|e| format!("insmod rvmm.ko spec_force=1: {e}"))?;
    let r = (|| -> Outcome {
        let line = kmsg_lines()
            .into_iter()
            .rev()
            .find(|l| l.contains("rvmm: speculation barriers:"))
            .ok_or("no 'speculation barriers' line from the module")?;
        ktap::diag(line.trim());
        check(
            line.contains("VERW before entry on")
                && line.contains("RSB after exit fill")
                && line.contains("branch history after exit cleared"),
            || format!("spec_force=1 did not turn the barriers on: {line}"),
        )?;
        let mut m = Machine::new(EntryMode::Protected, RAM)?;
        #[rustfmt::skip]
        let code = [
            0xbe, 0xe8, 0x03, 0x00, 0x00, // mov esi, 1000
            0x31, 0xc0,                   // l: xor eax, eax
            0x0f, 0xa2,                   // cpuid
            0x4e,                         // dec esi
            0x75, 0xf9,                   // jnz l
            0xb8, 0x34, 0x12, 0x00, 0x00, // mov eax, 0x1234
            0xe7, 0x10,                   // out 0x10, eax
            0xf4,                         // hlt
        ];
        m.mem.write(CODE, &code)?;
        let v = new_vcpu(
            &m.vm,
            0,
            &Regs {
                rip: CODE,
                ..m.regs
            },
            &m.sregs,
        )?;
        expect(&v, out4(0x10, 0x1234), "after 1000 CPUID exits")?;
        expect(&v, Exit::Hlt, "HLT")?;
        let s = m.vm.stats().map_err(err)?;
        check(s.exits[10] >= 1000, || {
            format!("{} CPUID exits, want 1000", s.exits[10])
        })
    })();
    ctx.unload_rvmm()?;
    ctx.load_rvmm()?;
    r
}

/// The kernel log so far (/dev/kmsg, without waiting for new lines).
fn kmsg_lines() -> Vec<String> {
    use std::io::Read;
    let mut out = Vec::new();
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return out;
    };
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(n) if n > 0 => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                // "prio,seq,time,flags;message"
                if let Some((_, msg)) = rec.split_once(';') {
                    out.push(msg.trim_end().to_string());
                }
            }
            Ok(_) => break,
            // EPIPE: records overwritten since; keep reading.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    out
}

/// Guest page tables with a large fan-in: 100 entries of a PML4 point at one PDPT, 100
/// of its entries at one PD, 100 of the PD's at one page table, so that 10^6 paths lead
/// up from that table. The guest touches all 100 paths, writes the table (its shadow
/// goes out of sync) and loads another CR3 (a flush: is the table under the new root?
/// is anything pinned above it?), 8 times. Each search up the parent links must cost
/// what the pool holds, not the number of paths: the longest interrupts-off section
/// stays below 1 ms.
pub fn fan_in_page_tables_bounded_section(_: &Ctx) -> Outcome {
    const FPML4: u64 = 0x10_0000;
    const FPDPT: u64 = 0x10_1000;
    const FPD: u64 = 0x10_2000;
    const FPT: u64 = 0x10_3000;
    const ADDRS: u64 = 0x10_4000;
    const DATA: u64 = 0x20_0000;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    let mem = &mut m.mem;
    // Entry 0: the identity map `setup` made (code, stack, these tables).
    mem.write_u64(FPML4, rvmm::guest::PDPT | PW)?;
    for k in 1..=100u64 {
        mem.write_u64(FPML4 + 8 * k, FPDPT | PW)?;
        mem.write_u64(FPDPT + 8 * k, FPD | PW)?;
        mem.write_u64(FPD + 8 * k, FPT | PW)?;
        mem.write_u64(ADDRS + 8 * (k - 1), (k << 39) | (k << 30) | (k << 21))?;
    }
    for i in 0..512u64 {
        mem.write_u64(FPT + 8 * i, (DATA + 0x1000 * (i % 64)) | PW)?;
    }
    #[rustfmt::skip]
    let code = [
        0x41, 0xbc, 0x08, 0x00, 0x00, 0x00,       // mov r12d, 8
        0x48, 0xc7, 0xc0, 0x00, 0x00, 0x10, 0x00, // round: mov rax, FPML4
        0x0f, 0x22, 0xd8,                         // mov cr3, rax
        0x48, 0xc7, 0xc6, 0x00, 0x40, 0x10, 0x00, // mov rsi, ADDRS
        0xb9, 0x64, 0x00, 0x00, 0x00,             // mov ecx, 100
        0x48, 0x8b, 0x06,                         // l: mov rax, [rsi]
        0x48, 0x8b, 0x18,                         // mov rbx, [rax]
        0x48, 0x83, 0xc6, 0x08,                   // add rsi, 8
        0xff, 0xc9,                               // dec ecx
        0x75, 0xf2,                               // jnz l
        0x48, 0xc7, 0xc0, 0x00, 0x30, 0x10, 0x00, // mov rax, FPT
        0x48, 0x8b, 0x50, 0x08,                   // mov rdx, [rax + 8]
        0x48, 0x89, 0x50, 0x08,                   // mov [rax + 8], rdx (the table unsyncs)
        0x48, 0xc7, 0xc0, 0x00, 0x10, 0x00, 0x00, // mov rax, PML4 (setup's)
        0x0f, 0x22, 0xd8,                         // mov cr3, rax (a flush: sync)
        0x41, 0xff, 0xcc,                         // dec r12d
        0x75, 0xbe,                               // jnz round
        0xe6, 0x10,                               // out 0x10, al
        0xf4,                                     // hlt
    ];
    m.mem.write(CODE, &code)?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    let e = run(&v)?;
    check(matches!(e, Exit::IoOut { port: 0x10, .. }), || {
        format!("the fan-in guest ended with {e:?}, want its OUT to port 0x10")
    })?;
    let s = m.vm.stats().map_err(err)?;
    ktap::diag(&format!(
        "fan-in: unsyncs {}, resyncs {}, root hits {}, longest interrupts-off section {} us",
        s.unsyncs,
        s.resyncs,
        s.root_hits,
        s.longest_section_ns / 1000
    ));
    // The table must have gone out of sync (what makes a CR3 load search above it);
    // how often depends on the pool's write handling (a flooded table is unshadowed).
    check(s.unsyncs >= 1, || {
        format!("{} unsyncs: the table never went out of sync", s.unsyncs)
    })?;
    check(s.longest_section_ns < 1_000_000, || {
        format!(
            "longest interrupts-off section {} ns (must be below 1 ms)",
            s.longest_section_ns
        )
    })
}
