// SPDX-License-Identifier: GPL-2.0

//! A minimal KTAP v1 producer (Documentation/dev-tools/ktap.rst), kselftest style.

use std::io::Write;

/// A test's result: `Err` carries the reason it failed; a reason that starts with
/// [`SKIP`] marks the test skipped (it does not apply to this machine).
pub type Outcome = Result<(), String>;

/// Prefix of an `Err` reason that means "skipped".
pub const SKIP: &str = "SKIP: ";

type TestFn<C> = fn(&C) -> Outcome;

pub struct Suite<C> {
    name: &'static str,
    tests: Vec<(&'static str, TestFn<C>)>,
}

/// Prints a diagnostic line.
pub fn diag(msg: &str) {
    for line in msg.lines() {
        println!("# {line}");
    }
    let _ = std::io::stdout().flush();
}

impl<C> Suite<C> {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            tests: Vec::new(),
        }
    }

    pub fn add(&mut self, name: &'static str, f: TestFn<C>) {
        self.tests.push((name, f));
    }

    /// Keeps only the tests whose names `keep` accepts.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.tests.retain(|(n, _)| keep(n));
    }

    /// Runs every test, prints KTAP, returns the process exit status.
    pub fn run(self, ctx: &C) -> i32 {
        println!("KTAP version 1");
        println!("# suite: {}", self.name);
        println!("1..{}", self.tests.len());
        let (mut pass, mut fail, mut skip) = (0, 0, 0);
        for (i, (name, f)) in self.tests.iter().enumerate() {
            diag(&format!("running {name}"));
            match f(ctx) {
                Ok(()) => {
                    pass += 1;
                    println!("ok {} {name}", i + 1);
                }
                Err(why) if why.starts_with(SKIP) => {
                    skip += 1;
                    println!("ok {} {name} # SKIP {}", i + 1, &why[SKIP.len()..]);
                }
                Err(why) => {
                    fail += 1;
                    diag(&format!("{name}: {why}"));
                    println!("not ok {} {name}", i + 1);
                }
            }
            let _ = std::io::stdout().flush();
        }
        println!("# Totals: pass:{pass} fail:{fail} xfail:0 xpass:0 skip:{skip} error:0");
        i32::from(fail != 0)
    }
}
