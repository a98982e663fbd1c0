// SPDX-License-Identifier: GPL-2.0

//! The pool under several vCPUs at once: a model of each vCPU's TLB (translations it
//! cached from the shadow, kept until its next VM exit or a remote flush makes it
//! leave guest mode, as a CPU without VPIDs does), guest stores that need no exit
//! because a TLB still holds a writable translation, and stores of another vCPU that
//! land in the middle of a pool operation. Every translation a vCPU uses is checked
//! against the SDM reference walkers: stale only where a real TLB may be (the tables
//! changed since that vCPU's last flush covering the address).

use super::*;
use crate::mmu::root_hints::RootHints;
use std::collections::BTreeMap;

/// Model vCPUs.
const CPUS: usize = 3;

/// A model vCPU.
#[derive(Clone)]
struct Cpu {
    cr3: u64,
    root: Option<SpId>,
    generation: u64,
    pdptes: [u64; 4],
    pinned: Option<SpId>,
    /// Its recent roots, for MOV CR3 without the pool lock (as the module's vCPU).
    hints: RootHints,
    /// Its TLB: (linear page, access kind) -> guest-physical page.
    tlb: BTreeMap<(u64, u8), u64>,
    /// When it last flushed everything (MOV CR3 that flushes, INVPCID), and each test
    /// address (INVLPG).
    last_flush: u64,
    invlpg_at: [u64; 192],
}

/// An access's kind as a TLB key: read, write, fetch; user ones apart.
fn kind(acc: Access) -> u8 {
    u8::from(acc.write) | (u8::from(acc.fetch) << 1) | (u8::from(acc.user) << 2)
}

/// Several vCPUs over one pool and one guest memory; the [`Machine`] runs the current
/// one (its CR3, root and PDPTE registers are swapped in).
struct Smp {
    m: Machine,
    cpus: Vec<Cpu>,
    cur: usize,
    /// Remote flushes seen so far.
    flushes: u64,
}

impl Smp {
    fn new(pages: usize, roots: usize, mode: u8, emulate: bool) -> Self {
        let mut m = Machine::with_mode(pages, roots, mode);
        m.s.st.emulate_writes = emulate;
        let cpu = Cpu {
            cr3: m.cr3,
            root: None,
            generation: u64::MAX,
            pdptes: m.pdptes,
            pinned: None,
            hints: RootHints::new(),
            tlb: BTreeMap::new(),
            last_flush: 0,
            invlpg_at: [0; 192],
        };
        let mut s = Self {
            cpus: vec![cpu; CPUS],
            cur: 0,
            flushes: m.s.tables.1,
            m,
        };
        s.cpus[0].root = s.m.root;
        s.cpus[0].pinned = s.m.pinned;
        s.cpus[0].generation = s.m.generation;
        for v in 1..CPUS {
            s.switch_to(v);
            let cr3 = s.m.cr3;
            s.m.load_cr3(cr3);
            s.after_op(true);
        }
        s
    }

    /// Runs vCPU `v` from now on.
    fn switch_to(&mut self, v: usize) {
        let c = &mut self.cpus[self.cur];
        (c.cr3, c.root, c.generation, c.pdptes, c.pinned) = (
            self.m.cr3,
            self.m.root,
            self.m.generation,
            self.m.pdptes,
            self.m.pinned,
        );
        let c = &self.cpus[v];
        (
            self.m.cr3,
            self.m.root,
            self.m.generation,
            self.m.pdptes,
            self.m.pinned,
        ) = (c.cr3, c.root, c.generation, c.pdptes, c.pinned);
        self.m.vcpu = v as u32;
        self.cur = v;
    }

    /// After a pool operation of the current vCPU (`exited`: it left guest mode, so its
    /// TLB is empty): the module's end of the operation, and a remote flush makes every
    /// vCPU leave guest mode.
    fn after_op(&mut self, exited: bool) {
        self.m.settle();
        if exited {
            self.cpus[self.cur].tlb.clear();
        }
        if self.m.s.tables.1 != self.flushes {
            self.flushes = self.m.s.tables.1;
            for c in self.cpus.iter_mut() {
                c.tlb.clear();
            }
        }
    }

