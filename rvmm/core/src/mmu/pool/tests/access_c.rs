// SPDX-License-Identifier: GPL-2.0

//! kvm-unit-tests x86/access.c, main loop (`ac_test_run` with 4-level paging): one
//! virtual address, 0xffff9234_00000000, whose PML4E, PDPTE, PDE (4-KiB table or 2-MiB
//! page) and PTE are rewritten before every case by the kernel (through its identity
//! map), then INVLPG, then CR0.WP and EFER.NXE set for the case, then (`twice`) a
//! supervisor read, then the access. Flags are access.c's `AC_*` bits in its order.

use super::*;

/// An access, what the shadow gave, and what the reference gives.
pub type Outcome = (Access, Result<u64, u32>, Result<u64, u32>);

pub const PTE_W: u32 = 1 << 0;
pub const PTE_U: u32 = 1 << 1;
pub const PTE_A: u32 = 1 << 2;
pub const PTE_D: u32 = 1 << 3;
pub const PTE_NX: u32 = 1 << 4;
pub const PTE_P: u32 = 1 << 5;
pub const PTE_51: u32 = 1 << 6;
pub const PTE_36: u32 = 1 << 7;
pub const PDE_W: u32 = 1 << 8;
pub const PDE_U: u32 = 1 << 9;
pub const PDE_A: u32 = 1 << 10;
pub const PDE_D: u32 = 1 << 11;
pub const PDE_PSE: u32 = 1 << 12;
pub const PDE_NX: u32 = 1 << 13;
pub const PDE_P: u32 = 1 << 14;
pub const PDE_51: u32 = 1 << 15;
pub const PDE_36: u32 = 1 << 16;
pub const PDE_13: u32 = 1 << 17;
pub const PDPTE_NO_W: u32 = 1 << 18;
pub const PKU_AD: u32 = 1 << 19;
pub const PKU_WD: u32 = 1 << 20;
pub const PKU_PKEY: u32 = 1 << 21;
pub const ACC_USER: u32 = 1 << 22;
pub const ACC_WRITE: u32 = 1 << 23;
pub const ACC_FETCH: u32 = 1 << 24;
pub const ACC_TWICE: u32 = 1 << 25;
pub const EFER_NX: u32 = 1 << 26;
pub const CR0_WP: u32 = 1 << 27;
pub const SMEP: u32 = 1 << 28;
pub const PKE: u32 = 1 << 29;
pub const FEP: u32 = 1 << 30;
pub const NR: u32 = 31;
const NAMES: [&str; 31] = [
    "pte.rw", "pte.user", "pte.a", "pte.d", "pte.nx", "pte.p", "pte.51", "pte.36", "pde.rw",
    "pde.user", "pde.a", "pde.d", "pde.pse", "pde.nx", "pde.p", "pde.51", "pde.36", "pde.13",
    "pdpte.ro", "pkru.ad", "pkru.wd", "pkey=1", "user", "write", "fetch", "twice", "efer.nx",
    "cr0.wp", "cr4.smep", "cr4.pke", "fep",
];

pub fn show(flags: u32) -> std::string::String {
    let mut s = std::string::String::new();
    for (i, n) in NAMES.iter().enumerate() {
        if flags & (1 << i) != 0 {
            s.push_str(n);
            s.push(' ');
        }
    }
    s
}

/// access.c's `ac_test_legal` (SMEP is not tested in its main loop).
pub fn legal(f: u32) -> bool {
    let has = |m: u32| f & m != 0;
    if has(SMEP) || (has(ACC_FETCH) && has(ACC_WRITE)) {
        return false;
    }
    if !has(PKE) && (has(PKU_AD) || has(PKU_WD)) {
        return false;
    }
    if !has(PDE_PSE) && has(PDE_13) {
        return false;
    }
    let mut reserved = PDE_51 | PDE_36 | PDE_13 | PTE_51 | PTE_36;
    if !has(EFER_NX) {
        reserved |= PDE_NX | PTE_NX;
    }
    reserved &= f;
    reserved & reserved.wrapping_sub(1) == 0
}

/// The test's guest: identity map of the 2 MiB (4-KiB pages, or one 2-MiB page as
/// kvm-unit-tests' boot tables have), PDPT, PD and PT of the test address in
/// TABLES.., the test page at guest-physical 0 (a 2-MiB page there covers the
/// tables too, as access.c's covers its tables at 33 MiB).
pub struct Env {
    pub m: Machine,
    pub pdpt: u64,
    pub pd: u64,
    pub pt: u64,
    /// The module's fault-loop check (vcpu/exit/paging.rs, `pool_fault`): the last
    /// (gva, rip) of a `Mapped` fault and how many `Mapped` faults at it in a row.
    pub last: (u64, u64),
    pub repeat: u32,
    /// The longest such run, and the case that first passed 64 (the module's
    /// RVMM_INTERNAL_NO_SHADOW).
    pub longest: u32,
    pub tripped: Option<(u32, u64, u64)>,
    pub flags: u32,
}

/// Instruction addresses of access.c's accesses (`rip` of the module's check): the
/// store of `ac_test_setup_ptes`, the store of 0xc3, the `twice` read, the read,
/// the write; a fetch faults with RIP = the address fetched.
pub const RIP_SETUP: u64 = 1;
pub const RIP_DATA: u64 = 2;
pub const RIP_TWICE: u64 = 3;
pub const RIP_READ: u64 = 4;
pub const RIP_WRITE: u64 = 5;

pub const VA: u64 = 0xffff_9234_0000_0000;
pub const PHYS: u64 = 0;

impl Env {
    pub fn new(pages: usize, large_identity: bool) -> Self {
        let mut m = Machine::new(pages, 16);
        m.s.st.emulate_writes = true;
        if large_identity {
            // PD entry 0 of the identity map: 2 MiB at 0, supervisor, A and D set.
            m.g.mem[2 * 512] = P | RW | A | D | PS;
        }
        m.ctx.gbpages = false;
        m.ctx.maxphyaddr = 46;
        let cr3 = m.cr3;
        m.load_cr3(cr3);
        Self {
            m,
            pdpt: TABLES,
            pd: TABLES + 1,
            pt: TABLES + 2,
            last: (0, 0),
            repeat: 0,
            longest: 0,
            tripped: None,
            flags: 0,
        }
    }

    /// The module's bookkeeping for the `Mapped` faults an operation took (those
    /// that changed the shadow first, then the spurious ones).
    fn count(&mut self, gva: u64, rip: u64, (fixed_before, spurious_before): (u64, u64)) {
        let spurious = self.m.s.st.stats.spurious_faults - spurious_before;
        let n = self.m.s.st.stats.faults_fixed - fixed_before;
        for k in 0..n {
            if k >= n - spurious && (gva, rip) == self.last {
                self.repeat += 1;
                self.longest = self.longest.max(self.repeat);
                if self.repeat > 64 {
                    self.repeat = 0;
                    self.tripped.get_or_insert((self.flags, gva, rip));
                }
            } else {
                if std::env::var("ACCESS_C_TRACE").is_ok() {
                    std::eprintln!(
                        "run of {} at {:x?} ended by a Mapped fault at {:#x} rip {} in case {:#x} [{}]",
                        self.repeat + 1, self.last, gva, rip, self.flags, show(self.flags)
                    );
                }
                self.last = (gva, rip);
                self.repeat = 0;
            }
        }
    }

    fn idx(level: u32) -> u64 {
        (VA >> (12 + 9 * (level - 1))) & 511
    }

    fn set(&mut self, gpa: u64, v: u64) {
        if self.m.g.read_entry(gpa, 8) != Some(v) {
            let before = self.m.faults();
            self.m.write(gpa, v);
            self.count(gpa, RIP_SETUP, before);
        }
    }

    fn set_ctx(&mut self, wp: bool, nxe: bool) {
        if self.m.ctx.wp != wp || self.m.ctx.nxe != nxe {
            self.m.ctx.wp = wp;
            self.m.ctx.nxe = nxe;
            // The module: a global flush's sync, then the root for the new controls.
            self.m.flush_all();
            let cr3 = self.m.cr3;
            self.m.load_cr3(cr3);
        }
    }