    /// MOV CR3 as the module's vCPU runs it: to a root it holds a hint on without the
    /// pool lock when nothing needs doing, else through the pool (and remembered).
    fn load_cr3(&mut self, cr3: u64, flush: bool) {
        let ctx = self.m.ctx;
        let key = u64::from(ctx.wp)
            | u64::from(ctx.smep) << 1
            | u64::from(ctx.smap) << 2
            | u64::from(ctx.nxe) << 3;
        let gen = self.m.s.st.generation;
        let unsync = self.m.s.pool().unsync_count();
        let pae = self.m.mode == MODE_PAE;
        let c = &self.cpus[self.cur];
        if let Some((root, _)) = c.hints.fast_switch(cr3, key, gen, flush, unsync, pae) {
            self.m.cr3 = cr3;
            self.m.root = Some(root);
            self.m.generation = gen;
            return;
        }
        self.m.load_cr3_pcid(cr3, flush);
        let (cr3, root) = (self.m.cr3, self.m.root());
        let mut pool = self.m.s.pool();
        self.cpus[self.cur]
            .hints
            .remember(&mut pool, cr3, key, root, CPUS as u32);
    }

    /// What the shadow gives the current vCPU for `gva` now, as its TLB would cache it.
    fn cache(&mut self, gva: u64, acc: Access) {
        let root = self.m.root();
        let root_pa = self.m.s.pool().root_pa(root);
        let mode = self.m.mode;
        if let Ok(hpa) = hw(&mut self.m.s.tables, mode, root_pa, gva, acc, &self.m.ctx) {
            self.cpus[self.cur]
                .tlb
                .insert((gva & !0xfff, kind(acc)), (hpa - HOST_OFF) & !0xfff);
        }
    }

    /// An access by the current vCPU: from its TLB, else through the shadow (with the
    /// pool handling its exits). Returns the result and whether it came without a walk
    /// of the guest's tables (from the TLB or the shadow).
    fn access(&mut self, gva: u64, acc: Access) -> (Result<u64, u32>, bool) {
        if let Some(&page) = self.cpus[self.cur].tlb.get(&(gva & !0xfff, kind(acc))) {
            return (Ok(page | (gva & 0xfff)), true);
        }
        let (got, hit) = self.m.access(gva, acc);
        // MMIO is emulated: an exit, never cached.
        let mmio = matches!(got, Ok(g) if g >> 12 >= GPAGES);
        self.after_op(!hit || mmio);
        if got.is_ok() && !mmio {
            self.cache(gva, acc);
        }
        // An MMIO access resolved from the shadow's MMIO entry (no walk) is a TLB hit
        // as far as staleness goes, though it exits.
        (got, hit)
    }

    /// A store of `value` into the table entry at `gpa` by the current vCPU, through
    /// the kernel's identity map: without an exit if its TLB holds a writable
    /// translation of the page, else through the shadow.
    fn store(&mut self, gpa: u64, value: u64) {
        let acc = Access {
            write: true,
            ..Access::default()
        };
        let size = self.m.esize();
        if self.cpus[self.cur]
            .tlb
            .contains_key(&(gpa & !0xfff, kind(acc)))
        {
            self.m.g.write_entry(gpa, size, value);
            return;
        }
        self.m.write_value = Some(value);
        self.m.emulated = false;
        let (r, hit) = self.m.access(gpa, acc);
        self.m.write_value = None;
        assert_eq!(r, Ok(gpa), "kernel store to {gpa:#x}");
        if !self.m.emulated {
            self.m.g.write_entry(gpa, size, value);
        }
        self.after_op(!hit);
        self.cache(gpa, acc);
    }
}

/// What a model vCPU does in one step.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// An access to `gva` (test address number `slot`).
    Access {
        gva: u64,
        slot: usize,
        acc: Access,
    },
    /// A store into a table entry.
    Store {
        gpa: u64,
        value: u64,
    },
    /// A store into a table entry that lands during the next step (any vCPU's) if this
    /// vCPU's TLB lets it without an exit.
    Race {
        gpa: u64,
        value: u64,
    },
    Invlpg {
        gva: u64,
        slot: usize,
    },
    /// INVPCID of all contexts.
    Flush,
    /// MOV CR3 (with PCIDs, `flush` false keeps the TLB).
    Cr3 {
        cr3: u64,
        flush: bool,
    },
}