    /// `ac_test_setup_ptes` + `ac_set_expected_status`'s INVLPG.
    pub fn setup(&mut self, f: u32) {
        let has = |m: u32| f & m != 0;
        let keep = |v: u64| v & (A | D);
        let pml4e_at = self.m.cr3 + 8 * Self::idx(4);
        let old = self.m.g.read_entry(pml4e_at, 8).unwrap();
        self.set(pml4e_at, (self.pdpt << 12) | keep(old) | P | RW | US);
        let pdpte_at = (self.pdpt << 12) + 8 * Self::idx(3);
        let old = self.m.g.read_entry(pdpte_at, 8).unwrap();
        let rw = if has(PDPTE_NO_W) { 0 } else { RW };
        self.set(pdpte_at, (self.pd << 12) | keep(old) | P | US | rw);
        let pde_at = (self.pd << 12) + 8 * Self::idx(2);
        let old = self.m.g.read_entry(pde_at, 8).unwrap();
        let mut pde = if has(PDE_PSE) {
            PHYS | PS
        } else {
            (self.pt << 12) | keep(old)
        };
        for (m, bit) in [
            (PDE_P, P),
            (PDE_W, RW),
            (PDE_U, US),
            (PDE_A, A),
            (PDE_D, D),
            (PDE_NX, XD),
            (PDE_51, 1 << 51),
            (PDE_36, 1 << 36),
            (PDE_13, 1 << 13),
        ] {
            if has(m) {
                pde |= bit;
            }
        }
        self.set(pde_at, pde);
        if !has(PDE_PSE) {
            let pte_at = (self.pt << 12) + 8 * Self::idx(1);
            let mut pte = PHYS;
            for (m, bit) in [
                (PTE_P, P),
                (PTE_W, RW),
                (PTE_U, US),
                (PTE_A, A),
                (PTE_D, D),
                (PTE_NX, XD),
                (PTE_51, 1 << 51),
                (PTE_36, 1 << 36),
            ] {
                if has(m) {
                    pte |= bit;
                }
            }
            self.set(pte_at, pte);
        }
        self.m.invlpg(VA);
    }

    /// `ac_test_do_access`: the results of the accesses, and the reference's.
    pub fn access(&mut self, f: u32) -> std::vec::Vec<Outcome> {
        let has = |m: u32| f & m != 0;
        // *(char *)at->phys = 0xc3, through the kernel's identity map.
        self.flags = f;
        let before = self.m.faults();
        self.m.write(PHYS, 0xc3);
        self.count(PHYS, RIP_DATA, before);
        self.set_ctx(has(CR0_WP), has(EFER_NX));
        let mut out = std::vec::Vec::new();
        let mut one = |env: &mut Self, acc: Access, rip: u64| {
            let reference = env.m.reference(VA, acc);
            let want = reference.clone().map(|(gpa, _)| gpa);
            let leaf_at = if has(PDE_PSE) {
                (env.pd << 12) + 8 * Self::idx(2)
            } else {
                (env.pt << 12) + 8 * Self::idx(1)
            };
            let leaf_before = env.m.g.read_entry(leaf_at, 8).unwrap();
            let before = env.m.faults();
            let (mut got, _) = env.m.access(VA, acc);
            env.count(VA, rip, before);
            // access.c's A/D checks: after an access, A in every entry used and D
            // in the leaf for a write; after a fault, the leaf as it was.
            let leaf = env.m.g.read_entry(leaf_at, 8).unwrap();
            match &reference {
                Ok((_, used)) => {
                    let ad = used
                        .iter()
                        .all(|&e| env.m.g.read_entry(e, 8).unwrap() & A != 0)
                        && (!acc.write || leaf & D != 0);
                    if !ad {
                        got = Err(0xad);
                    }
                }
                Err(_) if leaf != leaf_before => got = Err(0xad0),
                Err(_) => {}
            }
            out.push((acc, got, want));
        };
        if has(ACC_TWICE) {
            one(self, Access::default(), RIP_TWICE);
        }
        let rip = if has(ACC_FETCH) {
            VA
        } else if has(ACC_WRITE) {
            RIP_WRITE
        } else {
            RIP_READ
        };
        one(
            self,
            Access {
                write: has(ACC_WRITE),
                user: has(ACC_USER),
                fetch: has(ACC_FETCH),
            },
            rip,
        );
        out
    }
}

/// Runs access.c's main loop over flags `first..end`; returns the cases whose
/// results differ from the reference (flags, access, got, want).
pub fn run(
    env: &mut Env,
    invalid: u32,
    first: u32,
    end: u32,
) -> std::vec::Vec<std::string::String> {
    let mut bad = std::vec::Vec::new();
    let mut f = first;
    let mut done = 0u64;
    while f < end {
        if f & invalid == 0 && legal(f) {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                env.setup(f);
                env.access(f)
            }));
            match r {
                Ok(results) => {
                    for (acc, got, want) in results {
                        if got != want && bad.len() < 20 {
                            bad.push(std::format!(
                                "{}: {:?} got {:x?} want {:x?}",
                                show(f),
                                acc,
                                got,
                                want
                            ));
                        }
                    }
                }
                Err(e) => {
                    let msg = e
                        .downcast_ref::<std::string::String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).into()))
                        .unwrap_or_default();
                    panic!("case {:#x} [{}]: {}", f, show(f), msg);
                }
            }
            done += 1;
        }
        f = ((f | invalid) + 1) & !invalid;
    }
    std::eprintln!(
        "access.c: {done} cases, last {f:#x}, {} Mapped faults, longest run at one (gva, rip) {}, first past 64: {:x?}",
        env.m.s.st.stats.faults_fixed,
        env.longest,
        env.tripped.map(|(f, gva, rip)| (show(f), gva, rip))
    );
    bad
}

/// What access.c disables here: PKU (rvmm hides it), FEP, bit 36 (MAXPHYADDR 46).
pub const INVALID: u32 = PKU_AD | PKU_WD | PKU_PKEY | PKE | FEP | PTE_36 | PDE_36;

/// A fault on an address whose shadow already allows the access is fixed by writing
/// nothing: the pool counts it as spurious (what the module's fault-loop check counts).
#[test]
fn a_fault_that_changes_nothing_is_spurious() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()), (Ok(DATA << 12), false));
    assert_eq!(m.s.st.stats.spurious_faults, 0);
    let (root, cr3) = (m.root(), m.cr3);
    let ctx = m.ctx;
    let r = m.s.pool().page_fault(&mut m.g, root, cr3, gva, rd(), &ctx);
    assert_eq!(r, Ok(Fix::Mapped));
    assert_eq!(m.s.st.stats.spurious_faults, 1);
    // INVLPG after a PTE change drops or rewrites the entry: the next fault fills it.
    m.write((TABLES + 2) << 12, ((DATA + 1) << 12) | P | RW | US);
    m.invlpg(gva);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 1) << 12));
    assert_eq!(m.s.st.stats.spurious_faults, 1);
}

/// The start of access.c's main loop, up to its first 2-MiB cases (supervisor reads,
/// CR0.WP = 0, EFER.NXE = 0): each case rewrites the entries, INVLPGs the address (which
/// drops the large page's shadow leaf) and reads it again from the same instruction, so
/// every one of them takes a #PF exit at the same (gva, RIP) that the pool fixes. None
/// of that is a fault loop, and all of it must agree with the reference.
#[test]
fn access_c_first_large_pages_are_not_a_fault_loop() {
    for large_identity in [false, true] {
        let mut env = Env::new(512, large_identity);
        let bad = run(&mut env, INVALID, 0, 0x8000);
        assert!(bad.is_empty(), "{bad:#?}");
        assert_eq!(
            env.tripped
                .map(|(f, gva, rip)| std::format!("case [{}] gva {gva:#x} rip {rip}", show(f))),
            None,
            "the module's fault-loop check stops the guest (RVMM_INTERNAL_NO_SHADOW)"
        );
    }
}

#[test]
#[ignore = "long: the whole of access.c's main loop"]
fn access_c_main_loop_4k_identity() {
    let mut env = Env::new(512, false);
    let bad = run(&mut env, INVALID, 0, 1 << NR);
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(
        env.tripped, None,
        "the module's fault-loop check would stop the guest"
    );
}

#[test]
#[ignore = "long: the whole of access.c's main loop"]
fn access_c_main_loop_2m_identity() {
    let mut env = Env::new(512, true);
    let bad = run(&mut env, INVALID, 0, 1 << NR);
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(
        env.tripped, None,
        "the module's fault-loop check would stop the guest"
    );
}