/// The random operations of the one-vCPU tests, as steps of vCPU `cpu`.
fn step(mode: u8) -> impl Strategy<Value = (usize, Act)> {
    (0..CPUS, op()).prop_map(move |(cpu, op)| {
        let entry = |frame: u64, root: bool, index: usize| {
            (frame << 12)
                + if mode == MODE_LONG4 || mode == MODE_PAE {
                    8
                } else {
                    4
                } * write_index(mode, root, index) as u64
        };
        let act = match op {
            Op::Access { va, kind, user } => Act::Access {
                gva: va_of(va, mode),
                slot: va,
                acc: Access {
                    write: kind == 1,
                    user,
                    fetch: kind == 2,
                },
            },
            // PAE PDPTEs are registers a vCPU loads: tables only.
            Op::Write {
                frame,
                index,
                value,
            } if mode == MODE_PAE && frame < TABLES => Act::Store {
                gpa: entry(TABLES + frame - ROOTS, false, index),
                value,
            },
            Op::Write {
                frame,
                index,
                value,
            } => Act::Store {
                gpa: entry(frame, frame < TABLES, index),
                value,
            },
            Op::Race {
                frame,
                index,
                value,
            } => Act::Race {
                gpa: entry(frame, false, index),
                value,
            },
            Op::Invlpg { va } => Act::Invlpg {
                gva: va_of(va, mode),
                slot: va,
            },
            Op::FlushAll | Op::Ctx { .. } | Op::Flip { .. } => Act::Flush,
            Op::Cr3 { root, flush } => Act::Cr3 {
                cr3: root << 12,
                flush: flush || mode != MODE_LONG4,
            },
        };
        (cpu, act)
    })
}

/// Steps around one page table that every vCPU uses (4-level paging, address space 0
/// of [`map_private`]): its four first entries and the page directory entry above it
/// rewritten, raced, flushed and used, so that stores meet syncs and new shadows.
fn race_step() -> impl Strategy<Value = (usize, Act)> {
    let pt = TABLES + 2;
    let pd = TABLES + 1;
    let target = prop_oneof![
        8 => (0u64..2).prop_map(move |i| (pt << 12) + 8 * i),
        1 => Just(pd << 12),
    ];
    let value = (0u64..6, any::<bool>(), any::<bool>()).prop_map(move |(d, dirty, alt)| match d {
        0 => 0,
        // The page directory entry: this page table or another.
        5 => (if alt { TABLES + 5 } else { pt } << 12) | P | RW | US | A,
        _ => ((DATA + d) << 12) | P | RW | US | A | if dirty { D } else { 0 },
    });
    let gva = |i: u64| (1u64 << 39) + 4096 * i;
    let act = prop_oneof![
        4 => (0u64..2, any::<bool>()).prop_map(move |(i, w)| Act::Access {
            gva: gva(i),
            slot: i as usize,
            acc: Access { write: w, user: true, fetch: false },
        }),
        3 => (target.clone(), value.clone()).prop_map(|(gpa, value)| Act::Store { gpa, value }),
        3 => (target, value).prop_map(|(gpa, value)| Act::Race { gpa, value }),
        1 => (0u64..2).prop_map(move |i| Act::Invlpg { gva: gva(i), slot: i as usize }),
        2 => Just(Act::Cr3 { cr3: ROOTS << 12, flush: true }),
        1 => Just(Act::Flush),
    ];
    // Two vCPUs: one stores while the other syncs or faults.
    (0..2usize, act)
}

fn run_smp(
    mode: u8,
    pages: usize,
    emulate: bool,
    steps: &[(usize, Act)],
) -> Result<(), TestCaseError> {
    let mut s = Smp::new(pages, 16, mode, emulate);
    if mode == MODE_LONG4 {
        // The race steps' address space: the same page table under every vCPU.
        map_private(&mut s.m, 0);
        let pt = TABLES + 2;
        for i in 1..4u64 {
            s.m.g.mem[(pt * 512 + i) as usize] = ((DATA + i) << 12) | P | RW | US;
        }
        s.m.g.mem[((TABLES + 5) * 512) as usize] = ((DATA + 7) << 12) | P | RW | US;
    }
    let mut seq = 1u64;
    let mut last_write = 0u64;
    // A racing store armed by the previous step: its writer.
    let mut racer: Option<usize> = None;
    for &(cpu, act) in steps {
        // Two steps per operation: the operation, then a racing store that may land
        // after anything it did.
        seq += 2;
        if racer == Some(cpu) {
            // A vCPU does not store in the middle of its own exit: before it.
            finish_race(&mut s, cpu);
            racer = None;
            last_write = seq - 1;
        }
        let raced_before = s.m.g.race.as_ref().is_some_and(|r| r.landed);
        s.switch_to(cpu);
        match act {
            Act::Access { gva, slot, acc } => {
                let want = s.m.reference(gva, acc).map(|(gpa, _)| gpa);
                let (got, hit) = s.access(gva, acc);
                let c = &s.cpus[cpu];
                let may_be_stale = last_write > c.last_flush && c.invlpg_at[slot] < last_write;
                let raced = !raced_before && s.m.g.race.as_ref().is_some_and(|r| r.landed);
                if !raced && (!hit || !may_be_stale) {
                    prop_assert_eq!(
                        got,
                        want,
                        "vCPU {} {:#x} {:?} ({} exit)",
                        cpu,
                        gva,
                        acc,
                        if hit { "no" } else { "after an" }
                    );
                }
            }
            Act::Store { gpa, value } => {
                s.store(gpa, value);
                last_write = seq;
            }
            Act::Invlpg { gva, slot } => {
                s.m.invlpg(gva);
                s.after_op(true);
                s.cpus[cpu].invlpg_at[slot] = seq;
            }
            Act::Flush => {
                s.m.flush_all();
                s.after_op(true);
                s.cpus[cpu].last_flush = seq;
            }
            Act::Cr3 { cr3, flush } => {
                s.load_cr3(cr3, flush);
                s.after_op(true);
                if flush {
                    s.cpus[cpu].last_flush = seq;
                }
            }
            Act::Race { gpa, value } => {
                if let Some(w) = racer.take() {
                    finish_race(&mut s, w);
                }
                let w = Access {
                    write: true,
                    ..Access::default()
                };
                if s.cpus[cpu].tlb.contains_key(&(gpa & !0xfff, kind(w))) {
                    s.m.arm_race(gpa, value);
                    racer = Some(cpu);
                } else {
                    s.store(gpa, value);
                }
                last_write = seq;
                continue;
            }
        }
        if let Some(w) = racer.take() {
            finish_race(&mut s, w);
            last_write = seq + 1;
        }
    }
    if let Some(w) = racer.take() {
        finish_race(&mut s, w);
    }
    let n = s.m.s.pool().unsync_count();
    let flagged = s.m.s.sps.iter().filter(|sp| sp.valid && sp.unsync).count();
    prop_assert_eq!(n, flagged);
    Ok(())
}

/// A racing store of vCPU `w` after the step it raced: landed, or made now (through its
/// TLB if that still holds the page writable, else through the pool).
fn finish_race(s: &mut Smp, w: usize) {
    let Some(r) = s.m.g.race.take() else {
        return;
    };
    if !r.landed {
        s.switch_to(w);
        s.store(r.gpa, r.value);
        return;
    }
    // Nothing wrote over it but a walk's accessed/dirty update, which the CPU makes
    // atomically on the entry it read (a locked compare-exchange).
    let now = s.m.g.read_entry(r.gpa, r.size).unwrap();
    assert_eq!(
        now & !(A | D),
        r.value & !(A | D),
        "vCPU {w}'s store to {:#x} was lost",
        r.gpa
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn vcpus_agree_with_the_reference(steps in proptest::collection::vec(step(MODE_LONG4), 1..150), emulate: bool) {
        run_smp(MODE_LONG4, 64, emulate, &steps)?;
    }

    #[test]
    fn vcpus_agree_in_a_tiny_pool(steps in proptest::collection::vec(step(MODE_LONG4), 1..150), emulate: bool) {
        run_smp(MODE_LONG4, 24, emulate, &steps)?;
    }

    #[test]
    fn vcpus_agree_under_32bit_paging(steps in proptest::collection::vec(step(MODE_BITS32), 1..150), emulate: bool) {
        run_smp(MODE_BITS32, 64, emulate, &steps)?;
    }

    #[test]
    fn vcpus_agree_under_pae_paging(steps in proptest::collection::vec(step(MODE_PAE), 1..150), emulate: bool) {
        run_smp(MODE_PAE, 64, emulate, &steps)?;
    }

    #[test]
    fn stores_racing_syncs_and_new_shadows_are_not_lost(steps in proptest::collection::vec(race_step(), 1..40), emulate: bool) {
        run_smp(MODE_LONG4, 64, emulate, &steps)?;
    }
}
